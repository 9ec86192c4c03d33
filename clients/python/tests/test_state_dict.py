"""state_dict() is torch.optim.ASGD.state_dict(); load_state_dict() round-trips in both directions."""

import io
import unittest

import torch

from _common import HYPER, STEPS, ServiceTestCase, for_torch, make_model, torch_run, train


class StateDictMatchesTorch(ServiceTestCase):
    def test_state_dict_equals_torch_after_training(self):
        ref, torch_opt = torch_run()
        model = make_model()
        opt = self.remote(model.named_parameters(), transport="json")
        train(model, opt, range(STEPS))
        got = opt.state_dict()
        want = torch_opt.state_dict()
        self.assertStateDictEqual(got, want)
        # The averaging has started (t0 small): mu != 1 and ax is not the parameter.
        self.assertNotEqual(want["state"][0]["mu"].item(), 1.0)
        self.assertFalse(torch.equal(want["state"][0]["ax"], list(ref.parameters())[0]))
        # And it is a real state_dict: torch.optim.ASGD loads it and torch.save writes it.
        clone = torch.optim.ASGD(make_model().parameters(), **HYPER)
        clone.load_state_dict(got)
        buf = io.BytesIO()
        torch.save(got, buf)
        buf.seek(0)
        self.assertStateDictEqual(torch.load(buf), want)

    def test_state_dict_before_any_step(self):
        torch_opt = torch.optim.ASGD(for_torch(make_model().named_parameters()), **HYPER)
        opt = self.remote(make_model().named_parameters(), transport="json")
        self.assertStateDictEqual(opt.state_dict(), torch_opt.state_dict())

    def test_load_torch_state_dict_into_session_then_continue(self):
        # torch trains k steps; its state_dict goes into a session created from torch's weights;
        # both continue: identical.
        k = 37
        ref, torch_opt = torch_run(steps=k)
        model = make_model()
        model.load_state_dict(ref.state_dict())
        opt = self.remote(model.named_parameters(), transport="json")
        opt.load_state_dict(torch_opt.state_dict())
        self.assertStateDictEqual(opt.state_dict(), torch_opt.state_dict())
        train(ref, torch_opt, range(k, STEPS))
        train(model, opt, range(k, STEPS))
        self.assertParamsIdentical(model, ref)
        self.assertStateDictEqual(opt.state_dict(), torch_opt.state_dict())

    def test_session_state_dict_loads_into_torch_then_continue(self):
        k = 41
        model = make_model()
        opt = self.remote(model.named_parameters(), transport="json")
        train(model, opt, range(k))
        local = make_model(3)
        local.load_state_dict(model.state_dict())
        torch_opt = torch.optim.ASGD(for_torch(local.named_parameters()), **HYPER)
        torch_opt.load_state_dict(opt.state_dict())
        train(local, torch_opt, range(k, STEPS))
        want, _ = torch_run()
        self.assertParamsIdentical(local, want)

    def test_load_state_dict_with_an_empty_entry_as_torch_leaves_it(self):
        # A parameter that never stepped, whose optimizer.state[p] some code read: torch's state_dict holds
        # {} for it, and torch loads that. So does RemoteASGD; both then train on identically.
        k = 9
        ref = make_model()
        torch_opt = torch.optim.ASGD(for_torch(ref.named_parameters()), **HYPER)
        frozen = list(ref.parameters())[-1]
        frozen.requires_grad_(False)
        train(ref, torch_opt, range(k))
        self.assertEqual(torch_opt.state[frozen], {})  # the read leaves {}
        frozen.requires_grad_(True)
        saved = torch_opt.state_dict()
        self.assertEqual(saved["state"][len(list(ref.parameters())) - 1], {})
        model = make_model()
        model.load_state_dict(ref.state_dict())
        opt = self.remote(model.named_parameters(), transport="json")
        opt.load_state_dict(saved)
        train(ref, torch_opt, range(k, k + 20))
        train(model, opt, range(k, k + 20))
        self.assertParamsIdentical(model, ref)
        self.assertStateDictEqual(opt.state_dict(), torch_opt.state_dict())

    def test_load_state_dict_of_another_optimizer_is_refused_by_name(self):
        # An ASGD state_dict with SGD's momentum_buffer in it: refused, not loaded without it.
        opt = self.remote(make_model().named_parameters(), transport="json")
        model = make_model()
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        local = torch.optim.ASGD(for_torch(model.named_parameters()), **HYPER)
        local.step()
        sd = local.state_dict()
        sd["state"][0]["momentum_buffer"] = torch.zeros(1)
        with self.assertRaisesRegex(ValueError, r"state\[0\]: momentum_buffer is not part of ASGD's per-parameter state"):
            opt.load_state_dict(sd)

    def test_load_state_dict_keeps_group_values_as_torch_does(self):
        # A state_dict whose group says foreach=False and t0=15 (an int): torch's param_groups keep them so.
        model = make_model()
        local = torch.optim.ASGD(for_torch(model.named_parameters()), foreach=False, lr=0.05, t0=15)
        train(model, local, range(1))
        sd = local.state_dict()
        opt = self.remote(make_model().named_parameters(), transport="json")
        mirror = torch.optim.ASGD(for_torch(make_model().named_parameters()), **HYPER)
        opt.load_state_dict(sd)
        mirror.load_state_dict(sd)
        for got, want in zip(opt.param_groups, mirror.param_groups):
            for k in ("lr", "lambd", "alpha", "t0", "weight_decay", "foreach", "maximize"):
                self.assertEqual((got[k], type(got[k])), (want[k], type(want[k])), k)

    def test_load_state_dict_replaces_the_groups_keys_as_torch_does(self):
        # Keys the loaded groups lack (a scheduler's initial_lr, a tag of the user's) go, as torch's
        # load_state_dict replaces each group; a scheduler made afterwards then asks for initial_lr as torch's.
        saved = torch.optim.ASGD(for_torch(make_model().named_parameters()), lr=0.2).state_dict()
        opt = self.remote(make_model().named_parameters(), transport="json")
        mirror = torch.optim.ASGD(for_torch(make_model().named_parameters()), **HYPER)
        for o in (opt, mirror):
            torch.optim.lr_scheduler.StepLR(o, 3)
            o.param_groups[0]["tag"] = {"a": 1}
            o.load_state_dict(saved)
        self.assertEqual(sorted(opt.param_groups[0]), sorted(mirror.param_groups[0]))
        self.assertNotIn("initial_lr", opt.param_groups[0])
        self.assertNotIn("tag", opt.param_groups[0])
        for o in (opt, mirror):
            with self.assertRaisesRegex(KeyError, "initial_lr"):
                torch.optim.lr_scheduler.StepLR(o, 3, last_epoch=4)
        self.assertStateDictEqual(opt.state_dict(), mirror.state_dict())

    def test_load_state_dict_takes_the_groups_hyperparameters(self):
        opt = self.remote(make_model().named_parameters(), transport="json")
        torch_opt = torch.optim.ASGD(for_torch(make_model().named_parameters()), lr=0.125, lambd=2e-4, alpha=0.5, t0=3.0, weight_decay=0.25)
        opt.load_state_dict(torch_opt.state_dict())
        self.assertEqual(opt.param_groups[0]["lr"], 0.125)
        self.assertEqual(opt.param_groups[0]["t0"], 3.0)
        session = opt.client.get_session(opt.session)
        self.assertEqual(session["param_groups"][0]["lr"], 0.125)
        self.assertEqual(session["param_groups"][0]["weight_decay"], 0.25)
        self.assertStateDictEqual(opt.state_dict(), torch_opt.state_dict())

    def test_load_state_dict_of_another_shape_is_refused(self):
        from asgd_client import ServiceError

        opt = self.remote(make_model().named_parameters(), transport="json")
        other = torch.optim.ASGD([torch.zeros(3, requires_grad=True)]).state_dict()
        with self.assertRaisesRegex(ValueError, "doesn't match the size"):
            opt.load_state_dict(other)
        # The service checks too (a client that skips the local check).
        with self.assertRaises(ServiceError) as caught:
            opt.client.put_state_dict(opt.session, other)
        self.assertEqual(caught.exception.status, 400)

    def test_plain_functions(self):
        from asgd_client import create_session_from_model, get_state_dict, put_state_dict

        name = f"plain-{self._testMethodName}"[:60]
        model = make_model()
        info = create_session_from_model(model, self.url, name, token=self.token, **HYPER)
        self.assertEqual([p["name"] for p in info["params"]], [n for n, _ in model.named_parameters()])
        again = create_session_from_model(model, self.url, name, token=self.token, exist_ok=True, **HYPER)
        self.assertEqual(again["version"], info["version"])
        _, torch_opt = torch_run(steps=12)
        put_state_dict(self.url, name, torch_opt.state_dict(), token=self.token)
        self.assertStateDictEqual(get_state_dict(self.url, name, token=self.token), torch_opt.state_dict())
        self.client().delete_session(name)

    def test_state_dict_as_torch_save_file(self):
        _, torch_opt = torch_run(steps=25)
        opt = self.remote(make_model().named_parameters(), transport="json")
        opt.load_state_dict(torch_opt.state_dict())
        got = opt.client.get_state_dict(opt.session, format="pt")
        self.assertStateDictEqual(got, torch_opt.state_dict())

    def test_put_state_dict_as_torch_save_file(self):
        _, torch_opt = torch_run(steps=25)
        opt = self.remote(make_model().named_parameters(), transport="json")
        opt.client.put_state_dict(opt.session, torch_opt.state_dict(), format="pt")
        self.assertStateDictEqual(opt.state_dict(), torch_opt.state_dict())


if __name__ == "__main__":
    unittest.main()
