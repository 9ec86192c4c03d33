"""Conversions between the service's JSON forms and torch objects.

JSON tensors are ``{"shape": [...], "data": [flat row-major numbers]}``; non-finite values travel as
the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``. A float32 written as the shortest decimal that
round-trips its float64 value (Python's repr, JavaScript's Number#toString) is read back bit for bit.

A state_dict in JSON is exactly torch.optim.ASGD.state_dict() with tensors in JSON form and the
``state`` keys as strings. :func:`state_dict_from_json` turns it into the object PyTorch returns
(0-dim float32 tensors for step/eta/mu, a float32 tensor for ax, int keys) and keeps only the
param-group flags that the installed PyTorch's ASGD has (1.13 has no ``differentiable``/``capturable``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set

__all__ = [
    "json_data", "floats_from_json", "tensor_to_json", "tensor_from_json", "state_dict_to_json", "state_dict_to_torch",
    "state_dict_from_json",
    "local_group_keys", "group_from_json", "plain_number", "HYPERPARAMETER_KEYS", "FLAG_KEYS",
]

HYPERPARAMETER_KEYS = ("lr", "lambd", "alpha", "t0", "weight_decay", "maximize")
#: Keys PyTorch versions put in ASGD's groups besides the hyperparameters.
FLAG_KEYS = ("foreach", "differentiable", "capturable")
_FLOAT_KEYS = ("lr", "lambd", "alpha", "t0")
_SPECIAL = {"NaN": math.nan, "nan": math.nan, "Infinity": math.inf, "inf": math.inf, "-Infinity": -math.inf, "-inf": -math.inf}


def json_data(values: Iterable[float]) -> List[Any]:
    """Floats as JSON-safe values (non-finite as strings)."""
    out: List[Any] = []
    for x in values:
        if x != x:
            out.append("NaN")
        elif x in (math.inf, -math.inf):
            out.append("Infinity" if x > 0 else "-Infinity")
        else:
            out.append(x)
    return out


def floats_from_json(data: Sequence[Any]) -> List[float]:
    out = []
    for i, x in enumerate(data):
        if isinstance(x, bool):
            raise ValueError(f"data[{i}]: {x!r} is not a number")
        if isinstance(x, (int, float)):
            out.append(float(x))
        elif isinstance(x, str) and x in _SPECIAL:
            out.append(_SPECIAL[x])
        else:
            raise ValueError(f"data[{i}]: {x!r} is not a number")
    return out


def _torch():
    import torch

    return torch


def tensor_to_json(t: Any) -> Dict[str, Any]:
    """``{"shape", "data"}`` of a torch tensor, numpy array, or ``(shape, values)``."""
    mod = type(t).__module__
    if mod.startswith("torch"):
        torch = _torch()
        t = t.detach().to(device="cpu", dtype=torch.float32)
        shape = list(t.shape)
        values = t.reshape(-1).tolist()
        finite = bool(torch.isfinite(t).all()) if t.numel() else True
    elif mod.startswith("numpy"):
        shape = list(t.shape)
        values = t.astype("float32").reshape(-1).tolist()
        finite = all(math.isfinite(x) for x in values)
    elif isinstance(t, tuple) and len(t) == 2:
        shape = [int(d) for d in t[0]]
        values = [float(x) for x in t[1]]
        finite = all(math.isfinite(x) for x in values)
    else:
        raise TypeError(f"cannot write {type(t).__name__} as a JSON tensor")
    return {"shape": shape, "data": values if finite else json_data(values)}


def tensor_from_json(obj: Any, shape: Optional[Sequence[int]] = None):
    """A float32 torch tensor from ``{"shape", "data"}`` (or a flat list when ``shape`` is given)."""
    torch = _torch()
    if isinstance(obj, Mapping):
        shape = obj.get("shape", shape)
        data = obj.get("data")
        dtype = obj.get("dtype")
        if dtype not in (None, "float32"):
            raise ValueError(f"only float32 JSON tensors are supported, got {dtype!r}")
    else:
        data = obj
    if shape is None or not isinstance(data, list):
        raise ValueError("a JSON tensor is {\"shape\": [...], \"data\": [...]}")
    values = floats_from_json(data)
    return torch.tensor(values, dtype=torch.float32).reshape([int(d) for d in shape])


def _scalar(value: Any) -> float:
    """A state scalar (number, 0-dim tensor, or 1-element JSON tensor) as a Python float."""
    if hasattr(value, "item"):
        return float(value.item())
    if isinstance(value, Mapping):
        data = value.get("data")
        if isinstance(data, list) and len(data) == 1:
            return floats_from_json(data)[0]
        raise ValueError(f"expected a scalar, got a tensor of shape {value.get('shape')}")
    if isinstance(value, str):
        return floats_from_json([value])[0]
    return float(value)


def _json_scalar(x: float) -> Any:
    return json_data([x])[0]


def _is_bool(value: Any) -> bool:
    """bool or numpy's bool (which is no numbers.Number but has __float__)."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"))


def plain_number(value: Any) -> Any:
    """A group value as JSON carries it: a 1-element tensor (PyTorch 2.x allows a tensor lr) as
    ``float(value.item())``, a numpy scalar or other real number as the Python int or float of its value
    (``np.float32(0.1)`` -> its float32 value, exactly), numpy's bool as bool; anything else unchanged."""
    kind = type(value)
    if kind is float or kind is int or kind is bool:  # the usual case, asked about every step (exact types: not a subclass)
        return value
    if value is None or isinstance(value, str):
        return value
    if _is_bool(value):
        return bool(value)
    if hasattr(value, "numel") and hasattr(value, "item"):  # a torch tensor
        if value.numel() != 1:
            return value
        item = value.item()
        return item if isinstance(item, bool) else float(item)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) or hasattr(value, "__float__"):
        try:
            return float(value)
        except (TypeError, ValueError):  # complex has __float__, and refuses
            return value
    return value


def _group_value_to_json(key: str, value: Any) -> Any:
    value = plain_number(value)
    if isinstance(value, float) and not math.isfinite(value):
        hint = " (JSON has no inf; t0=1e30 behaves the same as inf: averaging never starts)" if key == "t0" and value > 0 else ""
        raise ValueError(f"param_groups: {key} = {value} is not finite{hint}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if key == "param_names" and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)  # torch 2.6+ keeps the names of a group built from named_parameters()
    if isinstance(value, (list, tuple)):
        values = [plain_number(v) for v in value]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values
    raise TypeError(f"param_groups: {key} = {value!r} cannot be sent to the service (numbers, strings, booleans, None, "
                    "and param_names, a list of strings)")


def _state_dict_to_wire(state_dict: Mapping[str, Any], key_of: Any, scalar_of: Any, ax_of: Any) -> Dict[str, Any]:
    """A state_dict checked and converted for PUT /state_dict, its state keys, step/eta/mu and ax written by
    the given functions; the groups' values as numbers, strings, booleans and None (either form)."""
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError('a state_dict is {"state": {...}, "param_groups": [...]}')
    state: Dict[Any, Any] = {}
    for key, entry in state_dict["state"].items():
        if isinstance(key, bool) or not isinstance(key, (int, str)) or not str(key).isdigit():
            raise ValueError(f"state: key {key!r} is not a parameter id (PyTorch's state_dict uses ints)")
        if isinstance(entry, Mapping) and len(entry) == 0:
            # {}: no state, as torch leaves it after optimizer.state[p] was read for a parameter that never
            # stepped (a defaultdict); torch's load_state_dict takes it.
            continue
        missing = [k for k in ("step", "eta", "mu", "ax") if k not in entry]
        if missing:
            raise ValueError(f"state[{key}]: missing {', '.join(missing)} (is this an ASGD state_dict?)")
        extra = [str(k) for k in entry if k not in ("step", "eta", "mu", "ax")]
        if extra:
            raise ValueError(f"state[{key}]: {', '.join(extra)} is not part of ASGD's per-parameter state (step, eta, mu, ax): "
                             "a state_dict of another optimizer?")
        state[key_of(int(key))] = {
            "step": scalar_of(_scalar(entry["step"])),
            "eta": scalar_of(_scalar(entry["eta"])),
            "mu": scalar_of(_scalar(entry["mu"])),
            "ax": ax_of(entry["ax"]),
        }
    groups = []
    for g in state_dict["param_groups"]:
        out = {k: _group_value_to_json(k, v) for k, v in g.items() if k != "params"}
        out["params"] = [int(p) for p in g["params"]]
        groups.append(out)
    return {"state": state, "param_groups": groups}


def state_dict_to_json(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """The JSON body for PUT /state_dict from a torch.optim.ASGD.state_dict() (tensors or JSON values)."""
    return _state_dict_to_wire(state_dict, str, _json_scalar, lambda ax: dict(ax) if isinstance(ax, Mapping) else tensor_to_json(ax))


def state_dict_to_torch(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """The same state_dict for a torch.save body (no JSON size limits): the same checks, and the values the
    JSON body would carry (0-dim float32 step/eta/mu, float32 ax on the CPU, the groups' plain values)."""
    torch = _torch()

    def ax_of(ax: Any) -> Any:
        if isinstance(ax, torch.Tensor):
            return ax.detach().to(device="cpu", dtype=torch.float32).contiguous()
        return tensor_from_json(ax if isinstance(ax, Mapping) else tensor_to_json(ax))

    return _state_dict_to_wire(state_dict, int, lambda x: torch.tensor(x, dtype=torch.float32), ax_of)


_LOCAL_KEYS: Optional[Set[str]] = None


def local_group_keys() -> Set[str]:
    """The keys of a param group of the installed PyTorch's torch.optim.ASGD (without 'params')."""
    global _LOCAL_KEYS
    if _LOCAL_KEYS is None:
        try:
            torch = _torch()
            opt = torch.optim.ASGD([torch.zeros(1, requires_grad=True)])
            _LOCAL_KEYS = set(opt.param_groups[0]) - {"params"}
        except ImportError:
            _LOCAL_KEYS = set(HYPERPARAMETER_KEYS) | set(FLAG_KEYS)
    return _LOCAL_KEYS


def group_from_json(group: Mapping[str, Any], keys: Optional[Set[str]] = None, kinds_known: bool = False) -> Dict[str, Any]:
    """A param group as PyTorch holds it: flags only where this PyTorch has them; lr/lambd/alpha/t0 as floats
    unless ``kinds_known`` (a state_dict, .pt or JSON, says which are ints: torch keeps an int t0 an int)."""
    keys = local_group_keys() if keys is None else keys
    out: Dict[str, Any] = {}
    for k, v in group.items():
        if k in FLAG_KEYS and k not in keys:
            continue  # a newer PyTorch's flag, absent from this one's groups
        if not kinds_known and k in _FLOAT_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = float(v)
        out[k] = list(v) if k == "params" else v
    for k in FLAG_KEYS:  # an older server's answer lacking a flag this PyTorch has
        if k in keys and k not in out:
            out[k] = None if k == "foreach" else False
    if "params" in out:  # PyTorch puts params last
        out["params"] = out.pop("params")
    return out


def state_dict_from_json(body: Mapping[str, Any], keys: Optional[Set[str]] = None) -> Dict[str, Any]:
    """torch.optim.ASGD.state_dict() from its JSON form: tensors, int keys, this PyTorch's group keys."""
    torch = _torch()
    state: Dict[int, Dict[str, Any]] = {}
    for key, entry in body["state"].items():
        state[int(key)] = {
            "step": torch.tensor(_scalar(entry["step"]), dtype=torch.float32),
            "eta": torch.tensor(_scalar(entry["eta"]), dtype=torch.float32),
            "mu": torch.tensor(_scalar(entry["mu"]), dtype=torch.float32),
            "ax": tensor_from_json(entry["ax"]),
        }
    groups = [group_from_json(g, keys, kinds_known=True) for g in body["param_groups"]]
    return {"state": state, "param_groups": groups}
