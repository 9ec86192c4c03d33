"""RemoteASGD: a torch.optim.Optimizer whose ASGD steps are applied by asgd-serve.

The session on the service holds the parameters and the optimizer state (step, eta, mu, ax). Each
``step()`` sends the gradients and copies the parameters the service answers with back into the
model, in place; the result is bit for bit what ``torch.optim.ASGD`` computes locally.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from .client import Client, ensure_session
from .errors import VersionMismatch
from .http import Connection
from .tensors import FLAG_KEYS, HYPERPARAMETER_KEYS, group_from_json, local_group_keys

__all__ = ["RemoteASGD"]

_SCALAR_TYPES = (type(None), bool, int, float, str)


def _split_params(params: Any) -> Tuple[List[Dict[str, Any]], List[List[Optional[str]]]]:
    """Param groups (as torch takes them) and, per group, the names given (None for plain tensors)."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, but got " + torch.typename(params))
    if isinstance(params, Mapping):  # a state_dict-like {name: tensor}
        params = list(params.items())
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    raw_groups = items if isinstance(items[0], Mapping) else [{"params": items}]
    groups: List[Dict[str, Any]] = []
    names: List[List[Optional[str]]] = []
    for g in raw_groups:
        if not isinstance(g, Mapping):
            raise TypeError("param groups must all be dicts when the first one is")
        ps = g["params"]
        if isinstance(ps, torch.Tensor):
            ps = [ps]
        elif isinstance(ps, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of tensors in sets will change between runs. Please use a list instead.")
        elif isinstance(ps, Mapping):
            ps = list(ps.items())
        else:
            ps = list(ps)
        tensors, group_names = [], []
        for item in ps:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                group_names.append(item[0])
                tensors.append(item[1])
            else:
                group_names.append(None)
                tensors.append(item)
        groups.append({**g, "params": tensors})
        names.append(group_names)
    return groups, names


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                             and not isinstance(a, bool) and not isinstance(b, bool) and float(a) == float(b))


class RemoteASGD(torch.optim.Optimizer):
    """torch.optim.ASGD, computed by an asgd-serve session.

    Arguments (besides ASGD's ``lr, lambd, alpha, t0, weight_decay, foreach, maximize``):
        params: ``model.parameters()``, ``model.named_parameters()`` (the names become the session's
            parameter names; plain tensors are named ``p0, p1, ...`` by position) or param-group dicts
            whose ``params`` are either.
        url, token: the service (default ``$ASGD_URL``, ``$ASGD_TOKEN``).
        session: the session's name (default: a new random name when creating).
        create: True (create it; fails if it exists), False (attach to an existing session; its
            parameters are copied into the model), or ``"if_missing"``.
        transport: ``"safetensors"`` (default), ``"json"`` or ``"auto"`` (see :class:`asgd_client.Client`).
        snapshot_every, keep_snapshots, max_staleness: session settings used at creation.
        send_base_version: send the version of the parameters the gradients were computed from, so
            the service can report staleness and enforce ``max_staleness``.
        retries, timeout: of each HTTP request (steps are retried safely with an Idempotency-Key).

    ``state`` stays empty locally: the optimizer state lives in the session (see ``state_dict()``).
    Changing a group's hyperparameters (``param_groups[i]["lr"] = ...``, LR schedulers) is sent to
    the session before the next step.
    """

    def __init__(
        self,
        params: Any,
        url: Optional[str] = None,
        session: Optional[str] = None,
        token: Optional[str] = None,
        create: Any = True,
        lr: float = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        *,
        transport: str = "safetensors",
        snapshot_every: Optional[int] = None,
        keep_snapshots: Optional[int] = None,
        max_staleness: Optional[int] = None,
        send_base_version: bool = True,
        timeout: float = 300.0,
        retries: int = 5,
        client: Optional[Client] = None,
        connection: Optional[Connection] = None,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError("Invalid learning rate: {}".format(lr))
        if not 0.0 <= weight_decay:
            raise ValueError("Invalid weight_decay value: {}".format(weight_decay))
        if create is False and not session:
            raise ValueError("session: the name of the session to attach to is needed with create=False")
        self.client = client or Client(url, token, transport=transport, timeout=timeout, retries=retries, connection=connection)
        self.session: str = session or f"asgd-{uuid.uuid4().hex[:16]}"
        self.send_base_version = send_base_version
        self._version: Optional[int] = None
        self._step_count = 0
        self._info: Dict[str, Any] = {}
        #: The service's answer to the last step: {session, step, version, staleness}.
        self.last_step: Optional[Dict[str, Any]] = None

        groups, given_names = _split_params(params)
        defaults: Dict[str, Any] = dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay, foreach=foreach, maximize=maximize)
        for key in local_group_keys():  # newer PyTorch's flags (differentiable, capturable), as ASGD sets them
            defaults.setdefault(key, False)
        self._initializing = True
        super().__init__(groups, defaults)
        self._initializing = False

        # Names in state_dict order (group by group, as PyTorch numbers them).
        flat: List[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        flat_given = [n for names in given_names for n in names]
        names = [n if n is not None else f"p{i}" for i, n in enumerate(flat_given)]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"parameter name {dup!r} is used twice")
        for n, p in zip(names, flat):
            if p.dtype != torch.float32:
                raise TypeError(f"parameter {n!r} is {p.dtype}; the service holds float32 parameters")
            if p.is_sparse:
                raise TypeError(f"parameter {n!r} is sparse; ASGD does not support sparse tensors")
        self._names: List[str] = names
        self._params: List[torch.Tensor] = flat
        self._name_of: Dict[int, str] = {id(p): n for p, n in zip(flat, names)}
        self._session_groups: List[Dict[str, Any]] = []

        group_specs = []
        for g in self.param_groups:
            spec: Dict[str, Any] = {"params": [self._name_of[id(p)] for p in g["params"]]}
            for key in HYPERPARAMETER_KEYS:
                spec[key] = g[key]
            group_specs.append(spec)
        create_kwargs = dict(
            params=list(zip(names, flat)),
            hyperparameters={k: defaults[k] for k in HYPERPARAMETER_KEYS},
            param_groups=group_specs,
            snapshot_every=snapshot_every,
            keep_snapshots=keep_snapshots,
            max_staleness=max_staleness,
        )
        info, created = ensure_session(self.client, self.session, create, create_kwargs)
        self._check_layout(info)
        self._take_session(info, update_local=not created)
        if not created:
            self.pull()
        else:
            self._sync_hyperparameters()  # extra group keys (e.g. initial_lr) the create body cannot carry

    # -- session bookkeeping -----------------------------------------------------------------------
    def _check_layout(self, info: Mapping[str, Any]) -> None:
        remote = info["params"]
        remote_names = [p["name"] for p in remote]
        if sorted(remote_names) != sorted(self._names):
            raise ValueError(f"session {self.session!r} has parameters {remote_names}, the optimizer has {self._names}")
        shapes = {p["name"]: list(p["shape"]) for p in remote}
        for n, p in zip(self._names, self._params):
            if shapes[n] != list(p.shape):
                raise ValueError(f"parameter {n!r}: the session holds shape {shapes[n]}, the model {list(p.shape)}")
        groups = info["param_groups"]
        remote_groups = [[remote_names[i] for i in g["params"]] for g in groups]
        local_groups = [[self._name_of[id(p)] for p in g["params"]] for g in self.param_groups]
        if remote_groups != local_groups:
            raise ValueError(f"session {self.session!r} groups its parameters as {remote_groups}, the optimizer as {local_groups}")

    def _take_session(self, info: Mapping[str, Any], update_local: bool = True) -> None:
        """Records a session answer; with ``update_local`` the groups take the session's hyperparameters."""
        self._info = dict(info)
        self._version = info.get("version", self._version)
        self._step_count = info.get("step", self._step_count)
        self._session_groups = [group_from_json({k: v for k, v in g.items() if k != "params"}) for g in info["param_groups"]]
        if update_local:
            for local, remote in zip(self.param_groups, self._session_groups):
                for k, v in remote.items():
                    local[k] = v

    def _group_changes(self) -> bool:
        for local, remote in zip(self.param_groups, self._session_groups):
            for k, v in local.items():
                if k == "params":
                    continue
                if k in FLAG_KEYS:
                    if bool(v) != bool(remote.get(k)):
                        return True
                    continue
                if isinstance(v, torch.Tensor) and v.numel() == 1:
                    v = v.item()
                if not isinstance(v, _SCALAR_TYPES):
                    continue  # not representable on the service (kept locally only)
                if k not in remote or not _same(v, remote[k]):
                    return True
        return False

    def _sync_hyperparameters(self) -> None:
        """Sends changed group hyperparameters (LR schedulers, manual edits) via load_state_dict semantics."""
        if not self._group_changes():
            return
        for _ in range(5):
            body, version = self.client.get_state_dict_versioned(self.session)
            groups = []
            for local, remote in zip(self.param_groups, body["param_groups"]):
                g = {k: remote[k] for k in remote}
                for k, v in local.items():
                    if k == "params":
                        continue
                    if isinstance(v, torch.Tensor) and v.numel() == 1:
                        v = v.item()
                    if isinstance(v, _SCALAR_TYPES):
                        g[k] = v
                g["params"] = remote["params"]
                groups.append(g)
            body["param_groups"] = groups
            try:
                info = self.client.put_state_dict(self.session, body, if_match=version)
            except VersionMismatch:
                continue  # another worker stepped in between: read again
            self._take_session(info, update_local=False)
            return
        raise RuntimeError(f"could not update the hyperparameters of session {self.session!r}: it kept changing")

    # -- torch.optim.Optimizer API ----------------------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if not getattr(self, "_initializing", False):
            raise NotImplementedError("RemoteASGD cannot add a parameter group to an existing session; create a new session")
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    def step(self, closure: Any = None) -> Any:
        """Sends the gradients (parameters whose ``.grad`` is None are skipped, as in PyTorch), then copies
        the session's new parameters into the model. Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyperparameters()
        grads: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ASGD does not support sparse gradients")
                grads[self._name_of[id(p)]] = p.grad
        if not grads:
            return loss  # torch.optim.ASGD changes nothing either
        base = self._version if self.send_base_version else None
        answer = self.client.step(self.session, grads, base_version=base)
        self._step_count = answer.get("step", self._step_count)
        self.last_step = answer
        self.pull()
        return loss

    def pull(self) -> int:
        """Copies the session's current parameters into the model (in place); returns their version."""
        tensors, version = self.client.get_params(self.session)
        self._copy_into_params(tensors)
        if version is not None:
            self._version = version
        return self._version  # type: ignore[return-value]

    def _copy_into_params(self, tensors: Mapping[str, torch.Tensor]) -> None:
        missing = [n for n in self._names if n not in tensors]
        if missing:
            raise RuntimeError(f"the service's answer lacks parameters {missing}")
        with torch.no_grad():
            for n, p in zip(self._names, self._params):
                t = tensors[n]
                if list(t.shape) != list(p.shape):
                    raise RuntimeError(f"parameter {n!r}: the service answered shape {list(t.shape)}, the model has {list(p.shape)}")
                p.copy_(t)

    def state_dict(self) -> Dict[str, Any]:
        """torch.optim.ASGD.state_dict() of the session: {"state": {i: {step, eta, mu, ax}}, "param_groups": [...]}."""
        self._sync_hyperparameters()
        return self.client.get_state_dict(self.session)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """torch.optim.ASGD.load_state_dict, applied to the session (parameters unchanged)."""
        sd = {"state": state_dict["state"], "param_groups": state_dict["param_groups"]}
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for g, s in zip(self.param_groups, sd["param_groups"]):
            if len(g["params"]) != len(s["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
        info = self.client.put_state_dict(self.session, sd)
        self._take_session(info, update_local=True)
        # Keys of the loaded groups that the service does not echo (kept as PyTorch keeps them).
        for local, loaded in zip(self.param_groups, sd["param_groups"]):
            for k, v in loaded.items():
                if k != "params" and k not in local and not (k in FLAG_KEYS and k not in local_group_keys()):
                    local[k] = v

    # -- evaluation helpers -----------------------------------------------------------------------
    def named_averaged_parameters(self) -> "OrderedDict[str, torch.Tensor]":
        """ASGD's averages (``ax``; the parameter itself where it has not stepped), by name."""
        tensors, _ = self.client.get_params(self.session, averaged=True)
        return OrderedDict((n, tensors[n]) for n in self._names)

    def averaged_parameters(self) -> List[torch.Tensor]:
        """ASGD's averages, in the order of the optimizer's parameters."""
        return list(self.named_averaged_parameters().values())

    @contextlib.contextmanager
    def swap_to_averaged(self) -> Iterator["RemoteASGD"]:
        """Context manager: the model holds the averaged parameters inside, its own parameters after.

        >>> with opt.swap_to_averaged():
        ...     evaluate(model)
        """
        averaged = self.named_averaged_parameters()
        saved = [p.detach().clone() for p in self._params]
        self._copy_into_params(averaged)
        try:
            yield self
        finally:
            with torch.no_grad():
                for p, s in zip(self._params, saved):
                    p.copy_(s)

    # -- session helpers --------------------------------------------------------------------------
    @property
    def version(self) -> Optional[int]:
        """The session version the model's parameters were last pulled at."""
        return self._version

    @property
    def step_count(self) -> int:
        """optimizer.step() calls applied by the session (its "step")."""
        return self._step_count

    @property
    def parameter_names(self) -> List[str]:
        return list(self._names)

    def refresh(self) -> Dict[str, Any]:
        """Reads the session (hyperparameters may have been changed by another client) and pulls parameters."""
        info = self.client.get_session(self.session)
        self._take_session(info, update_local=True)
        self.pull()
        return info

    def snapshot(self, pinned: bool = False) -> Dict[str, Any]:
        return self.client.snapshot(self.session, pinned=pinned)

    def restore(self, snapshot_id: int) -> None:
        """Rolls the session back to a snapshot and pulls its parameters into the model."""
        info = self.client.restore_snapshot(self.session, snapshot_id)
        self._take_session(info, update_local=True)
        self.pull()

    def download_checkpoint(self, path: str, format: str = "pt") -> str:
        from .functions import _write_atomic

        data = self.client.get_checkpoint(self.session, format=format)
        if format == "json":
            import json

            data = json.dumps(data).encode("utf-8")
        _write_atomic(path, data)
        return path

    def close(self) -> None:
        """Closes the keep-alive connection (the session stays on the service)."""
        self.client.close()

    def __enter__(self) -> "RemoteASGD":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        lines = [f"RemoteASGD (session {self.session!r} at {self.client.url}, version {self._version}, step {self._step_count})"]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for k in sorted(k for k in g if k != "params"):
                lines.append(f"    {k}: {g[k]}")
        return "\n".join(lines)

    def __getstate__(self) -> Dict[str, Any]:  # pragma: no cover - pickling an optimizer bound to a service
        raise TypeError("RemoteASGD is bound to a service session; save state_dict() or a checkpoint instead")
