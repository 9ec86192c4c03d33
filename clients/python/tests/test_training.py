"""RemoteASGD trains exactly as torch.optim.ASGD: parameters bit for bit equal after 100 steps."""

import unittest
import warnings

import torch

from _common import HYPER, STEPS, ServiceTestCase, batch, for_torch, make_model, torch_run, train, unique


class TrainingMatchesTorch(ServiceTestCase):
    def _check(self, transport: str, **loop):
        want, _ = torch_run(**loop)
        model = make_model()
        opt = self.remote(model.named_parameters(), transport=transport)
        train(model, opt, range(STEPS), **loop)
        self.assertParamsIdentical(model, want, f"[{transport}]")
        self.assertEqual(opt.step_count, STEPS)
        return model, opt

    def test_json_transport_is_bitwise_identical_to_torch(self):
        self._check("json")

    def test_safetensors_transport_is_bitwise_identical_to_torch(self):
        self._check("safetensors")

    def test_skipped_gradients_are_skipped_like_torch(self):
        # The last bias has p.grad None on every 3rd step: ASGD leaves it (and its step count) alone.
        model, opt = self._check("json", skip_bias_every=3)
        _, torch_opt = torch_run(skip_bias_every=3)
        got = opt.state_dict()
        want = torch_opt.state_dict()
        self.assertStateDictEqual(got, want)
        self.assertLess(want["state"][3]["step"].item(), STEPS)

    def test_zero_grad_with_the_installed_torchs_default(self):
        # A plain zero_grad(), as most loops write it: torch 1.x zeroes the gradients (set_to_none=False), so
        # a parameter that gets no gradient on a step still steps on zeros; torch 2.x sets them to None and
        # skips it. RemoteASGD does what the installed torch does.
        def freeze_every_third(model, opt, steps):
            head = model[-1]
            for i in range(steps):
                X, y = batch(i)
                opt.zero_grad()
                # Every third step the head's bias does not reach the loss: its gradient stays zeros or None.
                bias = head.bias.detach() if i % 3 == 1 else head.bias
                out = torch.nn.functional.linear(model[:-1](X), head.weight, bias)
                loss = torch.nn.functional.mse_loss(out, y)
                loss.backward()
                opt.step()

        ref = make_model()
        ref_opt = torch.optim.ASGD(for_torch(ref.named_parameters()), **HYPER)
        freeze_every_third(ref, ref_opt, 12)
        model = make_model()
        opt = self.remote(model.named_parameters(), transport="safetensors")
        freeze_every_third(model, opt, 12)
        self.assertParamsIdentical(model, ref)
        self.assertStateDictEqual(opt.state_dict(), ref_opt.state_dict())

    def test_last_step_holds_the_answers_fields(self):
        # The same fields with either transport: the safetensors answer's other metadata is the file's.
        for transport in ("json", "safetensors"):
            model = make_model()
            opt = self.remote(model.named_parameters(), transport=transport, session=unique(f"last-step-{transport}"))
            train(model, opt, range(2))
            self.assertEqual(sorted(opt.last_step), ["param_groups", "session", "staleness", "step", "version"], transport)
            self.assertEqual(opt.last_step["step"], 2, transport)

    def test_auto_transport_trains_identically(self):
        # "auto" uses safetensors and falls back to JSON (with a warning) where the service lacks it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self._check("auto")

    def test_plain_parameters_are_named_by_position(self):
        model = make_model()
        opt = self.remote(model.parameters(), transport="json")
        self.assertEqual(opt.parameter_names, ["p0", "p1", "p2", "p3"])
        info = opt.client.get_session(opt.session)
        self.assertEqual([p["name"] for p in info["params"]], ["p0", "p1", "p2", "p3"])
        self.assertEqual([p["shape"] for p in info["params"]], [[4, 8], [4], [1, 4], [1]])
        want, _ = torch_run(steps=10)
        train(model, opt, range(10))
        self.assertParamsIdentical(model, want)

    def test_param_groups_with_their_own_hyperparameters(self):
        def groups(m, named):
            pick = lambda prefix: [(n, p) if named else p for n, p in m.named_parameters() if n.startswith(prefix)]  # noqa: E731
            first, second = pick("0."), pick("2.")
            # "name" is a key of the user's own: PyTorch keeps it in the group and the state_dict.
            return [{"params": second, "lr": 0.02, "t0": 5.0, "name": "head"}, {"params": first, "weight_decay": 0.0}]

        ref = make_model()
        torch_opt = torch.optim.ASGD(for_torch(groups(ref, True)), **HYPER)
        train(ref, torch_opt, range(60))
        model = make_model()
        opt = self.remote(groups(model, True), transport="json")
        # Indices follow the groups' order, as in PyTorch: the second layer's parameters are 0 and 1.
        self.assertEqual(opt.parameter_names, ["2.weight", "2.bias", "0.weight", "0.bias"])
        train(model, opt, range(60))
        self.assertParamsIdentical(model, ref)
        self.assertStateDictEqual(opt.state_dict(), torch_opt.state_dict())
        self.assertEqual(opt.param_groups[0]["lr"], 0.02)
        self.assertEqual(opt.param_groups[1]["weight_decay"], 0.0)
        self.assertEqual(opt.state_dict()["param_groups"][0]["name"], "head")

    def test_sessions_created_from_safetensors_and_json_are_the_same(self):
        def groups(m):
            named = list(m.named_parameters())
            return [{"params": named[2:], "lr": 0.02, "t0": 5.0}, {"params": named[:2], "weight_decay": 0.0}]

        a = self.remote(groups(make_model()), transport="safetensors")
        b = self.remote(groups(make_model()), transport="json")
        sa, sb = a.client.get_session(a.session), b.client.get_session(b.session)
        for key in ("params", "param_groups", "numel", "step", "version"):
            self.assertEqual(sa[key], sb[key], key)
        self.assertEqual([p["name"] for p in sa["params"]], ["2.weight", "2.bias", "0.weight", "0.bias"])
        pa, _ = a.client.get_params(a.session)
        pb, _ = b.client.get_params(b.session)
        for name in pb:
            self.assertTrue(torch.equal(pa[name], pb[name]), name)

    def test_lr_scheduler_changes_reach_the_session(self):
        self.requireStepParams()  # they travel with the step (issue 11)
        ref = make_model()
        torch_opt = torch.optim.ASGD(for_torch(ref.named_parameters()), **HYPER)
        train(ref, torch_opt, range(40), scheduler=torch.optim.lr_scheduler.StepLR(torch_opt, step_size=10, gamma=0.5))
        model = make_model()
        opt = self.remote(model.named_parameters(), transport="json")
        train(model, opt, range(40), scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5))
        self.assertParamsIdentical(model, ref)
        got, want = opt.state_dict(), torch_opt.state_dict()
        self.assertStateDictEqual(got, want)  # includes initial_lr, set by the scheduler
        # The session holds the lr of the last step (steps 30-39: lr * 0.5**3); the scheduler's last change
        # travels with the next step, as a local optimizer uses it only then.
        self.assertEqual(opt.client.get_session(opt.session)["param_groups"][0]["lr"], HYPER["lr"] * 0.5 ** 3)

    def test_averaged_parameters_are_torch_ax(self):
        ref, torch_opt = torch_run(steps=30)
        model = make_model()
        opt = self.remote(model.named_parameters(), transport="json")
        train(model, opt, range(30))
        want_ax = [torch_opt.state[p]["ax"] for p in ref.parameters()]
        averaged = opt.averaged_parameters()
        for got, want in zip(averaged, want_ax):
            self.assertTrue(torch.equal(got, want))
        before = [p.detach().clone() for p in model.parameters()]
        with opt.swap_to_averaged():
            for p, want in zip(model.parameters(), want_ax):
                self.assertTrue(torch.equal(p, want))
        for p, b in zip(model.parameters(), before):
            self.assertTrue(torch.equal(p, b))
        # Evaluating on the averages only reads: an edit of the model (a clamp) is not sent by it, and stays
        # in the model afterwards; the next step sends it, as torch.optim.ASGD steps the edited tensor.
        version = opt.client.get_session(opt.session)["version"]
        with torch.no_grad():
            next(iter(model.parameters())).clamp_(-0.01, 0.01)
        edited = [p.detach().clone() for p in model.parameters()]
        with opt.swap_to_averaged():
            pass
        self.assertEqual(opt.client.get_session(opt.session)["version"], version, "swap_to_averaged wrote nothing")
        for p, e in zip(model.parameters(), edited):
            self.assertTrue(torch.equal(p, e))

    def test_averaged_parameters_as_safetensors(self):
        ref, torch_opt = torch_run(steps=15)
        model = make_model()
        opt = self.remote(model.named_parameters(), transport="json")
        train(model, opt, range(15))
        tensors, version = self.client("safetensors").get_params(opt.session, averaged=True)
        self.assertEqual(version, opt.version)
        self.assertEqual(sorted(tensors), sorted(n for n, _ in ref.named_parameters()))
        for name, p in ref.named_parameters():  # by name: a safetensors file has its own order
            self.assertTrue(torch.equal(tensors[name], torch_opt.state[p]["ax"]), name)

    def test_attach_to_an_existing_session(self):
        from asgd_client import SessionExists

        model = make_model()
        opt = self.remote(model.named_parameters(), transport="json")
        train(model, opt, range(20))
        with self.assertRaises(SessionExists):
            self.remote(make_model(5).named_parameters(), transport="json", session=opt.session, create=True)
        # A second worker with other initial weights attaches and receives the session's parameters.
        other = make_model(5)
        worker = self.remote(other.named_parameters(), transport="json", session=opt.session, create="if_missing")
        self.assertParamsIdentical(other, model)
        self.assertEqual(worker.step_count, 20)
        self.assertEqual(worker.version, opt.version)
        attached = make_model(6)
        self.remote(attached.named_parameters(), transport="json", session=opt.session, create=False)
        self.assertParamsIdentical(attached, model)
        # if_missing creates when absent.
        fresh = make_model()
        new = self.remote(fresh.named_parameters(), transport="json", session=unique("if-missing"), create="if_missing")
        self.assertEqual(new.step_count, 0)

    def test_joining_with_other_settings_says_which_the_session_keeps(self):
        model = make_model()
        opt = self.remote(model.named_parameters(), transport="json", max_staleness=4)
        other = make_model()
        with self.assertLogs("asgd_client", "WARNING") as logs:
            joined = self.remote(other.named_parameters(), transport="json", session=opt.session, lr=0.1, max_staleness=2)
        said = "\n".join(logs.output)
        self.assertIn(f"group 0 lr={HYPER['lr']!r} (asked 0.1)", said)
        self.assertIn("max_staleness=4 (asked 2)", said)
        self.assertEqual(joined.param_groups[0]["lr"], HYPER["lr"])  # the session's holds
        # The same settings join silently.
        with self.assertNoLogs("asgd_client", "WARNING"):
            self.remote(make_model().named_parameters(), transport="json", session=opt.session, max_staleness=4)

    def test_attach_refuses_a_different_model(self):
        model = make_model()
        opt = self.remote(model.named_parameters(), transport="json")
        wrong = torch.nn.Linear(8, 3)
        with self.assertRaisesRegex(ValueError, "parameters|shape"):
            self.remote(wrong.named_parameters(), transport="json", session=opt.session, create=False)

    def test_stale_gradients_are_refused_by_max_staleness(self):
        from asgd_client import StaleGradient

        a_model, b_model = make_model(), make_model()
        a = self.remote(a_model.named_parameters(), transport="json", max_staleness=0)
        b = self.remote(b_model.named_parameters(), transport="json", session=a.session, create=False, on_stale="raise")
        train(a_model, a, range(1))  # a steps: b's parameters are now one version old
        b_model(batch(1)[0]).sum().backward()
        with self.assertRaises(StaleGradient) as caught:
            b.step()
        self.assertEqual(caught.exception.version, a.version)
        b.pull()  # fresh parameters, fresh gradient: accepted
        b.zero_grad()
        b_model(batch(1)[0]).sum().backward()
        b.step()
        self.assertEqual(b.last_step["staleness"], 0)
        self.assertEqual(b.step_count, 2)

    @unittest.skipUnless(__import__("os").environ.get("ASGD_TEST_TOKEN"), "the service runs without auth (set ASGD_TEST_TOKEN)")
    def test_requests_without_the_token_are_refused(self):
        from asgd_client import Client, ServiceError

        opt = self.remote(make_model().named_parameters(), transport="json")
        anonymous = Client(self.url, token="", transport="json")
        self.addCleanup(anonymous.close)
        with self.assertRaises(ServiceError) as caught:
            anonymous.get_session(opt.session)
        self.assertEqual(caught.exception.status, 401)


if __name__ == "__main__":
    unittest.main()


class HyperparametersJsonCannotCarry(ServiceTestCase):
    def test_an_infinite_t0_is_refused_naming_it_with_an_equivalent(self):
        # torch takes t0=float("inf") ("never average"); JSON cannot carry it: a ValueError naming the field.
        with self.assertRaisesRegex(ValueError, r"hyperparameters\.t0: inf .*t0=1e30 behaves the same"):
            self.remote(make_model().named_parameters(), t0=float("inf"))
