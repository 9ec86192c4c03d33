"""RemoteASGD: a torch.optim.Optimizer whose ASGD steps are applied by asgd-serve.

The session on the service holds the parameters and the optimizer state (step, eta, mu, ax). Each
``step()`` is one request: it sends the gradients (and the groups' hyperparameters when they changed)
and the service answers with the new parameters, which are copied into the model in place; the result
is bit for bit what ``torch.optim.ASGD`` computes locally.

With ``pipeline=True`` the request is sent and ``step()`` returns; its answer is read and applied at the
next ``step()``, ``zero_grad()`` or ``synchronize()``: the next forward/backward overlaps the round trip.
The next ``step()`` sends its gradients before it reads that answer (they were computed without it), so the
service can commit them with other workers' steps while the answer travels.
Over http with the safetensors transport this needs no thread (the answer waits in the socket); otherwise,
and for ``step(wait=False)``, a background thread sends it.

In a session with ``aggregation`` (synchronous rounds) each ``step()`` is this worker's contribution to
the round at the model's version: it returns once the round has stepped, with the parameters of the
next version, which every worker of the round then holds.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import http.client
import inspect
import logging
import math
import numbers
import os
import re
import socket
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from .client import Client, _step_extras, ensure_session
from .errors import BaseVersionAhead, ConnectionFailed, DuplicateContribution, RoundPending, ServiceError, SessionNotFound, StaleGradient
from .http import DEFAULT_RETRY_BUDGET_S, Connection
from .state import SessionState
from .tensors import FLAG_KEYS, HYPERPARAMETER_KEYS, group_from_json, local_group_keys, plain_number, state_dict_to_torch

# torch.optim.Optimizer.zero_grad's own default (False before torch 2.0, True since): RemoteASGD.zero_grad()
# does what the installed torch's would.
_TORCH_SET_TO_NONE = bool(inspect.signature(torch.optim.Optimizer.zero_grad).parameters["set_to_none"].default)

log = logging.getLogger("asgd_client")

STALE_POLICIES = ("pull", "raise", "apply")
_WIRE_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

__all__ = ["RemoteASGD", "DetachedRemoteASGD"]

_WORKER_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def _default_worker() -> str:
    """host-pid-random: unique per optimizer, also for several optimizers in one process."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


_KEEPS_PARAM_NAMES: Optional[bool] = None


def _torch_keeps_param_names() -> bool:
    """Whether the installed torch keeps ``param_names`` in the groups of an optimizer built from
    ``named_parameters()`` (torch 2.6 on: Optimizer.add_param_group); 1.13 refuses the (name, tensor) pairs."""
    global _KEEPS_PARAM_NAMES
    if _KEEPS_PARAM_NAMES is None:
        try:
            probe = torch.optim.ASGD([("w", torch.zeros(1, requires_grad=True))])
            _KEEPS_PARAM_NAMES = "param_names" in probe.param_groups[0]
        except TypeError:
            _KEEPS_PARAM_NAMES = False
    return _KEEPS_PARAM_NAMES


def _split_params(params: Any) -> Tuple[List[Dict[str, Any]], List[List[Optional[str]]]]:
    """Param groups (as torch takes them) and, per group, the names given (None for plain tensors).

    Where the installed torch keeps them (2.6 on), a group given with names carries them as
    ``param_names``, as torch.optim.Optimizer.add_param_group does; a group naming only some of its
    parameters is refused as there."""
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
        group = {**g, "params": tensors}
        if _torch_keeps_param_names() and any(n is not None for n in group_names):
            if any(n is None for n in group_names):
                raise ValueError("all optimizer params should be with/without names. Some param names are missing")
            group["param_names"] = list(group_names)
        groups.append(group)
        names.append(group_names)
    return groups, names


def _hyper_value(key: str, value: Any) -> Any:
    """A group's hyperparameter as the step body carries it (None: not sendable, kept locally): a Python int
    as an int (torch keeps ``group['t0'] = 100`` an int, and so does the session, from the JSON literal), any
    other real number (numpy's included) as a Python float, a 1-element tensor lr (PyTorch 2.x) as
    float(lr.item())."""
    if type(value) is float and key != "maximize":  # the usual case, asked about every step
        return value
    value = plain_number(value)
    if key == "maximize":
        return bool(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if type(value) is int else float(value)


def _created_value(key: str, value: Any) -> Any:
    """A hyperparameter as a new session takes it: ``maximize`` as torch reads it (``if maximize``: 1 is True;
    the service takes only true or false, and refused ``maximize=1`` naming its own metadata), the others as
    the Python numbers JSON carries (plain_number)."""
    value = plain_number(value)
    return bool(value) if key == "maximize" and isinstance(value, (int, float)) else value


def _session_value(key: str, value: Any, as_int: bool = False) -> Any:
    """A hyperparameter of the session's JSON answers (which write 1000000.0 as 1000000): an int where the
    session holds an int (``as_int``: its ``int_hyperparameters``, or the kind known before), else a float;
    maximize a bool."""
    value = _hyper_value(key, value)
    if as_int and type(value) is float and value.is_integer():
        return int(value)
    return float(value) if type(value) is int and not as_int else value


def _with_kinds(group: Dict[str, Any], ints: Any) -> Dict[str, Any]:
    """A session group's numbers in their kinds, as the session holds them (its ``int_hyperparameters``)."""
    for k in HYPERPARAMETER_KEYS:
        v = group.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):  # not maximize
            group[k] = int(v) if k in ints and float(v).is_integer() else float(v)
    return group


def _wrapper_hint(remote: List[str], local: List[str]) -> str:
    """When the names differ by one prefix on every name (nn.Sequential's "0.", DDP's "module.", torch.compile's
    "_orig_mod."), what to do (a review: the names were listed, the cause not said)."""
    if len(remote) != len(local) or not remote:
        return ""
    for longer, shorter, whose in ((local, remote, "optimizer's"), (remote, local, "session's")):
        prefix = longer[0][: len(longer[0]) - len(shorter[0])] if longer[0].endswith(shorter[0]) else ""
        if prefix and sorted(longer) == sorted(prefix + n for n in shorter):
            fix = ("give the optimizer the inner model's parameters (e.g. model.module.named_parameters(), "
                   "model[0].named_parameters())" if whose == "optimizer's" else
                   "the session was made from a wrapped model: wrap this model the same way, or make a session from it")
            return f": every {whose} name carries the prefix {prefix!r} (a wrapper such as nn.Sequential, DistributedDataParallel or torch.compile); {fix}"
    return ""


def _unnamed_hint(remote: List[str], local: List[str]) -> str:
    """When one side names its parameters p0, p1, ... (made from model.parameters(), with no names) and the
    other by the model's names (named_parameters()), what to do (a review: only the lists were shown)."""
    if len(remote) != len(local) or not remote:
        return ""
    unnamed = lambda names: names == [f"p{i}" for i in range(len(names))]  # noqa: E731
    if unnamed(local) and not unnamed(remote):
        return (": this optimizer was given model.parameters(), whose names are p0, p1, ..., and the session holds the "
                "model's names: build it from model.named_parameters()")
    if unnamed(remote) and not unnamed(local):
        return (": the session was made from unnamed parameters (p0, p1, ...; model.parameters()), this optimizer has "
                "the model's names: build it from model.parameters(), or make a session from named_parameters()")
    return ""


def _given_as_other_type(value: Any) -> bool:
    """A number torch keeps as given that the service holds as a Python number (a tensor lr, np.float32)."""
    return isinstance(value, torch.Tensor) or (isinstance(value, numbers.Number) and type(value) not in (bool, int, float))


def _tensor_hyper_message(key: str) -> str:
    return (f"{key} is a tensor: the service computes the step with float({key}.item()) and eta in double precision, "
            f"as torch.optim.ASGD does for a Python float; torch with a tensor {key} computes eta in float32 tensor "
            f"arithmetic, so the results can differ from a local torch.optim.ASGD in the last bits")


#: Hyperparameters torch computes eta or mu from with the value's own arithmetic (weight_decay only scales
#: the gradient in torch's own tensor arithmetic: a numpy float32 there steps as its float value).
_NUMPY_ROUNDED = ("lr", "lambd", "alpha", "t0")


def _is_narrow_numpy_float(value: Any) -> bool:
    """A numpy floating scalar narrower than double (np.float32, np.float16): NumPy 2 computes with it in its width."""
    kind = type(value)
    return kind.__module__ == "numpy" and isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) \
        and getattr(value, "itemsize", 8) < 8


def _numpy_hyper_message(key: str, value: Any) -> str:
    return (f"{key} is a numpy {type(value).__name__}: the service steps with its value as a Python float ({float(value)!r}), "
            f"as torch.optim.ASGD does given {key}={float(value)!r}; torch given the numpy scalar computes eta and mu with "
            f"numpy, which under NumPy 2 rounds each operation to {type(value).__name__}, so the results can differ from a "
            f"local torch.optim.ASGD in the last bits (give {key}=float(...) to both)")


_FOREACH_MESSAGE = ("foreach=True: the service applies torch's single-tensor ASGD step (foreach=False); torch's foreach "
                    "path computes eta and the update differently, so the results can differ from a local "
                    "torch.optim.ASGD(foreach=True) in the last bits, and by much more where the parameters of one "
                    "group have different step counts (a layer frozen for a while: torch 1.13's foreach path steps "
                    "the whole group with the first parameter's eta)")


_DEFAULT_DTYPE_MESSAGE = ("torch.get_default_dtype() is {dtype}: torch.optim.ASGD then keeps a parameter's step, eta and mu "
                          "(made when it first steps) in {dtype}, and computes the update with that eta; the service keeps "
                          "them in float32, as torch does under the default float32, so the results can differ from a local "
                          "torch.optim.ASGD in the last bits. Set the default dtype back to torch.float32 before the "
                          "optimizer's first step (a float32 model is unaffected by it)")


_PUSH_ATTEMPTS = 5


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor's bit patterns: -0.0 differs from 0.0, a NaN equals itself (what bit-exact means)."""
    return t.detach().view(torch.int32)


def _same_bits(p: torch.Tensor, synced: torch.Tensor) -> bool:
    return torch.equal(_bits(p), _bits(synced))


def _equal_hyper(key: str, a: Any, b: Any) -> bool:
    """The same hyperparameter value, whatever Python number type holds it (100 and 100.0)."""
    va, vb = _hyper_value(key, a), _hyper_value(key, b)
    if va is None or vb is None:
        return False
    if type(va) in (int, float) and type(vb) in (int, float):
        va, vb = float(va), float(vb)
    return _same(va, vb)


def _loaded_as_written(loaded: Any, echoed: Any) -> bool:
    """A loaded group value that the session echoes as another Python number of the same value (an int 15 it
    gives back as 15.0): torch keeps the loaded one, so does RemoteASGD."""
    numeric = (int, float)
    return (type(loaded) in numeric and type(echoed) in numeric and type(loaded) is not type(echoed)
            and not isinstance(loaded, bool) and not isinstance(echoed, bool) and loaded == echoed)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b)


def _plain(value: Any) -> bool:
    """A value a checkpoint file (torch.save loaded with weights_only, or JSON) holds as it is."""
    return value is None or type(value) in (bool, int, float, str)


def _merge_group(group: Dict[str, Any], changed: Mapping[str, Any]) -> None:
    """Into a checkpoint's group: hyperparameters changed here replace the session's; other keys (a
    scheduler's initial_lr) fill in where the session's group has none."""
    for k, v in changed.items():
        if k in HYPERPARAMETER_KEYS:
            group[k] = v
        else:
            group.setdefault(k, v)


_WENT_BACK = re.compile(r"base_version: (\d+) is newer than the session's version \d+$")


def _went_back(err: ServiceError) -> Optional[int]:
    """The base_version of a step refused because the session's version is below it (409 BASE_VERSION_AHEAD;
    a service before that code said it as a 400 INVALID_QUERY or INVALID_BODY naming base_version), or None
    for any other error."""
    if isinstance(err, BaseVersionAhead):
        m = _WENT_BACK.search(err.message or "")
        return int(m.group(1)) if m else (err.version or 0) + 1
    if err.status != 400 or err.code not in ("INVALID_QUERY", "INVALID_BODY"):
        return None
    m = _WENT_BACK.search(err.message or "")
    return int(m.group(1)) if m else None


class _Outcome:
    """What a step's request brought back: the parameters to load and how they came."""

    __slots__ = ("answer", "params", "version", "sent_groups", "stale")

    def __init__(self, answer: Optional[Dict[str, Any]], params: Mapping[str, torch.Tensor], version: Optional[int],
                 sent_groups: Optional[List[Dict[str, Any]]], stale: Optional[ServiceError] = None) -> None:
        self.answer = answer
        self.params = params
        self.version = version
        self.sent_groups = sent_groups
        self.stale = stale


class _Sent:
    """A pipelined step sent without a thread: ``done()`` without waiting, ``result()`` reads its outcome
    (the interface of the Future the background thread gives)."""

    __slots__ = ("_opt", "_handle", "_groups")

    def __init__(self, opt: "RemoteASGD", handle: Any, groups: Optional[List[Dict[str, Any]]]) -> None:
        self._opt = opt
        self._handle = handle
        self._groups = groups

    @property
    def fresh(self) -> bool:
        return bool(getattr(self._handle, "fresh", False))

    def done(self) -> bool:
        # Its answer has begun to arrive. Not a connection closed without one: reading it then sends the step
        # again with request()'s retries, which zero_grad(), never waiting, must leave to the next step() (a
        # review: zero_grad() retried for the whole budget after a service restart, then raised).
        return self._handle.arrived()

    def result(self) -> _Outcome:
        return self._opt._settle(self._handle.finish, self._groups, resend=None)

    def wait(self) -> None:
        """Reads the answer (the step is then applied or refused on the service) without loading it."""
        self._handle.finish()


class _Resend:
    """A step whose request was interrupted (KeyboardInterrupt, SystemExit, a signal handler's exception) after
    it may have reached the service: it is owed. ``result()`` sends it again with the same Idempotency-Key,
    so the service applies it once whatever happened before (it answers a step it already applied with
    that first answer). It never counts as arrived (``zero_grad()`` does not send it)."""

    __slots__ = ("_opt", "_key", "_args")

    def __init__(self, opt: "RemoteASGD", key: str, args: Tuple[Any, ...]) -> None:
        self._opt = opt
        self._key = key
        self._args = args

    def done(self) -> bool:
        return False

    def result(self) -> _Outcome:
        return self._opt._request(*self._args, key=self._key)


class _Done:
    """An outcome read but not (wholly) loaded into the model when an interrupt came: loaded again."""

    __slots__ = ("_outcome",)

    def __init__(self, outcome: _Outcome) -> None:
        self._outcome = outcome

    def done(self) -> bool:
        return True

    def result(self) -> _Outcome:
        return self._outcome


class _Failed:
    """The error of a pipelined step whose answer ``zero_grad()`` read: raised by the next ``step()`` or
    ``synchronize()``, which read it as they read a step in flight, not by ``zero_grad()`` (found by a review:
    a loop that catches NonFiniteGradient around ``step()`` ended when ``zero_grad()`` raised it)."""

    __slots__ = ("_err",)

    def __init__(self, err: Exception) -> None:
        self._err = err

    def done(self) -> bool:
        return False  # zero_grad() leaves it

    def result(self) -> _Outcome:
        raise self._err


def _values_in_flight(pending: Any) -> Optional[List[Dict[str, Any]]]:
    """Per group, the hyperparameter values that steps sent but not yet loaded carry (the later step's value
    where two carry a key; None: none is in flight)."""
    if pending is None:
        return None
    if isinstance(pending, _Both):
        first, rest = _values_in_flight(pending.first), _values_in_flight(pending.rest)
        if first is None or rest is None:
            return first or rest
        return [{**a, **b} for a, b in zip(first, rest)]
    if isinstance(pending, _Sent):
        groups = pending._groups
    elif isinstance(pending, _Resend):
        groups = pending._args[2]
    elif isinstance(pending, _Done):
        groups = pending._outcome.sent_groups
    else:  # the background thread's Future
        owed = getattr(pending, "asgd_owed", None)
        groups = owed[1][2] if owed is not None else None
    return None if groups is None else [dict(g) for g in groups]


class _Both:
    """Two steps outstanding after an interrupt in a pipelined ``step()``: the earlier one's outcome is
    loaded first (as ``step()`` would have), then the later one's is the result."""

    __slots__ = ("_opt", "first", "rest")

    def __init__(self, opt: "RemoteASGD", first: Any, rest: Any) -> None:
        self._opt = opt
        self.first = first
        self.rest = rest

    def done(self) -> bool:
        return (self.first is None or self.first.done()) and self.rest.done()

    def result(self) -> _Outcome:
        if self.first is not None:
            outcome = self.first.result()
            self.first = _Done(outcome)  # read: not sent again should loading it be interrupted
            self._opt._apply(outcome, overlapped=True)
            self.first = None
        return self.rest.result()

    def wait(self) -> None:
        for part in (self.first, self.rest):
            if hasattr(part, "wait"):
                part.wait()


def _on_new_connection(pending: Any) -> bool:
    """A pipelined step sent over a connection opened for it (the first use of a second connection, or one
    opened again after the service closed the kept one): the service accepts that connection after it has
    read what the connections it already holds bring, so the next step, sent over one of those, could be
    read and committed first (found by a review: 1 run in 30, the second and third steps swapped). Its answer
    is read before the next step is sent."""
    return isinstance(pending, _Sent) and pending.fresh


def _owes(pending: Any) -> bool:
    """Whether ``pending`` holds an owed step (_Resend): one to send again before any later step."""
    return isinstance(pending, _Resend) or (isinstance(pending, _Both) and (_owes(pending.first) or _owes(pending.rest)))


def _holds(pending: Any, part: Any) -> bool:
    """Whether ``part`` is ``pending`` or one of a _Both's parts."""
    if pending is part:
        return True
    return isinstance(pending, _Both) and (_holds(pending.first, part) or _holds(pending.rest, part))


def _fate_unknown(err: BaseException) -> bool:
    """An exception after which a step's request may or may not have been applied: an interrupt, or a
    connection that failed (past the retries). Not an answer of the service (ServiceError)."""
    return _is_interrupt(err) or isinstance(err, (ConnectionFailed, OSError, http.client.HTTPException))


def _clone_grads(grads: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((n, g.detach().clone()) for n, g in grads.items())


def _same_grads(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """The same parameters with bit-identical gradients (of the same dtype and shape)."""
    if list(a) != list(b):
        return False
    for n, ga in a.items():
        gb = b[n]
        if ga.dtype != gb.dtype or ga.shape != gb.shape or ga.device != gb.device:
            return False
        if ga.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}[ga.dtype]
            if not torch.equal(ga.detach().contiguous().view(view), gb.detach().contiguous().view(view)):
                return False
        elif not torch.equal(ga, gb):
            return False
    return True


def _storable_extra(value: Any) -> bool:
    """Whether the service stores a param group's extra key with this value (numbers, strings, booleans, None)."""
    value = plain_number(value)
    return value is None or isinstance(value, (bool, int, float, str))


def _is_interrupt(err: BaseException) -> bool:
    """KeyboardInterrupt, SystemExit, GeneratorExit, a signal handler's own BaseException: not an error of
    the request, which may or may not have reached the service."""
    return not isinstance(err, Exception)


def _result_of_previous(pending: Any, then: str) -> Any:
    """A background step's outcome; its error is raised by a later call (step(), synchronize(); see _Failed),
    with a note saying it is the earlier step's and what became of this call's."""
    try:
        return pending.result()
    except Exception as err:
        if hasattr(err, "add_note"):  # Python 3.11+
            err.add_note(f"raised for the previous step, sent in the background; {then}")
        raise


def _forked_error(opt: "RemoteASGD") -> RuntimeError:
    return RuntimeError(
        f"this RemoteASGD of session {opt.session!r} was built in process {opt._pid} and is used in process "
        f"{os.getpid()}, forked from it: its connection to the service, and a step it has in flight, belong to "
        f"the process that built it (two processes reading one connection take each other's answers). Build "
        f"RemoteASGD in each worker process instead, after the fork (it joins the session; torch's Hogwild "
        f"example builds its optimizer in each process too)")


def _in_own_process(method: Any) -> Any:
    """A RemoteASGD method that talks to the service: refused in a process forked from the one that built the
    optimizer (its connection, its step in flight and its lock are that process's; the child's copies of the
    sockets are closed at the fork, see http._forget_inherited), as a pickled one is (DetachedRemoteASGD)."""

    @functools.wraps(method)
    def checked(self: "RemoteASGD", *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_pid", None) not in (None, os.getpid()):
            raise _forked_error(self)
        return method(self, *args, **kwargs)

    return checked


class RemoteASGD(torch.optim.Optimizer):
    """torch.optim.ASGD, computed by an asgd-serve session.

    Arguments (besides ASGD's ``lr, lambd, alpha, t0, weight_decay, foreach, maximize``, which are given as
    keywords here: the second positional argument is ``url``; real numbers of any type, numpy's included,
    and a 1-element tensor lr are taken; ``foreach=True`` and a tensor lr are warned about once, as the
    service computes the single-tensor step with the lr's Python float; ``differentiable`` and
    ``capturable`` must stay False):
        params: ``model.parameters()``, ``model.named_parameters()`` (the names become the session's
            parameter names, and with torch 2.6+ each group's ``param_names``, as in torch; plain tensors
            are named ``p0, p1, ...`` by position) or param-group dicts whose ``params`` are either.
        url, token: the service (default ``$ASGD_URL``, ``$ASGD_TOKEN``).
        session: the session's name (default: a new random name, created).
        create: ``"if_missing"`` (the default when a session name is given: every worker can start with
            the same arguments), True (create; fails if it exists), or False (attach). Attaching copies
            the session's parameters and hyperparameters into the model and groups.
        pipeline: ``step()`` sends the gradients and returns at once; the answer's parameters
            are applied at the next ``step()`` (which waits for them), ``zero_grad()`` (if they have
            arrived) or ``synchronize()``. The next gradient is then computed on the parameters from
            before the previous step (staleness 1, as Hivemind's delayed optimizer step), or on its
            parameters when its answer arrived before ``zero_grad()`` (staleness 0): at most 1, depending on
            timing, so pipelined runs are not bit-reproducible from run to run. ``step()``
            sends its gradients before it waits for the previous answer (a second connection).
        on_stale: what a step refused as stale (409, ``max_staleness``) does: ``"pull"`` (default: drop
            the gradient, load the current parameters, log a warning, count it in ``stale_dropped``),
            ``"raise"`` (:class:`StaleGradient`), or ``"apply"`` (send it again without
            ``base_version``, so the service applies it).
        grad_dtype: ``torch.float32`` (default), ``torch.float16`` or ``torch.bfloat16``: gradients
            travel rounded to that type (half the bytes; not bit-exact with a float32 client).
        worker: this worker's id (1-128 of ``A-Za-z0-9._-``), sent with every step: in log lines, as the
            sender of a pipelined loop's steps (the service's group commit does not hold one back for the
            same worker's next), and in a session with ``aggregation`` as the contributor of each round
            (default: ``host-pid-random``). Give each
            worker a stable id (its rank): the round's mean adds the gradients in the order of the ids.
        aggregation: synchronous rounds for a session this optimizer creates, e.g. ``{"contributions":
            3}`` (see :meth:`asgd_client.Client.create_session`). Whether steps are rounds is the
            session's setting: joining a session with ``aggregation`` makes every ``step()`` a
            contribution (``base_version`` and ``worker`` sent, the answer waited for; not with
            ``pipeline=True``, which raises ValueError, nor ``on_stale="apply"``).
        round_wait_s: how long the service holds one request for its round (``?wait=``, 1..3600; the
            service's default is 60) before answering 202; the client then asks again with the same
            Idempotency-Key.
        max_round_wait_s: give up waiting for a round after this many seconds (:class:`RoundPending`;
            the contribution stays in the round). Default None: wait as long as the round takes.
        transport: ``"safetensors"`` (default), ``"json"`` or ``"auto"`` (see :class:`asgd_client.Client`).
        snapshot_every, keep_snapshots, max_staleness: session settings used at creation.
        expire_after_idle_s: used at creation: the service deletes the session after this many seconds
            without a request (e.g. for a session named at random, which nothing else would delete).
        send_base_version: send the version of the parameters the gradients were computed from, so
            the service can report staleness and enforce ``max_staleness``.
        retry_budget_s: seconds a request keeps retrying (connection errors, 429/502/503/504); the
            default 60 outlasts a restart of the service. ``retries`` caps the count as well.
        timeout: socket timeout of one attempt.

    Parameters edited outside the optimizer between steps (``model.load_state_dict``, ``p.data.clamp_``,
    masks) are sent to the session before the next step (and by ``synchronize()``, ``push_params()``), so
    the step applies to them as torch.optim.ASGD's would; with ``pipeline=True`` the changed elements keep
    their values over the result of a step that was in flight (see the README, "Editing the weights").

    ``state[p]`` reads ASGD's state (step, eta, mu, ax) from the session (see :mod:`asgd_client.state`);
    reading it sends nothing, so swapping ``ax`` in and back (AWD-LSTM's evaluation) leaves the session alone.
    Changed group hyperparameters (``param_groups[i]["lr"] = ...``, any LR scheduler) travel with the
    next step, at no extra cost.
    """

    def __init__(
        self,
        params: Any,
        url: Optional[str] = None,
        session: Optional[str] = None,
        token: Optional[str] = None,
        create: Any = None,
        lr: float = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        *,
        differentiable: bool = False,
        capturable: bool = False,
        pipeline: bool = False,
        on_stale: str = "pull",
        grad_dtype: torch.dtype = torch.float32,
        worker: Optional[str] = None,
        transport: str = "safetensors",
        snapshot_every: Optional[int] = None,
        keep_snapshots: Optional[int] = None,
        max_staleness: Optional[int] = None,
        aggregation: Optional[Mapping[str, Any]] = None,
        expire_after_idle_s: Optional[int] = None,
        round_wait_s: Optional[int] = None,
        max_round_wait_s: Optional[float] = None,
        send_base_version: bool = True,
        timeout: float = 300.0,
        retries: Optional[int] = None,
        retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
        client: Optional[Client] = None,
        connection: Optional[Connection] = None,
    ) -> None:
        if url is not None and not isinstance(url, str) and (isinstance(url, (numbers.Number, torch.Tensor)) or hasattr(url, "__float__")):
            raise TypeError(f"RemoteASGD(params, {url!r}): the second positional argument of RemoteASGD is url, not lr; "
                            f"give lr (and the other hyperparameters) as keywords: RemoteASGD(params, lr={url!r}, url=...)")
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError("Invalid learning rate: {}".format(lr))
        if not 0.0 <= weight_decay:
            raise ValueError("Invalid weight_decay value: {}".format(weight_decay))
        if create is None:
            create = "if_missing" if session else True
        if create is False and not session:
            raise ValueError("session: the name of the session to attach to is needed with create=False")
        if on_stale not in STALE_POLICIES:
            raise ValueError(f"on_stale must be one of {STALE_POLICIES}, got {on_stale!r}")
        if grad_dtype not in _WIRE_DTYPES:
            raise ValueError(f"grad_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {grad_dtype}")
        if session is not None and not (isinstance(session, str) and session):
            # An empty name is not "no name": a launcher passing session=os.environ.get("RUN", "") would put each
            # worker in a session of its own, each named at random (found by a review).
            raise ValueError(f"session must be a session name (or None for a new session named at random), got {session!r}")
        if worker is not None and not (isinstance(worker, str) and _WORKER_ID.fullmatch(worker)):
            raise ValueError(f"worker must be 1-128 characters of A-Za-z0-9._-, got {worker!r}")
        if aggregation is not None:
            self._check_rounds(pipeline, on_stale, send_base_version)
        if connection is None and client is None:
            connection = Connection(url, token, timeout=timeout, retries=retries, retry_budget_s=retry_budget_s)
        self.client = client or Client(transport=transport, connection=connection)
        self.session: str = session or f"asgd-{uuid.uuid4().hex[:16]}"
        self.send_base_version = send_base_version
        self.pipeline = bool(pipeline)
        self.on_stale = on_stale
        self.grad_dtype = grad_dtype
        self.worker: str = worker or _default_worker()
        self._worker_given = worker is not None
        self.round_wait_s = round_wait_s
        self.max_round_wait_s = max_round_wait_s
        #: The session's ``aggregation`` (None: every step is applied on its own).
        self.aggregation: Optional[Dict[str, Any]] = None
        #: Gradients dropped because the service refused them as stale (``on_stale="pull"``).
        self.stale_dropped = 0
        #: The service's answer to the last applied step: {session, step, version, staleness}.
        self.last_step: Optional[Dict[str, Any]] = None
        # Whether a step of this optimizer has been answered (a DuplicateContribution before: a restart's).
        self._contributed = False
        self._version: Optional[int] = None
        # Not "_step_count": torch's LR schedulers own that attribute of the optimizer (they reset it).
        self._session_step = 0
        self._info: Dict[str, Any] = {}
        self._lock = threading.RLock()
        self._pid = os.getpid()  # see _in_own_process
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: Any = None  # a Future (background thread) or a _Sent
        self._overlap_floor: Optional[int] = None  # see _apply
        #: The gradients of a step() interrupted after its request may have reached the service (see _owe).
        self._interrupted: Optional["OrderedDict[str, torch.Tensor]"] = None

        #: Caveats already warned about (once per optimizer): a tensor hyperparameter, foreach=True.
        self._warned: set = set()

        groups, given_names = _split_params(params)
        defaults: Dict[str, Any] = dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay, foreach=foreach, maximize=maximize)
        # The hyperparameters asked for, per group: given in the group's dict, or as a keyword with another value
        # than torch's default. Joining a session, only these are warned about when the session holds others.
        signature = inspect.signature(RemoteASGD.__init__).parameters
        keyword_given = {k for k in HYPERPARAMETER_KEYS if k in signature and not _equal_hyper(k, defaults[k], signature[k].default)}
        self._asked_keys = [keyword_given | ({k for k in HYPERPARAMETER_KEYS if k in g} if isinstance(g, dict) else set()) for g in groups]
        flags = {"differentiable": differentiable, "capturable": capturable}
        for key in flags:  # newer PyTorch's flags, in the order ASGD sets them (1.13 has none)
            if key in local_group_keys():
                defaults[key] = flags[key]
        for key in sorted(local_group_keys()):  # a flag of a later PyTorch, as ASGD defaults it
            defaults.setdefault(key, False)
        self._initializing = True
        super().__init__(groups, defaults)
        self._initializing = False
        for k, g in enumerate(self.param_groups):
            for flag, value in flags.items():
                if g.get(flag, value):
                    raise ValueError(f"{flag}=True (param group {k}) is not supported: the service computes the step "
                                     f"outside autograd and CUDA graphs; leave it False")
            if isinstance(g["lr"], torch.Tensor) and g["lr"].numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        self._warn_caveats(self.param_groups)

        # Names in state_dict order (group by group, as PyTorch numbers them).
        flat: List[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        flat_given = [n for names in given_names for n in names]
        names = [n if n is not None else f"p{i}" for i, n in enumerate(flat_given)]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"parameter name {dup!r} is used twice: the session keys parameters by name. Groups built from "
                             f"submodules' named_parameters() repeat names such as 'weight' (torch 2.6+ allows it); give "
                             f"full names instead, e.g. [(n, p) for n, p in model.named_parameters() if n.startswith('0.')] "
                             f"per group, or prefix them: [(f'0.{{n}}', p) for n, p in model[0].named_parameters()]")
        first_of: Dict[int, int] = {}
        for i, p in enumerate(flat):
            j = first_of.setdefault(id(p), i)
            if j != i:
                k_i = next(k for k, g in enumerate(self.param_groups) if any(q is p for q in g["params"]))
                where = "twice in param group %d" % k_i if sum(q is p for q in self.param_groups[k_i]["params"]) > 1 else "in two param groups"
                raise ValueError(f"parameter {names[i]!r} is the same tensor as {names[j]!r}: it is listed {where}; "
                                 f"a session holds each parameter once, so list it once")
        for n, p in zip(names, flat):
            if p.dtype != torch.float32:
                raise TypeError(f"parameter {n!r} is {p.dtype}; the service holds float32 parameters")
            if p.is_sparse:
                raise TypeError(f"parameter {n!r} is sparse; ASGD does not support sparse tensors")
        self._names: List[str] = names
        self._params: List[torch.Tensor] = flat
        #: Each parameter's device and shape when the optimizer was built (see _check_params).
        self._layout: List[Tuple[torch.device, Tuple[int, ...]]] = [(p.device, tuple(p.shape)) for p in flat]
        self._name_of: Dict[int, str] = {id(p): n for p, n in zip(flat, names)}
        self._index_of: Dict[int, int] = {id(p): i for i, p in enumerate(flat)}
        #: The parameters as the session last held them for this optimizer (created from, loaded from a step's
        #: answer or a pull, or pushed). A model that no longer matches them was edited outside the optimizer
        #: (model.load_state_dict, clamp_, a pruning mask, re-initialisation): see _push_edits.
        self._synced: List[torch.Tensor] = [p.detach().clone() for p in flat]
        #: The synced parameters from before a pipelined step that an opt.state read waited for (see _catch_up).
        self._read_stale: Optional[List[torch.Tensor]] = None
        #: The hyperparameters the session holds for each group, as far as this optimizer knows.
        self._session_groups: List[Dict[str, Any]] = []
        #: This optimizer's own hyperparameters as last sent to (or taken from) the session, per group: a
        #: value in param_groups that differs from them travels with the next step (see _group_changes).
        self._own_groups: List[Dict[str, Any]] = []
        self.state = SessionState(self)

        group_specs = []
        for g in self.param_groups:
            spec: Dict[str, Any] = {"params": [self._name_of[id(p)] for p in g["params"]]}
            for key in HYPERPARAMETER_KEYS:
                spec[key] = _created_value(key, g[key])  # numpy scalars, a tensor lr: as the Python numbers JSON carries
            if isinstance(g.get("foreach"), bool):  # kept in the session's groups, as torch keeps it (None: not sent)
                spec["foreach"] = g["foreach"]
            if "param_names" in g:  # torch 2.6+: the session's state_dict carries them, as torch's does
                spec["param_names"] = list(g["param_names"])
            group_specs.append(spec)
        create_kwargs = dict(
            params=list(zip(names, flat)),
            hyperparameters={k: _created_value(k, defaults[k]) for k in HYPERPARAMETER_KEYS},
            param_groups=group_specs,
            snapshot_every=snapshot_every,
            keep_snapshots=keep_snapshots,
            max_staleness=max_staleness,
            aggregation=aggregation,
            expire_after_idle_s=expire_after_idle_s,
        )
        info, created = ensure_session(self.client, self.session, create, create_kwargs)
        self._check_layout(info)
        if not created:
            self._warn_settings_replaced(info, group_specs, max_staleness)
        self._take_session(info, update_local=not created)
        self._mark_own()
        if self.aggregation is not None:
            self._check_rounds(self.pipeline, self.on_stale, self.send_base_version)
        if not created and aggregation is not None and dict(aggregation).items() - (self.aggregation or {}).items():
            log.warning("[%s] session %r exists with aggregation %s; this optimizer asked for %s (the session's holds)",
                        self.worker, self.session, self.aggregation, dict(aggregation))
        if not created:
            self._pull()
        if self.pipeline:
            # Both connections of the loop open before its first steps (see _on_new_connection): the second
            # step overlaps the first from the start.
            open_spare = getattr(getattr(self.client, "conn", None), "open_spare", None)
            if open_spare is not None:
                open_spare()
        if self.pipeline and self.send_base_version and info.get("max_staleness") == 0:
            log.warning("[%s] session %r accepts no stale gradient (max_staleness 0), but with pipeline=True a "
                        "gradient is computed while the step before it is in flight: each one that comes out a "
                        "version old will be %s", self.worker, self.session,
                        {"pull": "dropped", "raise": "refused", "apply": "sent again without base_version"}[self.on_stale])

    # -- session bookkeeping -----------------------------------------------------------------------
    def _warn_settings_replaced(self, info: Mapping[str, Any], asked_groups: List[Dict[str, Any]], max_staleness: Optional[int]) -> None:
        """Joining a session: the session's hyperparameters and max_staleness hold; say which asked-for values
        they replace (a worker started with other settings than the session's would otherwise not know)."""
        differ = []
        kinds = info.get("int_hyperparameters")
        for k, (asked, remote) in enumerate(zip(asked_groups, info["param_groups"])):
            held = group_from_json({key: v for key, v in remote.items() if key != "params"})
            if isinstance(kinds, list) and k < len(kinds):
                held = _with_kinds(held, kinds[k])
            for key in HYPERPARAMETER_KEYS:
                if k < len(self._asked_keys) and key not in self._asked_keys[k]:
                    continue  # a default, not asked for: the session's value is taken without a word
                mine, theirs = _hyper_value(key, asked.get(key)), _hyper_value(key, held.get(key))
                if mine is not None and theirs is not None and not _equal_hyper(key, mine, theirs):
                    differ.append(f"group {k} {key}={theirs!r} (asked {mine!r})")
        if max_staleness is not None and info.get("max_staleness") != max_staleness:
            differ.append(f"max_staleness={info.get('max_staleness')!r} (asked {max_staleness!r})")
        if differ:
            log.warning("[%s] session %r exists with other settings than this optimizer asked for; the session's hold: %s",
                        self.worker, self.session, ", ".join(differ))

    def _check_layout(self, info: Mapping[str, Any]) -> None:
        remote = info["params"]
        remote_names = [p["name"] for p in remote]
        if sorted(remote_names) != sorted(self._names):
            raise ValueError(f"session {self.session!r} has parameters {remote_names}, the optimizer has {self._names}"
                             f"{_wrapper_hint(remote_names, self._names) or _unnamed_hint(remote_names, self._names)}")
        shapes = {p["name"]: list(p["shape"]) for p in remote}
        for n, p in zip(self._names, self._params):
            if shapes[n] != list(p.shape):
                raise ValueError(f"parameter {n!r}: the session holds shape {shapes[n]}, the model {list(p.shape)}")
        groups = info["param_groups"]
        remote_groups = [[remote_names[i] for i in g["params"]] for g in groups]
        local_groups = [[self._name_of[id(p)] for p in g["params"]] for g in self.param_groups]
        if remote_groups != local_groups:
            # The same groups with their parameters in another order, or the parameters grouped otherwise (a
            # review: the order's hint was given for both; the names were the same, checked above).
            same_groups = len(remote_groups) == len(local_groups) and all(sorted(a) == sorted(b) for a, b in zip(remote_groups, local_groups))
            hint = ("; the parameters are grouped otherwise: build this optimizer with the session's groups (the lists "
                    "above), or make a new session for this grouping")
            if same_groups:
                hint = ("; the same parameters in another order (a session created from a safetensors file takes the "
                        "file's order, and safetensors sorts by name): create it with param_groups naming the model's "
                        "order, or from a torch.save file or JSON, or build this optimizer with the parameters in the "
                        "session's order")
            raise ValueError(f"session {self.session!r} groups its parameters as {remote_groups}, the optimizer as {local_groups}{hint}")

    @staticmethod
    def _check_rounds(pipeline: bool, on_stale: str, send_base_version: bool) -> None:
        """What a session with ``aggregation`` cannot do: a contribution is computed at the round's version."""
        if pipeline:
            raise ValueError("pipeline=True cannot be used in a session with aggregation: each round needs gradients "
                             "computed at its version, and a pipelined gradient is one version old")
        if on_stale == "apply":
            raise ValueError('on_stale="apply" cannot be used in a session with aggregation: a contribution needs its base_version')
        if not send_base_version:
            raise ValueError("send_base_version=False cannot be used in a session with aggregation: a contribution needs its base_version")

    def _take_session(self, info: Mapping[str, Any], update_local: bool = True, keep_equal: bool = True) -> None:
        """Records a session answer; with ``update_local`` the groups take the session's hyperparameters."""
        self._info = dict(info)
        if "aggregation" in info:
            self.aggregation = info["aggregation"]
        self._version = info.get("version", self._version)
        self._session_step = info.get("step", self._session_step)
        # Which numbers are ints (t0=4 given as an int stays one, as torch keeps it): a service that does not
        # say (before int_hyperparameters) gives floats, its answers writing 4.0 as 4.
        kinds = info.get("int_hyperparameters")
        if not (isinstance(kinds, list) and len(kinds) == len(info["param_groups"])):
            kinds = None
        remote_groups = [group_from_json({k: v for k, v in g.items() if k != "params"}) for g in info["param_groups"]]
        if kinds is not None:
            remote_groups = [_with_kinds(g, ints) for g, ints in zip(remote_groups, kinds)]
        self._session_groups = [{k: _session_value(k, g[k], kinds is not None and k in kinds[i]) for k in HYPERPARAMETER_KEYS if k in g}
                                for i, g in enumerate(remote_groups)]
        if update_local:
            for local, remote in zip(self.param_groups, remote_groups):
                for k, v in remote.items():
                    if keep_equal and k in HYPERPARAMETER_KEYS and k in local and _equal_hyper(k, local[k], v):
                        # The value this optimizer holds, as it was given: the session's answer does not say
                        # which numbers are ints (a worker joining a session made with t0=100 took 100.0,
                        # where torch.optim.ASGD(t0=100) keeps the int; a torch 2.x user's review).
                        continue
                    local[k] = v
            self._mark_own()

    def _mark_own(self) -> None:
        """The groups' values now are this optimizer's, in step with the session: only later changes are sent."""
        self._own_groups = [{k: _hyper_value(k, g.get(k)) for k in HYPERPARAMETER_KEYS} for g in self.param_groups]

    @property
    def session_hyperparameters(self) -> List[Dict[str, Any]]:
        """Per group, the hyperparameters the session holds (lr, lambd, alpha, t0, weight_decay, maximize) as
        of the last answer this optimizer read. With several workers they can differ from this optimizer's
        ``param_groups``, which hold its own values: the ones it set (its scheduler's) and sends."""
        return [dict(g) for g in self._session_groups]

    def _warn_caveats(self, groups: Any) -> None:
        """Once per optimizer: values torch takes whose step the service computes as for another value (a
        tensor lr, or a numpy float32 lr, lambd, alpha or t0, as a Python float; foreach=True, as foreach=False)."""
        for g in groups:
            for k in HYPERPARAMETER_KEYS:
                if isinstance(g.get(k), torch.Tensor) and k not in self._warned:
                    self._warned.add(k)
                    warnings.warn(_tensor_hyper_message(k), UserWarning, stacklevel=3)
                if k in _NUMPY_ROUNDED and _is_narrow_numpy_float(g.get(k)) and f"numpy {k}" not in self._warned:
                    self._warned.add(f"numpy {k}")
                    warnings.warn(_numpy_hyper_message(k, g[k]), UserWarning, stacklevel=3)
            if g.get("foreach") and "foreach" not in self._warned:
                self._warned.add("foreach")
                warnings.warn(_FOREACH_MESSAGE, UserWarning, stacklevel=3)

    def _group_changes(self) -> Optional[List[Dict[str, Any]]]:
        """Per group, the hyperparameters changed here since a step carrying them was last answered (or since
        they were taken from the session; None when none is). A value another worker gave the session is not
        one of them: it is not sent back.
        A value that a step still in flight carries (pipelined: sent, its answer not yet loaded) goes again with
        this step: should the step in flight be sent again (its answer lost) it would be applied after this
        one, which then ran with the old value (found by a review: a StepLR change lost for a step). Once a
        step carrying it is answered it is not sent again, so a value goes with at most the steps sent before
        that answer (one more when pipelined), not with every step (with several workers the session's lr
        would then follow whichever worker stepped last). A value going back while in flight (lr A, B, A as
        CyclicLR at a peak) goes too. Should the step in flight be dropped, its values were not taken: they
        count as unsent and go with the next step."""
        changes: List[Dict[str, Any]] = []
        in_flight = _values_in_flight(self._pending) or [{} for _ in self.param_groups]
        for i, (local, known, flying) in enumerate(zip(self.param_groups, self._own_groups, in_flight)):
            changed = {}
            for k in HYPERPARAMETER_KEYS:
                value = local.get(k)
                if type(value) is not float and ((isinstance(value, torch.Tensor) and k not in self._warned)
                                                 or (_is_narrow_numpy_float(value) and f"numpy {k}" not in self._warned)):
                    self._warn_caveats([local])
                v = _hyper_value(k, local.get(k))
                if v is None and k in local:
                    # torch.optim.ASGD fails on it too (a TypeError in its arithmetic): not skipped, which left the
                    # session stepping with its old value (a review: lr read from a config file as "0.01").
                    raise TypeError(f"param_groups[{i}]['{k}']: {local[k]!r} is not a number; torch.optim.ASGD needs a real number "
                                    f"(a float, an int{', or a 1-element tensor' if k == 'lr' else ''})")
                if v is not None and (not _same(v, known.get(k)) or (k in flying and not _same(v, flying[k]))):
                    changed[k] = v
            changes.append(changed)
        return changes if any(changes) else None

    # -- torch.optim.Optimizer API ----------------------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if not getattr(self, "_initializing", False):
            raise NotImplementedError(
                "RemoteASGD does not support add_param_group(): a session's parameters and groups are fixed when it is "
                "created. Give every parameter (and group) to RemoteASGD when you build it: a parameter that is frozen "
                "for now (requires_grad=False, or .grad None) is skipped by step() until it gets a gradient, as in "
                "torch.optim.ASGD; set its group's lr when you unfreeze it. Or create a new session")
        super().add_param_group(param_group)

    def _check_params(self) -> None:
        """The parameters still are what the session holds: float32, on the device and of the shape they had
        when the optimizer was built (``model.double()``, ``.half()``, ``.to(...)`` or a resize after building
        it would otherwise train in float32 or fail deep inside). Raised before anything is sent."""
        if torch.get_default_dtype() is not torch.float32 and "default-dtype" not in self._warned:
            # Found by a review (torch 2.13 and 1.13): with a float64 default, local ASGD's eta is float64 and the
            # parameters drift from the service's from about step 50, silently.
            self._warned.add("default-dtype")
            warnings.warn(_DEFAULT_DTYPE_MESSAGE.format(dtype=torch.get_default_dtype()), UserWarning, stacklevel=3)
        for n, p, (device, shape) in zip(self._names, self._params, self._layout):
            if p.dtype != torch.float32:
                raise TypeError(f"parameter {n!r} is now {p.dtype} (model.double()/half()/bfloat16() after building the "
                                f"optimizer?); the service holds float32 parameters: keep the model in float32 (autocast "
                                f"works), or build the optimizer again for a float32 model")
            if p.device != device:
                raise RuntimeError(f"parameter {n!r} is now on {p.device}, it was on {device} when the optimizer was built; "
                                   f"move the model before building RemoteASGD")
            if tuple(p.shape) != shape:
                raise RuntimeError(f"parameter {n!r} now has shape {list(p.shape)}, the session holds {list(shape)}")

    @_in_own_process
    def zero_grad(self, set_to_none: Optional[bool] = None) -> None:
        """As torch's, with the installed torch's default for ``set_to_none`` (False in 1.x, True in 2.x: a
        parameter without a gradient then steps on a zero gradient, or is skipped, as locally); also applies a
        pipelined step's parameters if they have arrived (never waits)."""
        if set_to_none is None:
            set_to_none = _TORCH_SET_TO_NONE
        with self._lock:
            self._check_params()
            try:
                self._apply_pending(block=False)
            except Exception as err:
                # The service refused the step in flight (a non-finite gradient, a stale one with
                # on_stale="raise"): raised by the next step() or synchronize(), as documented (_Failed).
                # A step whose fate is unknown stays pending (owed): the next step() or synchronize() sends it
                # again with its Idempotency-Key, and raises if that fails too; not raised here (a review:
                # a background step's connection error came out of zero_grad(), against the README).
                if self._pending is not None:
                    log.debug("[%s] session %r: the step in flight failed with its fate unknown (%s); the next step() sends it again",
                              self.worker, self.session, err)
                else:
                    if hasattr(err, "__notes__"):
                        del err.__notes__  # the call that raises it adds its own
                    self._pending = _Failed(err)
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

    @_in_own_process
    def step(self, closure: Any = None, *, metrics: Optional[Mapping[str, float]] = None, samples: Optional[int] = None,
             wait: bool = True) -> Any:
        """One ASGD step on the service, in one request. Returns the closure's loss (a Future with
        ``wait=False``).

        Parameters whose ``.grad`` is None are skipped, as in PyTorch. Changed group hyperparameters
        and ``metrics`` ({name: number}, stored with the step) travel in the same request. Without
        ``pipeline`` and with ``wait=True`` the new parameters are in the model when this returns.
        Otherwise the request runs in the background and its parameters are applied at the next
        ``step()``, ``zero_grad()`` or ``synchronize()``; ``wait=False`` returns a Future of the
        service's answer ({session, step, version, staleness}; ``{"dropped": True, ...}`` for a
        gradient dropped as stale). An error of a background step is raised by the next ``step()`` or
        ``synchronize()``.

        ``samples``: how many samples the gradient was computed from (sent with the step; a session's
        ``aggregation.target_samples`` counts them). In a session with ``aggregation`` the step is this
        worker's contribution to the round at the model's version and returns once the round has
        stepped (its answer, with ``round``, in ``last_step``).
        """
        try:
            return self._step(closure, metrics, samples, wait)
        except SessionNotFound as err:
            # What to do, besides what happened (a review: "session does not exist" mid-training said neither).
            if hasattr(err, "add_note"):
                err.add_note(f"session {self.session!r} was deleted (or expired after its expire_after_idle_s): its parameters and "
                             f"optimizer state are gone from the service. Start it again from this model with "
                             f"RemoteASGD(..., create=True), or from a checkpoint (upload_checkpoint) or a downloaded state_dict.")
            raise

    def _step(self, closure: Any, metrics: Optional[Mapping[str, float]], samples: Optional[int], wait: bool) -> Any:
        """step() itself."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._lock:
            # A refused step that zero_grad() read (_Failed): raised once this step has been sent, whichever
            # way it goes (plain, a thread, pipelined; after an edit is pushed), so that a loop catching it
            # loses no good batch; kept to raise later should this step fail or be interrupted.
            failed = self._pending if isinstance(self._pending, _Failed) else None
            if failed is None:
                return self._step_locked(loss, metrics, samples, wait)
            self._pending = None
            try:
                result = self._step_locked(loss, metrics, samples, wait)
            except BaseException:
                self._pending = failed if self._pending is None else _Both(self, failed, self._pending)
                raise
            sent = self._grads_now()
            if not sent:
                _result_of_previous(failed, "this call sent nothing")
            # As a pipelined step() raising its predecessor's error: a re-run with these gradients is a retry.
            self._interrupted = _clone_grads(sent)
            _result_of_previous(failed, "this step's request was sent, do not send it again")
            return result  # not reached: the line above raises

    def _grads_now(self) -> "OrderedDict[str, torch.Tensor]":
        """The gradients step() sends: each parameter's .grad that is not None, by name."""
        return OrderedDict((self._name_of[id(p)], p.grad) for group in self.param_groups for p in group["params"] if p.grad is not None)

    def _step_locked(self, loss: Any, metrics: Optional[Mapping[str, float]], samples: Optional[int], wait: bool) -> Any:
        """step() under the lock, the closure's loss computed."""
        self._check_params()
        # Parameters edited since the last sync (model.load_state_dict after building the optimizer,
        # clamp_, a mask): the gradient was computed on them and torch.optim.ASGD would step them, so the
        # session takes them first. A step in flight is waited for (its result merged under the edit):
        # this step then goes out without overlap.
        if any(not _same_bits(p, s) for p, s in zip(self._params, self._synced)):
            log.debug("[%s] session %r: parameters differ from the session's: the step in flight is read first, then they are sent",
                      self.worker, self.session)
            self._apply_pending(block=True)
            self._push_edits()
        else:
            self._read_stale = None  # nothing put back after a state read: the copies of before it are gone
        # The gradient was computed on the parameters in the model now: with a step in flight, those
        # from before it (its answer is loaded just below, after the gradient is taken).
        base = self._version if self.send_base_version else None
        background = self.pipeline or not wait
        # A pipelined step sent without a thread goes out before the previous one's answer is read
        # (below): the service can commit it while this process waits, with other workers' steps.
        overlap = background and wait and self.aggregation is None and not isinstance(self._pending, Future)
        if not overlap:
            self._apply_pending(block=True)
        if self.aggregation is not None:
            self._check_rounds(self.pipeline, self.on_stale, self.send_base_version)
        grads = self._grads_now()
        if any(g.is_sparse for g in grads.values()):
            raise RuntimeError("ASGD does not support sparse gradients")
        if not grads:  # torch.optim.ASGD changes nothing either
            if metrics and "metrics-without-step" not in self._warned:
                # Metrics travel with a step: with no gradient there is none (said once per optimizer).
                self._warned.add("metrics-without-step")
                log.warning("[%s] session %r: step(metrics=...) with no parameter holding a gradient sends nothing: "
                            "its metrics are not stored (they travel with a step)", self.worker, self.session)
            self._apply_pending(block=True)
            if wait:
                return loss
            done: Future = Future()
            done.set_result(None)
            return done
        # Cleared only once the retry is done: an interrupt while comparing (long for a big model) or while
        # the owed step is read and loaded leaves the marker for the next re-run, which is its retry again.
        retried = self._interrupted
        if retried is not None and _same_grads(retried, grads):
            # The same gradients as a step() that was interrupted after its request may have reached the
            # service: this is its retry. That step is owed (sent again with its Idempotency-Key, so it is
            # applied once) or in flight; nothing more is sent.
            log.info("[%s] session %r: step() with the gradients of the interrupted step: taken as its retry "
                     "(sent again with its Idempotency-Key: applied once)", self.worker, self.session)
            if not (background and wait and self.aggregation is None):
                self._apply_pending(block=True)
            self._interrupted = None
            if wait:
                return loss
            done = Future()
            done.set_result(dict(self.last_step or {}))
            return done
        self._interrupted = None
        groups = self._group_changes()
        metrics = dict(metrics) if metrics is not None else None
        _step_extras("none", groups, metrics)  # refused here, naming the field, before anything is sent
        key = uuid.uuid4().hex
        args = (grads, base, groups, metrics, samples)
        if not background:
            outcome: Optional[_Outcome] = None
            try:
                outcome = self._send_owing(self._request, key, args)
                self._apply_outcome(outcome)
            except BaseException as err:
                # Interrupted after the request may have gone out, wherever (loading the answer, or between
                # two statements here): a re-run with these gradients must be its retry, and the answer
                # not yet loaded is owed (read again, or the request sent again with its key: applied once).
                if _is_interrupt(err) and self._interrupted is None:
                    if outcome is None:
                        self._owe(key, args)
                    else:
                        self._interrupted = _clone_grads(grads)
                        if self._pending is None:
                            self._pending = _Done(outcome)
                raise
            return loss
        if wait and self.aggregation is None:
            # Pipelined: sent now on this thread, its answer read at the next call (no thread).
            # Group changes not yet confirmed by the previous step's answer travel again: the same values.
            if _owes(self._pending) or _on_new_connection(self._pending):
                # An interrupted step owed (perhaps never sent) goes first: sent after this one, it would
                # be applied after it. So does one sent over a new connection (_on_new_connection).
                self._apply_pending(block=True)
            sent = None
            try:
                sent = self._send_owing(self._start, key, args)
                if sent is not None:
                    previous, self._pending = self._pending, sent
                    if previous is not None:
                        try:
                            outcome = _result_of_previous(previous, "this step's request was sent, do not send it again")
                        except BaseException as err:
                            if _fate_unknown(err) and not isinstance(previous, Future):
                                self._pending = _Both(self, previous, sent)  # the previous one is owed too
                            self._interrupted = _clone_grads(grads)
                            raise
                        try:
                            self._apply(outcome, overlapped=True)
                        except BaseException:
                            self._pending = _Both(self, _Done(outcome), sent)
                            self._interrupted = _clone_grads(grads)
                            raise
                    return loss
            except BaseException as err:
                # An interrupt the handlers above did not see (between two statements): this step may be
                # out; a re-run with its gradients is its retry, and it is owed unless already in _pending.
                if _is_interrupt(err) and self._interrupted is None:
                    if sent is None:
                        self._owe(key, args)
                    else:
                        self._interrupted = _clone_grads(grads)
                        if not _holds(self._pending, sent):
                            self._pending = sent if self._pending is None else _Both(self, self._pending, sent)
                raise
        self._apply_pending(block=True)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asgd-step")
        # The gradients leave the caller's tensors now: backward() may overwrite them next.
        grads = OrderedDict((n, g.detach().clone()) for n, g in grads.items())
        future = self._executor.submit(self._request, grads, base, groups, metrics, samples, key=key)
        # Should the request fail with its fate unknown (a connection lost past the retries), the call that
        # reads it owes the step: sent again with this key (applied once), as on the caller's thread.
        future.asgd_owed = (key, (grads, base, groups, metrics, samples))  # type: ignore[attr-defined]
        self._pending = future
        return loss if wait else _AnswerFuture(future)

    def _send_owing(self, send: Any, key: str, args: Tuple[Any, ...]) -> Any:
        """``send(*args, key=key)``; should it fail with its fate unknown (an interrupt, a connection lost),
        the step is owed (see :meth:`_owe`) and the error raised."""
        try:
            return send(*args, key=key)
        except BaseException as err:
            if _fate_unknown(err):
                self._owe(key, args)
            raise

    def _owe(self, key: str, args: Tuple[Any, ...]) -> None:
        """This step's request was interrupted (or its connection failed) after it may have reached the
        service: the next call sends it again with the same Idempotency-Key (applied once), and a step()
        with the same gradients is its retry (see step())."""
        grads = _clone_grads(args[0])
        owed = _Resend(self, key, (grads,) + tuple(args[1:]))
        self._pending = owed if self._pending is None else _Both(self, self._pending, owed)
        self._interrupted = grads

    def _apply_outcome(self, outcome: _Outcome) -> None:
        """_apply for an outcome this call read: should an interrupt come while it loads, it is loaded again."""
        try:
            self._apply(outcome)
        except BaseException:
            self._pending = _Done(outcome) if self._pending is None else _Both(self, self._pending, _Done(outcome))
            raise

    def _request(self, grads: Mapping[str, torch.Tensor], base: Optional[int], groups: Optional[List[Dict[str, Any]]],
                 metrics: Optional[Dict[str, float]], samples: Optional[int] = None, key: Optional[str] = None) -> _Outcome:
        """The step's request (in the caller's or the background thread); touches no optimizer state."""
        wire = _WIRE_DTYPES[self.grad_dtype]
        # The worker id goes with every step: in a plain session it tells the service that the steps of a
        # pipelined loop, sent over two connections, come from one worker (its group commit does not hold
        # one step back for the next one of the same worker).
        send: Dict[str, Any] = dict(returns="params", param_groups=groups, metrics=metrics, grad_dtype=wire, samples=samples, worker=self.worker)
        if self.aggregation is not None or self._worker_given:
            send.update(wait=self.round_wait_s, max_wait_s=self.max_round_wait_s)
        else:
            # The worker id of a plain session's steps: no round holds them, so neither the socket timeout
            # nor the retry budget waits for one.
            send.update(held=False)
        return self._settle(lambda: self.client.step(self.session, grads, base_version=base, idempotency_key=key, **send), groups,
                            resend=lambda: self.client.step(self.session, grads, base_version=None, **send), base=base, key=key)

    def _start(self, grads: Mapping[str, torch.Tensor], base: Optional[int], groups: Optional[List[Dict[str, Any]]],
               metrics: Optional[Dict[str, float]], samples: Optional[int], key: Optional[str] = None) -> Optional["_Sent"]:
        """A pipelined step sent now without a thread (Client.start_step); None where that cannot be done
        (https, another transport, on_stale="apply", which sends the gradients again): the thread does it."""
        if self.on_stale == "apply":
            return None
        handle = self.client.start_step(self.session, grads, base_version=base, returns="params", param_groups=groups, metrics=metrics,
                                        grad_dtype=_WIRE_DTYPES[self.grad_dtype], samples=samples,
                                        worker=self.worker, idempotency_key=key)
        return None if handle is None else _Sent(self, handle, groups)

    def _settle(self, call: Any, groups: Optional[List[Dict[str, Any]]], resend: Any, base: Optional[int] = None,
                key: Optional[str] = None) -> _Outcome:
        """The outcome of a step's request ``call()``, by the staleness policy when it is refused as stale."""
        try:
            answer = call()
        except DuplicateContribution as err:
            # Only the first contribution of this optimizer: a restart's. Later ones are another live process
            # with this worker id (a misconfiguration), raised as before.
            if self.aggregation is None or base is None or err.version != base or self._contributed:
                raise
            # This worker's contribution to the round at ``base`` is in already: sent by this worker before a
            # restart (its process killed once the service had stored it, the round still open). The round
            # steps with that one; this gradient is dropped, and the round's result loaded once it has stepped.
            log.warning("[%s] session %r: this worker's contribution to the round at version %s is in already (sent "
                        "before a restart?): this gradient is dropped; waiting for the round to step", self.worker, self.session, base)
            started = time.monotonic()
            try:
                tensors, version, step = self.client.wait_params(self.session, base, wait_s=min(60.0, max(1.0, float(self.round_wait_s or 60))),
                                                                 max_wait_s=self.max_round_wait_s, with_step=True)
            except TimeoutError as timeout:
                if isinstance(timeout, RoundPending):
                    raise
                raise RoundPending(self.session, {"version": base, "workers": [self.worker]}, key or "", time.monotonic() - started) from err
            # The session's figures at the version loaded, for step_count and last_step (a rounds review: they
            # stayed a round behind, so a LambdaLR on step_count ran one step off); of the round's record only
            # its version is known here.
            answer = None if step is None else {"session": self.session, "step": step, "version": version, "staleness": 0, "round": {"version": base}}
            return _Outcome(answer, tensors, version, None, stale=err)
        except StaleGradient as err:
            if self.on_stale == "raise":
                raise
            # A gradient of replaced state (replaced_at: a restore, a load, or the session deleted and created
            # again) is of parameters no longer in the session's history: dropped under "apply" too, as one
            # refused with BASE_VERSION_AHEAD is.
            replaced = isinstance(err.body, dict) and err.body.get("replaced_at") is not None
            if self.on_stale == "pull" or replaced:
                tensors, version = self.client.get_params(self.session)
                return _Outcome(None, tensors, version, None, stale=err)
            answer = resend()
        except ServiceError as err:
            went_back = _went_back(err)
            if went_back is None or self.on_stale == "raise":
                raise
            # The session is at a lower version than the one this gradient was computed at: deleted and
            # created again (by another worker, or by its expire_after_idle_s), or its database restored.
            # Its history is not the one the gradient came from: dropped, and its parameters loaded.
            tensors, version = self.client.get_params(self.session)
            log.warning("[%s] session %r is at version %s, below the %s this optimizer held (deleted and created again, "
                        "or its database restored): training goes on from its parameters", self.worker, self.session, version, went_back)
            return _Outcome(None, tensors, version, None, stale=err)
        params = answer.pop("params", None)
        if params is None:  # a service without return=params (before issue 11): a second request
            if groups is not None:
                raise RuntimeError("the service ignores hyperparameters sent with a step (it predates them): "
                                   "upgrade asgd-serve, or change them with load_state_dict()")
            params, version = self.client.get_params(self.session)
        else:
            # A retried step whose version the service no longer keeps comes with the parameters now.
            version = answer.get("params_version", answer.get("version"))
        return _Outcome(answer, params, version, groups)

    def _apply(self, outcome: _Outcome, overlapped: bool = False) -> None:
        """Loads a step's outcome into the model (caller's thread, under the lock). ``overlapped``: the next
        step was sent before this answer was read."""
        self._contributed = True
        floor, self._overlap_floor = self._overlap_floor, None
        # The two steps in flight may have been committed in the other order (two replicas): then the
        # parameters loaded from the other answer are newer and hold this step too.
        older = floor is not None and outcome.stale is None and outcome.version is not None and outcome.version < floor
        if not older:
            self._load_from_service(outcome.params, keep_edits=True)
            if outcome.version is not None:
                self._version = outcome.version
        if overlapped:
            self._overlap_floor = self._version
        if isinstance(outcome.stale, DuplicateContribution):
            if outcome.answer is not None and not older:
                self._session_step = outcome.answer["step"]
                self.last_step = outcome.answer
            log.warning("[%s] session %r: loaded the round's result at version %s (this worker's gradient for it was "
                        "the one it sent before)", self.worker, self.session, self._version)
            return
        if outcome.stale is not None:
            self.stale_dropped += 1
            log.warning("[%s] session %r: gradient dropped as stale (%s); loaded the parameters at version %s "
                        "(%d dropped so far)", self.worker, self.session, outcome.stale.message, self._version, self.stale_dropped)
            return
        answer = outcome.answer or {}
        if not older:
            # An older answer read after a newer one (two in flight, committed in the other order) leaves the
            # newer step's figures: step_count and last_step never go back.
            self._session_step = answer.get("step", self._session_step)
            self.last_step = answer
        if outcome.sent_groups is not None:
            for own, known, sent in zip(self._own_groups, self._session_groups, outcome.sent_groups):
                own.update(sent)
                known.update(sent)
        self._note_session_groups(answer.get("param_groups"))

    def _note_session_groups(self, groups: Any) -> None:
        """Records the session's hyperparameters at the answered version (a step answer's ``param_groups``),
        for :attr:`session_hyperparameters`. They are never written into ``param_groups``: those hold this
        optimizer's own values (a scheduler's multiplies them: a value another worker's scheduler reached,
        copied in, would be decayed a second time), and only the ones changed here are sent."""
        if not isinstance(groups, list) or len(groups) != len(self._session_groups):
            return
        for known, remote in zip(self._session_groups, groups):
            if not isinstance(remote, dict):
                continue
            for k in HYPERPARAMETER_KEYS:
                if k in remote:
                    known[k] = _session_value(k, remote[k], type(known.get(k)) is int)

    def _apply_pending(self, block: bool) -> None:
        if self._pid != os.getpid():  # reached without a public method (a SessionState taken before a fork)
            raise _forked_error(self)
        pending = self._pending
        if pending is None or (not block and not pending.done()):
            return
        if not block:
            log.debug("[%s] session %r: the answer of the step in flight has begun to arrive: read now", self.worker, self.session)
        try:
            outcome = _result_of_previous(pending, "this call sent nothing")
        except BaseException as err:
            # An interrupt (or a connection that failed) leaves the step pending: the next call reads it,
            # sending it again with its Idempotency-Key where its answer was not read (applied once). A
            # background thread's Future keeps running. An error the service answered is raised once.
            if isinstance(pending, Future):
                if not _is_interrupt(err):
                    self._pending = None
                    owed = getattr(pending, "asgd_owed", None)
                    unknown = owed is not None and _fate_unknown(err)
                    if unknown:
                        # The background request may have been applied: the next call sends it again with
                        # its key (the service answers it once), and a step() with its gradients is its retry.
                        log.warning("[%s] session %r: a step sent in the background failed with its fate unknown (%s); "
                                    "the next call sends it again with its Idempotency-Key (applied once)",
                                    self.worker, self.session, err)
                        self._owe(*owed)
                    if getattr(pending, "asgd_delivered", False) and not unknown:
                        # step(wait=False)'s Future gave the caller the service's refusal already (nothing was
                        # applied, nothing is owed): not raised twice. A step whose fate is unknown is owed: this
                        # call raises, as before, and the next sends it first (a review: returning here let a
                        # plain step() go out before it, and its older answer was then loaded over the newer).
                        log.debug("[%s] session %r: the step in flight was refused (%s); its Future said so", self.worker, self.session, err)
                        return
            elif not _fate_unknown(err):
                self._pending = pending.rest if isinstance(pending, _Both) and pending.first is not None else None
            raise
        self._pending = None
        self._apply_outcome(outcome)

    def _catch_up(self, warn_in_flight: bool = False) -> Optional[int]:
        """Waits for a pipelined step and loads its parameters (as :meth:`synchronize`), but sends nothing:
        what reading the state does. Parameters edited in the model stay edited (the AWD-LSTM idiom swaps
        ``ax`` in while it reads ``state[p]``) and are sent by the next step only if they still differ then."""
        if self._pid != os.getpid():
            raise _forked_error(self)
        with self._lock:
            if warn_in_flight and self._pending is not None and "state-in-flight" not in self._warned:
                # Copies of p.data taken before this read hold the parameters from before the step in flight:
                # swapped back after evaluating, they would be sent by the next step as an edit, undoing
                # that step for every worker. Said once per optimizer (a loop may read the state every step).
                self._warned.add("state-in-flight")
                log.warning("[%s] session %r: reading opt.state waited for the step in flight and loaded its parameters; "
                            "copies of the parameters taken before this read are one step old (put back, they are taken "
                            "for the session's, not sent): call opt.synchronize() before copying p.data", self.worker, self.session)
            before = list(self._synced) if self._pending is not None else None
            self._apply_pending(block=True)
            if before is not None and any(a is not b for a, b in zip(before, self._synced)):
                # The parameters from before the step just loaded: a copy of p.data taken before this read holds
                # them, and is recognised if it is put back (see _push_edits).
                self._read_stale = before
            return self._version

    @_in_own_process
    def synchronize(self) -> Optional[int]:
        """Waits for a pipelined step and loads its parameters, sends the model's parameters if they were
        edited outside the optimizer (see :meth:`push_params`) and the hyperparameters changed in
        ``param_groups`` since the last step (a scheduler's ``step()`` at the end of an epoch); returns the
        model's version. Afterwards the session holds what the model and ``param_groups`` hold: a snapshot or
        checkpoint taken next (:meth:`snapshot`, :meth:`download_checkpoint` call this) has them.

        In a session with rounds (``aggregation``) the changed hyperparameters are not sent here: a change
        without a step would move the version and void the open round for the other workers (their
        contributions, computed at this version, dropped as stale, or this call refused with RoundOpen).
        They go with this worker's next contribution; :meth:`download_checkpoint` writes them into its file."""
        return self._synchronize(groups=self.aggregation is None)

    def _synchronize(self, groups: bool) -> Optional[int]:
        """synchronize(); with ``groups`` False the changed hyperparameters stay to travel with the next step
        (state_dict() and load_state_dict() read or replace them locally: no new version for that)."""
        with self._lock:
            self._check_params()
            self._apply_pending(block=True)
            self._push_edits()
            if groups:
                self._push_group_changes()
            return self._version

    def _push_group_changes(self) -> bool:
        """Sends the hyperparameters changed here since the last step (PATCH param_groups: a new version, no
        step); True if it did. Caller holds the lock and has loaded any pending answer."""
        from .errors import ServiceError

        changes = self._group_changes()
        if changes is None:
            return False
        try:
            info = self.client.set_hyperparameters(self.session, changes)
        except ServiceError as err:
            if err.status in (404, 405) and err.code in ("ROUTE_NOT_FOUND", "METHOD_NOT_ALLOWED"):
                if "param_groups_route" not in self._warned:
                    self._warned.add("param_groups_route")
                    warnings.warn("this asgd-serve cannot set hyperparameters without a step: the changed param_groups reach "
                                  "the session with the next step (a snapshot or checkpoint taken before has the old values)",
                                  UserWarning, stacklevel=3)
                return False
            raise
        for own, known, sent in zip(self._own_groups, self._session_groups, changes):
            own.update(sent)
            known.update(sent)
        self._note_session_groups(info.get("param_groups"))
        # The parameters did not change: the model is at the new version unless other workers stepped between.
        if self._version is not None and info.get("version") == self._version + 1:
            self._version = info["version"]
        return True

    @_in_own_process
    def push_params(self) -> Optional[int]:
        """Sends the model's parameters to the session (PUT params): the next step applies to them, as
        torch.optim.ASGD steps whatever the parameters hold. The optimizer state (step, eta, mu, ax) and the
        hyperparameters stay. Returns the new version.

        ``step()`` and ``synchronize()`` do this by themselves when the model's parameters differ from the
        ones the optimizer last loaded (``model.load_state_dict``, ``p.data.clamp_``, pruning masks); call it
        to send them at a moment of your choice (e.g. before another worker or a download reads them).
        """
        with self._lock:
            self._check_params()
            self._apply_pending(block=True)
            self._push([n for n, p, s in zip(self._names, self._params, self._synced) if not _same_bits(p, s)])
            return self._version

    def _push_edits(self) -> bool:
        """Sends the model's parameters when they differ (bit for bit) from the last synced ones; True if it did.
        Caller holds the lock and has loaded any pending answer (its step applied on the old parameters)."""
        stale, self._read_stale = self._read_stale, None
        if stale is not None:
            differ = [i for i, (p, s) in enumerate(zip(self._params, self._synced)) if not _same_bits(p, s)]
            if differ and all(_same_bits(self._params[i], stale[i]) for i in differ):
                # Every parameter that differs holds exactly what it held before the pipelined step that an
                # opt.state read waited for: copies taken before that read, put back (AWD-LSTM's evaluation
                # swap without synchronize()). Sent, they would undo that step for every worker (found by a
                # review: 30 steps ended 0.067 away from a replay); the session's parameters are taken instead.
                with torch.no_grad():
                    for i in differ:
                        self._params[i].copy_(self._synced[i])
                warnings.warn(
                    f"session {self.session!r}: the parameters put back after reading opt.state are the ones from before the "
                    f"step in flight at that read (copies of p.data taken before it); sent, they would undo that step for every "
                    f"worker, so the session's parameters were taken instead. Call opt.synchronize() before copying p.data",
                    UserWarning, stacklevel=4)
                return False
        edited = [n for n, p, s in zip(self._names, self._params, self._synced) if not _same_bits(p, s)]
        if not edited:
            return False
        self._push(edited)
        return True

    def _push(self, edited: List[str]) -> None:
        """PUT params with the model's parameters, at the version the optimizer knows (If-Match). When other
        workers' steps came in between (412), their parameters are loaded first, the edited elements kept,
        and the result sent at the newer version: an edit replaces the elements it changed, nothing else."""
        from .errors import VersionMismatch

        for attempt in range(_PUSH_ATTEMPTS):
            tensors = OrderedDict((n, p.detach()) for n, p in zip(self._names, self._params))
            try:
                info = self.client.put_params(self.session, tensors, if_match=self._version)
            except VersionMismatch:
                if attempt == _PUSH_ATTEMPTS - 1:
                    raise
                current, version = self.client.get_params(self.session)
                self._load_from_service(current, keep_edits=True)
                if version is not None:
                    self._version = version
                continue
            self._synced = [p.detach().clone() for p in self._params]
            self._take_session(info, update_local=False)
            shown = ", ".join(edited[:5]) + (f" and {len(edited) - 5} more" if len(edited) > 5 else "")
            log.info("[%s] session %r: parameters changed outside the optimizer (%s); sent the model's parameters "
                     "(version %s): the next step applies to them", self.worker, self.session, shown or "none", self._version)
            return

    @_in_own_process
    def pull(self) -> int:
        """Copies the session's current parameters into the model (in place); returns their version."""
        with self._lock:
            self._apply_pending(block=True)
            return self._pull()

    def _pull(self) -> int:
        tensors, version = self.client.get_params(self.session)
        self._load_from_service(tensors, keep_edits=False)
        if version is not None:
            self._version = version
        return self._version  # type: ignore[return-value]

    def _load_from_service(self, tensors: Mapping[str, torch.Tensor], keep_edits: bool) -> None:
        """Copies the session's parameters into the model and remembers them as synced. ``keep_edits``: the
        elements changed in the model since the last sync (while a pipelined step was in flight, or before
        another worker's steps were pulled) keep the model's value; the others take the session's."""
        self._check_params()
        self._copy_into_params(tensors, check_only=True)
        kept = []
        with torch.no_grad():
            for i, (n, p, s) in enumerate(zip(self._names, self._params, self._synced)):
                # The decoded answer is this optimizer's own (never written to): kept as the synced copy
                # rather than copied into one, which saves a copy of the model per step.
                t = tensors[n].reshape(p.shape)
                if keep_edits and not _same_bits(p, s):
                    changed = _bits(p) != _bits(s)
                    p.copy_(torch.where(changed, p.detach(), t))
                    kept.append(n)
                else:
                    p.copy_(t)
                self._synced[i] = t if t.dtype == torch.float32 else p.detach().clone()
        if kept:
            log.info("[%s] session %r: parameters %s were changed while a step was in flight; the changed elements "
                     "keep their new values over that step's result and are sent with the next step",
                     self.worker, self.session, ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else ""))

    def _copy_into_params(self, tensors: Mapping[str, torch.Tensor], check_only: bool = False) -> None:
        missing = [n for n in self._names if n not in tensors]
        if missing:
            raise RuntimeError(f"the service's answer lacks parameters {missing}")
        with torch.no_grad():
            for n, p in zip(self._names, self._params):
                t = tensors[n]
                if list(t.shape) != list(p.shape):
                    raise RuntimeError(f"parameter {n!r}: the service answered shape {list(t.shape)}, the model has {list(p.shape)}")
                if not check_only:
                    p.copy_(t)

    def _hooks(self, kind: str) -> Any:
        """torch 2.x's state_dict / load_state_dict hooks (``register_state_dict_pre_hook`` ...); none in 1.13."""
        return list(getattr(self, f"_optimizer_{kind}_hooks", {}).values())

    @_in_own_process
    def state_dict(self) -> Dict[str, Any]:
        """torch.optim.ASGD.state_dict() of the session: {"state": {i: {step, eta, mu, ax}}, "param_groups": [...]}.

        The groups carry this optimizer's own values (as torch's state_dict does): keys the service
        does not keep (e.g. a scheduler's ``initial_lr``), changes not yet sent with a step, and the values
        as they were set (a tensor lr stays the tensor, a numpy lr the numpy scalar; the session holds
        their float). torch 2.x's state_dict pre and post hooks run as in torch.optim.Optimizer.state_dict.
        """
        for pre_hook in self._hooks("state_dict_pre"):
            pre_hook(self)
        self._synchronize(groups=False)
        # A torch.save file, not JSON: JSON answers stop at 16M numbers (a state_dict counts 2 x numel).
        sd = self.client.get_state_dict(self.session, format="pt")
        groups = []
        for remote, local in zip(sd["param_groups"], self.param_groups):
            # torch's pack_group: the group's own values in its order, then keys only the session has; params last.
            group = {k: v for k, v in local.items() if k != "params"}
            group.update((k, v) for k, v in remote.items() if k not in group and k != "params")
            group["params"] = remote["params"]
            groups.append(group)
        sd["param_groups"] = groups
        for post_hook in self._hooks("state_dict_post"):
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    @property  # type: ignore[override]
    @_in_own_process
    def state(self) -> Any:
        """torch.optim.ASGD's per-parameter state, read from the session (see :mod:`asgd_client.state`)."""
        return self.__dict__["_session_state"]

    @state.setter
    def state(self, value: Any) -> None:
        if "_session_state" not in self.__dict__ or isinstance(value, SessionState):
            # torch.optim.Optimizer.__init__'s defaultdict, then this optimizer's SessionState.
            self.__dict__["_session_state"] = value
            return
        if isinstance(value, Mapping) and len(value) == 0:
            # `opt.state = defaultdict(dict)`: the state starts over, as in torch (found by a review: the session
            # kept its step, eta, mu and ax, and opt.state stayed the empty dict, so `'ax' in opt.state[p]` was
            # False for good).
            self.reset_state()
            return
        raise TypeError("the optimizer state lives in the asgd-serve session: change it with load_state_dict() "
                        "(opt.state = {} or opt.state.clear() start it over)")

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        # torch's __setstate__ updates __dict__, where a "state" would be shadowed by the property: set it through it.
        state = dict(state)
        if "state" in state:
            self.state = state.pop("state")
        super().__setstate__(state)

    @_in_own_process
    def reset_state(self) -> None:
        """Starts the optimizer state over for every parameter (step, eta, mu, ax), keeping the hyperparameters:
        what ``opt.state.clear()`` does to torch.optim.ASGD. A new version of the session."""
        groups: List[Dict[str, Any]] = []
        first = 0
        for g in self.param_groups:
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(first, first + len(g["params"])))})
            first += len(g["params"])
        # Said as what the user did (the warning that the session went back names it), not as a load_state_dict.
        self.__dict__["_load_cause"] = "starting the optimizer state over (opt.state.clear(), opt.state = {}, reset_state())"
        try:
            self.load_state_dict({"state": {}, "param_groups": groups})
        finally:
            self.__dict__.pop("_load_cause", None)

    @_in_own_process
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """torch.optim.ASGD.load_state_dict, applied to the session (parameters unchanged).

        As in torch: the loaded groups' ``param_names`` replace the optimizer's, and a group loaded without
        them keeps the optimizer's (torch 2.6 on); values torch keeps as given (a tensor lr) stay so in
        ``param_groups``, and the session takes their float. torch 2.x's load_state_dict pre and post hooks
        run as in torch.optim.Optimizer.load_state_dict.
        """
        state_dict = dict(state_dict)  # shallow copy, as torch's
        for pre_hook in self._hooks("load_state_dict_pre"):
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._synchronize(groups=False)
        loaded_groups = state_dict["param_groups"]
        if len(loaded_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for g, s in zip(self.param_groups, loaded_groups):
            if len(g["params"]) != len(s["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
        keep_names = _torch_keeps_param_names()
        sent_groups, full_groups = [], []
        for local, loaded in zip(self.param_groups, loaded_groups):
            group = dict(loaded)
            if keep_names and "param_names" in local and "param_names" not in group:
                group["param_names"] = list(local["param_names"])  # torch's update_group keeps the optimizer's names
            full_groups.append(group)
            # Keys of other code (a dict of metadata, a list) that the service does not store stay here, in
            # param_groups, as torch keeps them; state_dict() gives them back.
            sent_groups.append({k: v for k, v in group.items() if k in ("params", "param_names") or k in HYPERPARAMETER_KEYS
                                or k in FLAG_KEYS or _storable_extra(v)})
        sd = {"state": state_dict["state"], "param_groups": sent_groups}
        self._warn_caveats(loaded_groups)
        # The session's step before the load: a load takes every worker sharing the session back to the
        # loaded state, which is said (a worker that restarts in a shared session should not load one).
        before = self.client.get_session(self.session).get("step")
        # A torch.save file, not JSON (limited to 256 MiB, about 12M parameters): the same values either way.
        info = self.client.put_state_dict(self.session, state_dict_to_torch(sd), format="pt")
        after = info.get("step")
        if isinstance(before, int) and isinstance(after, int) and before > after:
            log.warning("[%s] %s took session %r back from step %d to step %d, for every worker that shares it "
                        "(eta, mu and the averages ax with it). A worker that restarts in a session others train should not "
                        "load optimizer state: it takes the session's when it joins (load a scheduler's state_dict alone).",
                        self.worker, self.__dict__.get("_load_cause", "load_state_dict"), self.session, before, after)
        with self._lock:
            self._take_session(info, update_local=True, keep_equal=False)  # the loaded values replace the groups', as in torch
        for local, loaded in zip(self.param_groups, full_groups):
            for k, v in loaded.items():
                if k == "params" or (k in FLAG_KEYS and k not in local_group_keys()):
                    continue
                if k not in local or k == "param_names" or not _storable_extra(v):
                    # Keys the service does not echo, and the names (kept as PyTorch keeps them).
                    local[k] = copy.deepcopy(v)
                elif _given_as_other_type(v) and _same(plain_number(v), plain_number(local[k])):
                    local[k] = copy.deepcopy(v)  # the value as given (a tensor lr); the session holds its float
                elif k in HYPERPARAMETER_KEYS and _loaded_as_written(v, local[k]):
                    local[k] = v  # t0=15 stays an int as torch keeps it (the session's echo may be 15.0)
                elif k in FLAG_KEYS and (v is None or isinstance(v, bool)) and bool(v) == bool(local[k]):
                    local[k] = v  # foreach=False stays False (the session holds None: the same step)
            if "param_names" in local and "param_names" not in loaded:
                del local["param_names"]  # torch before 2.6 replaces the group, names included
            # torch replaces the group: a key the loaded one lacks (a scheduler's initial_lr, another tool's
            # metadata) goes, so that a scheduler made after the load asks for it as torch's does (found by a
            # review: a stale initial_lr was kept). The hyperparameters and the flags stay: the session's, and
            # torch's __setstate__ fills missing flags in.
            for k in [k for k in local if k not in loaded and k not in ("params", "param_names") and k not in HYPERPARAMETER_KEYS and k not in FLAG_KEYS]:
                del local[k]
        self._mark_own()  # the loaded values are this optimizer's, and the session's
        for post_hook in self._hooks("load_state_dict_post"):
            post_hook(self)

    # -- evaluation helpers -----------------------------------------------------------------------
    @_in_own_process
    def named_averaged_parameters(self) -> "OrderedDict[str, torch.Tensor]":
        """ASGD's averages (``ax``; the parameter itself where it has not stepped), by name. Reads only: a
        pipelined step is waited for, but parameters edited in the model are not sent (as ``opt.state``; ax,
        as torch.optim.ASGD's, changes only at a step, and the next step sends the edits)."""
        self._catch_up()
        tensors, _ = self.client.get_params(self.session, averaged=True)
        return OrderedDict((n, tensors[n]) for n in self._names)

    @_in_own_process
    def averaged_parameters(self) -> List[torch.Tensor]:
        """ASGD's averages, in the order of the optimizer's parameters."""
        return list(self.named_averaged_parameters().values())

    @contextlib.contextmanager
    @_in_own_process
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
        """The session version of the parameters in the model."""
        return self._version

    @property
    def step_count(self) -> int:
        """optimizer.step() calls applied by the session (its "step")."""
        return self._session_step

    @property
    def parameter_names(self) -> List[str]:
        return list(self._names)

    @_in_own_process
    def refresh(self) -> Dict[str, Any]:
        """Reads the session (hyperparameters may have been changed by another client) and pulls parameters."""
        with self._lock:
            self._apply_pending(block=True)
            info = self.client.get_session(self.session)
            self._take_session(info, update_local=True)
            self._pull()
            return info

    def _synchronize_for_save(self) -> None:
        """synchronize() before a snapshot or checkpoint; in a session with rounds without sending changed
        hyperparameters: a PATCH there would move the version and void the open round for the other workers
        (their contributions, computed at this version, refused as stale). They go with the next contribution."""
        self.synchronize()

    @_in_own_process
    def snapshot(self, pinned: bool = False) -> Dict[str, Any]:
        self._synchronize_for_save()
        return self.client.snapshot(self.session, pinned=pinned)

    @_in_own_process
    def restore(self, snapshot_id: int) -> None:
        """Rolls the session back to a snapshot and pulls its parameters into the model."""
        with self._lock:
            self._apply_pending(block=True)
            info = self.client.restore_snapshot(self.session, snapshot_id)
            self._take_session(info, update_local=True)
            self._pull()

    @_in_own_process
    def download_checkpoint(self, path: str, format: str = "pt") -> str:
        from .functions import _write_atomic

        self._synchronize_for_save()
        data = self.client.get_checkpoint(self.session, format=format)
        # With rounds the values changed here since the last contribution were not sent (see above): the file
        # gets them, as torch.save(opt.state_dict()) has a scheduler's epoch-end lr.
        changes = self._group_changes() if self.aggregation is not None else None
        # Keys of this optimizer's groups that steps do not carry (a scheduler's initial_lr, which resuming
        # it with last_epoch= requires) go in the file where the session has none, as opt.state_dict() has them.
        extras = [{k: v for k, v in local.items() if k != "params" and k not in HYPERPARAMETER_KEYS and _plain(v)}
                  for local in self.param_groups]
        changes = [{**extra, **(changes[i] if changes else {})} for i, extra in enumerate(extras)] if any(extras) or changes else None
        if changes and format == "json":
            for group, changed in zip(data["optimizer"]["param_groups"], changes):
                _merge_group(group, changed)
        elif changes:
            import io

            # The service's own file; weights_only where it reads floats (torch 2.x; 1.13's refuses them).
            load_kw: Dict[str, Any] = {"weights_only": True} if int(torch.__version__.split(".")[0]) >= 2 else {}
            checkpoint = torch.load(io.BytesIO(data), map_location="cpu", **load_kw)
            for group, changed in zip(checkpoint["optimizer"]["param_groups"], changes):
                _merge_group(group, changed)
            out = io.BytesIO()
            torch.save(checkpoint, out)
            data = out.getvalue()
        if format == "json":
            import json

            data = json.dumps(data).encode("utf-8")
        _write_atomic(path, data)
        return path

    def close(self) -> None:
        """Waits for a pipelined step (without applying it), stops the background thread and closes the
        keep-alive connection (the session stays on the service). In a process forked from the one that built
        the optimizer: only this process's connection (the step in flight and the thread are the other's)."""
        if self._pid != os.getpid():
            self.client.close()
            return
        pending = self._pending
        if isinstance(pending, (_Sent, _Both)):  # an interrupted step owed (_Resend) is not sent again here
            with contextlib.suppress(Exception):  # as a background step's error is not raised here either
                pending.wait()
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        self.client.close()

    def __enter__(self) -> "RemoteASGD":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None and self._pid == os.getpid():  # in a forked child: only its connection is closed
            self._synchronize(groups=False)
        self.close()

    def __repr__(self) -> str:
        lines = [f"RemoteASGD (session {self.session!r} at {self.client.url}, version {self._version}, step {self._session_step})"]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for k in sorted(k for k in g if k != "params"):
                lines.append(f"    {k}: {g[k]}")
        return "\n".join(lines)

    def __reduce__(self) -> Any:
        """Pickled (torch.save of an object that refers to it, such as torch 1.13's OneCycleLR.state_dict(),
        whose ``anneal_func`` is a bound method of the scheduler) as a :class:`DetachedRemoteASGD`: the
        session's address and name, no connection, no token. Save ``state_dict()`` or a checkpoint to keep
        the optimizer's state."""
        return (DetachedRemoteASGD, (self.client.url, self.session))


class DetachedRemoteASGD:
    """What a pickled :class:`RemoteASGD` becomes: the session's url and name, detached from the service.

    It lets objects that refer to the optimizer be saved with torch.save (a torch 1.13 scheduler's
    state_dict, as with torch.optim.ASGD, whose pickle is a copy detached from the model); it cannot
    train: its optimizer methods raise, naming the session to attach to."""

    def __init__(self, url: Optional[str], session: str) -> None:
        self.url = url
        self.session = session

    def _detached(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"this is a pickled RemoteASGD of session {self.session!r} at {self.url}, detached from the "
                           f"service; to train, build RemoteASGD(model.named_parameters(), url=..., session="
                           f"{self.session!r}) (it attaches to the session), and load state_dict() for the state")

    step = zero_grad = state_dict = load_state_dict = synchronize = add_param_group = _detached
    # AWD-LSTM's resume reads optimizer.param_groups and optimizer.state of the loaded object (found by a
    # review: a bare AttributeError).
    param_groups = state = defaults = property(_detached)

    def __repr__(self) -> str:
        return f"DetachedRemoteASGD(session {self.session!r} at {self.url})"


class _AnswerFuture(Future):
    """The Future ``step(wait=False)`` returns: the service's answer without the parameter tensors."""

    def __init__(self, inner: Future) -> None:
        super().__init__()
        self._pid = os.getpid()
        self._inner = inner
        inner.add_done_callback(self._settle)

    def _delivered(self) -> None:
        # The caller has the error from here: the next call does not raise it again (a review: a loop that
        # handled it, fixing an lr, ended at the next step, which sent nothing of its own).
        self._inner.asgd_delivered = True  # type: ignore[attr-defined]

    def _forked(self) -> None:
        # In a process forked from the one that sent it, the thread that would settle it is not there: waiting
        # would be for ever (a review). Said as RemoteASGD's methods say it.
        if self._pid != os.getpid() and not self.done():
            raise RuntimeError(f"this step's Future belongs to process {self._pid}, which sent the step; this process "
                               f"({os.getpid()}) was forked from it and cannot wait for it: build RemoteASGD in each worker process")

    def result(self, timeout: Optional[float] = None) -> Any:
        self._forked()
        try:
            return super().result(timeout)
        except BaseException:
            if self.done() and not self.cancelled() and super().exception(0) is not None:
                self._delivered()
            raise

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        self._forked()
        err = super().exception(timeout)
        if err is not None:
            self._delivered()
        return err

    def _settle(self, inner: Future) -> None:
        err = inner.exception()
        if err is not None:
            self.set_exception(err)
            return
        outcome: _Outcome = inner.result()
        if outcome.stale is not None:
            self.set_result({"dropped": True, "version": outcome.version, "reason": outcome.stale.message})
        else:
            self.set_result(dict(outcome.answer or {}))
