"""Safe retries against the real service: a step whose answer is lost is retried with the same
Idempotency-Key and applied once; a 503 is retried. Training still matches torch bit for bit."""

import time
import unittest

import torch

from _common import ServiceTestCase, batch, make_model, torch_run, train, unique
from _fakes import LocalServer
from asgd_client import Client, Connection, ServiceError

STEPS = 20


class RetriesAreSafe(ServiceTestCase):
    def proxy(self, faults):
        """A proxy in front of the service; ``faults[n]`` says what to do with the n-th step request."""
        counter = {"step": 0}

        def decide(req):
            if req.method == "POST" and req.path.split("?")[0].endswith("/step"):
                counter["step"] += 1
                fault = faults.get(counter["step"])
                if fault == "lose-answer":  # the service applies the step; the client never hears
                    proxy.forward(req)
                    return "drop"
                if fault == "503":
                    return 503, [("Retry-After", "0")], b'{"statusCode":503,"code":"SERVICE_UNAVAILABLE","message":"injected"}'
                if fault == "refuse":
                    return "drop"
            return proxy.forward(req)

        proxy = LocalServer(decide, upstream=self.url)
        self.addCleanup(proxy.close)
        conn = Connection(proxy.url, self.token, retries=4, backoff=0.001)
        self.addCleanup(conn.close)
        return proxy, conn

    def losing_first(self, lose):
        """A proxy in front of the service that loses the answer of the first request for which ``lose(req)``
        holds (the request is made) and forwards everything else."""
        lost = {"done": False}

        def decide(req):
            if not lost["done"] and lose(req):
                lost["done"] = True
                proxy.forward(req)
                return "drop"
            return proxy.forward(req)

        proxy = LocalServer(decide, upstream=self.url)
        self.addCleanup(proxy.close)
        return proxy

    def _train_through(self, transport):
        proxy, conn = self.proxy({3: "lose-answer", 5: "503", 6: "lose-answer", 9: "refuse"})
        model = make_model()
        opt = self.remote(model.named_parameters(), transport=transport, connection=conn)
        train(model, opt, range(STEPS))
        want, _ = torch_run(steps=STEPS)
        self.assertParamsIdentical(model, want)
        info = opt.client.get_session(opt.session)
        self.assertEqual(info["step"], STEPS, "every step applied exactly once")
        steps = [r for r in proxy.requests if r.method == "POST" and r.path.split("?")[0].endswith("/step")]
        self.assertEqual(len(steps), STEPS + 4)
        self.assertEqual(steps[2].headers["idempotency-key"], steps[3].headers["idempotency-key"])

    def test_a_change_whose_answer_is_lost_is_not_made_again_over_later_steps(self):
        # Each change is applied, another worker steps, and the answer is lost: the client sends it again with
        # its Idempotency-Key and gets the first answer (replayed); the other worker's step stays.
        direct = self.client()
        changes = {
            "put_params": lambda c, n: c.put_params(n, {"w": torch.tensor([1.0, 2.0, 3.0])}),
            "put_state_dict": lambda c, n: c.put_state_dict(n, torch.optim.ASGD([torch.zeros(3, requires_grad=True)], lr=0.05).state_dict()),
            "put_checkpoint": lambda c, n: c.put_checkpoint(n, direct.get_checkpoint(n)),
            "set_hyperparameters": lambda c, n: c.set_hyperparameters(n, [{"lr": 0.02}]),
            "restore_snapshot": lambda c, n: c.restore_snapshot(n, direct.list_snapshots(n)[-1]["id"]),
        }
        for what, change in changes.items():
            with self.subTest(what):
                name = unique(what.replace("_", "-"))
                direct.create_session(name, {"w": torch.tensor([0.5, -0.5, 0.25])}, hyperparameters={"lr": 0.1})
                lost = {"done": False}

                def decide(req, name=name):
                    if req.method != "GET" and not lost["done"]:
                        lost["done"] = True
                        proxy.forward(req)  # applied
                        direct.step(name, {"w": torch.tensor([1.0, 1.0, 1.0])})  # another worker steps
                        return "drop"  # the answer is lost
                    return proxy.forward(req)

                proxy = LocalServer(decide, upstream=self.url)
                self.addCleanup(proxy.close)
                client = Client(proxy.url, self.token, connection=Connection(proxy.url, self.token, retries=4, backoff=0.001))
                self.addCleanup(client.close)
                answer = change(client, name)
                sent = [r for r in proxy.requests if r.method != "GET"]
                self.assertEqual(len(sent), 2, "sent again once")
                self.assertEqual(sent[0].headers["idempotency-key"], sent[1].headers["idempotency-key"])
                self.assertIs(answer.get("replayed"), True)
                self.assertEqual(answer["version"], 2, "the first answer")
                session = direct.get_session(name)
                self.assertEqual(session["version"], 3, "the other worker's step is the last change")
                params, _ = direct.get_params(name)
                state_dict = direct.get_state_dict(name)
                self.assertEqual(session["step"], state_dict["state"][0]["step"].item() if state_dict["state"] else 0)
                # The step after the change stays: the parameters are not the change's again.
                if what in ("put_params", "restore_snapshot"):
                    self.assertFalse(torch.equal(params["w"], {"put_params": torch.tensor([1.0, 2.0, 3.0]), "restore_snapshot": torch.tensor([0.5, -0.5, 0.25])}[what]))

    def test_lost_answers_and_503_do_not_step_twice_json(self):
        self._train_through("json")

    def test_lost_answers_and_503_do_not_step_twice_safetensors(self):
        self._train_through("safetensors")

    def test_pipelined_lr_change_holds_whatever_order_its_steps_reach_the_service(self):
        # Found by a review: the step carrying StepLR's new lr lost its answer and was sent again after the next
        # step, which had not carried the lr: the service ran that one with the old lr, silently. Each step
        # must run with the lr its step() was called with, whatever order its requests reach the service in.
        import json
        import urllib.parse
        import urllib.request

        # The step of i=4 (its metrics say so) carries the first new lr: held back here, so that i=5, sent on
        # the other connection while i=4 is in flight, reaches the service first (as after a resend, or two
        # routes). Steps also pass each other in this proxy (a thread and a connection each): the test only
        # counts on i=5 before i=4.
        def decide(req):
            if req.method == "POST" and req.path.split("?")[0].endswith("/step") and (rb'\"i\":4}' in req.body[:2000] or b'"i":4}' in req.body[:2000]):
                time.sleep(0.5)
            return proxy.forward(req)

        proxy = LocalServer(decide, upstream=self.url)
        self.addCleanup(proxy.close)
        conn = Connection(proxy.url, self.token, retries=4, backoff=0.001)
        self.addCleanup(conn.close)
        model = make_model()
        opt = self.remote(model.named_parameters(), connection=conn, pipeline=True)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        called_with = {}
        for i in range(12):
            X, y = batch(i)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(X), y).backward()
            called_with[i] = opt.param_groups[0]["lr"]
            opt.step(metrics={"i": i})
            scheduler.step()
        opt.synchronize()

        def read(path):
            req = urllib.request.Request(f"{self.url}/v1/sessions/{urllib.parse.quote(opt.session)}/{path}",
                                         headers={"authorization": f"Bearer {self.token}"} if self.token else {})
            with urllib.request.urlopen(req) as r:
                return json.load(r)

        step_of = {p["version"]: int(p["values"]["i"]) for p in read("metrics?limit=1000")["points"]}
        versions = sorted(step_of)
        self.assertEqual(sorted(step_of.values()), list(range(12)), "each step once")
        order = [step_of[v] for v in versions]
        self.assertLess(order.index(5), order.index(4), f"i=5 went before i=4: {order}")
        changes = sorted((c["version"], c["param_groups"][0]["lr"]) for c in read("hyperparameters?limit=1000")["changes"])
        lr = opt.defaults["lr"]
        for v in versions:
            lr = next((x for w, x in reversed(changes) if w <= v), lr)
            self.assertEqual(lr, called_with[step_of[v]], f"version {v} (step i={step_of[v]}) ran with lr {lr}; changes {changes}")

    def test_pipelined_steps_with_lost_answers_and_503_step_once_each(self):
        # Sent on the caller's thread and read at the next step: a lost answer or a 503 found then is
        # sent again under the same key, and the loop goes on.
        proxy, conn = self.proxy({3: "lose-answer", 5: "503", 6: "lose-answer", 9: "refuse"})
        model = make_model()
        opt = self.remote(model.named_parameters(), connection=conn, pipeline=True)
        train(model, opt, range(STEPS))
        version = opt.synchronize()
        info = opt.client.get_session(opt.session)
        self.assertEqual(info["step"], STEPS, "every step applied exactly once")
        self.assertEqual(version, info["version"])
        got, _ = opt.client.get_params(opt.session)
        for n, p in model.named_parameters():
            self.assertTrue(torch.equal(p, got[n]), n)
        steps = [r for r in proxy.requests if r.method == "POST" and r.path.split("?")[0].endswith("/step")]
        self.assertEqual(len(steps), STEPS + 4)
        # A step is sent before the previous answer is read, so a retry comes after the next step: each
        # step has its own key and a retry carries its step's key.
        keys = [r.headers["idempotency-key"] for r in steps]
        self.assertEqual(len(set(keys)), STEPS)

    def test_zero_grad_leaves_a_pipelined_step_whose_answer_was_lost_to_the_next_step(self):
        # A review: a connection closed without the answer counted as "arrived", so zero_grad() read it, sent
        # the step again with the retries of the whole budget and raised their error, where the README says it
        # loads an answer that has arrived and never waits. Now the next step() sends it again (its key).
        proxy, conn = self.proxy({2: "lose-answer"})
        model = make_model()
        opt = self.remote(model.named_parameters(), connection=conn, pipeline=True)
        sent = lambda: sum(1 for r in proxy.requests if r.method == "POST" and r.path.split("?")[0].endswith("/step"))  # noqa: E731
        for i in range(2):
            opt.zero_grad()
            model(batch(i)[0]).sum().backward()
            opt.step()
        deadline = time.monotonic() + 10
        while sent() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the proxy has closed the connection without the answer
        before = sent()
        opt.zero_grad()  # raises nothing, sends nothing
        self.assertEqual(sent(), before, "zero_grad() sent nothing")
        model(batch(2)[0]).sum().backward()
        opt.step()  # sends the lost one again (its key), then this one
        version = opt.synchronize()
        info = opt.client.get_session(opt.session)
        self.assertEqual(info["step"], 3, "each step applied once")
        self.assertEqual(version, info["version"])
        got, _ = opt.client.get_params(opt.session)
        for n, p in model.named_parameters():
            self.assertTrue(torch.equal(p, got[n]), n)
        steps = [r for r in proxy.requests if r.method == "POST" and r.path.split("?")[0].endswith("/step")]
        self.assertEqual(len(steps), 4, "the lost one sent again once")
        keys = [r.headers["idempotency-key"] for r in steps]
        self.assertEqual(keys.count(keys[1]), 2, "the lost one, sent again (after the next step: pipelined) with its key")
        self.assertEqual(len(set(keys)), 3)

    def test_a_delete_whose_answer_is_lost_counts_as_made(self):
        # A review: the DELETE was made, its answer lost, and the retry's 404 raised SessionNotFound.
        from asgd_client import SessionNotFound

        direct = self.client()
        name = unique("lost-delete")
        direct.create_session(name, {"w": torch.tensor([0.5, -0.5])}, hyperparameters={"lr": 0.1})
        proxy = self.losing_first(lambda req: req.method == "DELETE")  # deleted, the answer lost
        client = Client(proxy.url, self.token, connection=Connection(proxy.url, self.token, retries=4, backoff=0.001))
        client.delete_session(name)  # made once; the retry found it gone
        self.assertEqual([r.method for r in proxy.requests].count("DELETE"), 2)
        with self.assertRaises(SessionNotFound):
            direct.get_session(name)
        with self.assertRaises(SessionNotFound):  # a delete of a session that is not there still says so
            client.delete_session(name)

    def test_a_worker_whose_create_answer_is_lost_joins_the_session_it_made(self):
        # A review: with create="if_missing" the create was made, its answer lost, and RemoteASGD failed to
        # start (a create is not sent again). Now the session found there is joined.
        from asgd_client import RemoteASGD

        name = unique("lost-create")
        proxy = self.losing_first(lambda req: req.method == "POST" and req.path.split("?")[0] == "/v1/sessions")  # created, the answer lost
        model = make_model()
        opt = RemoteASGD(model.named_parameters(), url=proxy.url, token=self.token, session=name, create="if_missing", lr=0.05,
                         connection=Connection(proxy.url, self.token, retries=1, backoff=0.001))
        self.assertEqual([r.method for r in proxy.requests].count("POST"), 1, "the create was not sent again")
        train(model, opt, range(2))
        self.assertEqual(opt.client.get_session(name)["step"], 2)

    def test_replayed_answer_is_the_first_answer(self):
        model = make_model()
        opt = self.remote(model.named_parameters(), transport="json")
        grads = {n: torch.full_like(p, 0.01) for n, p in model.named_parameters()}
        first = opt.client.step(opt.session, grads, idempotency_key="fixed-key-1")
        again = opt.client.step(opt.session, grads, idempotency_key="fixed-key-1")
        self.assertEqual(again["version"], first["version"])
        self.assertTrue(again.get("replayed"))
        self.assertEqual(opt.client.get_session(opt.session)["step"], 1)
        with self.assertRaises(ServiceError) as caught:  # same key, other gradients
            opt.client.step(opt.session, {n: g * 2 for n, g in grads.items()}, idempotency_key="fixed-key-1")
        self.assertEqual(caught.exception.code, "IDEMPOTENCY_KEY_REUSED")

    def test_non_finite_gradient_is_refused_not_retried(self):
        model = make_model()
        opt = self.remote(model.named_parameters(), transport="json")
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        next(model.parameters()).grad[0, 0] = float("nan")
        with self.assertRaises(ServiceError) as caught:
            opt.step()
        self.assertEqual(caught.exception.status, 422)
        self.assertEqual(caught.exception.code, "NON_FINITE_GRADIENT")
        self.assertEqual(opt.client.get_session(opt.session)["step"], 0)


if __name__ == "__main__":
    unittest.main()
