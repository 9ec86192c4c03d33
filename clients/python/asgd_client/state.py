"""``RemoteASGD.state``: torch.optim.ASGD's per-parameter state (step, eta, mu, ax), read from the session.

ASGD users evaluate on the averaged parameters with ``p.data = opt.state[p]["ax"].clone()`` (AWD-LSTM).
The state lives in the session, so this mapping reads the session's state_dict when it is first looked at
and keeps it until the model's parameters move to another version (then it asks again, with
``If-None-Match``: a 304 costs no transfer). Reading it never writes to the session: parameters edited in
the model (the idiom's swap) are not sent; the next ``step()`` sends them if they are still edited then. The tensors are what torch.optim.ASGD holds: 0-dim float32
``step``, ``eta`` and ``mu``, and ``ax`` of the parameter's shape. Each read is a copy: an edit of it in place
does not reach the session (nor the next read); change the state with ``load_state_dict``. Assigning a value
equal to the one held (the "move the optimizer state to the device" loop of resume code) is taken as a no-op;
``opt.state.clear()`` or ``opt.state = defaultdict(dict)`` start the state over, as in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterator, Mapping, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .optim import RemoteASGD

__all__ = ["SessionState", "ParamState"]

_READ_ONLY = "the optimizer state lives in the asgd-serve session; change it with load_state_dict()"


class SessionState(Mapping):
    """``opt.state``: parameter -> :class:`ParamState` (empty for a parameter that never stepped)."""

    def __init__(self, opt: "RemoteASGD") -> None:
        self._opt = opt
        self._cache: Optional[Dict[int, Dict[str, Any]]] = None
        self._model_version: Optional[int] = None  # the model's version when the cache was checked
        self._session_version: Optional[int] = None  # the session's version the cache was read at

    def _index(self, p: Any) -> Optional[int]:
        i = self._opt._index_of.get(id(p))
        return i if i is not None and self._opt._params[i] is p else None

    def entries(self) -> Dict[int, Dict[str, Any]]:
        """{flat parameter index: {step, eta, mu, ax}} of the session, cached by the model's version."""
        opt = self._opt
        # Reading writes nothing: a pipelined step in flight is waited for and loaded, but the model's
        # parameters are not sent, even if they differ from the session's (the AWD-LSTM idiom assigns
        # p.data = state[p]["ax"] one parameter at a time; see RemoteASGD._catch_up).
        opt._catch_up(warn_in_flight=True)
        if self._cache is not None and self._model_version == opt.version:
            return self._cache
        known = self._session_version if self._cache is not None else None
        sd, version = opt.client.get_state_dict_if_changed(opt.session, known)
        if sd is not None:  # else 304: the session is still where the cache was read
            self._cache = {int(k): dict(v) for k, v in sd["state"].items()}
            self._session_version = version
        self._model_version = opt.version
        return self._cache  # type: ignore[return-value]

    def __getitem__(self, p: Any) -> "ParamState":
        i = self._index(p)
        return ParamState(self, i)

    def __iter__(self) -> Iterator[Any]:
        entries = self.entries()
        return iter([p for i, p in enumerate(self._opt._params) if entries.get(i)])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, p: object) -> bool:
        i = self._index(p)
        return i is not None and bool(self.entries().get(i))

    def __setitem__(self, p: Any, value: Any) -> None:
        raise TypeError(_READ_ONLY)

    def clear(self) -> None:
        """Starts the state over (every parameter's step, eta, mu and ax), as ``torch.optim.ASGD().state.clear()``:
        the session loads an empty state with the optimizer's hyperparameters."""
        self._opt.reset_state()

    def __repr__(self) -> str:
        return f"<RemoteASGD state of session {self._opt.session!r}: {len(self._opt._params)} parameters>"


class ParamState(Mapping):
    """One parameter's state: ``step``, ``eta``, ``mu``, ``ax`` (no keys before its first step)."""

    def __init__(self, owner: SessionState, index: Optional[int]) -> None:
        self._owner = owner
        self._index = index

    def _entry(self) -> Dict[str, Any]:
        if self._index is None:  # not a parameter of this optimizer: empty, as torch's defaultdict
            return {}
        return self._owner.entries().get(self._index, {})

    def __getitem__(self, key: str) -> Any:
        # A copy (found by a review: `opt.state[p]["ax"].mul_(0.5)` changed the cached tensor, so later reads
        # showed an edit the session never had).
        value = self._entry()[key]
        return value.clone() if hasattr(value, "clone") else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._entry())

    def __len__(self) -> int:
        return len(self._entry())

    def __setitem__(self, key: str, value: Any) -> None:
        # Resume code moves the optimizer state to the model's device (`st[k] = v.to(device)`): a value equal to
        # the one held changes nothing and is taken (found by a review: it raised); any other is refused.
        held = self._entry().get(key)
        if held is not None and _same_value(held, value):
            return
        raise TypeError(_READ_ONLY)

    def __repr__(self) -> str:
        return repr(self._entry())


def _same_value(held: Any, value: Any) -> bool:
    """``value`` holds what ``held`` holds: a tensor of its dtype and shape with its bits, on any device."""
    if not (hasattr(held, "dtype") and hasattr(value, "dtype") and hasattr(value, "detach")):
        return False
    if value.dtype != held.dtype or tuple(value.shape) != tuple(held.shape):
        return False
    import torch

    return bool(torch.equal(value.detach().cpu().view(torch.int32) if held.dtype == torch.float32 else value.detach().cpu(),
                            held.view(torch.int32) if held.dtype == torch.float32 else held))
