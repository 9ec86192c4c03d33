"""Client: one method per route of the asgd-serve v1 API.

Tensors in and out are torch tensors when torch is installed. Wire formats:

* ``transport="safetensors"``: step bodies and parameter downloads as safetensors (F32);
* ``transport="json"``: JSON tensors, for services whose binary routes are not available;
* ``transport="auto"``: safetensors, falling back to JSON (for the rest of the client's life) when the
  service answers 406/415 to a binary request.

state_dicts travel as JSON by default (exact: every float32 survives the decimal round trip) or as
torch.save files (``format="pt"``). Checkpoints default to torch.save files.
"""

from __future__ import annotations

import functools
import io
import json
import math
import logging
import time
import uuid
import warnings
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from . import safetensors as st
from .errors import ConnectionFailed, RoundPending, SessionExists, SessionNotFound, UnsupportedFormat
from .http import DEFAULT_RETRY_BUDGET_S, Connection, Response
from .tensors import HYPERPARAMETER_KEYS, group_from_json, plain_number, state_dict_from_json, state_dict_to_json, tensor_from_json, tensor_to_json

__all__ = ["Client", "TRANSPORTS", "SAFETENSORS", "PT"]

SAFETENSORS = "application/x-safetensors"
PT = "application/octet-stream"
JSON = "application/json"
TRANSPORTS = ("safetensors", "json", "auto")

TensorLike = Any
log = logging.getLogger("asgd_client")

#: The seconds the service holds a contribution for its round when the request gives no ?wait= (its DEFAULT_WAIT_SECONDS).
DEFAULT_ROUND_WAIT_S = 60


@functools.lru_cache(maxsize=1024)
def _quote(name: str) -> str:
    """A session name as a path segment (cached: a training loop names its session every step). '', '.' and
    '..' cannot be one: ``get_session("")`` read the session list, and a proxy that normalizes the path (nginx
    does) takes '.' and '..' as dot segments. The service refuses such names anyway: refused here, before a
    request is sent."""
    import urllib.parse

    if not isinstance(name, str) or name in ("", ".", ".."):
        raise ValueError(f"session name {name!r}: must be 1-128 characters of A-Za-z0-9._-, not '.' or '..'")
    return urllib.parse.quote(name, safe="")


def _warn_tensor_hyperparameters(state_dict: Any) -> None:
    """A tensor hyperparameter (torch 2.x takes lr=torch.tensor(0.05)) travels in JSON as float(lr.item()): the
    session then steps as torch.optim.ASGD does with that Python float, not as torch with a tensor lr (eta in
    float32 tensor arithmetic, differing in the last bits). Said with a UserWarning, as RemoteASGD says it;
    the same state_dict as a torch.save file (format="pt") is refused by the service (found by a review: the
    JSON PUT took it silently)."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
    if not isinstance(groups, (list, tuple)):
        return
    for i, g in enumerate(groups):
        if not isinstance(g, Mapping):
            continue
        for k in HYPERPARAMETER_KEYS:
            v = g.get(k)
            if hasattr(v, "numel") and hasattr(v, "item"):
                warnings.warn(f"param_groups[{i}].{k} is a tensor: it is sent as float({k}.item()), and the session steps as "
                              f"torch.optim.ASGD does with that Python float; torch with a tensor {k} computes eta in float32 "
                              f"tensor arithmetic, so the two can differ in the last bits (as a torch.save file, format='pt', "
                              f"the service refuses a tensor {k})", UserWarning, stacklevel=3)


def _if_match(version: Optional[Union[int, str]]) -> Dict[str, str]:
    if version is None:
        return {}
    return {"If-Match": f'"{version}"' if isinstance(version, int) else str(version)}


def _change_headers(if_match: Optional[Union[int, str]], idempotency_key: Optional[str]) -> Dict[str, str]:
    """A change that is not a step (a PUT, PATCH param_groups, a restore) always carries an Idempotency-Key
    (a fresh one unless given): sent again after a lost answer, the service answers it with the first
    answer (``replayed``) instead of making it again over steps acknowledged meanwhile."""
    return {**_if_match(if_match), "Idempotency-Key": idempotency_key or uuid.uuid4().hex}


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401

        return True
    except ImportError:
        return False


def named_tensors(params: Any) -> "OrderedDict[str, TensorLike]":
    """Accepts a mapping name -> tensor, a list of (name, tensor), or a list of {name, shape, data}."""
    out: "OrderedDict[str, TensorLike]" = OrderedDict()
    items: Iterable[Any] = params.items() if isinstance(params, Mapping) else params
    for item in items:
        if isinstance(item, Mapping):
            out[str(item["name"])] = (list(item["shape"]), item["data"])
        else:
            name, value = item
            if name in out:
                raise ValueError(f"parameter {name!r} appears twice")
            out[str(name)] = value
    _refuse_aliases(out)
    return out


def _refuse_aliases(tensors: Mapping[str, Any]) -> None:
    """Two names of one tensor (tied weights, as ``model.state_dict()`` lists them): refused, as the service
    refuses such a torch.save file. Sent as two parameters they would train apart."""
    first: Dict[Tuple[Any, ...], str] = {}
    for name, value in tensors.items():
        if not hasattr(value, "data_ptr") or not hasattr(value, "stride"):
            continue  # not a torch tensor: (shape, values) pairs, numpy arrays
        if str(getattr(value, "layout", "torch.strided")) != "torch.strided" or value.numel() == 0:
            continue  # sparse (no strides: refused further on as not dense), or empty (no storage to share)
        key = (value.data_ptr(), tuple(value.shape), tuple(value.stride()), str(value.dtype), str(value.device))
        if key in first:
            raise ValueError(f"parameter {name!r} is the same tensor as {first[key]!r} (tied weights, as model.state_dict() "
                             f"lists them): a session would hold two copies that train apart; create it from "
                             f"dict(model.named_parameters()), which lists a tied tensor once")
        first[key] = name


def _time_left(max_wait_s: Optional[float], started: float) -> Optional[float]:
    """Seconds left of a call's ``max_wait_s`` that started at ``started`` (time.monotonic()): never below 0;
    None for no limit."""
    return None if max_wait_s is None else max(0.0, max_wait_s - (time.monotonic() - started))


class Client:
    """The v1 API of one asgd-serve instance.

    >>> c = Client("http://127.0.0.1:8080", token=None)
    >>> c.create_session("run-1", model.named_parameters(), hyperparameters={"lr": 0.01, "t0": 100})
    """

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        *,
        transport: str = "safetensors",
        timeout: float = 300.0,
        retries: Optional[int] = None,
        retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
        connection: Optional[Connection] = None,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.conn = connection or Connection(url, token, timeout=timeout, retries=retries, retry_budget_s=retry_budget_s)
        self.transport = transport

    @property
    def url(self) -> str:
        return self.conn.url

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- transport negotiation -----------------------------------------------------------------
    def _binary(self) -> bool:
        return self.transport in ("safetensors", "auto")

    def _fall_back(self, err: UnsupportedFormat) -> None:
        warnings.warn(f"asgd-serve does not accept safetensors here ({err}); using JSON from now on", RuntimeWarning, stacklevel=3)
        self.transport = "json"

    # -- sessions --------------------------------------------------------------------------------
    def create_session(
        self,
        name: str,
        params: Any,
        *,
        hyperparameters: Optional[Mapping[str, Any]] = None,
        param_groups: Optional[Sequence[Mapping[str, Any]]] = None,
        snapshot_every: Optional[int] = None,
        keep_snapshots: Optional[int] = None,
        max_staleness: Optional[int] = None,
        aggregation: Optional[Mapping[str, Any]] = None,
        keep_log_bytes: Optional[int] = None,
        expire_after_idle_s: Optional[int] = None,
    ) -> Dict[str, Any]:
        """POST /v1/sessions (JSON body). ``params``: name -> tensor, [(name, tensor)] or [{name, shape, data}].

        ``param_groups``: ``[{"params": [names], **overrides}]``; the state_dict numbers parameters in
        the groups' order, as PyTorch does. ``aggregation``: synchronous rounds, e.g.
        ``{"contributions": 3}`` or ``{"contributions": 3, "timeout_s": 30, "min_contributions": 2}`` or
        ``{"target_samples": 256}``: each step is then the mean of a round's gradients (see the README).
        """
        options: Dict[str, Any] = {"name": name}
        # numpy scalars and 1-element tensors (torch takes them) as the Python numbers JSON carries.
        if hyperparameters:
            options["hyperparameters"] = {k: plain_number(v) for k, v in hyperparameters.items()}
            _check_hyperparameters("hyperparameters", options["hyperparameters"])
        if param_groups is not None:
            options["param_groups"] = [dict({k: plain_number(v) for k, v in g.items()}, params=list(g["params"])) for g in param_groups]
            for i, g in enumerate(options["param_groups"]):
                _check_hyperparameters(f"param_groups[{i}]", g)
        for key, value in (("snapshot_every", snapshot_every), ("keep_snapshots", keep_snapshots), ("max_staleness", max_staleness),
                           ("keep_log_bytes", keep_log_bytes), ("expire_after_idle_s", expire_after_idle_s)):
            if value is not None:
                options[key] = value
        if aggregation is not None:
            options["aggregation"] = dict(aggregation)
        tensors = named_tensors(params)
        if self._binary():
            # A safetensors file of the initial parameters, the other options in its "asgd" metadata.
            # A service without binary create answers 415 before creating anything: then JSON.
            body = st.encode(tensors, metadata={"asgd": json.dumps(options, separators=(",", ":"), allow_nan=False)})
            try:
                return self.conn.request("POST", "/v1/sessions", body=body, content_type=SAFETENSORS, expect=(201,)).json()
            except UnsupportedFormat:
                pass
        json_params = []
        for pname, value in tensors.items():
            t = tensor_to_json(value)
            json_params.append({"name": pname, "shape": t["shape"], "data": t["data"]})
        return self.conn.request("POST", "/v1/sessions", json_body={**options, "params": json_params}, expect=(201,)).json()

    def get_session(self, name: str) -> Dict[str, Any]:
        return self.conn.request("GET", f"/v1/sessions/{_quote(name)}").json()

    def session_exists(self, name: str) -> bool:
        try:
            self.get_session(name)
            return True
        except SessionNotFound:
            return False

    def list_sessions(self, limit: int = 100) -> List[Dict[str, Any]]:
        """Every session (follows the pagination cursor)."""
        out: List[Dict[str, Any]] = []
        after: Optional[str] = None
        while True:
            page = self.conn.request("GET", "/v1/sessions", query={"limit": limit, "after": after}).json()
            out.extend(page["sessions"])
            after = page.get("next")
            if not after:
                return out

    def delete_session(self, name: str, if_match: Optional[int] = None, missing_ok: bool = False) -> None:
        """Deletes the session; SessionNotFound when there is none (``missing_ok``: nothing then). A delete
        whose answer was lost and that is found gone when sent again counts as made (the first attempt made it,
        or someone else did: either way it is gone)."""
        try:
            self.conn.request("DELETE", f"/v1/sessions/{_quote(name)}", headers=_if_match(if_match), expect=(204, 200))
        except SessionNotFound as err:
            if not (missing_ok or err.outcome_unknown):
                raise

    def update_settings(self, name: str, **settings: Any) -> Dict[str, Any]:
        """PATCH snapshot_every / keep_snapshots / max_staleness / aggregation (``aggregation=None``
        removes it; refused with :class:`RoundOpen` while a round has contributions)."""
        return self.conn.request("PATCH", f"/v1/sessions/{_quote(name)}", json_body=settings, retry=True).json()

    def set_hyperparameters(self, name: str, param_groups: List[Mapping[str, Any]], *, if_match: Optional[int] = None,
                            idempotency_key: Optional[str] = None) -> Dict[str, Any]:
        """PATCH /param_groups: sets hyperparameters of the groups without a step (one dict per group, only the
        keys that change), as a new version written as a snapshot. Returns the session."""
        headers = _change_headers(if_match, idempotency_key)
        return self.conn.request("PATCH", f"/v1/sessions/{_quote(name)}/param_groups", json_body={"param_groups": list(param_groups)},
                                 headers=headers, retry=True).json()

    # -- training --------------------------------------------------------------------------------
    def step(
        self,
        name: str,
        grads: Mapping[str, TensorLike],
        *,
        base_version: Optional[int] = None,
        if_match: Optional[int] = None,
        idempotency_key: Optional[str] = None,
        returns: str = "none",
        param_groups: Optional[Sequence[Mapping[str, Any]]] = None,
        metrics: Optional[Mapping[str, float]] = None,
        grad_dtype: str = "F32",
        worker: Optional[str] = None,
        samples: Optional[int] = None,
        wait: Optional[int] = None,
        max_wait_s: Optional[float] = None,
        held: Optional[bool] = None,
    ) -> Dict[str, Any]:
        """POST /step: one optimizer step with these gradients (parameters absent from ``grads`` are skipped).

        In a session with ``aggregation`` this is a contribution to the open round at ``base_version``
        (required there), from ``worker`` (required there) with ``samples`` (optional, the batch size:
        ``target_samples`` counts them); the answer comes once the round has stepped and carries
        ``round`` ({version, contributions, samples, timed_out}); with ``returns="params"`` the
        parameters are those of version ``base_version + 1``. The service holds each request at most
        ``wait`` seconds (its ``?wait=``, 1..3600, default 60) and then answers 202 pending: the same
        request is sent again with the same Idempotency-Key (it counts once) until the round steps, or
        until ``max_wait_s`` seconds have passed (:class:`RoundPending`; None: no limit).
        A second contribution of the worker to one round raises :class:`DuplicateContribution`.
        Without ``aggregation``, ``samples`` is checked and otherwise ignored, and ``worker`` tells the
        service which steps come from one worker (its group commit never holds a step back for the same
        worker's next one).

        ``held``: whether the service may hold the request for a round (None: when ``worker`` or ``wait``
        is given). Each attempt's socket timeout is then the connection's timeout on top of that hold, and
        the retry budget starts once the hold has passed: a connection lost late in a hold is still retried.

        ``returns``: "none", "params" or "averaged": the answer then also holds ``"params"`` ({name:
        tensor} at the answered version; safetensors in and out with the safetensors transport).
        ``param_groups``: one object per session group with the hyperparameters that take effect from
        this step on (lr, lambd, alpha, t0, weight_decay, maximize). ``metrics``: {name: number},
        stored with the step. ``grad_dtype``: "F32", "F16" or "BF16" (half precision on the wire; the
        JSON transport sends the rounded values).

        Always sent with an Idempotency-Key (a fresh one unless given), so connection errors and 503s
        are retried without ever stepping twice. Answer: {session, step, version, staleness[, params]}.
        """
        extras = _step_extras(returns, param_groups, metrics)
        key = idempotency_key or uuid.uuid4().hex
        headers = {"Idempotency-Key": key, **_if_match(if_match)}
        path = f"/v1/sessions/{_quote(name)}/step"
        query: Dict[str, Any] = {"return": returns if returns != "none" else None, "wait": wait}
        # The round's fields: in the query with a safetensors body, in the JSON body otherwise.
        contribution = {k: v for k, v in (("worker", worker), ("samples", samples)) if v is not None}
        if held is None:
            held = worker is not None or wait is not None
        if self._binary():
            body = _safetensors_step(grads, extras, grad_dtype)
            try:
                return self._contribute(name, headers, max_wait_s, path, held, query={**query, "base_version": base_version, **contribution},
                                        body=body, content_type=SAFETENSORS, accept=SAFETENSORS if returns != "none" else None)
            except UnsupportedFormat as err:
                if self.transport != "auto":
                    raise
                self._fall_back(err)
                headers["Idempotency-Key"] = uuid.uuid4().hex
        _check_half(grads, grad_dtype)
        payload: Dict[str, Any] = {"grads": {n: tensor_to_json(_rounded(g, grad_dtype)) for n, g in grads.items()}}
        if base_version is not None:
            payload["base_version"] = base_version
        payload.update(contribution)
        payload.update(extras)
        return self._contribute(name, headers, max_wait_s, path, held, query=query, json_body=payload, accept=JSON)

    def start_step(
        self,
        name: str,
        grads: Mapping[str, TensorLike],
        *,
        base_version: Optional[int] = None,
        returns: str = "none",
        param_groups: Optional[Sequence[Mapping[str, Any]]] = None,
        metrics: Optional[Mapping[str, float]] = None,
        grad_dtype: str = "F32",
        samples: Optional[int] = None,
        worker: Optional[str] = None,
        idempotency_key: Optional[str] = None,
    ) -> Optional["StartedStep"]:
        """:meth:`step` in two halves, for a pipelined training loop without a thread: the request is sent
        now (the gradients are encoded into it, so the caller may overwrite them), and the handle's
        ``finish()`` reads the answer, as :meth:`step` returns it, or raises as it does; ``answered()``
        tells without waiting whether it has begun to arrive. The step carries an Idempotency-Key: if the
        connection fails, ``finish()`` sends it again with the usual retries, and it is applied once. None
        where this cannot be done (https, a transport other than "safetensors"): use :meth:`step`.
        Not for a session with ``aggregation`` (a contribution may be answered 202 and asked again)."""
        extras = _step_extras(returns, param_groups, metrics)
        if self.transport != "safetensors":
            return None
        body = _safetensors_step(grads, extras, grad_dtype)
        query = {"return": returns if returns != "none" else None, "base_version": base_version, "worker": worker, "samples": samples}
        started = self.conn.start("POST", f"/v1/sessions/{_quote(name)}/step", query=query, body=body, content_type=SAFETENSORS,
                                  headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex}, accept=SAFETENSORS if returns != "none" else None)
        return None if started is None else StartedStep(started)

    def _contribute(self, name: str, headers: Dict[str, str], max_wait_s: Optional[float], path: str, held: bool,
                    **request: Any) -> Dict[str, Any]:
        """Sends a step and, while the service answers 202 (its round is still open), the same request
        again with the same Idempotency-Key: the service stores the contribution once and answers
        each repeat once the round has stepped (or with 202 again after ``?wait``). ``held``: the service
        may hold the request for a round (a worker or a wait given): the socket timeout and the retry
        budget count from the end of that hold."""
        started = time.monotonic()
        query = request.get("query") or {}
        wait = query.get("wait") or DEFAULT_ROUND_WAIT_S  # what the service holds it for at most
        while True:
            left = _time_left(max_wait_s, started)
            if left is not None:
                # Never longer than the time this call has left, so that max_wait_s holds (in milliseconds: the
                # service takes fractions of a second, and 0 answers at once).
                wait = min(round(left, 3), query.get("wait") or DEFAULT_ROUND_WAIT_S)
                request["query"] = {**query, "wait": wait}
            res = self.conn.request("POST", path, headers=headers, expect=(200, 202), hold_s=float(wait) if held else 0.0, **request)
            if res.status == 200:
                return _step_answer(res)
            pending = res.json().get("round")
            waited = time.monotonic() - started
            log.debug("session %r: round %s still open after %.1f s; asking again", name, pending, waited)
            if max_wait_s is not None and waited >= max_wait_s:
                raise RoundPending(name, pending, headers["Idempotency-Key"], waited)

    def get_params(
        self, name: str, *, averaged: bool = False, version: Optional[int] = None
    ) -> Tuple["OrderedDict[str, Any]", Optional[int]]:
        """GET /params (or ASGD's averages ``ax`` with ``averaged=True``): ({name: tensor}, version).

        Tensors are torch tensors when torch is installed, else ``{"shape", "data"}`` dicts.
        """
        path = f"/v1/sessions/{_quote(name)}/params"
        read = self._read_params(path, {"averaged": averaged or None, "version": version})
        if read is None:  # a 304 answers only a read with after_version
            raise RuntimeError(f"GET {path}: 304 to a read that asked for no version")
        return read

    def wait_params(self, name: str, after_version: int, *, averaged: bool = False, wait_s: float = 60.0,
                    max_wait_s: Optional[float] = None, with_step: bool = False) -> Tuple[Any, ...]:
        """The parameters (or ``averaged``) once the session's version is above ``after_version``: GET /params
        ``?after_version=&wait=`` (the service holds each request up to ``wait_s`` seconds, 1 to 60, and
        answers 304 while the version has not moved; this asks again), until ``max_wait_s`` seconds have
        passed (None: no limit), then :class:`TimeoutError`. Returns ({name: tensor}, version), read as
        :meth:`get_params` reads them (safetensors unless the transport is JSON). ``with_step``: ({name:
        tensor}, version, step), the session's step count at that version (None from a service without it).
        """
        if not 1.0 <= float(wait_s) <= 60.0:
            raise ValueError(f"wait_s must be 1 to 60 seconds, got {wait_s!r}")
        path = f"/v1/sessions/{_quote(name)}/params"
        started = time.monotonic()
        while True:
            left = _time_left(max_wait_s, started)
            if left == 0.0:
                raise TimeoutError(f"session {name!r}: still at version {after_version} or below after {max_wait_s} s")
            hold = float(wait_s) if left is None else min(float(wait_s), left)
            query: Dict[str, Any] = {"averaged": averaged or None, "after_version": after_version, "wait": round(hold, 3)}
            read = self._read_params(path, query, expect=(200, 304), hold_s=hold, with_step=with_step)
            if read is not None:
                return read

    def _read_params(self, path: str, query: Dict[str, Any], expect: Tuple[int, ...] = (200,),
                     hold_s: float = 0.0, with_step: bool = False) -> Optional[Tuple[Any, ...]]:
        """GET of parameters as safetensors (JSON with the JSON transport, or where the service has no
        safetensors): ({name: tensor}, version), with ``with_step`` also the step count (X-Session-Step), or
        None for a 304."""
        read = self._read_params_of(path, query, expect, hold_s)
        if read is None:
            return None
        tensors, version, res = read
        if not with_step:
            return tensors, version
        step = res.headers.get("x-session-step", "")
        return tensors, version, int(step) if step.isdigit() else None

    def _read_params_of(self, path: str, query: Dict[str, Any], expect: Tuple[int, ...],
                        hold_s: float) -> Optional[Tuple["OrderedDict[str, Any]", Optional[int], Response]]:
        if self._binary():
            try:
                res = self.conn.request("GET", path, query={**query, "format": "safetensors"}, accept=SAFETENSORS, expect=expect, hold_s=hold_s)
            except UnsupportedFormat as err:
                if self.transport != "auto":
                    raise
                self._fall_back(err)
            else:
                if res.status == 304:
                    return None
                if res.content_type not in (SAFETENSORS, "application/safetensors"):
                    raise UnsupportedFormat(res.status, "UNEXPECTED_CONTENT_TYPE",
                                            f"asked for safetensors, got {res.content_type or 'no Content-Type'}",
                                            method="GET", url=res.url, body=res.body[:200])
                raw, meta = st.decode(res.body)
                return _tensors_of(_in_session_order(raw, meta)), res.version, res
        res = self.conn.request("GET", path, query={**query, "format": "json"}, accept=JSON, expect=expect, hold_s=hold_s)
        if res.status == 304:
            return None
        body = res.json()
        params = body["params"]
        if _has_torch():
            return OrderedDict((k, tensor_from_json(v)) for k, v in params.items()), body.get("version", res.version), res
        return OrderedDict(params), body.get("version", res.version), res

    def put_params(self, name: str, tensors: Mapping[str, TensorLike], *, format: Optional[str] = None,
                   if_match: Optional[int] = None, idempotency_key: Optional[str] = None) -> Dict[str, Any]:
        """PUT /params: replaces every parameter of the session ({name: tensor}, all of them, the session's
        shapes, finite); the optimizer state (step, eta, mu, ax) and the hyperparameters stay, as editing a
        model's weights leaves torch.optim.ASGD's state. Returns the session (its new ``version``).

        ``format``: ``"safetensors"``, ``"json"`` or ``"pt"`` (a torch.save'd dict); default: the transport's.
        """
        path = f"/v1/sessions/{_quote(name)}/params"
        headers = _change_headers(if_match, idempotency_key)
        if format is None:
            format = "safetensors" if self._binary() else "json"
        if format == "safetensors":
            try:
                return self.conn.request("PUT", path, body=st.encode(tensors), content_type=SAFETENSORS, headers=headers).json()
            except UnsupportedFormat as err:
                if self.transport != "auto":
                    raise
                self._fall_back(err)
                format = "json"
        if format == "pt":
            # As given: a module's state_dict() keeps its _metadata, by which the service leaves its buffers out.
            obj = tensors if isinstance(tensors, dict) else dict(tensors)
            return self.conn.request("PUT", path, body=_torch_save(obj), content_type=PT, headers=headers).json()
        if format != "json":
            raise ValueError("format must be 'safetensors', 'json' or 'pt'")
        body = {"params": {n: tensor_to_json(t) for n, t in tensors.items()}}
        return self.conn.request("PUT", path, json_body=body, headers=headers).json()

    # -- state_dict and checkpoints -------------------------------------------------------------
    def get_state_dict(self, name: str, *, format: str = "json", version: Optional[int] = None, raw: bool = False) -> Any:
        """GET /state_dict as torch.optim.ASGD.state_dict() (tensors; needs torch).

        ``format="json"`` or ``"pt"`` (a torch.save file, read with torch.load). ``raw=True`` returns the
        JSON body / the file's bytes untouched.
        """
        path = f"/v1/sessions/{_quote(name)}/state_dict"
        if format == "pt":
            res = self.conn.request("GET", path, query={"format": "pt", "version": version}, accept=PT)
            if raw:
                return res.body
            import torch

            loaded = torch.load(io.BytesIO(res.body))
            # The file holds the newest PyTorch's group keys: keep this PyTorch's, as from JSON.
            return {**loaded, "param_groups": [group_from_json(g, kinds_known=True) for g in loaded["param_groups"]]}
        if format != "json":
            raise ValueError("format must be 'json' or 'pt'")
        body = self.conn.request("GET", path, query={"format": "json", "version": version}, accept=JSON).json()
        return body if raw else state_dict_from_json(body)

    def get_state_dict_if_changed(self, name: str, known_version: Optional[int]) -> Tuple[Optional[Dict[str, Any]], Optional[int]]:
        """(state_dict, its version), or (None, known_version) when the session is still at
        ``known_version`` (If-None-Match: 304, nothing sent). The state_dict comes as a torch.save file."""
        headers = {"If-None-Match": f'"{known_version}"'} if known_version is not None else None
        res = self.conn.request("GET", f"/v1/sessions/{_quote(name)}/state_dict", query={"format": "pt"}, accept=PT,
                                headers=headers, expect=(200, 304))
        if res.status == 304:
            return None, known_version
        import torch

        loaded = torch.load(io.BytesIO(res.body))
        return {**loaded, "param_groups": [group_from_json(g, kinds_known=True) for g in loaded["param_groups"]]}, res.version

    def put_state_dict(self, name: str, state_dict: Any, *, format: str = "json", if_match: Optional[int] = None,
                       idempotency_key: Optional[str] = None) -> Dict[str, Any]:
        """PUT /state_dict: Optimizer.load_state_dict on the service (parameters unchanged). Returns the session.

        ``state_dict``: a torch state_dict (or its JSON form); with ``format="pt"`` it is sent as a
        torch.save file (bytes are sent as they are).
        """
        path = f"/v1/sessions/{_quote(name)}/state_dict"
        headers = _change_headers(if_match, idempotency_key)
        if format == "pt":
            data = state_dict if isinstance(state_dict, (bytes, bytearray)) else _torch_save(state_dict)
            return self.conn.request("PUT", path, body=data, content_type=PT, headers=headers).json()
        if format != "json":
            raise ValueError("format must be 'json' or 'pt'")
        _warn_tensor_hyperparameters(state_dict)
        return self.conn.request("PUT", path, json_body=state_dict_to_json(state_dict), headers=headers).json()

    def get_checkpoint(self, name: str, *, format: str = "pt", version: Optional[int] = None) -> Any:
        """GET /checkpoint: bytes of a torch.save of {"model", "optimizer", "step"} (``format="pt"``) or its JSON."""
        path = f"/v1/sessions/{_quote(name)}/checkpoint"
        if format == "pt":
            return self.conn.request("GET", path, query={"format": "pt", "version": version}, accept=PT).body
        if format != "json":
            raise ValueError("format must be 'pt' or 'json'")
        return self.conn.request("GET", path, query={"format": "json", "version": version}, accept=JSON).json()

    def put_checkpoint(self, name: str, checkpoint: Any, *, if_match: Optional[int] = None,
                       idempotency_key: Optional[str] = None) -> Dict[str, Any]:
        """PUT /checkpoint: parameters and optimizer state from a torch.save file (bytes) or a dict.

        A dict with tensors is sent as a torch.save file; a dict already in JSON form as JSON.
        """
        path = f"/v1/sessions/{_quote(name)}/checkpoint"
        headers = _change_headers(if_match, idempotency_key)
        if isinstance(checkpoint, (bytes, bytearray, memoryview)):
            data = bytes(checkpoint)
            if data[:1] == b"{":
                return self.conn.request("PUT", path, body=data, content_type=JSON, headers=headers).json()
            return self.conn.request("PUT", path, body=data, content_type=PT, headers=headers).json()
        if _is_json_checkpoint(checkpoint):
            return self.conn.request("PUT", path, json_body=checkpoint, headers=headers).json()
        return self.conn.request("PUT", path, body=_torch_save(checkpoint), content_type=PT, headers=headers).json()

    # -- snapshots -------------------------------------------------------------------------------
    def snapshot(self, name: str, *, pinned: bool = False) -> Dict[str, Any]:
        return self.conn.request("POST", f"/v1/sessions/{_quote(name)}/snapshots", json_body={"pinned": pinned}, expect=(201,)).json()

    def list_snapshots(self, name: str) -> List[Dict[str, Any]]:
        return self.conn.request("GET", f"/v1/sessions/{_quote(name)}/snapshots").json()["snapshots"]

    def restore_snapshot(self, name: str, snapshot_id: int, *, if_match: Optional[int] = None,
                         idempotency_key: Optional[str] = None) -> Dict[str, Any]:
        """POST …/restore: the snapshot's state becomes the session's, as a new version. Sent with an
        Idempotency-Key (so retried like a PUT): a retry after a lost answer does not roll back again."""
        return self.conn.request("POST", f"/v1/sessions/{_quote(name)}/snapshots/{int(snapshot_id)}/restore",
                                 headers=_change_headers(if_match, idempotency_key)).json()

    def metrics(self, name: str, *, after_version: Optional[int] = None, limit: Optional[int] = None,
                max_points: Optional[int] = None) -> Dict[str, Any]:
        """GET /metrics: the metrics and staleness of committed steps, in version order: ``{"points": [{version,
        step, time, staleness, values}], "next_after_version", ...}``. Page with ``after_version`` (the last
        page's ``next_after_version``) and ``limit`` (the service's default 1000); or ``max_points``: the whole
        series after ``after_version`` in at most that many points (buckets with the mean, min and max)."""
        query = {"after_version": after_version, "limit": limit, "max_points": max_points}
        return self.conn.request("GET", f"/v1/sessions/{_quote(name)}/metrics", query=query).json()

    def hyperparameter_changes(self, name: str, *, after_version: Optional[int] = None, limit: Optional[int] = None,
                               max_points: Optional[int] = None) -> Dict[str, Any]:
        """GET /hyperparameters: every group's values at the first version (``initial_param_groups``) and the
        versions that changed them (``changes``, oldest first, after ``after_version``; ``reason`` "step" for a
        scheduler's), paged as :meth:`metrics` is."""
        query = {"after_version": after_version, "limit": limit, "max_points": max_points}
        return self.conn.request("GET", f"/v1/sessions/{_quote(name)}/hyperparameters", query=query).json()

    def norms(self, name: str) -> Dict[str, Any]:
        """GET /norms: the L2 norm of each parameter and of its average ``ax``, with ASGD's step, eta and mu,
        at the current version."""
        return self.conn.request("GET", f"/v1/sessions/{_quote(name)}/norms").json()

    def fork(self, name: str, new_name: str, *, snapshot: Optional[int] = None, **settings: Any) -> Dict[str, Any]:
        body: Dict[str, Any] = {"name": new_name, **settings}
        if snapshot is not None:
            body["snapshot"] = int(snapshot)
        return self.conn.request("POST", f"/v1/sessions/{_quote(name)}/fork", json_body=body, expect=(201,)).json()


def _check_hyperparameters(where: str, values: Mapping[str, Any]) -> None:
    """A ValueError naming the hyperparameter JSON cannot carry (torch takes t0=float("inf") for "never average")."""
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            hint = " (t0=1e30 behaves the same as inf: averaging never starts)" if key == "t0" and value > 0 else ""
            raise ValueError(f"{where}.{key}: {value} cannot be sent to the service, which keeps finite hyperparameters{hint}")


def _check_json(what: str, value: Any) -> None:
    """A ValueError naming the field for what JSON cannot carry (NaN, infinities, objects)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: {sorted(value)} cannot be sent as JSON ({err}); values must be finite numbers") from None


def _rounded(t: Any, grad_dtype: str) -> Any:
    """A gradient rounded to the wire dtype, for JSON (which carries the rounded values exactly)."""
    if grad_dtype == "F32" or not type(t).__module__.startswith("torch"):
        return t
    import torch

    return t.detach().to({"F16": torch.float16, "BF16": torch.bfloat16}[grad_dtype]).float()


def _in_session_order(raw: Dict[str, Any], meta: Mapping[str, str]) -> Dict[str, Any]:
    """A parameters file's tensors in the session's (the model's) order, as JSON lists them: the file holds
    them in safetensors' order (by dtype, then name), its ``param_names`` metadata the session's."""
    try:
        names = json.loads(meta.get("param_names", "null"))
    except ValueError:
        names = None
    if not isinstance(names, list) or sorted(map(str, names)) != sorted(raw):
        return raw
    return {n: raw[n] for n in names}


def _tensors_of(raw: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """A decoded safetensors file's tensors: torch tensors when torch is installed, else {"shape", "data"} dicts."""
    if _has_torch():
        return OrderedDict((k, st.raw_to_torch(v)) for k, v in raw.items())
    return OrderedDict((k, {"shape": v.shape, "data": v.tolist()}) for k, v in raw.items())


def _step_answer(res: Response) -> Dict[str, Any]:
    """The step answer as a dict; a safetensors answer's tensors under "params" (torch tensors when torch is
    installed, else {"shape", "data"} dicts, as get_params gives them)."""
    if res.content_type in (SAFETENSORS, "application/safetensors"):
        raw, meta = st.decode(res.body)
        # The answer's fields, as the JSON answer has them; the file's other metadata ("format": "pt",
        # "averaged", "replayed") describes the file, not the step.
        answer: Dict[str, Any] = {}
        for k, v in meta.items():
            if k in ("version", "step", "staleness", "params_version") and v.lstrip("-").isdigit():
                answer[k] = int(v)
            elif k in ("round", "param_groups"):  # JSON: {"version", "contributions", …}; [{"lr", …}] per group
                try:
                    answer[k] = json.loads(v)
                except ValueError:
                    answer[k] = v
            elif k == "session":
                answer[k] = v
        answer["params"] = _tensors_of(raw)
        return answer
    answer = res.json()
    if isinstance(answer.get("params"), dict) and _has_torch():
        answer["params"] = OrderedDict((k, tensor_from_json(v)) for k, v in answer["params"].items())
    return answer


def _step_extras(returns: str, param_groups: Optional[Sequence[Mapping[str, Any]]], metrics: Optional[Mapping[str, float]]) -> Dict[str, Any]:
    """A step's ``param_groups`` and ``metrics`` as they travel (checked), after checking ``returns``."""
    if returns not in ("none", "params", "averaged"):
        raise ValueError(f"returns must be 'none', 'params' or 'averaged', got {returns!r}")
    extras: Dict[str, Any] = {}
    if param_groups is not None:
        extras["param_groups"] = [{k: plain_number(v) for k, v in g.items()} for g in param_groups]
        for i, g in enumerate(extras["param_groups"]):
            _check_hyperparameters(f"param_groups[{i}]", g)
    if metrics is not None:
        # A loss as it comes: a 0-dim tensor (loss.detach() or not), a numpy scalar: their Python number.
        extras["metrics"] = {k: plain_number(v) for k, v in dict(metrics).items()}
        for k, v in extras["metrics"].items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"metrics.{k}: {v!r} is not a finite number (a metric is a finite number, e.g. float(loss))")
    _check_json("step", extras)
    return extras


def _check_half(grads: Mapping[str, TensorLike], grad_dtype: str) -> None:
    """A finite gradient that overflows the wire's half type is refused here, naming it."""
    for name, g in grads.items():
        over = st.half_overflow(g, grad_dtype)
        if over is not None:
            largest = "65504" if grad_dtype == "F16" else "about 3.39e38"
            raise OverflowError(f"grads[{name!r}]: element {over[0]} ({over[1]}) overflows {'float16' if grad_dtype == 'F16' else 'bfloat16'} "
                                f"(largest finite {largest}); send the gradients as float32")


def _safetensors_step(grads: Mapping[str, TensorLike], extras: Mapping[str, Any], grad_dtype: str) -> bytearray:
    """A safetensors step body: the gradients, and the extras as JSON in ``__metadata__``."""
    _check_half(grads, grad_dtype)
    metadata = {k: json.dumps(v, separators=(",", ":"), allow_nan=False) for k, v in extras.items()}
    return st.encode(grads, metadata=metadata or None, dtype=grad_dtype)


class StartedStep:
    """A step sent by :meth:`Client.start_step`: ``answered()`` (no waiting) and ``finish()`` (the answer)."""

    __slots__ = ("_started",)

    def __init__(self, started: Any) -> None:
        self._started = started

    @property
    def fresh(self) -> bool:
        """Sent over a connection opened for it (see Started.fresh)."""
        return bool(getattr(self._started, "fresh", False))

    def answered(self) -> bool:
        return self._started.answered()

    def arrived(self) -> bool:
        """The answer has begun to arrive: finish() reads it without sending the step again."""
        return self._started.arrived()

    def finish(self) -> Dict[str, Any]:
        return _step_answer(self._started.finish())


def _torch_save(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _is_json_checkpoint(obj: Any) -> bool:
    """True when a checkpoint dict holds no tensors (JSON form)."""
    try:
        json.dumps(obj, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def ensure_session(client: Client, name: str, create: Any, create_kwargs: Mapping[str, Any]) -> Tuple[Dict[str, Any], bool]:
    """(session, created): creates it (create=True), attaches (False), or either ('if_missing').

    Logs (logger ``asgd_client``, INFO) whether the session was created or joined.
    """
    if create not in (True, False, "if_missing"):
        raise ValueError("create must be True, False or 'if_missing'")
    info: Optional[Dict[str, Any]] = None
    created = False
    if create is True:
        info, created = client.create_session(name, **create_kwargs), True
    elif create is False:
        info = client.get_session(name)
    else:
        try:
            info = client.get_session(name)
        except SessionNotFound:
            try:
                info, created = client.create_session(name, **create_kwargs), True
            except SessionExists:  # created by another worker in the meantime
                info = client.get_session(name)
            except ConnectionFailed as err:
                # A create is not sent again (it could make the session twice over another's), but its answer
                # may be what was lost: made, by this worker or another, it is joined (a review: the worker
                # failed to start while its session existed).
                try:
                    info = client.get_session(name)
                except SessionNotFound:
                    raise err from None
                log.warning("session %r: the create's answer was lost (%s); the session is there: joined", name, err)
    log.info("session %r %s at %s (version %s, step %s)", name, "created" if created else "joined", client.url,
             info.get("version"), info.get("step"))
    return info, created


__all__ += ["named_tensors", "ensure_session", "Response"]
