"""What a contribution to a synchronous round puts on the wire, against a scripted fake service (no
asgd-serve needed): base_version, worker and samples with the step, a 202 pending followed by the same
request with the same Idempotency-Key, the answered parameters loaded, and what rounds cannot do."""

import json
import time
import unittest
from urllib.parse import parse_qs, parse_qsl, urlsplit

import torch

from _fakes import LocalServer
from asgd_client import Client, Connection, DuplicateContribution, RemoteASGD, RoundPending
from asgd_client import safetensors as st

SHAPES = {"w": [2, 3], "b": [2]}
GROUP = {"lr": 0.01, "lambd": 1e-4, "alpha": 0.75, "t0": 1e6, "weight_decay": 0.0, "maximize": False, "foreach": None}
AGGREGATION = {"contributions": 2}


class FakeRounds:
    """One session with ``aggregation``; each step request is answered 202 ``pending`` times in a row
    (per Idempotency-Key), then 200 with parameters of value ``version + 1``."""

    def __init__(self, test, pending=2, aggregation=AGGREGATION, duplicate=False):
        self.version, self.pending, self.aggregation, self.duplicate = 1, pending, aggregation, duplicate
        self.answered_202 = {}
        self.srv = LocalServer(self.decide)
        test.addCleanup(self.srv.close)
        self.conn = Connection(self.srv.url, retries=0)
        test.addCleanup(self.conn.close)

    def info(self):
        return {"name": "s", "version": self.version, "step": self.version - 1, "aggregation": self.aggregation, "round": None,
                "params": [{"name": n, "shape": s} for n, s in SHAPES.items()], "param_groups": [dict(GROUP, params=[0, 1])]}

    def tensors(self, value):
        return {n: (s, [float(value)] * (s[0] * (s[1] if len(s) > 1 else 1))) for n, s in SHAPES.items()}

    def decide(self, req):
        path = urlsplit(req.path).path
        if req.method == "POST" and path == "/v1/sessions":
            return 201, [], json.dumps(self.info()).encode()
        if req.method == "GET" and path == "/v1/sessions/s":
            return 200, [], json.dumps(self.info()).encode()
        if req.method == "POST" and path.endswith("/step"):
            if self.duplicate:
                body = {"statusCode": 409, "code": "DUPLICATE_CONTRIBUTION", "message": f"worker: w0 already contributed to the round at version {self.version}",
                        "version": self.version}
                return 409, [], json.dumps(body).encode()
            key = req.headers["idempotency-key"]
            round_ = {"version": self.version, "contributions": 1, "samples": None, "workers": ["w0"], "age_s": 0.5}
            if self.answered_202.get(key, 0) < self.pending:
                self.answered_202[key] = self.answered_202.get(key, 0) + 1
                return 202, [("Content-Type", "application/json")], json.dumps({"pending": True, "round": round_}).encode()
            self.version += 1
            meta = {"session": "s", "version": str(self.version), "step": str(self.version - 1), "staleness": "0",
                    "round": json.dumps({"version": self.version - 1, "contributions": 2, "samples": 32, "timed_out": False})}
            body = st.encode(self.tensors(self.version), metadata=meta)
            return 200, [("ETag", f'"{self.version}"'), ("Content-Type", "application/x-safetensors")], body
        query = dict(parse_qsl(urlsplit(req.path).query))
        if req.method == "GET" and path.endswith("/params") and "after_version" in query:
            # The round the duplicate's worker is in steps after one 304 (another worker's contribution).
            self.waits = getattr(self, "waits", 0) + 1
            if self.waits == 1 or getattr(self, "stuck", False):
                time.sleep(0.2)  # a hold, shortened
                return 304, [("ETag", f'"{self.version}"')], b""
            self.version = int(query["after_version"]) + 1
            if query.get("format") == "safetensors":
                return 200, [("ETag", f'"{self.version}"'), ("Content-Type", "application/x-safetensors")], st.encode(self.tensors(self.version))
            body = {"version": self.version, "params": {n: {"shape": s, "data": d} for n, (s, d) in self.tensors(self.version).items()}}
            return 200, [("ETag", f'"{self.version}"'), ("Content-Type", "application/json")], json.dumps(body).encode()
        if req.method == "GET" and path.endswith("/params"):
            body = st.encode(self.tensors(self.version))
            return 200, [("ETag", f'"{self.version}"'), ("Content-Type", "application/x-safetensors")], body
        return 404, [], b'{"statusCode":404,"code":"SESSION_NOT_FOUND","message":"fake"}'

    def steps(self):
        return [r for r in self.srv.requests if r.method == "POST" and urlsplit(r.path).path.endswith("/step")]


def model():
    return [("w", torch.nn.Parameter(torch.zeros(2, 3))), ("b", torch.nn.Parameter(torch.zeros(2)))]


def with_grads(params):
    for _, p in params:
        p.grad = torch.ones_like(p)


class Contribution(unittest.TestCase):
    def test_a_pending_round_is_asked_again_with_the_same_key_and_its_parameters_loaded(self):
        fake = FakeRounds(self, pending=2)
        params = model()
        opt = RemoteASGD(params, session="s", create=False, connection=fake.conn, worker="w0", round_wait_s=1)
        self.assertEqual(opt.aggregation, AGGREGATION)
        with_grads(params)
        opt.step(samples=16)
        steps = fake.steps()
        self.assertEqual(len(steps), 3, "202, 202, then 200")
        self.assertEqual(len({r.headers["idempotency-key"] for r in steps}), 1, "one key for the whole wait")
        self.assertEqual(len({r.body for r in steps}), 1, "the same body each time")
        for r in steps:
            query = parse_qs(urlsplit(r.path).query)
            self.assertEqual(query, {"return": ["params"], "wait": ["1"], "base_version": ["1"], "worker": ["w0"], "samples": ["16"]})
        self.assertEqual(opt.version, 2)
        self.assertTrue(all(torch.equal(p, torch.full_like(p, 2.0)) for _, p in params), "the parameters of version 2")
        self.assertEqual(opt.last_step["round"], {"version": 1, "contributions": 2, "samples": 32, "timed_out": False})
        with_grads(params)
        opt.step()  # the next round: computed at version 2
        self.assertEqual(parse_qs(urlsplit(fake.steps()[-1].path).query)["base_version"], ["2"])
        self.assertNotIn("samples", parse_qs(urlsplit(fake.steps()[-1].path).query))

    def test_json_transport_carries_worker_and_samples_in_the_body(self):
        fake = FakeRounds(self, pending=1)
        client = Client(transport="json", connection=fake.conn)
        answer = client.step("s", {"b": torch.ones(2)}, base_version=1, worker="w1", samples=8)
        first, second = fake.steps()
        self.assertEqual(first.body, second.body)
        self.assertEqual(first.headers["idempotency-key"], second.headers["idempotency-key"])
        body = json.loads(first.body)
        self.assertEqual((body["base_version"], body["worker"], body["samples"]), (1, "w1", 8))
        self.assertEqual(answer["version"], 2)

    def test_max_wait_gives_up_with_the_key_to_resume(self):
        fake = FakeRounds(self, pending=5)
        client = Client(connection=fake.conn)
        with self.assertRaises(RoundPending) as caught:
            client.step("s", {"b": torch.ones(2)}, base_version=1, worker="w0", max_wait_s=0)
        self.assertEqual(len(fake.steps()), 1)
        self.assertEqual(caught.exception.round["workers"], ["w0"])
        key = caught.exception.idempotency_key
        self.assertEqual(fake.steps()[0].headers["idempotency-key"], key)
        answer = client.step("s", {"b": torch.ones(2)}, base_version=1, worker="w0", idempotency_key=key)
        self.assertEqual(answer["version"], 2)
        self.assertEqual({r.headers["idempotency-key"] for r in fake.steps()}, {key})

    def test_max_wait_asks_for_no_longer_hold_than_it_has_left(self):
        # Found by a review: the hold asked for was rounded up to whole seconds, so max_wait_s=1.5 asked for 2.
        fake = FakeRounds(self, pending=1000)
        client = Client(connection=fake.conn)
        with self.assertRaises(RoundPending):
            client.step("s", {"b": torch.ones(2)}, base_version=1, worker="w0", max_wait_s=0.05)
        asked = [float(parse_qs(urlsplit(r.path).query)["wait"][0]) for r in fake.steps()]
        self.assertTrue(all(0 <= w <= 0.05 for w in asked), asked)
        self.assertEqual(asked, sorted(asked, reverse=True), "what is left shrinks")

    def test_a_hold_longer_than_the_socket_timeout_is_waited_for(self):
        # The service holds a contribution up to ?wait= seconds: a socket timeout shorter than that is no
        # sign of a dead connection (it was a timeout, then retries until the budget ran out).
        fake = FakeRounds(self, pending=1)
        decide = fake.srv._decide
        fake.srv._decide = lambda req: (time.sleep(1.0) if req.path.split("?")[0].endswith("/step") else None) or decide(req)
        client = Client(connection=Connection(fake.srv.url, timeout=0.3, retry_budget_s=0.3))
        answer = client.step("s", {"b": torch.ones(2)}, base_version=1, worker="w0", wait=2)
        self.assertEqual(answer["version"], 2)
        self.assertEqual(len(fake.steps()), 2, "a 202 after the hold, then the answer: no request lost to a timeout")

    def test_a_connection_lost_late_in_a_hold_is_retried_whatever_the_budget(self):
        # A proxy or a replica going away 1 s into a 2 s hold: the request (its Idempotency-Key) goes again,
        # though the retry budget (0.3 s) is shorter than the time already spent in the hold.
        fake = FakeRounds(self, pending=0)
        decide = fake.srv._decide

        def cut_first(req):
            if req.path.split("?")[0].endswith("/step") and len(fake.steps()) == 1:
                time.sleep(1.0)
                return "drop"
            return decide(req)

        fake.srv._decide = cut_first
        client = Client(connection=Connection(fake.srv.url, retry_budget_s=0.3, backoff=0.05))
        answer = client.step("s", {"b": torch.ones(2)}, base_version=1, worker="w0", wait=2)
        self.assertEqual(answer["version"], 2)
        first, second = fake.steps()
        self.assertEqual(first.headers["idempotency-key"], second.headers["idempotency-key"])

    def test_a_duplicate_contribution_at_its_own_version_waits_for_the_round_and_loads_it(self):
        # This worker's contribution is in the round already (sent before a restart): the new gradient is
        # dropped and the round's result loaded once it has stepped (GET params?after_version=, 304 until then).
        fake = FakeRounds(self, duplicate=True)
        params = model()
        opt = RemoteASGD(params, session="s", create=False, connection=fake.conn, worker="w0", round_wait_s=1)
        with_grads(params)
        with self.assertLogs("asgd_client", level="WARNING") as logs:
            opt.step()
        self.assertTrue(any("is in already" in line for line in logs.output), logs.output)
        waits = [r.path for r in fake.srv.requests if r.method == "GET" and "after_version=1" in r.path]
        self.assertEqual(len(waits), 2, "asked again after the 304")
        self.assertTrue(all("wait=1" in path for path in waits), waits)
        self.assertTrue(all("format=safetensors" in path for path in waits), "read as get_params reads: safetensors")
        self.assertEqual(opt.version, 2)
        self.assertTrue(all(torch.equal(p, torch.full_like(p, 2.0)) for _, p in params), "the round's parameters")
        self.assertEqual(len(fake.steps()), 1, "the gradient is not sent again")
        # Its next contribution refused as a duplicate is another live process with this worker id: raised.
        with_grads(params)
        with self.assertRaises(DuplicateContribution):
            opt.step()

    def test_a_duplicate_of_a_restart_whose_round_does_not_step_in_max_round_wait_s_is_round_pending(self):
        from asgd_client import RoundPending

        fake = FakeRounds(self, duplicate=True)
        fake.stuck = True  # 304 for good: the round never steps
        params = model()
        opt = RemoteASGD(params, session="s", create=False, connection=fake.conn, worker="w0", round_wait_s=1, max_round_wait_s=2)
        with_grads(params)
        started = time.monotonic()
        with self.assertLogs("asgd_client", level="WARNING"), self.assertRaises(RoundPending):
            opt.step()
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(opt.version, 1)

    def test_a_duplicate_contribution_at_another_version_is_raised(self):
        fake = FakeRounds(self, duplicate=True)
        params = model()
        opt = RemoteASGD(params, session="s", create=False, connection=fake.conn, worker="w0")
        fake.version = 3  # the 409 says another round than the one this worker holds
        with_grads(params)
        with self.assertRaises(DuplicateContribution) as caught:
            opt.step()
        self.assertEqual(caught.exception.status, 409)
        self.assertIn("worker", caught.exception.message)
        self.assertEqual(opt.version, 1)
        self.assertTrue(all(torch.equal(p, torch.ones_like(p)) for _, p in params), "still version 1's parameters")


class WhatRoundsCannotDo(unittest.TestCase):
    def test_pipeline_with_aggregation_raises_before_any_request(self):
        srv = LocalServer(lambda req: (500, [], b""))
        self.addCleanup(srv.close)
        conn = Connection(srv.url, retries=0)
        with self.assertRaisesRegex(ValueError, "pipeline"):
            RemoteASGD(model(), session="s", connection=conn, pipeline=True, aggregation={"contributions": 2})
        with self.assertRaisesRegex(ValueError, "apply"):
            RemoteASGD(model(), session="s", connection=conn, on_stale="apply", aggregation={"contributions": 2})
        self.assertEqual(srv.requests, [])

    def test_pipeline_on_joining_a_session_with_aggregation_raises(self):
        fake = FakeRounds(self)
        with self.assertRaisesRegex(ValueError, "pipeline"):
            RemoteASGD(model(), session="s", create=False, connection=fake.conn, pipeline=True)
        self.assertEqual(fake.steps(), [])

    def test_a_bad_worker_id_is_refused_locally(self):
        fake = FakeRounds(self)
        for bad in ("", "a b", "x" * 129, "w/0"):
            with self.assertRaisesRegex(ValueError, "worker"):
                RemoteASGD(model(), session="s", create=False, connection=fake.conn, worker=bad)
        self.assertEqual(fake.srv.requests, [])

    def test_the_default_worker_ids_differ_between_optimizers(self):
        fake = FakeRounds(self)
        a = RemoteASGD(model(), session="s", create=False, connection=fake.conn)
        b = RemoteASGD(model(), session="s", create=False, connection=fake.conn)
        self.assertNotEqual(a.worker, b.worker)
        self.assertRegex(a.worker, r"^[A-Za-z0-9._-]{1,128}$")

    def test_create_sends_the_aggregation(self):
        fake = FakeRounds(self)
        RemoteASGD(model(), session="s", create=True, connection=fake.conn, worker="w0", aggregation={"contributions": 2})
        create = next(r for r in fake.srv.requests if r.method == "POST")
        _, meta = st.decode(create.body)
        self.assertEqual(json.loads(meta["asgd"])["aggregation"], {"contributions": 2})


if __name__ == "__main__":
    unittest.main()
