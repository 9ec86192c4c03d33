"""asgd_client: Python client for asgd-serve (torch.optim.ASGD steps applied by a service, bit for bit).

Standard library only; torch is imported when ``RemoteASGD`` or tensors are used.

    from asgd_client import RemoteASGD
    opt = RemoteASGD(model.named_parameters(), url="http://127.0.0.1:8080", session="run-1", lr=0.01, t0=100)
"""

from .client import Client
from .errors import (
    ASGDClientError, BaseVersionAhead, ConnectionFailed, DuplicateContribution, NonFiniteGradient, RoundConflict, RoundOpen,
    RoundPending, ServiceError, ServiceUnavailable, SessionExists, SessionNotFound, StaleGradient, UnsupportedFormat,
    VersionMismatch,
)
from .functions import (
    create_session_from_model, delete_session, download_checkpoint, get_params, get_state_dict, put_state_dict,
    upload_checkpoint,
)
from .http import Connection

__version__ = "0.2.0"

__all__ = [
    "RemoteASGD", "Client", "Connection",
    "create_session_from_model", "download_checkpoint", "upload_checkpoint", "get_state_dict", "put_state_dict",
    "get_params", "delete_session",
    "ASGDClientError", "ServiceError", "ConnectionFailed", "SessionNotFound", "SessionExists", "StaleGradient", "BaseVersionAhead", "NonFiniteGradient",
    "VersionMismatch", "UnsupportedFormat", "ServiceUnavailable", "DuplicateContribution", "RoundConflict", "RoundOpen",
    "RoundPending",
]


def __getattr__(name):  # RemoteASGD needs torch: import it only when asked for
    if name == "RemoteASGD":
        from .optim import RemoteASGD

        return RemoteASGD
    raise AttributeError(f"module 'asgd_client' has no attribute {name!r}")
