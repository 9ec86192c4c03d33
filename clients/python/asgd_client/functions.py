"""Plain functions for scripts: one call, one request (or two), no optimizer object."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Mapping, Optional, Sequence

from .client import Client, named_tensors

__all__ = [
    "create_session_from_model", "download_checkpoint", "upload_checkpoint", "get_state_dict", "put_state_dict",
    "get_params", "delete_session",
]


def _write_atomic(path: str, data: bytes) -> None:
    """Writes a file whole or not at all (a temporary file in the same folder, then a rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".asgd-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def create_session_from_model(
    model: Any,
    url: Optional[str] = None,
    name: Optional[str] = None,
    *,
    token: Optional[str] = None,
    param_groups: Optional[Sequence[Mapping[str, Any]]] = None,
    exist_ok: bool = False,
    snapshot_every: Optional[int] = None,
    keep_snapshots: Optional[int] = None,
    max_staleness: Optional[int] = None,
    aggregation: Optional[Mapping[str, Any]] = None,
    **hyperparameters: Any,
) -> Dict[str, Any]:
    """Creates a session holding ``model.named_parameters()`` (names as in ``model.state_dict()``).

    ``hyperparameters``: lr, lambd, alpha, t0, weight_decay, maximize. ``param_groups``:
    ``[{"params": [names], **overrides}]``. ``aggregation``: synchronous rounds (``{"contributions": K}``,
    see :meth:`Client.create_session`). With ``exist_ok`` an existing session is returned as is.
    Returns the session (``{"name", "version", "step", "params", "param_groups", ...}``).
    """
    if not name:
        raise ValueError("name: the session's name is needed")
    client = Client(url, token)
    params = named_tensors(model.named_parameters() if hasattr(model, "named_parameters") else model)
    try:
        return client.create_session(
            name, params, hyperparameters=hyperparameters or None, param_groups=param_groups,
            snapshot_every=snapshot_every, keep_snapshots=keep_snapshots, max_staleness=max_staleness,
            aggregation=aggregation,
        )
    except Exception as err:
        from .errors import SessionExists

        if exist_ok and isinstance(err, SessionExists):
            return client.get_session(name)
        raise
    finally:
        client.close()


def download_checkpoint(url: Optional[str], name: str, path: str, *, token: Optional[str] = None, format: str = "pt",
                        version: Optional[int] = None) -> str:
    """Saves the session's checkpoint to ``path``: a torch.save file of {"model", "optimizer", "step"}
    (``format="pt"``; ``torch.load(path)`` reads it) or the same as JSON (``format="json"``)."""
    client = Client(url, token)
    try:
        data = client.get_checkpoint(name, format=format, version=version)
    finally:
        client.close()
    if format == "json":
        data = json.dumps(data, separators=(",", ":")).encode("utf-8")
    _write_atomic(path, data)
    return path


def upload_checkpoint(url: Optional[str], name: str, path: str, *, token: Optional[str] = None,
                      if_match: Optional[int] = None) -> Dict[str, Any]:
    """Replaces the session's parameters and optimizer state with a checkpoint file (torch.save or JSON,
    told apart by content). Returns the session."""
    with open(path, "rb") as f:
        data = f.read()
    client = Client(url, token)
    try:
        return client.put_checkpoint(name, data, if_match=if_match)
    finally:
        client.close()


def get_state_dict(url: Optional[str], name: str, *, token: Optional[str] = None, format: str = "json",
                   version: Optional[int] = None) -> Dict[str, Any]:
    """The session's torch.optim.ASGD.state_dict() (tensors; ``torch.optim.ASGD.load_state_dict`` takes it)."""
    client = Client(url, token)
    try:
        return client.get_state_dict(name, format=format, version=version)
    finally:
        client.close()


def put_state_dict(url: Optional[str], name: str, state_dict: Mapping[str, Any], *, token: Optional[str] = None,
                   format: str = "json", if_match: Optional[int] = None) -> Dict[str, Any]:
    """Optimizer.load_state_dict on the session (parameters unchanged). Returns the session."""
    client = Client(url, token)
    try:
        return client.put_state_dict(name, state_dict, format=format, if_match=if_match)
    finally:
        client.close()


def get_params(url: Optional[str], name: str, *, token: Optional[str] = None, averaged: bool = False,
               transport: str = "safetensors") -> Dict[str, Any]:
    """The session's parameters (or ASGD averages) as {name: tensor}: ``model.load_state_dict`` takes it."""
    client = Client(url, token, transport=transport)
    try:
        return dict(client.get_params(name, averaged=averaged)[0])
    finally:
        client.close()


def delete_session(url: Optional[str], name: str, *, token: Optional[str] = None, missing_ok: bool = False) -> None:
    client = Client(url, token)
    try:
        client.delete_session(name, missing_ok=missing_ok)
    finally:
        client.close()
