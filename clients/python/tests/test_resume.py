"""Resume equivalence: training interrupted after k steps and resumed from a downloaded checkpoint
(into a new session) ends bit for bit where the uninterrupted run ends; restarting from the weights
alone (fresh optimizer state) does not."""

import json
import os
import shutil
import tempfile
import unittest

import torch
from torch import nn

from _common import HYPER, STEPS, ServiceTestCase, differs, make_model, torch_run, train, unique

K = 40


class ResumeFromCheckpoint(ServiceTestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="asgd-client-resume-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.want, _ = torch_run()  # uninterrupted: STEPS steps of torch.optim.ASGD

    def _interrupted_run(self, transport="json"):
        """K steps on the service; the 'process' then ends: only the session remains."""
        model = make_model()
        opt = self.remote(model.named_parameters(), transport=transport)
        train(model, opt, range(K))
        opt.close()
        return opt.session

    def _assert_weights_only_restart_differs(self, weights):
        model = make_model(9)
        model.load_state_dict(weights)
        opt = self.remote(model.named_parameters(), transport="json")  # new session, fresh ASGD state
        train(model, opt, range(K, STEPS))
        self.assertTrue(differs(model, self.want), "a weights-only restart should not end where the uninterrupted run ends")
        # It is the optimizer state that matters: torch does the same thing locally.
        local = make_model(9)
        local.load_state_dict(weights)
        train(local, torch.optim.ASGD(local.parameters(), **HYPER), range(K, STEPS))
        self.assertParamsIdentical(model, local)

    def test_resume_from_torch_save_checkpoint_via_upload(self):
        from asgd_client import create_session_from_model, download_checkpoint, upload_checkpoint

        session = self._interrupted_run()
        path = download_checkpoint(self.url, session, os.path.join(self.tmp, "ckpt.pt"), token=self.token)
        ckpt = torch.load(path)
        self.assertEqual(set(ckpt), {"model", "optimizer", "step"})
        self.assertEqual(ckpt["step"], K)
        # A new process: another initialisation, a new session, the checkpoint uploaded into it.
        model = make_model(7)
        name = unique("resumed-upload")
        create_session_from_model(model, self.url, name, token=self.token, **HYPER)
        info = upload_checkpoint(self.url, name, path, token=self.token)
        self.assertEqual(info["step"], K)
        opt = self.remote(model.named_parameters(), session=name, create=False, transport="json")  # pulls the parameters
        train(model, opt, range(K, STEPS))
        self.assertParamsIdentical(model, self.want, "resumed from checkpoint:")
        self._assert_weights_only_restart_differs(ckpt["model"])

    def test_a_checkpoint_saved_as_pytorchs_tutorial_saves_it_uploads_and_resumes(self):
        # torch.save({"epoch", "model_state_dict", "optimizer_state_dict", "loss"}) of a local run: no "step"
        # (the session counts it from the optimizer state), the tutorial's key names.
        from asgd_client import Client, create_session_from_model

        local, local_opt = torch_run(K)
        path = os.path.join(self.tmp, "tutorial.pt")
        torch.save({"epoch": 3, "model_state_dict": local.state_dict(), "optimizer_state_dict": local_opt.state_dict(), "loss": 0.25}, path)
        model = make_model(7)
        name = unique("tutorial-upload")
        create_session_from_model(model, self.url, name, token=self.token, **HYPER)
        client = Client(self.url, token=self.token)
        with open(path, "rb") as f:
            info = client.put_checkpoint(name, f.read())
        self.assertEqual(info["step"], K)
        opt = self.remote(model.named_parameters(), session=name, create=False, transport="json")
        train(model, opt, range(K, STEPS))
        self.assertParamsIdentical(model, self.want, "resumed from the tutorial's checkpoint:")
        # Both spellings of a key in one file is refused, naming it; the session is unchanged.
        both = {"model": local.state_dict(), "model_state_dict": local.state_dict(), "optimizer": local_opt.state_dict()}
        before = client.get_session(name)["version"]
        with self.assertRaisesRegex(Exception, "model_state_dict"):
            client.put_checkpoint(name, both)
        self.assertEqual(client.get_session(name)["version"], before)

    def test_the_tutorials_checkpoint_of_a_model_with_buffers_uploads(self):
        # Found by a review: model.state_dict() holds the buffers too (BatchNorm's running_mean, running_var and
        # int64 num_batches_tracked; a registered positional encoding), and every such checkpoint was refused
        # (INVALID_TENSOR for the int64 one, UNKNOWN_PARAMETER "model.pe" for the float one).
        from asgd_client import Client, RemoteASGD

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 3)
                self.bn = nn.BatchNorm1d(3)
                self.register_buffer("pe", torch.arange(4.0))

            def forward(self, x):
                return self.bn(self.fc(x + self.pe))

        torch.manual_seed(3)
        local = Net()
        local_opt = torch.optim.ASGD(local.parameters(), **HYPER)
        for k in range(3):
            local_opt.zero_grad()
            local(torch.randn(8, 4)).pow(2).mean().backward()
            local_opt.step()
        path = os.path.join(self.tmp, "bn.pt")
        torch.save({"epoch": 3, "model_state_dict": local.state_dict(), "optimizer_state_dict": local_opt.state_dict(), "loss": 0.5}, path)

        torch.manual_seed(4)
        model = Net()
        name = unique("buffers")
        opt = RemoteASGD(model.named_parameters(), url=self.url, token=self.token, session=name, **HYPER)
        self.addCleanup(opt.close)
        client = Client(self.url, token=self.token)
        with open(path, "rb") as f:
            info = client.put_checkpoint(name, f.read())
        self.assertEqual(info["step"], 3)
        params, _ = client.get_params(name)
        for pname, p in local.named_parameters():
            self.assertTrue(torch.equal(params[pname], p.detach()), pname)
        sd = client.get_state_dict(name)
        want = local_opt.state_dict()
        for i in range(len(want["state"])):
            for key in ("ax", "eta", "mu", "step"):
                self.assertTrue(torch.equal(torch.as_tensor(sd["state"][i][key]).reshape(-1), torch.as_tensor(want["state"][i][key]).reshape(-1)), (i, key))
        # With a parameter missing nothing is left out: refused, naming the key as the file has it.
        broken = {k: v for k, v in local.state_dict().items() if k != "fc.bias"}
        before = client.get_session(name)["version"]
        with self.assertRaisesRegex(Exception, r"model_state_dict\."):
            client.put_checkpoint(name, {"model_state_dict": broken, "optimizer_state_dict": local_opt.state_dict()})
        self.assertEqual(client.get_session(name)["version"], before)

    def test_resume_from_torch_save_checkpoint_via_torch_load(self):
        from asgd_client import download_checkpoint

        session = self._interrupted_run()
        path = download_checkpoint(self.url, session, os.path.join(self.tmp, "ckpt.pt"), token=self.token)
        ckpt = torch.load(path)
        model = make_model(7)
        model.load_state_dict(ckpt["model"])
        opt = self.remote(model.named_parameters(), transport="json")
        opt.load_state_dict(ckpt["optimizer"])
        train(model, opt, range(K, STEPS))
        self.assertParamsIdentical(model, self.want, "resumed from checkpoint:")
        # The same file resumes plain torch.optim.ASGD too.
        local = make_model(8)
        local.load_state_dict(ckpt["model"])
        torch_opt = torch.optim.ASGD(local.parameters(), **HYPER)
        torch_opt.load_state_dict(ckpt["optimizer"])
        train(local, torch_opt, range(K, STEPS))
        self.assertParamsIdentical(local, self.want)

    def test_resume_from_json_checkpoint(self):
        from asgd_client import download_checkpoint
        from asgd_client.tensors import state_dict_from_json, tensor_from_json

        session = self._interrupted_run()
        path = download_checkpoint(self.url, session, os.path.join(self.tmp, "ckpt.json"), token=self.token, format="json")
        with open(path) as f:
            ckpt = json.load(f)
        self.assertEqual(ckpt["step"], K)
        weights = {n: tensor_from_json(t) for n, t in ckpt["model"].items()}
        model = make_model(7)
        model.load_state_dict(weights)
        opt = self.remote(model.named_parameters(), transport="json")
        opt.load_state_dict(state_dict_from_json(ckpt["optimizer"]))
        train(model, opt, range(K, STEPS))
        self.assertParamsIdentical(model, self.want, "resumed from JSON checkpoint:")
        self._assert_weights_only_restart_differs(weights)

    def test_upload_json_checkpoint(self):
        from asgd_client import create_session_from_model, download_checkpoint, upload_checkpoint

        session = self._interrupted_run()
        path = download_checkpoint(self.url, session, os.path.join(self.tmp, "ckpt.json"), token=self.token, format="json")
        model = make_model(7)
        name = unique("resumed-json-upload")
        create_session_from_model(model, self.url, name, token=self.token, **HYPER)
        upload_checkpoint(self.url, name, path, token=self.token)
        opt = self.remote(model.named_parameters(), session=name, create=False, transport="json")
        train(model, opt, range(K, STEPS))
        self.assertParamsIdentical(model, self.want, "resumed from uploaded JSON checkpoint:")

    def test_resume_from_a_snapshot_by_fork_and_restore(self):
        model = make_model()
        opt = self.remote(model.named_parameters(), transport="json")
        train(model, opt, range(K))
        snap = opt.snapshot(pinned=True)
        self.assertEqual(snap["step"], K)
        train(model, opt, range(K, STEPS))
        self.assertParamsIdentical(model, self.want)
        # A fork from the snapshot continues as the original did.
        fork_name = unique("fork")
        forked = opt.client.fork(opt.session, fork_name, snapshot=snap["id"])
        self.assertEqual(forked["step"], K)
        other = make_model(4)
        fopt = self.remote(other.named_parameters(), session=fork_name, create=False, transport="json")
        train(other, fopt, range(K, STEPS))
        self.assertParamsIdentical(other, self.want, "fork:")
        # Rolling the original back and replaying gives the same end again.
        opt.restore(snap["id"])
        self.assertEqual(opt.step_count, K)
        train(model, opt, range(K, STEPS))
        self.assertParamsIdentical(model, self.want, "restore:")


if __name__ == "__main__":
    unittest.main()


class CheckpointAfterSchedulerStep(ServiceTestCase):
    """The epoch-end order: the epoch's steps, scheduler.step(), then a checkpoint or snapshot. The new lr is
    in param_groups but no step has carried it yet: download_checkpoint() and snapshot() send it first
    (PATCH param_groups), so the file and the snapshot hold it, and a resume from them is exact."""

    def _epoch(self, model, opt, steps):
        train(model, opt, steps)

    def test_checkpoint_and_snapshot_after_scheduler_step_hold_the_new_lr(self):
        from asgd_client import download_checkpoint  # noqa: F401  (the method is what is tested)

        tmp = tempfile.mkdtemp(prefix="asgd-client-sched-")
        self.addCleanup(shutil.rmtree, tmp, True)
        # uninterrupted, locally: two epochs of 20 steps, StepLR(gamma=0.1) after the first
        ref = make_model()
        local = torch.optim.ASGD(ref.parameters(), **HYPER)
        sched = torch.optim.lr_scheduler.StepLR(local, step_size=1, gamma=0.1)
        self._epoch(ref, local, range(20))
        sched.step()
        self._epoch(ref, local, range(20, 40))

        model = make_model()
        opt = self.remote(model.named_parameters(), transport="json")
        remote_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
        self._epoch(model, opt, range(20))
        remote_sched.step()
        path = opt.download_checkpoint(os.path.join(tmp, "epoch1.pt"))
        ckpt = torch.load(path)
        self.assertEqual(ckpt["optimizer"]["param_groups"][0]["lr"], opt.param_groups[0]["lr"])
        snap = opt.snapshot()
        self.assertEqual(opt.client.get_session(opt.session)["param_groups"][0]["lr"], opt.param_groups[0]["lr"])

        # resumed locally from the file: ends where the uninterrupted run ends
        resumed = make_model(9)
        resumed.load_state_dict(ckpt["model"])
        resumed_opt = torch.optim.ASGD(resumed.parameters(), **HYPER)
        resumed_opt.load_state_dict(ckpt["optimizer"])
        self._epoch(resumed, resumed_opt, range(20, 40))
        self.assertParamsIdentical(resumed, ref, "resumed from the checkpoint:")

        # and the remote run goes on with the new lr, after a restore of the snapshot too
        self._epoch(model, opt, range(20, 25))
        opt.restore(snap["id"])
        self.assertEqual(opt.param_groups[0]["lr"], local.param_groups[0]["lr"])
        self._epoch(model, opt, range(20, 40))
        self.assertParamsIdentical(model, ref, "restored from the snapshot:")


class JoinKeepsKinds(ServiceTestCase):
    def test_a_worker_joining_a_session_holds_its_hyperparameters_in_their_python_kinds(self):
        # A PyTorch user's review: the creator had t0=4, a worker joining (or joining a fork) had 4.0, and
        # session_hyperparameters said weight_decay 0.0; torch.optim.ASGD(t0=4) keeps the int.
        model = make_model()
        name = unique("kinds")
        creator = self.remote(model.named_parameters(), session=name, lr=0.05, t0=4, lambd=1e-3, weight_decay=0)
        joiner = self.remote(make_model(3).named_parameters(), session=name, create=False)
        local = torch.optim.ASGD(make_model().parameters(), lr=0.05, t0=4, lambd=1e-3)
        for opt in (creator, joiner):
            group = opt.param_groups[0]
            self.assertEqual([(k, repr(group[k])) for k in ("lr", "lambd", "alpha", "t0", "weight_decay")],
                             [(k, repr(local.param_groups[0][k])) for k in ("lr", "lambd", "alpha", "t0", "weight_decay")])
            self.assertEqual(repr(opt.session_hyperparameters[0]["t0"]), "4")
            self.assertEqual(repr(opt.session_hyperparameters[0]["weight_decay"]), "0")
            self.assertEqual(repr(opt.state_dict()["param_groups"][0]["t0"]), "4")
        # A float t0 of a whole value stays a float.
        other = unique("kinds-float")
        self.remote(make_model().named_parameters(), session=other, t0=4.0)
        joined = self.remote(make_model().named_parameters(), session=other, create=False)
        self.assertEqual(repr(joined.param_groups[0]["t0"]), "4.0")


class LoadInASharedSession(ServiceTestCase):
    """A worker restored from its own older checkpoint in a session others train takes the whole session back
    (Optimizer.load_state_dict on the session): said in a warning, found by a review as a PyTorch user."""

    def test_a_load_that_takes_the_session_back_is_warned_about(self):
        name = unique("rewind")
        model_a, model_b = make_model(), make_model()
        a = self.remote(model_a.named_parameters(), session=name)
        b = self.remote(model_b.named_parameters(), session=name)
        train(model_b, b, range(2))
        saved = b.state_dict()
        train(model_a, a, range(2, 7))
        a.synchronize()
        self.assertEqual(a.step_count, 7)
        restarted = self.remote(make_model().named_parameters(), session=name)
        with self.assertLogs("asgd_client", "WARNING") as logs:
            restarted.load_state_dict(saved)
        self.assertTrue(any(f"took session {name!r} back from step 7 to step 2, for every worker" in line for line in logs.output), logs.output)
        # A load that takes nothing back (the session's own state) says nothing.
        with self.assertNoLogs("asgd_client", "WARNING"):
            restarted.load_state_dict(restarted.state_dict())
        for opt in (a, b, restarted):
            opt.close()
