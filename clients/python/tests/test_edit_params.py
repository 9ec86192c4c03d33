"""Editing the model's parameters between steps (model.load_state_dict, clamp_, masks) works as with
torch.optim.ASGD: the next step applies to the edited weights, the optimizer state is untouched."""

import logging
import unittest

import torch
from torch import nn

from _common import HYPER, STEPS, ServiceTestCase, batch, for_torch, make_model, torch_run, train


def clip(model: nn.Module, c: float = 0.25) -> None:
    """WGAN's weight clipping, as its training loop writes it."""
    for p in model.parameters():
        p.data.clamp_(-c, c)


def train_clipped(model: nn.Module, opt, steps: range) -> None:
    for i in steps:
        X, y = batch(i)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(X), y).backward()
        opt.step()
        clip(model)


class EditsReachTheSession(ServiceTestCase):
    def assertStateBitsEqual(self, got, want):
        """The state_dicts hold the same bits (-0.0 is not 0.0) with the same dtypes and Python types."""
        self.assertStateDictEqual(got, want)
        for i, w in want["state"].items():
            for k, wv in w.items():
                self.assertTrue(torch.equal(got["state"][i][k].view(torch.int32), wv.view(torch.int32)), f"state[{i}][{k}] bits")
        for g, w in zip(got["param_groups"], want["param_groups"]):
            self.assertEqual({k: type(v) for k, v in g.items()}, {k: type(v) for k, v in w.items()})

    def test_resume_order_model_loaded_after_the_optimizer_is_built(self):
        # The usual resume: build model, build optimizer, then load both state_dicts; continue. The run
        # ends bit for bit where the uninterrupted local run ends.
        k = 40
        want, want_opt = torch_run()
        ref, ref_opt = torch_run(steps=k)
        ckpt = {"model": ref.state_dict(), "optimizer": ref_opt.state_dict()}
        for pipeline in (False, True):
            with self.subTest(pipeline=pipeline):
                model = make_model(seed=123)  # a fresh init the checkpoint replaces
                opt = self.remote(model.named_parameters(), pipeline=pipeline,
                                  session=f"resume-order-{int(pipeline)}-{self.id()[-6:]}")
                model.load_state_dict(ckpt["model"])
                opt.load_state_dict(ckpt["optimizer"])
                if not pipeline:
                    train(model, opt, range(k, STEPS))
                    self.assertParamsIdentical(model, want)
                    self.assertStateBitsEqual(opt.state_dict(), want_opt.state_dict())
                else:
                    # Pipelined steps lag by one step; the first step after the resume does not.
                    local, local_opt = make_model(), None
                    local.load_state_dict(ckpt["model"])
                    local_opt = torch.optim.ASGD(for_torch(local.named_parameters()), **HYPER)
                    local_opt.load_state_dict(ckpt["optimizer"])
                    train(local, local_opt, range(k, k + 1))
                    train(model, opt, range(k, k + 1))
                    opt.synchronize()
                    self.assertParamsIdentical(model, local)
                    self.assertStateBitsEqual(opt.state_dict(), local_opt.state_dict())

    def test_model_loaded_before_the_first_step_without_load_state_dict(self):
        # Only the weights change (e.g. pretrained weights loaded after building the optimizer): the
        # first step applies to them, the optimizer state starts fresh as torch's does.
        pretrained, _ = torch_run(steps=30, seed=5)
        want = make_model()
        want.load_state_dict(pretrained.state_dict())
        want_opt = torch.optim.ASGD(for_torch(want.named_parameters()), **HYPER)
        train(want, want_opt, range(20))
        model = make_model()
        opt = self.remote(model.named_parameters())
        model.load_state_dict(pretrained.state_dict())
        with self.assertLogs("asgd_client", logging.INFO) as logs:
            train(model, opt, range(20))
        self.assertEqual(sum("changed outside the optimizer" in line for line in logs.output), 1, logs.output)
        self.assertParamsIdentical(model, want)
        self.assertStateBitsEqual(opt.state_dict(), want_opt.state_dict())

    def test_weight_clipping_after_every_step_matches_torch(self):
        steps = range(60)
        want = make_model()
        want_opt = torch.optim.ASGD(for_torch(want.named_parameters()), **HYPER)
        train_clipped(want, want_opt, steps)
        model = make_model()
        opt = self.remote(model.named_parameters())
        train_clipped(model, opt, steps)
        self.assertParamsIdentical(model, want)
        self.assertStateBitsEqual(opt.state_dict(), want_opt.state_dict())
        # The clipping bit: the run clipped something, and the session holds the model's clipped weights.
        self.assertTrue(any(p.abs().max().item() == 0.25 for p in want.parameters()))
        opt.synchronize()
        tensors, _ = opt.client.get_params(opt.session)
        for n, p in model.named_parameters():
            self.assertTrue(torch.equal(tensors[n], p.detach()), n)

    def test_edit_while_a_pipelined_step_is_in_flight(self):
        # Documented semantics: the elements changed while a step was in flight keep their new values over
        # that step's result; the other elements take the result; the next step applies to the merged weights.
        model = make_model()
        opt = self.remote(model.named_parameters(), pipeline=True)
        local = make_model()
        local_opt = torch.optim.ASGD(for_torch(local.named_parameters()), **HYPER)
        X, y = batch(0)
        for m, o in ((model, opt), (local, local_opt)):
            o.zero_grad(set_to_none=True)
            nn.functional.mse_loss(m(X), y).backward()
            o.step()
        # The step is in flight for the remote model (which still holds the weights from before it).
        weight = model[0].weight
        with torch.no_grad():
            weight[0].fill_(0.5)
            local[0].weight[0].fill_(0.5)
        opt.zero_grad(set_to_none=True)  # loads the answer if it has come: must not undo the edit
        opt.synchronize()
        self.assertParamsIdentical(model, local)
        X, y = batch(1)
        for m, o in ((model, opt), (local, local_opt)):
            o.zero_grad(set_to_none=True)
            nn.functional.mse_loss(m(X), y).backward()
            o.step()
        opt.synchronize()
        self.assertParamsIdentical(model, local)
        self.assertStateBitsEqual(opt.state_dict(), local_opt.state_dict())

    def test_push_params_sends_the_weights_and_keeps_the_optimizer_state(self):
        model = make_model()
        opt = self.remote(model.named_parameters())
        train(model, opt, range(15))
        before = opt.state_dict()
        version = opt.version
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        self.assertEqual(opt.push_params(), version + 1)
        tensors, at = opt.client.get_params(opt.session)
        self.assertEqual(at, version + 1)
        for n, p in model.named_parameters():
            self.assertTrue(torch.equal(tensors[n], p.detach()), n)
        self.assertStateBitsEqual(opt.state_dict(), before)
        self.assertEqual(opt.step_count, 15)

    def test_another_workers_steps_are_kept_where_the_edit_changed_nothing(self):
        # A push at an old version (another worker stepped in between) sends the edited elements over the
        # session's current parameters, not this worker's stale copy.
        model = make_model()
        opt = self.remote(model.named_parameters())
        other_model = make_model()
        other = self.remote(other_model.named_parameters(), session=opt.session, create=False)
        train(other_model, other, range(3))
        with torch.no_grad():
            model[0].bias[0] = 0.75
        opt.synchronize()
        tensors, _ = opt.client.get_params(opt.session)
        self.assertEqual(tensors["0.bias"][0].item(), 0.75)
        for n, p in other_model.named_parameters():
            want = p.detach().clone()
            if n == "0.bias":
                want[0] = 0.75
            self.assertTrue(torch.equal(tensors[n], want), n)
            self.assertTrue(torch.equal(dict(model.named_parameters())[n].detach(), want), n)


class SignedZeros(ServiceTestCase):
    def test_a_parameter_at_negative_zero_keeps_its_sign_in_both_transports(self):
        # Found by a review: JSON answers wrote -0.0 as 0, so with transport="json" the model's -0.0 became
        # +0.0 after a step that left it where it was (torch keeps -0.0).
        self.requireStepParams()
        for transport in ("json", "safetensors"):
            with self.subTest(transport=transport):
                p = nn.Parameter(torch.tensor([-0.0, 1.0, -0.0]))
                ref = nn.Parameter(p.detach().clone())
                opt = self.remote([("p", p)], lr=0.0, transport=transport)
                torch_opt = torch.optim.ASGD([ref], lr=0.0)
                for q, o in ((p, opt), (ref, torch_opt)):
                    q.grad = torch.zeros(3)
                    o.step()
                opt.synchronize()
                self.assertEqual(torch.signbit(p.detach()).tolist(), [True, False, True])
                self.assertTrue(torch.equal(torch.signbit(p.detach()), torch.signbit(ref.detach())))
                tensors, _ = opt.client.get_params(opt.session)
                self.assertEqual(torch.signbit(tensors["p"]).tolist(), [True, False, True])


class StateDictTravelsAsTorchSave(ServiceTestCase):
    def test_state_dict_and_load_state_dict_do_not_use_json(self):
        # JSON answers stop at 16M numbers and JSON bodies at 256 MiB: the optimizer's own state_dict
        # round trip must not depend on them. Every request is recorded.
        model = make_model()
        opt = self.remote(model.named_parameters(), transport="json")
        train(model, opt, range(12))
        json_form = opt.client.get_state_dict(opt.session, format="json")
        seen = []
        request = opt.client.conn.request

        def spy(method, path, **kw):
            seen.append((method, path, (kw.get("query") or {}).get("format"), kw.get("content_type"), "json_body" in kw))
            return request(method, path, **kw)

        opt.client.conn.request = spy
        sd = opt.state_dict()
        opt.load_state_dict(sd)
        opt.client.conn.request = request
        sd_calls = [s for s in seen if s[1].endswith("/state_dict")]
        self.assertEqual([(m, f, json_body) for m, _, f, _, json_body in sd_calls], [("GET", "pt", False), ("PUT", None, False)])
        self.assertEqual(sd_calls[1][3], "application/octet-stream")
        # The same structure, values and types as the JSON form gave (and torch's state_dict has).
        self.assertEqual(list(sd), ["state", "param_groups"])
        self.assertEqual(list(sd["state"]), list(json_form["state"]))
        for i, entry in json_form["state"].items():
            self.assertEqual(list(sd["state"][i]), list(entry))
            for k, v in entry.items():
                self.assertEqual(sd["state"][i][k].dtype, v.dtype)
                self.assertTrue(torch.equal(sd["state"][i][k].view(torch.int32), v.view(torch.int32)), (i, k))
        local = torch.optim.ASGD(for_torch(make_model().named_parameters()), **HYPER)
        for g, local_group in zip(sd["param_groups"], local.state_dict()["param_groups"]):
            self.assertEqual(list(g), list(local_group))
            self.assertEqual({k: type(v) for k, v in g.items()}, {k: type(v) for k, v in local_group.items()})
        self.assertEqual(opt.state_dict()["param_groups"], sd["param_groups"])
        back = opt.client.get_state_dict(opt.session, format="json")
        for i, entry in json_form["state"].items():
            for k, v in entry.items():
                self.assertTrue(torch.equal(back["state"][i][k].view(torch.int32), v.view(torch.int32)), (i, k))

    def test_load_state_dict_of_an_old_style_state_dict(self):
        # PyTorch < 1.12 wrote step as an int and eta/mu as Python floats: loaded as JSON loaded them.
        _, torch_opt = torch_run(steps=25)
        sd = torch_opt.state_dict()
        old = {"state": {i: {"step": int(s["step"].item()), "eta": float(s["eta"].item()), "mu": float(s["mu"].item()), "ax": s["ax"].double()}
                         for i, s in sd["state"].items()},
               "param_groups": [{k: v for k, v in g.items() if k not in ("foreach", "maximize")} for g in sd["param_groups"]]}
        opt = self.remote(make_model().named_parameters())
        opt.load_state_dict(old)
        got = opt.state_dict()
        for i, s in sd["state"].items():
            for k, v in s.items():
                self.assertTrue(torch.equal(got["state"][i][k], v), (i, k))


if __name__ == "__main__":
    unittest.main()


class _WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.l(x))


class ParamsInTheModelsWays(ServiceTestCase):
    def test_put_params_pt_takes_a_modules_state_dict_as_a_torch_save_file_does(self):
        # A review: format="pt" made a plain dict of model.state_dict(), losing its _metadata, by which the
        # service leaves a module state_dict's buffers out; the same object torch.save'd by hand was taken.
        model = _WithBuffers()
        opt = self.remote(model.named_parameters())
        other = _WithBuffers()
        other(torch.randn(4, 3))  # the running statistics move: buffers, not parameters
        client = self.client()
        answer = client.put_params(opt.session, other.state_dict(), format="pt")
        got, version = client.get_params(opt.session)
        self.assertEqual(version, answer["version"])
        for n, p in other.named_parameters():
            self.assertTrue(torch.equal(got[n], p.detach()), n)
        # In the other formats the buffers are names the session lacks: refused, saying what to send.
        for fmt in ("safetensors", "json"):
            with self.assertRaises(Exception) as refused:
                client.put_params(opt.session, other.state_dict(), format=fmt)
            self.assertIn("dict(model.named_parameters())", str(refused.exception), fmt)
        self.assertEqual(client.get_params(opt.session)[1], version, "refusals changed nothing")

    def test_get_params_lists_the_models_order_in_every_transport(self):
        # A review: over safetensors (the default) the parameters came in the file's order (by name), over
        # JSON in the model's; code that pairs them with model.parameters() by position got other tensors.
        import asgd_client

        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # 0.weight, 0.bias, 2.weight, 2.bias
        opt = self.remote(model.named_parameters())
        names = [n for n, _ in model.named_parameters()]
        self.assertNotEqual(names, sorted(names), "a model whose order is not the names' sorted order")
        for transport in ("safetensors", "json"):
            got, _ = self.client(transport).get_params(opt.session)
            self.assertEqual(list(got), names, transport)
            averaged, _ = self.client(transport).get_params(opt.session, averaged=True)
            self.assertEqual(list(averaged), names, f"{transport}, averaged")
        self.assertEqual(list(asgd_client.get_params(self.url, opt.session, token=self.token)), names)
