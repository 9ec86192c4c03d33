"""Reading ``opt.state[p]`` writes nothing to the session, so ASGD's evaluation idiom (AWD-LSTM: swap each
parameter for its average ``ax``, evaluate, swap back) changes neither the session nor another worker's steps.
The next step() still sends weights that were edited and left edited, as torch.optim.ASGD steps whatever
the parameters hold."""

import unittest

import torch

from _common import HYPER, ServiceTestCase, StepCounter, batch, make_model, train

# t0=0: the averages move away from the parameters within a few steps (ax != p is what the idiom shows).
KW = dict(lr=0.1, lambd=1e-4, alpha=0.75, t0=0.0, weight_decay=0.0)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def set_grads_and_step(opt, params, g: float) -> None:
    """One step with the gradient ``g`` everywhere: the same for every worker and for torch."""
    opt.zero_grad()
    for p in params:
        p.grad = torch.full_like(p, g)
    opt.step()


def awd_swap_in(model_params, opt):
    """The AWD-LSTM evaluation idiom, as its training script writes it."""
    tmp = {}
    for p in model_params:
        tmp[p] = p.data.clone()
        p.data = opt.state[p]["ax"].clone()
    return tmp


def awd_swap_back(model_params, tmp) -> None:
    for p in model_params:
        p.data = tmp[p].clone()


class ReadingStateWritesNothing(ServiceTestCase):
    def assertBitsEqual(self, got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
        if not torch.equal(bits(got), bits(want)):
            self.fail(f"{msg}: {got.flatten()[:4].tolist()} != {want.flatten()[:4].tolist()} (bit for bit)")

    def test_awd_idiom_with_two_workers_keeps_the_other_workers_step(self):
        # Worker a evaluates on the averages while worker b steps. The session's parameters stay what the
        # steps made them (b's step applies to them, not to a's averages), and a's step after swapping back
        # applies on top of b's: the session ends where torch.optim.ASGD ends with all the gradients in order.
        torch.manual_seed(0)
        init = [torch.randn(3), torch.randn(2)]
        A = [t.clone().requires_grad_() for t in init]
        B = [t.clone().requires_grad_() for t in init]
        L = [t.clone().requires_grad_() for t in init]
        counter = StepCounter(self, self.url, self.token)  # what a sends
        a = self.remote([("w", A[0]), ("b", A[1])], connection=counter.conn, **KW)
        b = self.remote([("w", B[0]), ("b", B[1])], session=a.session, create=False, **KW)
        local = torch.optim.ASGD(L, **KW)
        for _ in range(3):
            for opt, ps in ((a, A), (b, B)):
                set_grads_and_step(opt, ps, 1.0)
                set_grads_and_step(local, L, 1.0)
        a.pull()
        version = a.client.get_session(a.session)["version"]

        mark = counter.mark()
        tmp = awd_swap_in(A, a)
        for p, q in zip(A, L):
            self.assertBitsEqual(p, local.state[q]["ax"], "a's model holds torch's ax")
        self.assertFalse(torch.equal(A[0], tmp[A[0]]), "ax equals the parameter: the test would prove nothing")
        self.assertEqual([r for r in counter.since(mark) if not r.startswith("GET ")], [], "reading opt.state wrote to the session")
        self.assertEqual(a.client.get_session(a.session)["version"], version, "reading opt.state made a version")
        params, _ = a.client.get_params(a.session)
        for n, q in zip(("w", "b"), L):
            self.assertBitsEqual(params[n], q, f"session's {n} while a evaluates")

        set_grads_and_step(b, B, 0.5)  # b steps while a evaluates
        set_grads_and_step(local, L, 0.5)
        awd_swap_back(A, tmp)
        set_grads_and_step(a, A, 0.25)  # a's weights are back, bit for bit: nothing is pushed
        set_grads_and_step(local, L, 0.25)

        params, _ = a.client.get_params(a.session)
        for n, p, q in zip(("w", "b"), A, L):
            self.assertBitsEqual(params[n], q, f"session's {n} (b's step kept)")
            self.assertBitsEqual(p, q, f"a's {n}")
        info = a.client.get_session(a.session)
        self.assertEqual((info["step"], info["version"]), (8, version + 2), "two steps, no parameter upload")
        sd = a.state_dict()
        for i, q in enumerate(L):
            for k in ("step", "eta", "mu", "ax"):
                self.assertBitsEqual(sd["state"][i][k], local.state[q][k], f"state[{i}][{k}]")

    def test_awd_idiom_between_epochs_is_bit_exact_and_makes_no_versions(self):
        # One worker: evaluate on ax three times between epochs (the last time leaving ax in place, which the
        # next step sends, as torch steps whatever the parameters hold); torch.optim.ASGD does the same.
        ref, model = make_model(), make_model()
        torch_opt = torch.optim.ASGD(ref.parameters(), **HYPER)
        opt = self.remote(model.named_parameters())
        version = opt.client.get_session(opt.session)["version"]
        steps = 0
        for epoch in range(3):
            train(ref, torch_opt, range(steps, steps + 15))
            train(model, opt, range(steps, steps + 15))
            steps += 15
            for m, o in ((ref, torch_opt), (model, opt)):
                tmp = awd_swap_in(list(m.parameters()), o)
                with torch.no_grad():
                    m(batch(0)[0])  # evaluate
                if epoch < 2:
                    awd_swap_back(list(m.parameters()), tmp)
            self.assertParamsIdentical(model, ref, f"epoch {epoch}")
            self.assertEqual(opt.client.get_session(opt.session)["version"], version + steps,
                             f"epoch {epoch}: reading opt.state made versions of its own")
        # ax left in place: the next step sends it (one upload, documented) and applies to it, as torch's does.
        train(ref, torch_opt, range(steps, steps + 5))
        train(model, opt, range(steps, steps + 5))
        self.assertParamsIdentical(model, ref, "after leaving ax in place")
        self.assertEqual(opt.client.get_session(opt.session)["version"], version + steps + 5 + 1)
        self.assertStateDictEqual({"state": opt.state_dict()["state"], "param_groups": []},
                                  {"state": torch_opt.state_dict()["state"], "param_groups": []})

    def test_state_habits_of_resume_code_behave_as_torch(self):
        # Found by a review: an in-place edit of a state tensor changed the cached copy (later reads showed an
        # edit the session never had), `opt.state = defaultdict(dict)` was ignored by the session and left
        # opt.state empty for good, and the "move the state to the device" loop of resume code raised.
        from collections import defaultdict

        ref, model = make_model(), make_model()
        torch_opt = torch.optim.ASGD(ref.parameters(), **HYPER)
        opt = self.remote(model.named_parameters())
        train(ref, torch_opt, range(0, 6))
        train(model, opt, range(0, 6))
        p, q = next(model.parameters()), next(ref.parameters())
        # A read is a copy: an edit of it in place reaches neither the session nor the next read.
        opt.state[p]["ax"].mul_(0.5)
        self.assertTrue(torch.equal(bits(opt.state[p]["ax"]), bits(torch_opt.state[q]["ax"])))
        # Moving the state to the device it is on (a value equal to the one held) is taken; another is refused.
        for st in opt.state.values():
            for k, v in st.items():
                if torch.is_tensor(v):
                    st[k] = v.to("cpu")
        with self.assertRaisesRegex(TypeError, "load_state_dict"):
            opt.state[p]["ax"] = torch.zeros_like(p)
        # Starting the state over, both ways torch code does it, then training on: equal to torch bit for bit.
        for reset in (lambda o: setattr(o, "state", defaultdict(dict)), lambda o: o.state.clear()):
            reset(torch_opt)
            with self.assertLogs("asgd_client", "WARNING") as logged:
                reset(opt)
            # Said as what was done, not as a load_state_dict the user never called (a review).
            self.assertTrue(any("starting the optimizer state over (opt.state.clear()" in line and "took session" in line for line in logged.output), logged.output)
            self.assertFalse(any("load_state_dict took" in line for line in logged.output), logged.output)
            self.assertNotIn("ax", opt.state[p])
            train(ref, torch_opt, range(6, 10))
            train(model, opt, range(6, 10))
            self.assertParamsIdentical(model, ref, "after the state started over")
            self.assertIn("ax", opt.state[p])
            self.assertStateDictEqual({"state": opt.state_dict()["state"], "param_groups": []},
                                      {"state": torch_opt.state_dict()["state"], "param_groups": []})
        with self.assertRaisesRegex(TypeError, "load_state_dict"):
            opt.state = {0: {}}

    def test_reading_state_with_a_step_in_flight_waits_for_it_and_sends_nothing(self):
        self.requireStepParams()
        model = make_model()
        counter = StepCounter(self, self.url, self.token)
        opt = self.remote(model.named_parameters(), pipeline=True, connection=counter.conn)
        train(model, opt, range(3))  # the third step is in flight
        mark = counter.mark()
        p = next(model.parameters())
        with self.assertLogs("asgd_client", "WARNING") as logged:
            self.assertEqual(opt.state[p]["step"].item(), 3.0, "the state read includes the step in flight")
        # the AWD-LSTM idiom's copies of p.data taken before this read would be a step old: said, once
        self.assertEqual(len(logged.records), 1, logged.output)
        self.assertIn("opt.synchronize()", logged.output[0])
        self.assertEqual(opt.version, opt.client.get_session(opt.session)["version"], "the step's parameters are loaded")
        # (The step in flight may reach the proxy after the mark: only what the read itself sends counts.)
        self.assertEqual([r for r in counter.since(mark) if r not in ("POST step", "GET state_dict") and not r.startswith("GET test-")], [])


    def test_awd_idiom_without_synchronize_in_a_pipelined_loop_undoes_no_step(self):
        # Found by a review: copies of p.data taken before the state read (which waits for the step in flight)
        # are a step old; put back, the next step sent them as an edit and undid that step for every worker
        # (0.067 away from a replay after 30 steps). They are recognised and the session's parameters taken.
        self.requireStepParams()
        model = make_model()
        opt = self.remote(model.named_parameters(), pipeline=True)
        sent = []
        for epoch in range(3):
            train(model, opt, range(epoch * 5, epoch * 5 + 5))  # the last step is in flight
            params = list(model.parameters())
            with self.assertWarnsRegex(UserWarning, "opt.synchronize"):
                tmp = {p: p.data.clone() for p in params}  # before the read: a step old
                for p in params:
                    p.data = opt.state[p]["ax"].clone()
                with torch.no_grad():
                    model(batch(0)[0])
                for p in params:
                    p.data = tmp[p]
                train(model, opt, range(100 + epoch, 101 + epoch))
            sent.append(epoch)
        opt.synchronize()
        info = opt.client.get_session(opt.session)
        # Every version is a step: the stale copies were never sent as an edit (PUT params).
        self.assertEqual(info["version"], info["step"] + 1)
        self.assertEqual(info["step"], 18)
        session_params, _ = opt.client.get_params(opt.session)
        for (n, p) in model.named_parameters():
            self.assertTrue(torch.equal(bits(p), bits(session_params[n])), n)


if __name__ == "__main__":
    unittest.main()
