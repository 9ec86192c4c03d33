"""LR schedulers over RemoteASGD: bit for bit what torch.optim.ASGD does with the same scheduler, with
one request per step (the hyperparameters travel with the step: no extra request, version or snapshot)."""

import threading
import unittest

import torch
from torch import nn

from _common import HYPER, ServiceTestCase, StepCounter, batch, for_torch, make_model, train, unique

STEPS = 120

SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=15, gamma=0.5),
    # ASGD has no momentum: OneCycleLR must not cycle it.
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS, cycle_momentum=False),
    "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2),
    "ExponentialLR": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.98),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.05 * k)),
}


def loop(model, opt, sched, steps):
    """The ordinary loop; ReduceLROnPlateau is stepped with the loss. Returns the lrs used."""
    lrs = []
    for i in steps:
        X, y = batch(i)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), y)
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(loss.item())
        else:
            sched.step()
    return lrs


class SchedulersMatchTorch(ServiceTestCase):
    def setUp(self):
        self.requireStepParams()

    def check(self, kind, transport="safetensors"):
        ref = make_model()
        torch_opt = torch.optim.ASGD(for_torch(ref.named_parameters()), **HYPER)
        want_lrs = loop(ref, torch_opt, SCHEDULERS[kind](torch_opt), range(STEPS))
        self.assertGreater(len(set(want_lrs)), 1, f"{kind} never changed the lr: the test would prove nothing")

        counter = StepCounter(self, self.url, self.token)
        model = make_model()
        opt = self.remote(model.named_parameters(), transport=transport, connection=counter.conn)
        sched = SCHEDULERS[kind](opt)
        v0 = opt.version
        mark = counter.mark()
        got_lrs = loop(model, opt, sched, range(STEPS))
        requests = counter.since(mark)

        self.assertEqual(got_lrs, want_lrs)
        self.assertEqual(requests, ["POST step"] * STEPS, "one request per step, nothing else")
        self.assertParamsIdentical(model, ref, kind)
        info = opt.client.get_session(opt.session)
        self.assertEqual(info["version"] - v0, STEPS, "hyperparameter changes make no versions of their own")
        self.assertEqual(info["param_groups"][0]["lr"], want_lrs[-1])
        self.assertStateDictEqual(opt.state_dict(), torch_opt.state_dict())  # incl. the scheduler's initial_lr

    def test_step_lr(self):
        self.check("StepLR")

    def test_a_downloaded_checkpoint_resumes_a_scheduler_as_torch_save_of_state_dict_does(self):
        # Found by a review: the file lacked the scheduler's initial_lr, and StepLR(..., last_epoch=) raised KeyError.
        import os
        import tempfile

        ref = make_model()
        torch_opt = torch.optim.ASGD(for_torch(ref.named_parameters()), **HYPER)
        ref_sched = torch.optim.lr_scheduler.StepLR(torch_opt, step_size=4, gamma=0.5)
        model = make_model()
        opt = self.remote(model.named_parameters())
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        loop(ref, torch_opt, ref_sched, range(10))
        loop(model, opt, sched, range(10))
        for fmt in ("pt", "json"):
            with self.subTest(fmt), tempfile.TemporaryDirectory() as d:
                path = opt.download_checkpoint(os.path.join(d, f"ck.{fmt}"), format=fmt)
                if fmt == "pt":
                    ck = torch.load(path)
                else:
                    import json

                    with open(path) as f:
                        ck = json.load(f)
                group = ck["optimizer"]["param_groups"][0]
                self.assertEqual(group["initial_lr"], HYPER["lr"])
                self.assertEqual(group["lr"], torch_opt.param_groups[0]["lr"], "the session's lr, not the first one")
        # Resumed locally from the file: the scheduler takes last_epoch and goes on as the reference does.
        resumed = make_model()
        local = torch.optim.ASGD(resumed.parameters(), **HYPER)
        with tempfile.TemporaryDirectory() as d:
            ck = torch.load(opt.download_checkpoint(os.path.join(d, "ck.pt")))
        resumed.load_state_dict(ck["model"])
        local.load_state_dict(ck["optimizer"])
        local_sched = torch.optim.lr_scheduler.StepLR(local, step_size=4, gamma=0.5, last_epoch=ck["step"] - 1)
        self.assertEqual(loop(resumed, local, local_sched, range(10, 20)), loop(ref, torch_opt, ref_sched, range(10, 20)))
        self.assertParamsIdentical(resumed, ref, "resumed from the checkpoint")

    def test_one_cycle_lr(self):
        self.check("OneCycleLR")

    def test_reduce_lr_on_plateau(self):
        self.check("ReduceLROnPlateau")

    def test_exponential_cosine_and_lambda_lr(self):
        for kind in ("ExponentialLR", "CosineAnnealingLR", "LambdaLR"):
            with self.subTest(kind):
                self.check(kind)

    def test_step_lr_over_json(self):
        self.check("StepLR", transport="json")

    def test_hyperparameters_of_several_groups(self):
        def groups(m):
            named = list(m.named_parameters())
            return [{"params": named[:2]}, {"params": named[2:], "lr": 0.02}]

        ref = make_model()
        torch_opt = torch.optim.ASGD(for_torch(groups(ref)), **HYPER)
        model = make_model()
        opt = self.remote(groups(model))
        for o, m in ((torch_opt, ref), (opt, model)):
            for i in range(40):
                if i == 10:
                    o.param_groups[1]["weight_decay"] = 0.0
                    o.param_groups[0]["t0"] = 3.0
                if i == 25:
                    o.param_groups[0]["lambd"] = 1e-3
                    o.param_groups[1]["alpha"] = 0.5
                X, y = batch(i)
                o.zero_grad()
                nn.functional.mse_loss(m(X), y).backward()
                o.step()
        self.assertParamsIdentical(model, ref)
        self.assertStateDictEqual(opt.state_dict(), torch_opt.state_dict())

    def test_a_refused_hyperparameter_names_the_field_and_changes_nothing(self):
        from asgd_client import ServiceError

        model = make_model()
        opt = self.remote(model.named_parameters())
        before = opt.client.get_session(opt.session)
        opt.param_groups[0]["lr"] = -1.0
        model(batch(0)[0]).sum().backward()
        with self.assertRaises(ServiceError) as caught:
            opt.step()
        self.assertEqual(caught.exception.status, 400)
        self.assertIn("param_groups[0].lr", caught.exception.message)
        after = opt.client.get_session(opt.session)
        self.assertEqual((after["version"], after["step"]), (before["version"], before["step"]))


class WorkersWithTheirOwnSchedulers(ServiceTestCase):
    def test_two_workers_each_with_a_scheduler_run_200_steps(self):
        self.requireStepParams()
        name = unique("two-schedulers")
        barrier = threading.Barrier(2)
        errors, opts = [], []

        def worker(rank):
            try:
                from asgd_client import RemoteASGD

                model = make_model(rank)
                barrier.wait()  # both create at once: one creates, the other joins
                opt = RemoteASGD(model.named_parameters(), url=self.url, token=self.token, session=name, **HYPER)
                opts.append(opt)
                sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.995)
                loop(model, opt, sched, range(rank, 400, 2))
            except BaseException as err:  # reported by the main thread
                errors.append(err)

        with self.assertLogs("asgd_client", "INFO") as logs:
            threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
        for opt in opts:
            self.addCleanup(opt.close)
        self.assertEqual(errors, [])
        self.assertEqual(opts[0].client.get_session(name)["step"], 400)
        # One created it, the other joined (a late joiner may also be warned that the scheduler already moved
        # the session's lr: that line is neither).
        joined = [line for line in logs.output if f"session '{name}' created at" in line or f"session '{name}' joined at" in line]
        self.assertEqual(sorted("created" in line for line in joined), [False, True], joined)


if __name__ == "__main__":
    unittest.main()


class EachWorkersHyperparametersAreItsOwn(ServiceTestCase):
    """A worker's param_groups hold its own values (set at construction, by its scheduler or code, by its
    load_state_dict): it sends them when they changed since its last step, and never takes other workers'
    values from the session's answers (a chainable scheduler would multiply them a second time)."""

    def _two(self, pipeline: bool):
        a_model, b_model = make_model(), make_model()
        a = self.remote(a_model.named_parameters(), pipeline=pipeline)
        b = self.remote(b_model.named_parameters(), session=a.session, create=False, pipeline=pipeline)
        return a_model, a, b_model, b

    def session_lr(self, opt):
        return opt.client.get_session(opt.session)["param_groups"][0]["lr"]

    def check(self, pipeline: bool) -> None:
        a_model, a, b_model, b = self._two(pipeline)
        start = b.param_groups[0]["lr"]
        train(a_model, a, range(2))
        a.param_groups[0]["lr"] = start / 1000  # the schedule, on worker a only
        train(a_model, a, range(2, 4))
        a.synchronize()
        train(b_model, b, range(4, 6))
        b.synchronize()
        # b keeps its own value and does not send it back: the session steps with a's.
        self.assertEqual(b.param_groups[0]["lr"], start)
        self.assertEqual(b.state_dict()["param_groups"][0]["lr"], start)
        self.assertEqual(b.session_hyperparameters[0]["lr"], start / 1000)
        self.assertEqual(self.session_lr(b), start / 1000)
        # A change made on b travels with b's next step; a's unchanged value is not sent back by a's steps.
        b.param_groups[0]["lr"] = start / 10
        train(b_model, b, range(6, 7))
        b.synchronize()
        self.assertEqual(b.param_groups[0]["lr"], start / 10)
        self.assertEqual(self.session_lr(b), start / 10)
        train(a_model, a, range(7, 9))
        a.synchronize()
        self.assertEqual(a.param_groups[0]["lr"], start / 1000)
        self.assertEqual(self.session_lr(a), start / 10)
        self.assertEqual(a.session_hyperparameters[0]["lr"], start / 10)

    def test_a_worker_without_the_scheduler_keeps_its_own_lr_and_does_not_send_it(self):
        self.check(pipeline=False)

    def test_the_sessions_values_read_as_floats(self):
        # The session's answers write 1.0 as 1: session_hyperparameters said lr 1 and t0 1000000 (ints, as
        # the session does not hold them), which a load_state_dict of them would have sent as ints.
        a_model, a, b_model, b = self._two(False)
        b.client.set_hyperparameters(b.session, [{"lr": 1.0}])
        train(a_model, a, range(1))
        a.synchronize()
        held = a.session_hyperparameters[0]
        self.assertEqual((type(held["lr"]), held["lr"]), (float, 1.0))
        self.assertEqual((type(held["t0"]), held["t0"]), (float, float(a.param_groups[0]["t0"])))

    def test_a_pipelined_worker_without_the_scheduler_keeps_its_own_lr(self):
        self.check(pipeline=True)

    def check_chainable(self, make_sched, pipeline: bool, want_lr: float) -> None:
        """The review's case: worker A steps twice as often as B, each runs the same chainable scheduler;
        the decay must be applied once, not once per worker."""
        a_model, b_model = make_model(0), make_model(1)
        a = self.remote(a_model.named_parameters(), pipeline=pipeline, lr=0.05)
        b = self.remote(b_model.named_parameters(), session=a.session, pipeline=pipeline, lr=0.05)
        A, B = (a_model, a, make_sched(a)), (b_model, b, make_sched(b))
        counter = [0]

        def step(w):
            model, opt, sched = w
            opt.zero_grad()
            X, y = batch(counter[0])
            counter[0] += 1
            nn.functional.mse_loss(model(X), y).backward()
            opt.step()
            sched.step()

        for _ in range(10):
            step(A)
            step(A)
            step(B)
        for _ in range(3):
            step(B)  # B reaches its own milestone
        step(A)
        A[1].synchronize()
        B[1].synchronize()
        self.assertEqual(self.session_lr(A[1]), want_lr)
        self.assertEqual(A[1].param_groups[0]["lr"], want_lr)
        self.assertEqual(B[1].param_groups[0]["lr"], want_lr)

    def test_two_workers_with_multistep_lr_decay_once(self):
        sched = lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[10], gamma=0.1)  # noqa: E731
        self.check_chainable(sched, pipeline=False, want_lr=0.05 * 0.1)

    def test_two_pipelined_workers_with_multistep_lr_decay_once(self):
        sched = lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[10], gamma=0.1)  # noqa: E731
        self.check_chainable(sched, pipeline=True, want_lr=0.05 * 0.1)
