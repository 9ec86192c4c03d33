"""Tests that need no service: safetensors codec, JSON conversions, the HTTP retry policy."""

import json
import math
import struct
import unittest

import torch

import _server  # noqa: F401  (puts the package on sys.path)
from _fakes import LocalServer
from asgd_client import Client, Connection, ConnectionFailed, ServiceError, ServiceUnavailable, SessionNotFound, UnsupportedFormat
from asgd_client import safetensors as st
from asgd_client.tensors import group_from_json, state_dict_from_json, state_dict_to_json, tensor_from_json, tensor_to_json


class Safetensors(unittest.TestCase):
    def test_layout_is_the_reference_layout(self):
        data = st.encode({"w": torch.tensor([[1.0, -2.0]]), "b": torch.tensor([0.5])}, metadata={"format": "pt"})
        (n,) = struct.unpack("<Q", data[:8])
        self.assertEqual((8 + n) % 8, 0, "header padded to 8 bytes")
        header = json.loads(data[8 : 8 + n])
        self.assertEqual(header["w"], {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]})
        self.assertEqual(header["b"], {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]})
        self.assertEqual(header["__metadata__"], {"format": "pt"})
        self.assertEqual(data[8 + n :], struct.pack("<3f", 1.0, -2.0, 0.5))

    def test_round_trip_is_bitwise(self):
        g = torch.Generator().manual_seed(0)
        tensors = {
            "a": torch.randn(3, 4, 5, generator=g),
            "scalar": torch.tensor(3.25),
            "empty": torch.zeros(0, 3),
            "special": torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-45]),
        }
        out, meta = st.decode_torch(st.encode(tensors))
        self.assertEqual(meta, {})
        self.assertEqual(list(out), list(tensors))
        for k, t in tensors.items():
            self.assertEqual(out[k].shape, t.shape)
            self.assertEqual(out[k].dtype, torch.float32)
            self.assertTrue(torch.equal(out[k].view(torch.int32), t.view(torch.int32)), k)

    def test_numpy_and_plain_inputs(self):
        import numpy as np

        data = st.encode({"n": np.arange(6, dtype=np.float64).reshape(2, 3), "l": ([2], [1.5, 2.5])})
        raw, _ = st.decode(data)
        self.assertEqual(raw["n"].shape, [2, 3])
        self.assertEqual(raw["n"].tolist(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
        self.assertEqual(raw["l"].tolist(), [1.5, 2.5])

    def test_other_dtypes_are_read(self):
        header = json.dumps({"i": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]},
                             "h": {"dtype": "BF16", "shape": [1], "data_offsets": [16, 18]}}).encode()
        data = struct.pack("<Q", len(header)) + header + struct.pack("<2q", -3, 7) + struct.pack("<H", 0x3FC0)
        raw, _ = st.decode(data)
        self.assertEqual(raw["i"].tolist(), [-3, 7])
        self.assertEqual(raw["h"].tolist(), [1.5])
        t = st.raw_to_torch(raw["i"])
        self.assertEqual(t.dtype, torch.int64)
        self.assertEqual(st.raw_to_torch(raw["h"]).float().tolist(), [1.5])

    def test_invalid_files_are_refused(self):
        for bad in [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", struct.pack("<Q", 100) + b"{}",
                    struct.pack("<Q", 2) + b"[]",
                    (lambda h: struct.pack("<Q", len(h)) + h + b"\0" * 4)(b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'),
                    (lambda h: struct.pack("<Q", len(h)) + h)(b'{"x":{"dtype":"Q9","shape":[],"data_offsets":[0,0]}}')]:
            with self.assertRaises(st.SafetensorsError, msg=repr(bad)):
                st.decode(bad)


    def test_a_finite_gradient_that_overflows_half_precision_is_refused_naming_it(self):
        from asgd_client.client import _safetensors_step

        with self.assertRaisesRegex(OverflowError, r"^grads\['b'\]: element 1 \(1000000\.0\) overflows float16 \(largest finite 65504\)"):
            _safetensors_step({"w": torch.ones(2), "b": torch.tensor([1.0, 1e6])}, {}, "F16")
        # Infinities and NaN are sent as they are (the service names them); the largest finite F16 is fine.
        _safetensors_step({"b": torch.tensor([float("inf"), float("nan"), 65504.0])}, {}, "F16")
        _safetensors_step({"b": torch.tensor([1e6])}, {}, "BF16")
        # The encoder itself rounds as torch's .half() does: 1e6 becomes inf there.
        raw, _ = st.decode(st.encode({"b": torch.tensor([1e6])}, dtype="F16"))
        self.assertTrue(torch.isinf(st.raw_to_torch(raw["b"])).all())


class JsonForms(unittest.TestCase):
    def test_tensor_json_round_trip_keeps_non_finite(self):
        t = torch.tensor([[1.0, math.nan], [math.inf, -math.inf]])
        j = tensor_to_json(t)
        self.assertEqual(j["data"][1:], ["NaN", "Infinity", "-Infinity"])
        json.dumps(j, allow_nan=False)
        back = tensor_from_json(json.loads(json.dumps(j)))
        self.assertTrue(torch.equal(back.view(torch.int32)[0, :1], t.view(torch.int32)[0, :1]))
        self.assertTrue(math.isnan(back[0, 1].item()))
        self.assertEqual(back[1].tolist(), [math.inf, -math.inf])

    def test_an_infinite_t0_is_refused_with_what_behaves_the_same(self):
        # torch takes t0=inf (averaging never starts); JSON has no inf: the message says what to give instead.
        p = torch.nn.Parameter(torch.zeros(2))
        sd = torch.optim.ASGD([p], t0=math.inf).state_dict()
        with self.assertRaisesRegex(ValueError, r"^param_groups: t0 = inf is not finite \(JSON has no inf; t0=1e30 behaves the same"):
            state_dict_to_json(sd)

    def test_float32_survives_the_decimal_round_trip(self):
        g = torch.Generator().manual_seed(3)
        t = torch.randn(1000, generator=g) * torch.logspace(-40, 38, 1000)
        back = tensor_from_json(json.loads(json.dumps(tensor_to_json(t))))
        self.assertTrue(torch.equal(back.view(torch.int32), t.view(torch.int32)))

    def test_state_dict_json_round_trip_equals_torch(self):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.ASGD(model.parameters(), lr=0.1, t0=1.0, weight_decay=0.01)
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
        want = opt.state_dict()
        body = json.loads(json.dumps(state_dict_to_json(want), allow_nan=False))
        self.assertEqual(sorted(body["state"]), ["0", "1"])
        got = state_dict_from_json(body)
        self.assertEqual(got["param_groups"], want["param_groups"])
        for i in want["state"]:
            for k in want["state"][i]:
                self.assertTrue(torch.equal(got["state"][i][k], want["state"][i][k]))
                self.assertEqual(got["state"][i][k].dtype, want["state"][i][k].dtype)
        torch.optim.ASGD(torch.nn.Linear(3, 2).parameters()).load_state_dict(got)

    def test_group_values_numpy_tensors_and_param_names_as_json(self):
        # What torch keeps in a group travels as the Python values JSON carries; param_names as a list of strings.
        import numpy as np

        group = {"param_names": ["a", "b"], "lr": np.float32(0.1), "t0": np.int64(3), "maximize": np.bool_(True),
                 "initial_lr": torch.tensor(0.25), "params": [0, 1]}
        got = state_dict_to_json({"state": {}, "param_groups": [group]})["param_groups"][0]
        self.assertEqual(got, {"param_names": ["a", "b"], "lr": float(np.float32(0.1)), "t0": 3, "maximize": True,
                               "initial_lr": 0.25, "params": [0, 1]})
        self.assertEqual({k: type(v) for k, v in got.items()},
                         {"param_names": list, "lr": float, "t0": int, "maximize": bool, "initial_lr": float, "params": list})
        json.dumps(got, allow_nan=False)
        with self.assertRaisesRegex(TypeError, "tags"):  # lists of strings only as param_names
            state_dict_to_json({"state": {}, "param_groups": [{"tags": ["x"], "params": [0]}]})

    def test_groups_keep_only_this_torchs_flags(self):
        local = set(torch.optim.ASGD([torch.zeros(1, requires_grad=True)]).param_groups[0]) - {"params"}
        g = group_from_json({"lr": 1, "lambd": 0.0001, "alpha": 0.75, "t0": 1000000, "weight_decay": 0, "foreach": None,
                             "maximize": False, "differentiable": False, "capturable": False, "initial_lr": 0.5, "params": [0]})
        self.assertEqual(set(g) - {"params", "initial_lr"}, local)
        self.assertIsInstance(g["lr"], float)
        self.assertIsInstance(g["t0"], float)
        self.assertEqual(list(g)[-1], "params")


class RetryPolicy(unittest.TestCase):
    def serve(self, decide):
        srv = LocalServer(decide)
        self.addCleanup(srv.close)
        conn = Connection(srv.url, retries=3, backoff=0.001)
        self.addCleanup(conn.close)
        return srv, conn

    def test_step_is_retried_with_the_same_idempotency_key_on_503(self):
        answers = iter([(503, [("Retry-After", "0")], b'{"statusCode":503,"code":"SERVICE_UNAVAILABLE","message":"busy"}'),
                        (200, [("ETag", '"7"')], b'{"session":"s","step":3,"version":7,"staleness":0}')])
        srv, conn = self.serve(lambda req: next(answers))
        answer = Client(connection=conn, transport="json").step("s", {"w": torch.ones(2)})
        self.assertEqual(answer["version"], 7)
        keys = [r.headers["idempotency-key"] for r in srv.requests]
        self.assertEqual(len(keys), 2)
        self.assertEqual(keys[0], keys[1])
        self.assertEqual(srv.requests[0].body, srv.requests[1].body)

    def test_step_is_retried_after_a_dropped_connection(self):
        state = {"n": 0}

        def decide(req):
            state["n"] += 1
            return "drop" if state["n"] == 1 else (200, [], b'{"session":"s","step":1,"version":2,"staleness":0}')

        srv, conn = self.serve(decide)
        Client(connection=conn, transport="safetensors").step("s", {"w": torch.ones(2)})
        self.assertEqual(len(srv.requests), 2)
        self.assertEqual(srv.requests[0].headers["idempotency-key"], srv.requests[1].headers["idempotency-key"])
        self.assertEqual(srv.requests[0].headers["content-type"], "application/x-safetensors")

    def test_create_is_not_retried_after_a_dropped_connection(self):
        srv, conn = self.serve(lambda req: "drop")
        with self.assertRaises(ConnectionFailed):
            Client(connection=conn).create_session("s", {"w": torch.ones(1)})
        self.assertEqual(len(srv.requests), 1)

    def test_503_that_persists_is_raised_after_the_retries(self):
        srv, conn = self.serve(lambda req: (503, [], b'{"statusCode":503,"code":"SERVICE_UNAVAILABLE","message":"db down"}'))
        with self.assertRaises(ServiceUnavailable) as caught:
            Client(connection=conn).get_session("s")
        self.assertEqual(len(srv.requests), 4)
        self.assertIn("db down", str(caught.exception))

    def test_names_that_cannot_be_a_path_segment_are_refused_before_a_request(self):
        # '' read the session list (GET /v1/sessions/), and a proxy that normalizes paths takes '.' and '..'
        # as dot segments: a ValueError naming it, and nothing is sent.
        srv, conn = self.serve(lambda req: (200, [], b'{"sessions":[],"next":null}'))
        client = Client(connection=conn)
        for name in ("", ".", ".."):
            for call in (lambda: client.get_session(name), lambda: client.delete_session(name),
                         lambda: client.step(name, {"w": torch.ones(1)}), lambda: client.get_params(name)):
                with self.assertRaises(ValueError) as caught:
                    call()
                self.assertIn(f"session name {name!r}", str(caught.exception))
        self.assertEqual(srv.requests, [])

    def test_client_errors_are_not_retried_and_name_the_request(self):
        srv, conn = self.serve(lambda req: (404, [], b'{"statusCode":404,"code":"SESSION_NOT_FOUND","message":"session \\"x\\" does not exist"}'))
        with self.assertRaises(SessionNotFound) as caught:
            Client(connection=conn).get_session("x")
        self.assertEqual(len(srv.requests), 1)
        self.assertIn("GET http://127.0.0.1", str(caught.exception))
        self.assertEqual(caught.exception.code, "SESSION_NOT_FOUND")

    def test_unsupported_format_falls_back_to_json_in_auto_mode(self):
        def decide(req):
            if req.headers.get("content-type") == "application/x-safetensors":
                return 415, [], b'{"statusCode":415,"code":"UNSUPPORTED_MEDIA_TYPE","message":"use application/json"}'
            return 200, [], b'{"session":"s","step":1,"version":2,"staleness":0}'

        srv, conn = self.serve(decide)
        with self.assertRaises(UnsupportedFormat):
            Client(connection=conn, transport="safetensors").step("s", {"w": torch.ones(1)})
        client = Client(connection=conn, transport="auto")
        with self.assertWarns(RuntimeWarning):
            client.step("s", {"w": torch.ones(1)})
        self.assertEqual(client.transport, "json")
        self.assertEqual(json.loads(srv.requests[-1].body), {"grads": {"w": {"shape": [1], "data": [1.0]}}})

    def test_create_falls_back_to_json_when_binary_create_is_refused(self):
        def decide(req):
            if req.headers.get("content-type") == "application/x-safetensors":
                return 415, [], b'{"statusCode":415,"code":"UNSUPPORTED_MEDIA_TYPE","message":"use application/json"}'
            return 201, [], b'{"name":"s","version":1}'

        srv, conn = self.serve(decide)
        Client(connection=conn).create_session("s", [("w", torch.tensor([1.5]))], hyperparameters={"lr": 0.5})
        self.assertEqual(len(srv.requests), 2)
        raw, meta = st.decode(srv.requests[0].body)
        self.assertEqual(json.loads(meta["asgd"]), {"name": "s", "hyperparameters": {"lr": 0.5}})
        self.assertEqual(raw["w"].tolist(), [1.5])
        self.assertEqual(json.loads(srv.requests[1].body),
                         {"name": "s", "hyperparameters": {"lr": 0.5}, "params": [{"name": "w", "shape": [1], "data": [1.5]}]})

    def test_bearer_token_is_sent(self):
        srv, _ = self.serve(lambda req: (200, [], b'{"sessions":[],"next":null}'))
        conn = Connection(srv.url, token="t" * 20)
        self.addCleanup(conn.close)
        Client(connection=conn).list_sessions()
        self.assertEqual(srv.requests[0].headers["authorization"], "Bearer " + "t" * 20)

    def test_error_without_json_body(self):
        srv, conn = self.serve(lambda req: (500, [], b"<html>proxy error</html>"))
        with self.assertRaises(ServiceError) as caught:
            Client(connection=conn).get_session("s")
        self.assertEqual(caught.exception.status, 500)
        self.assertIn("proxy error", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
