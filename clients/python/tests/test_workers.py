"""What several workers need: opt.state[p] read from the session, the staleness policies, metrics and
half-precision gradients with the step, and retries that outlast a restart of the service."""

import logging
import threading
import time
import unittest

import torch
from torch import nn

from _common import HYPER, ServiceTestCase, StepCounter, batch, make_model, torch_run, train, unique


class StateIsTorchs(ServiceTestCase):
    def test_state_of_each_parameter_equals_torch_asgd(self):
        ref, torch_opt = torch_run(steps=30, skip_bias_every=3)
        counter = StepCounter(self, self.url, self.token)
        model = make_model()
        opt = self.remote(model.named_parameters(), connection=counter.conn)
        train(model, opt, range(30), skip_bias_every=3)
        mark = counter.mark()
        for p, q in zip(model.parameters(), ref.parameters()):
            got, want = opt.state[p], torch_opt.state[q]
            self.assertEqual(sorted(got), sorted(want))
            for key in want:
                self.assertEqual(got[key].dtype, want[key].dtype, key)
                self.assertEqual(got[key].shape, want[key].shape, key)
                self.assertTrue(torch.equal(got[key], want[key]), f"{key}: {got[key]} != {want[key]}")
        self.assertEqual(len(counter.since(mark)), 1, "one read of the session's state, cached for the version")
        self.assertEqual(len(opt.state), 4)
        self.assertIn(next(model.parameters()), opt.state)
        # The AWD-LSTM idiom: evaluate on the averages.
        for p, q in zip(model.parameters(), ref.parameters()):
            p.data = opt.state[p]["ax"].clone()
            self.assertTrue(torch.equal(p, torch_opt.state[q]["ax"]))
        with self.assertRaises(TypeError):
            opt.state[next(model.parameters())]["ax"] = torch.zeros(1)

    def test_state_is_cached_by_version_and_read_again_conditionally(self):
        counter = StepCounter(self, self.url, self.token)
        a_model, b_model = make_model(), make_model()
        a = self.remote(a_model.named_parameters())
        b = self.remote(b_model.named_parameters(), session=a.session, connection=counter.conn)
        train(b_model, b, range(2))
        train(a_model, a, range(2, 3))  # the session moves on; b's model stays at its version
        p = next(b_model.parameters())
        mark = counter.mark()
        ax = b.state[p]["ax"].clone()  # the session's state (step 3), cached for b's version
        self.assertEqual(b.state[p]["step"].item(), 3.0)
        self.assertEqual((counter.since(mark), counter.statuses[-1]), (["GET state_dict"], 200))
        b.pull()  # b's model moves to the session's version: asked again, If-None-Match
        mark = counter.mark()
        self.assertTrue(torch.equal(b.state[p]["ax"], ax))
        self.assertEqual((counter.since(mark), counter.statuses[-1]), (["GET state_dict"], 304))
        self.assertTrue(torch.equal(b.state[p]["ax"], ax))
        self.assertEqual(len(counter.since(mark)), 1, "then cached: no request")
        train(b_model, b, range(3, 4))
        self.assertEqual(b.state[p]["step"].item(), 4.0)
        self.assertEqual(counter.statuses[-1], 200)

    def test_state_follows_new_steps_and_is_empty_before_the_first(self):
        model = make_model()
        opt = self.remote(model.named_parameters())
        p = next(model.parameters())
        self.assertEqual(dict(opt.state[p]), {})
        self.assertEqual(len(opt.state), 0)
        self.assertEqual(dict(opt.state[torch.zeros(1)]), {})  # not a parameter of this optimizer
        train(model, opt, range(3))
        self.assertEqual(opt.state[p]["step"].item(), 3.0)
        train(model, opt, range(3, 5))
        self.assertEqual(opt.state[p]["step"].item(), 5.0)


class CreateIfMissing(ServiceTestCase):
    def test_two_workers_started_alike_one_creates_the_other_joins(self):
        from asgd_client import RemoteASGD

        name = unique("if-missing")
        barrier = threading.Barrier(2)
        opts, errors = {}, []

        def worker(rank):
            try:
                model = make_model(rank)
                barrier.wait()
                opts[rank] = (model, RemoteASGD(model.named_parameters(), url=self.url, token=self.token, session=name, **HYPER))
            except BaseException as err:
                errors.append(err)

        with self.assertLogs("asgd_client", logging.INFO) as logs:
            threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        for _, opt in opts.values():
            self.addCleanup(opt.close)
        self.assertEqual(errors, [])
        lines = [line for line in logs.output if name in line]
        self.assertEqual(sorted("created" in line for line in lines), [False, True], lines)
        # Both hold the session's parameters (the creator's), whatever their own initial weights were.
        self.assertParamsIdentical(opts[0][0], opts[1][0])


    def test_joining_warns_of_replaced_values_it_asked_for_and_not_of_defaults(self):
        from asgd_client import RemoteASGD

        creator = self.remote(make_model().named_parameters(), lr=0.05, t0=3.0)
        name = creator.session

        def join(**kw):
            with self.assertLogs("asgd_client", logging.INFO) as logs:
                opt = RemoteASGD(make_model().named_parameters(), url=self.url, token=self.token, session=name, **kw)
            self.addCleanup(opt.close)
            self.assertEqual(opt.param_groups[0]["lr"], 0.05, "the session's value holds")
            return [line for line in logs.output if "other settings" in line]

        self.assertEqual(join(), [], "no hyperparameter asked for: nothing replaced")
        warned = join(lr=0.2)
        self.assertEqual(len(warned), 1, warned)
        self.assertIn("lr=0.05 (asked 0.2)", warned[0])
        self.assertNotIn("t0=", warned[0], "t0 was not asked for")

class StalenessPolicies(ServiceTestCase):
    def pair(self, policy):
        a_model, b_model = make_model(), make_model()
        a = self.remote(a_model.named_parameters(), max_staleness=0)
        b = self.remote(b_model.named_parameters(), session=a.session, on_stale=policy)
        train(a_model, a, range(1))  # b's parameters are now one version old
        b.zero_grad()
        nn.functional.mse_loss(b_model(batch(1)[0]), batch(1)[1]).backward()
        return a, a_model, b, b_model

    def test_pull_drops_the_gradient_loads_the_parameters_and_goes_on(self):
        a, a_model, b, b_model = self.pair("pull")
        with self.assertLogs("asgd_client", "WARNING") as logs:
            b.step()  # no exception: the loop goes on
        self.assertEqual(b.stale_dropped, 1)
        self.assertTrue(any("stale" in line for line in logs.output), logs.output)
        self.assertEqual(b.client.get_session(b.session)["step"], 1, "the stale gradient was not applied")
        self.assertParamsIdentical(b_model, a_model)
        self.assertEqual(b.version, a.version)
        train(b_model, b, range(1, 2))  # fresh parameters, fresh gradient: accepted
        self.assertEqual(b.last_step["staleness"], 0)
        self.assertEqual(b.step_count, 2)

    def test_raise(self):
        from asgd_client import StaleGradient

        a, _, b, _ = self.pair("raise")
        with self.assertRaises(StaleGradient) as caught:
            b.step()
        self.assertEqual(caught.exception.version, a.version)

    def test_apply_sends_it_without_base_version(self):
        a, _, b, _ = self.pair("apply")
        b.step()
        self.assertEqual(b.stale_dropped, 0)
        self.assertEqual(b.client.get_session(b.session)["step"], 2, "the stale gradient was applied")
        self.assertEqual(b.version, b.client.get_session(b.session)["version"])

    def test_pipeline_on_a_session_without_staleness_is_warned_about(self):
        a = self.remote(make_model().named_parameters(), max_staleness=0)
        with self.assertLogs("asgd_client", logging.WARNING) as logs:
            self.remote(make_model().named_parameters(), session=a.session, pipeline=True)
        self.assertIn("max_staleness 0", "\n".join(logs.output))

    def test_pipelined_pull(self):
        a, a_model, b, b_model = self.pair("pull")
        b.pipeline = True
        b.step()
        self.assertEqual(b.synchronize(), a.version)
        self.assertEqual(b.stale_dropped, 1)
        self.assertParamsIdentical(b_model, a_model)


class StepExtras(ServiceTestCase):
    def setUp(self):
        self.requireStepParams()

    def test_metrics_travel_with_the_step(self):
        model = make_model()
        opt = self.remote(model.named_parameters())
        for i in range(3):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(batch(i)[0]), batch(i)[1])
            loss.backward()
            opt.step(metrics={"loss": loss.item(), "samples": 16})
        res = opt.client.conn.request("GET", f"/v1/sessions/{opt.session}/metrics")
        points = res.json()["points"]
        self.assertEqual([p["step"] for p in points], [1, 2, 3])
        self.assertEqual(points[0]["values"]["samples"], 16)
        # The loss as it comes (a 0-dim tensor that requires grad, a numpy scalar) is its number.
        import numpy as np

        opt.zero_grad()
        loss = nn.functional.mse_loss(model(batch(3)[0]), batch(3)[1])
        loss.backward()
        opt.step(metrics={"loss": loss, "lr": np.float32(0.5), "samples": np.int64(16)})
        last = opt.client.conn.request("GET", f"/v1/sessions/{opt.session}/metrics?after_version={points[-1]['version']}").json()["points"]
        self.assertEqual(last[0]["values"], {"loss": loss.item(), "lr": 0.5, "samples": 16})

    def test_the_client_reads_metrics_hyperparameter_changes_and_norms(self):
        # Client.metrics, .hyperparameter_changes and .norms: what a notebook reads back about a run.
        model = make_model()
        opt = self.remote(model.named_parameters())
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        ref = make_model()
        torch_opt = torch.optim.ASGD(ref.parameters(), **HYPER)
        torch_scheduler = torch.optim.lr_scheduler.StepLR(torch_opt, step_size=2, gamma=0.5)
        losses = []
        for i in range(5):
            for m, o in ((model, opt), (ref, torch_opt)):
                o.zero_grad()
                loss = nn.functional.mse_loss(m(batch(i)[0]), batch(i)[1])
                loss.backward()
                if o is opt:
                    opt.step(metrics={"loss": loss.item()})
                    losses.append(loss.item())
                else:
                    o.step()
            scheduler.step()
            torch_scheduler.step()
        client = opt.client
        first = client.metrics(opt.session, limit=2)
        rest = client.metrics(opt.session, after_version=first["next_after_version"])
        points = first["points"] + rest["points"]
        self.assertEqual([p["step"] for p in points], [1, 2, 3, 4, 5])
        self.assertEqual([p["values"]["loss"] for p in points], losses)
        whole = client.metrics(opt.session, max_points=100)
        self.assertEqual([p["values"]["loss"] for p in whole["points"]], losses)
        # StepLR halved lr after steps 2 and 4: it went with steps 3 and 5.
        history = client.hyperparameter_changes(opt.session)
        self.assertEqual(history["initial_param_groups"][0]["lr"], HYPER["lr"])
        self.assertEqual([(c["step"], c["reason"], c["param_groups"][0]["lr"]) for c in history["changes"]],
                         [(3, "step", HYPER["lr"] * 0.5), (5, "step", HYPER["lr"] * 0.25)])
        norms = client.norms(opt.session)
        self.assertEqual((norms["version"], norms["step"]), (6, 5))
        by_name = {n["name"]: n for n in norms["params"]}
        for (name, _), p in zip(model.named_parameters(), ref.parameters()):
            ax = torch_opt.state[p]["ax"]
            self.assertAlmostEqual(by_name[name]["norm"], p.detach().double().norm().item(), delta=1e-12 * (1 + p.detach().double().norm().item()))
            self.assertAlmostEqual(by_name[name]["ax_norm"], ax.double().norm().item(), delta=1e-12 * (1 + ax.double().norm().item()))
            self.assertEqual(by_name[name]["eta"], torch_opt.state[p]["eta"].item())

    def _half(self, dtype, transport):
        from asgd_client import ServiceError

        model = make_model()
        opt = self.remote(model.named_parameters(), grad_dtype=dtype, transport=transport)
        ref = make_model()
        torch_opt = torch.optim.ASGD(ref.parameters(), **HYPER)
        for i in range(20):
            for m, o in ((model, opt), (ref, torch_opt)):
                o.zero_grad()
                nn.functional.mse_loss(m(batch(i)[0]), batch(i)[1]).backward()
            for p in ref.parameters():  # what the service receives: the gradient rounded to dtype
                p.grad = p.grad.to(dtype).float()
            try:
                opt.step()
            except ServiceError as err:
                if 400 <= err.status < 500 and transport == "safetensors":
                    self.skipTest(f"the service refuses {dtype} gradients ({err.code}: {err.message}); h12-kernel adds them")
                raise
            torch_opt.step()
        self.assertParamsIdentical(model, ref, str(dtype))

    def test_bfloat16_gradients(self):
        self._half(torch.bfloat16, "safetensors")

    def test_float16_gradients(self):
        self._half(torch.float16, "safetensors")

    def test_half_gradients_over_json_are_the_rounded_values(self):
        self._half(torch.bfloat16, "json")


class RetriesOutlastARestart(ServiceTestCase):
    def test_training_goes_on_across_a_restart_of_the_service(self):
        if not self.srv.restartable:
            self.skipTest("the service was not started by the tests (ASGD_TEST_URL)")
        model = make_model()
        opt = self.remote(model.named_parameters())
        restarted = threading.Event()
        failure = []

        def restart():
            try:
                self.srv.restart(down_s=1.5)
            except BaseException as err:
                failure.append(err)
            finally:
                restarted.set()

        steps = 40
        with self.assertLogs("asgd_client", logging.WARNING) as logs:
            for i in range(steps):
                if i == 15:
                    threading.Thread(target=restart, daemon=True).start()
                    while self.srv.proc is not None and not restarted.is_set():  # until it is going down
                        time.sleep(0.01)
                train(model, opt, range(i, i + 1))
            self.assertTrue(restarted.wait(120))
        self.assertEqual(failure, [])
        self.assertTrue(any("retry" in line for line in logs.output), logs.output)
        want, _ = torch_run(steps=steps)
        self.assertParamsIdentical(model, want)
        self.assertEqual(opt.client.get_session(opt.session)["step"], steps, "every step applied once")


if __name__ == "__main__":
    unittest.main()
