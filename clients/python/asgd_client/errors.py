"""Exceptions raised by the client.

Every answer of the service that is not a success becomes an :class:`ServiceError` carrying the
JSON error body ``{statusCode, code, message}`` and the request that caused it, so that a failure
can be reported (and reproduced) as "this request, this answer".
"""

from __future__ import annotations

from typing import Any, Dict, Optional


class ASGDClientError(Exception):
    """Base class of every error raised by asgd_client."""


class ServiceError(ASGDClientError):
    """The service answered with an error status.

    Attributes: ``status`` (HTTP status), ``code`` (the service's stable error code, e.g.
    ``SESSION_NOT_FOUND``), ``message``, ``body`` (the decoded error body, or the raw text),
    ``method`` and ``url`` of the request, ``request_content_type``.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        method: str = "",
        url: str = "",
        body: Any = None,
        request_content_type: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.method = method
        self.url = url
        self.body = body
        #: True when an earlier attempt of this request lost its answer and may be what the error is about
        #: (a 412 after a PUT with If-Match was sent again): its outcome is unknown, read the session.
        self.outcome_unknown = False
        self.request_content_type = request_content_type
        self.headers = dict(headers or {})
        request = f"{method} {url}".strip()
        if request_content_type:
            request += f" (Content-Type: {request_content_type})"
        super().__init__(f"{request} -> {status} {code}: {message}")

    @property
    def version(self) -> Optional[int]:
        """The session's current version when the service told it (412, 409 stale gradient)."""
        if isinstance(self.body, dict) and isinstance(self.body.get("version"), int):
            return self.body["version"]
        return None


class SessionNotFound(ServiceError):
    """404 SESSION_NOT_FOUND."""


class SessionExists(ServiceError):
    """409 SESSION_EXISTS: a session with this name already exists."""


class StaleGradient(ServiceError):
    """409 STALE_GRADIENT: the gradient was computed from parameters older than max_staleness allows."""


class BaseVersionAhead(ServiceError):
    """409 BASE_VERSION_AHEAD: the step's ``base_version`` is above the session's version: its database was
    restored from an older backup (a session deleted and created again continues the name's versions: a
    gradient of the deleted one's is a StaleGradient with ``replaced_at``). ``version`` is the session's version."""


class NonFiniteGradient(ServiceError):
    """422 NON_FINITE_GRADIENT: a gradient holds NaN or an infinity (the message names the parameter and the
    element); nothing was applied."""


class DuplicateContribution(ServiceError):
    """409 DUPLICATE_CONTRIBUTION: this worker already contributed to the open round (with another
    Idempotency-Key). The round steps without a second gradient from it."""


class RoundConflict(ServiceError):
    """409 ROUND_CONFLICT: the contribution's ``param_groups`` differ from those already in the round."""


class RoundOpen(ServiceError):
    """409 ROUND_OPEN: ``aggregation`` cannot change while a round has contributions."""


class VersionMismatch(ServiceError):
    """412 VERSION_MISMATCH: If-Match did not match the session's version."""


class UnsupportedFormat(ServiceError):
    """406 / 415: the service does not (yet) accept or produce this format (safetensors, torch.save).

    Use ``transport="json"`` (or ``"auto"``) to fall back to JSON.
    """


class ServiceUnavailable(ServiceError):
    """503 (or 502/504/429) that was still answered after every retry."""


class RoundPending(ASGDClientError, TimeoutError):
    """The round of a contribution had not stepped within ``max_wait_s`` (the client's limit; the
    service keeps the contribution). Sending the same request again with ``idempotency_key`` goes on
    waiting without contributing twice.

    Attributes: ``round`` (the open round as the service last described it), ``idempotency_key``.
    """

    def __init__(self, session: str, round: Any, idempotency_key: str, waited_s: float) -> None:
        self.session = session
        self.round = round
        self.idempotency_key = idempotency_key
        self.waited_s = waited_s
        super().__init__(f"session {session!r}: the round had not stepped after {waited_s:.0f} s ({round}); "
                         f"send again with idempotency_key={idempotency_key!r} to keep waiting")


class ConnectionFailed(ASGDClientError):
    """The service could not be reached (after the retries that were safe to make)."""

    def __init__(self, method: str, url: str, cause: BaseException, attempts: int, hint: str = "") -> None:
        self.method = method
        self.url = url
        self.cause = cause
        self.attempts = attempts
        super().__init__(f"{method} {url}: {type(cause).__name__}: {cause} (after {attempts} attempt(s)){hint}")


_BY_CODE = {
    "SESSION_NOT_FOUND": SessionNotFound,
    "SESSION_EXISTS": SessionExists,
    "STALE_GRADIENT": StaleGradient,
    "BASE_VERSION_AHEAD": BaseVersionAhead,
    "NON_FINITE_GRADIENT": NonFiniteGradient,
    "VERSION_MISMATCH": VersionMismatch,
    "DUPLICATE_CONTRIBUTION": DuplicateContribution,
    "ROUND_CONFLICT": RoundConflict,
    "ROUND_OPEN": RoundOpen,
    "NOT_ACCEPTABLE": UnsupportedFormat,
    "UNSUPPORTED_MEDIA_TYPE": UnsupportedFormat,
}

_BY_STATUS = {406: UnsupportedFormat, 415: UnsupportedFormat, 412: VersionMismatch, 429: ServiceUnavailable,
              502: ServiceUnavailable, 503: ServiceUnavailable, 504: ServiceUnavailable}


def error_class(status: int, code: str) -> type:
    return _BY_CODE.get(code) or _BY_STATUS.get(status) or ServiceError
