"""safetensors, written and read with struct + json (no dependency on the safetensors package).

Layout: 8 bytes little-endian unsigned header length N, N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"?: {str: str}}`` (padded with
spaces to a multiple of 8), then the data: each tensor's bytes, row-major, little-endian, at
``8 + N + begin``.

Tensors may be given as torch tensors, numpy arrays, or ``(shape, flat sequence of numbers)`` pairs.
"""

from __future__ import annotations

import array
import json
import struct
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

__all__ = ["encode", "decode", "decode_torch", "raw_to_torch", "SafetensorsError", "RawTensor", "DTYPES"]

MAX_HEADER = 100 * 1024 * 1024

#: safetensors dtype -> (bytes per element, array/struct typecode or None)
DTYPES: Dict[str, Tuple[int, Optional[str]]] = {
    "F64": (8, "d"), "F32": (4, "f"), "F16": (2, "e"), "BF16": (2, None),
    "I64": (8, "q"), "I32": (4, "i"), "I16": (2, "h"), "I8": (1, "b"),
    "U64": (8, "Q"), "U32": (4, "I"), "U16": (2, "H"), "U8": (1, "B"), "BOOL": (1, "?"),
}

_LITTLE = sys.byteorder == "little"


class SafetensorsError(ValueError):
    """The bytes are not a valid safetensors file."""


class RawTensor:
    """A tensor of a safetensors file: ``dtype`` (e.g. "F32"), ``shape`` and its raw little-endian bytes."""

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: str, shape: List[int], data: memoryview) -> None:
        self.dtype = dtype
        self.shape = shape
        self.data = data

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def tolist(self) -> List[Any]:
        """The flat row-major values as Python numbers."""
        size, code = DTYPES[self.dtype]
        if self.dtype == "BF16":
            raw = bytes(self.data)
            words = struct.unpack(f"<{len(raw) // 2}H", raw)
            return list(struct.unpack(f"<{len(words)}f", struct.pack(f"<{len(words)}I", *[w << 16 for w in words])))
        assert code is not None
        return list(struct.unpack(f"<{len(self.data) // size}{code}", self.data))

    def __repr__(self) -> str:
        return f"RawTensor(dtype={self.dtype!r}, shape={self.shape!r})"


_TORCH_WIRE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _torch_bytes(t: Any, dtype: str) -> Any:
    """Little-endian bytes of a CPU torch tensor converted (rounded to nearest even) to ``dtype``."""
    torch = _torch()
    t = t.to(device="cpu", dtype=getattr(torch, _TORCH_WIRE[dtype])).contiguous()
    if dtype == "BF16":  # numpy has no bfloat16: move its bit patterns as int16
        t = t.view(torch.int16)
    try:
        import numpy  # noqa: F401

        # A view of the tensor's memory (no copy here): encode copies it once, into the file.
        return memoryview(t.numpy().reshape(-1)).cast("B") if _LITTLE else t.numpy().byteswap().tobytes()
    except ImportError:
        code = {"F32": "f", "F16": "e", "BF16": "h"}[dtype]
        values = t.reshape(-1).tolist()
        return struct.pack(f"<{len(values)}{code}", *values)


def _f32_bytes(value: Any, dtype: str = "F32") -> Tuple[List[int], Any]:
    """(shape, little-endian bytes) of a torch tensor, numpy array or (shape, values), as F32, F16 or BF16."""
    if dtype not in _TORCH_WIRE:
        raise ValueError(f"dtype must be one of {sorted(_TORCH_WIRE)}, got {dtype!r}")
    mod = type(value).__module__
    if mod.startswith("torch"):
        t = value.detach()
        if t.is_sparse:
            raise TypeError("sparse tensors cannot be written to safetensors")
        return list(t.shape), _torch_bytes(t, dtype)
    if dtype != "F32":  # half precision from numpy or plain values goes through torch
        return _f32_bytes(_as_torch(value), dtype)
    if mod.startswith("numpy"):
        return list(value.shape), value.astype("<f4", copy=False).tobytes(order="C")
    if isinstance(value, tuple) and len(value) == 2:
        shape, values = value
        arr = array.array("f", [float(x) for x in values])
        n = 1
        for d in shape:
            n *= int(d)
        if n != len(arr):
            raise ValueError(f"shape {list(shape)} needs {n} values, got {len(arr)}")
        if not _LITTLE:
            arr.byteswap()
        return [int(d) for d in shape], arr.tobytes()
    raise TypeError(f"cannot write {type(value).__name__} as a tensor (use a torch tensor, numpy array or (shape, values))")


def _as_torch(value: Any) -> Any:
    """A float32 torch tensor of a numpy array or (shape, values)."""
    torch = _torch()
    if type(value).__module__.startswith("numpy"):
        return torch.from_numpy(value.astype("float32"))
    shape, values = value
    return torch.tensor([float(x) for x in values], dtype=torch.float32).reshape([int(d) for d in shape])


def half_overflow(value: Any, dtype: str) -> Optional[Tuple[int, float]]:
    """(index, value) of the first element of a torch tensor that is finite but rounds to an infinity in
    ``dtype`` (F16 above 65504, BF16 near float32's limit), or None. A step refuses such a gradient naming it
    (the service would say "not finite" about a number the caller never had); encode() rounds as torch does."""
    if dtype == "F32" or not type(value).__module__.startswith("torch"):
        return None
    torch = _torch()
    t = value.detach().to(device="cpu")
    over = torch.isinf(t.to(getattr(torch, _TORCH_WIRE[dtype]))) & torch.isfinite(t)
    if not bool(over.any()):
        return None
    i = int(over.reshape(-1).nonzero()[0])
    return i, float(t.reshape(-1)[i])


def _torch():
    import torch

    return torch


def encode(tensors: Mapping[str, Any], metadata: Optional[Mapping[str, str]] = None, dtype: str = "F32") -> bytearray:
    """A safetensors file holding every tensor as ``dtype`` (F32, or F16/BF16 rounded), in the order given."""
    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks: List[bytes] = []
    offset = 0
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        shape, data = _f32_bytes(value, dtype)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)
    # One allocation, one copy of each tensor (a 1e6-parameter gradient is 4 MB per step).
    out = bytearray(8 + len(head) + offset)
    out[:8] = struct.pack("<Q", len(head))
    out[8 : 8 + len(head)] = head
    view = memoryview(out)
    at = 8 + len(head)
    for chunk in chunks:
        n = len(chunk)
        view[at : at + n] = chunk
        at += n
    return out


def decode(buf: Union[bytes, bytearray, memoryview]) -> Tuple[Dict[str, RawTensor], Dict[str, str]]:
    """(tensors by name in file order, metadata). Validates offsets, sizes and dtypes."""
    view = memoryview(buf).cast("B")
    if len(view) < 8:
        raise SafetensorsError(f"{len(view)} bytes: too short for a safetensors header")
    (n,) = struct.unpack("<Q", view[:8])
    if n > MAX_HEADER or 8 + n > len(view):
        raise SafetensorsError(f"header length {n} does not fit in {len(view)} bytes")
    try:
        header = json.loads(bytes(view[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SafetensorsError(f"header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise SafetensorsError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data = view[8 + n :]
    out: Dict[str, RawTensor] = {}
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise SafetensorsError(f"{name}: not a tensor entry")
        dtype = info.get("dtype")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if dtype not in DTYPES:
            raise SafetensorsError(f"{name}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise SafetensorsError(f"{name}: invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise SafetensorsError(f"{name}: invalid data_offsets {offsets!r}")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end <= len(data) or end - begin != numel * DTYPES[dtype][0]:
            raise SafetensorsError(f"{name}: data_offsets {offsets} do not hold {numel} x {dtype} in {len(data)} bytes")
        spans.append((begin, end, name))
        out[name] = RawTensor(dtype, list(shape), data[begin:end])
    spans.sort()
    for (b0, e0, a), (b1, e1, b) in zip(spans, spans[1:]):
        if b1 < e0:
            raise SafetensorsError(f"{a} and {b} overlap")
    # Keep file order (the order of data_offsets), as the safetensors library does.
    ordered = {name: out[name] for _, _, name in spans}
    return ordered, {str(k): str(v) for k, v in metadata.items()}


_TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def raw_to_torch(raw: RawTensor):
    """A torch tensor (its own memory) from a RawTensor."""
    torch = _torch()
    name = _TORCH_DTYPES.get(raw.dtype)
    if name is None:
        raise SafetensorsError(f"dtype {raw.dtype} has no torch equivalent")
    dtype = getattr(torch, name)
    if raw.numel == 0:
        return torch.empty(raw.shape, dtype=dtype)
    buf = bytearray(raw.data)  # own, writable, aligned copy
    t = torch.frombuffer(buf, dtype=dtype).reshape(raw.shape)
    if not _LITTLE and DTYPES[raw.dtype][0] > 1:  # pragma: no cover - big-endian hosts
        t = torch.tensor(raw.tolist(), dtype=dtype).reshape(raw.shape)
    return t


def decode_torch(buf: Union[bytes, bytearray, memoryview]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """(torch tensors by name, metadata)."""
    raw, metadata = decode(buf)
    return {name: raw_to_torch(t) for name, t in raw.items()}, metadata

