"""Shared pieces of the tests: a small seeded model, fixed data, the torch reference loop, comparisons."""

from __future__ import annotations

import unittest
from typing import Any, Dict, List

import torch
from torch import nn

from _server import server, unique  # noqa: F401  (re-exported)

# t0 small so that averaging (mu != 1) happens within the run; weight_decay > 0 exercises that path.
HYPER = dict(lr=0.05, lambd=1e-4, alpha=0.75, t0=10.0, weight_decay=1e-3)
STEPS = 100

torch.set_num_threads(1)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1))


def make_data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)


DATA = make_data()


def batch(i: int):
    X, y = DATA
    k = (i * 16) % 64
    return X[k : k + 16], y[k : k + 16]


def train(model: nn.Module, opt: Any, steps: range, *, skip_bias_every: int = 0, scheduler: Any = None) -> List[float]:
    """The training loop, identical for torch.optim.ASGD and RemoteASGD.

    ``skip_bias_every``: on every n-th step the last layer's bias has no gradient (p.grad is None), so
    ASGD skips it: its state then lags the others', as in PyTorch.
    """
    losses = []
    for i in steps:
        X, y = batch(i)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(X), y)
        loss.backward()
        if skip_bias_every and i % skip_bias_every == 0:
            list(model.parameters())[-1].grad = None
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def _torch_keeps_param_names() -> bool:
    try:
        return "param_names" in torch.optim.ASGD([("w", torch.zeros(1, requires_grad=True))]).param_groups[0]
    except TypeError:  # torch before 2.6 takes tensors only
        return False


#: torch 2.6+ keeps "param_names" in the groups (and state_dict) of an optimizer built from named parameters.
TORCH_KEEPS_PARAM_NAMES = _torch_keeps_param_names()


def for_torch(params: Any) -> Any:
    """What RemoteASGD was given (``named_parameters()``, (name, tensor) pairs, or groups of them), as the
    installed torch.optim.ASGD takes it: unchanged where torch keeps param_names (its groups and state_dict
    then match RemoteASGD's, names included), the bare tensors before torch 2.6."""
    items = list(params)
    if TORCH_KEEPS_PARAM_NAMES:
        return items

    def bare(ps: Any) -> List[Any]:
        return [p[1] if isinstance(p, tuple) else p for p in ps]

    if items and isinstance(items[0], dict):
        return [dict(g, params=bare(g["params"])) for g in items]
    return bare(items)


def torch_run(steps: int = STEPS, seed: int = 0, **kw: Any):
    """(model, torch.optim.ASGD) after ``steps`` local steps (built from named_parameters() where torch keeps
    names, as the tests build RemoteASGD)."""
    model = make_model(seed)
    opt = torch.optim.ASGD(for_torch(model.named_parameters()), **HYPER)
    train(model, opt, range(steps), **kw)
    return model, opt


class ServiceTestCase(unittest.TestCase):
    maxDiff = None

    @classmethod
    def setUpClass(cls) -> None:
        cls.srv = server()
        cls.url = cls.srv.url
        cls.token = cls.srv.token

    def remote(self, params: Any, **kw: Any):
        from asgd_client import RemoteASGD

        kw.setdefault("session", unique(self._testMethodName.replace("_", "-")[:40]))
        for k, v in HYPER.items():
            kw.setdefault(k, v)
        opt = RemoteASGD(params, url=self.url, token=self.token, **kw)
        self.addCleanup(opt.close)
        return opt

    def requireStepParams(self) -> None:
        """Skips when the service predates issue 11's step (no parameters in the step answer)."""
        if not step_returns_params(self.client()):
            self.skipTest("the service does not answer POST /step?return=params with parameters (issue 11 server side absent)")

    def client(self, transport: str = "safetensors"):
        from asgd_client import Client

        c = Client(self.url, self.token, transport=transport)
        self.addCleanup(c.close)
        return c

    def assertParamsIdentical(self, a: nn.Module, b: nn.Module, msg: str = "") -> None:
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            self.assertEqual(na, nb)
            self.assertEqual(pa.dtype, pb.dtype)
            if not torch.equal(pa, pb):
                diff = (pa - pb).abs().max().item()
                self.fail(f"{msg} parameter {na} differs (max abs diff {diff:g}; bitwise-identical expected)")

    def assertStateDictEqual(self, got: Dict[str, Any], want: Dict[str, Any]) -> None:
        """Same keys at every level, tensors torch.equal with the same dtype and shape, equal group values."""
        self.assertEqual(set(got.keys()), set(want.keys()))
        self.assertEqual(sorted(got["state"].keys()), sorted(want["state"].keys()))
        for i, w in want["state"].items():
            g = got["state"][i]
            self.assertEqual(set(g.keys()), set(w.keys()), f"state[{i}] keys")
            for k, wv in w.items():
                gv = g[k]
                self.assertIsInstance(gv, torch.Tensor, f"state[{i}][{k}]")
                self.assertEqual(gv.dtype, wv.dtype, f"state[{i}][{k}] dtype")
                self.assertEqual(gv.shape, wv.shape, f"state[{i}][{k}] shape")
                self.assertTrue(torch.equal(gv, wv), f"state[{i}][{k}]: {gv} != {wv}")
        self.assertEqual(len(got["param_groups"]), len(want["param_groups"]))
        for g, w in zip(got["param_groups"], want["param_groups"]):
            self.assertEqual(set(g.keys()), set(w.keys()), "param_groups keys")
            for k in w:
                self.assertEqual(g[k], w[k], f"param_groups[{k}]")


_CAPABILITIES: Dict[str, bool] = {}


def step_returns_params(client: Any) -> bool:
    """Whether the service answers POST /step?return=params with the parameters (issue 11's server
    side). Probed once on a throwaway session; tests of what needs it skip only when it is absent."""
    if "params" not in _CAPABILITIES:
        name = unique("probe")
        client.create_session(name, {"w": torch.zeros(2)})
        try:
            answer = client.step(name, {"w": torch.ones(2)}, returns="params")
            _CAPABILITIES["params"] = "params" in answer
        finally:
            client.delete_session(name, missing_ok=True)
    return _CAPABILITIES["params"]


class StepCounter:
    """A proxy in front of the service that counts the requests it forwards, by method and route."""

    def __init__(self, test: unittest.TestCase, upstream: str, token: Any = None) -> None:
        from _fakes import LocalServer
        from asgd_client import Connection

        #: The status of each forwarded answer, in order.
        self.statuses: List[int] = []

        def forward(req):
            answer = self.proxy.forward(req)
            self.statuses.append(answer[0])
            return answer

        self.proxy = LocalServer(forward, upstream=upstream)
        test.addCleanup(self.proxy.close)
        self.conn = Connection(self.proxy.url, token)
        test.addCleanup(self.conn.close)

    def mark(self) -> int:
        return len(self.proxy.requests)

    def since(self, mark: int) -> List[str]:
        """"METHOD /path-tail" of every request after ``mark``."""
        out = []
        for r in self.proxy.requests[mark:]:
            path = r.path.split("?")[0]
            out.append(f"{r.method} {path.rsplit('/', 1)[-1]}")
        return out


def differs(a: nn.Module, b: nn.Module) -> bool:
    return any(not torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


__all__ = ["for_torch", "TORCH_KEEPS_PARAM_NAMES", "step_returns_params", "StepCounter", "HYPER", "STEPS", "make_model", "batch", "train", "torch_run", "ServiceTestCase", "differs", "unique", "server"]
