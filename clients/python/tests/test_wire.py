"""What RemoteASGD puts on the wire, against a scripted fake service (no asgd-serve needed): one request per
step, hyperparameters only when they changed, metrics and half-precision gradients in the safetensors
body, and the fallback for a service whose step answer has no parameters."""

import json
import logging
import unittest
from urllib.parse import parse_qs, urlsplit

import torch

from _fakes import LocalServer
from asgd_client import Connection, RemoteASGD
from asgd_client import safetensors as st

SHAPES = {"w": [2, 3], "b": [2]}
GROUP = {"lr": 0.01, "lambd": 1e-4, "alpha": 0.75, "t0": 1e6, "weight_decay": 0.0, "maximize": False, "foreach": None}


class FakeService:
    """Creates one session and answers steps with parameters of value ``version`` (with_params=False:
    the answer of a service before issue 11, which has no parameters)."""

    def __init__(self, test, with_params=True):
        self.version, self.step, self.with_params = 1, 0, with_params
        self.srv = LocalServer(self.decide)
        test.addCleanup(self.srv.close)
        self.conn = Connection(self.srv.url, retries=0)
        test.addCleanup(self.conn.close)

    def params(self):
        return {n: {"shape": s, "data": [float(self.version)] * (s[0] * (s[1] if len(s) > 1 else 1))} for n, s in SHAPES.items()}

    def decide(self, req):
        path = urlsplit(req.path).path
        info = {"name": "s", "version": self.version, "step": self.step,
                "params": [{"name": n, "shape": s} for n, s in SHAPES.items()], "param_groups": [dict(GROUP, params=[0, 1])]}
        if req.method == "POST" and path == "/v1/sessions":
            return 201, [], json.dumps(info).encode()
        if req.method == "POST" and path.endswith("/step"):
            self.version += 1
            self.step += 1
            answer = {"session": "s", "step": self.step, "version": self.version, "staleness": 0}
            if self.with_params:
                answer["params"] = self.params()
            return 200, [("ETag", f'"{self.version}"')], json.dumps(answer).encode()
        if req.method == "GET" and path.endswith("/params") and "safetensors" in req.headers.get("accept", ""):
            body = st.encode({n: (v["shape"], v["data"]) for n, v in self.params().items()})
            return 200, [("ETag", f'"{self.version}"'), ("Content-Type", "application/x-safetensors")], body
        if req.method == "GET" and path.endswith("/params"):
            return 200, [("ETag", f'"{self.version}"')], json.dumps({"version": self.version, "params": self.params()}).encode()
        return 404, [], b'{"statusCode":404,"code":"SESSION_NOT_FOUND","message":"fake"}'

    def steps(self):
        return [r for r in self.srv.requests if r.method == "POST" and r.path.split("?")[0].endswith("/step")]


def step_metadata(req):
    return st.decode(req.body)


class Wire(unittest.TestCase):
    def model(self):
        return [("w", torch.nn.Parameter(torch.zeros(2, 3))), ("b", torch.nn.Parameter(torch.zeros(2)))]

    def test_one_request_per_step_and_hyperparameters_only_when_changed(self):
        fake = FakeService(self)
        params = self.model()
        opt = RemoteASGD(params, session="s", create=True, connection=fake.conn)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        before = len(fake.srv.requests)
        for _ in range(5):
            opt.zero_grad()
            for _, p in params:
                p.grad = torch.ones_like(p)
            opt.step(metrics={"loss": 0.5})
            sched.step()
        self.assertEqual(len(fake.srv.requests) - before, 5, "one request per step")
        sent = []
        for req in fake.steps():
            self.assertEqual(parse_qs(urlsplit(req.path).query)["return"], ["params"])
            self.assertEqual(req.headers["accept"], "application/x-safetensors")
            tensors, meta = step_metadata(req)
            self.assertEqual(json.loads(meta["metrics"]), {"loss": 0.5})
            self.assertEqual({t.dtype for t in tensors.values()}, {"F32"})
            sent.append(json.loads(meta["param_groups"]) if "param_groups" in meta else None)
        # StepLR halves lr after steps 2 and 4: sent with steps 3 and 5, nothing else.
        self.assertEqual(sent, [None, None, [{"lr": 0.005}], None, [{"lr": 0.0025}]])
        self.assertEqual(opt.version, 6)
        self.assertTrue(all(torch.equal(p, torch.full_like(p, 6.0)) for _, p in params))

    def test_half_precision_gradients_and_json_bodies(self):
        fake = FakeService(self)
        params = self.model()
        opt = RemoteASGD(params, session="s", create=True, connection=fake.conn, grad_dtype=torch.bfloat16)
        for _, p in params:
            p.grad = torch.full_like(p, 1 / 3)
        opt.step()
        tensors, _ = step_metadata(fake.steps()[-1])
        self.assertEqual({t.dtype for t in tensors.values()}, {"BF16"})
        self.assertEqual(tensors["b"].tolist(), [torch.tensor(1 / 3).bfloat16().item()] * 2)
        opt.client.transport = "json"
        opt.param_groups[0]["t0"] = 5
        opt.step(metrics={"samples": 32})
        body = json.loads(fake.steps()[-1].body)
        self.assertEqual(body["param_groups"], [{"t0": 5.0}])
        self.assertEqual(body["metrics"], {"samples": 32})
        self.assertEqual(body["grads"]["b"]["data"], [torch.tensor(1 / 3).bfloat16().item()] * 2)

    def test_a_service_without_parameters_in_the_step_answer(self):
        fake = FakeService(self, with_params=False)
        params = self.model()
        opt = RemoteASGD(params, session="s", create=True, connection=fake.conn)
        for _, p in params:
            p.grad = torch.ones_like(p)
        opt.step()  # falls back to a second request for the parameters
        self.assertEqual([r.method for r in fake.srv.requests[-2:]], ["POST", "GET"])
        self.assertEqual(opt.version, 2)
        opt.param_groups[0]["lr"] = 0.5  # it would ignore them: refused loudly, not trained wrongly
        with self.assertRaisesRegex(RuntimeError, "hyperparameters"):
            opt.step()

    def test_a_replayed_answer_with_the_current_parameters_sets_their_version(self):
        # A retried step whose version the service no longer keeps: its first answer, with the parameters
        # now and their version as params_version (JSON) or __metadata__ params_version (safetensors).
        for accept_safetensors in (False, True):
            fake = FakeService(self)
            decide = fake.decide

            def replay_gone(req, fake=fake, decide=decide, accept_safetensors=accept_safetensors):
                if not (req.method == "POST" and req.path.split("?")[0].endswith("/step")):
                    return decide(req)
                fake.version = 9  # others stepped meanwhile
                meta = {"session": "s", "step": "1", "version": "2", "staleness": "0", "replayed": "true", "params_version": "9"}
                if accept_safetensors:
                    body = st.encode({n: (v["shape"], v["data"]) for n, v in fake.params().items()}, metadata=meta)
                    return 200, [("ETag", '"2"'), ("Content-Type", "application/x-safetensors")], body
                answer = {"session": "s", "step": 1, "version": 2, "staleness": 0, "replayed": True, "params_version": 9, "params": fake.params()}
                return 200, [("ETag", '"2"')], json.dumps(answer).encode()

            fake.srv._decide = replay_gone
            params = self.model()
            opt = RemoteASGD(params, session="s", create=True, connection=fake.conn)
            for _, p in params:
                p.grad = torch.ones_like(p)
            opt.step()
            self.assertEqual(opt.version, 9, "the version of the parameters loaded")
            self.assertEqual(params[1][1].tolist(), [9.0, 9.0])
            self.assertEqual(opt.last_step["version"], 2, "the step's own version")

    def test_create_defaults_to_if_missing_with_a_name_and_logs_it(self):
        fake = FakeService(self)
        with self.assertLogs("asgd_client", logging.INFO) as logs:
            RemoteASGD(self.model(), session="s", connection=fake.conn)
        self.assertEqual([(r.method, urlsplit(r.path).path) for r in fake.srv.requests[:2]],
                         [("GET", "/v1/sessions/s"), ("POST", "/v1/sessions")])
        self.assertIn("created", logs.output[-1])


if __name__ == "__main__":
    unittest.main()
