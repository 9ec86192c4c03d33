"""A small HTTP layer on the standard library (http.client): keep-alive, bearer auth, JSON errors, retries.

Retry policy (what is safe to repeat):

* GET/HEAD/PUT/DELETE are retried on connection errors and on 429/502/503/504.
* POST is retried likewise only when it carries an ``Idempotency-Key`` (the service then answers a
  repeated request with the first answer and does not apply it twice: optimizer steps).
* Any request is retried when the connection was refused (nothing reached the service).

``Retry-After`` is honoured (capped at ``max_backoff``); otherwise the wait doubles from ``backoff``.
Retries stop when ``retry_budget_s`` seconds have passed since the first attempt (default 60: longer
than a cold start of the service, so a training loop outlasts a restart) or after ``retries`` retries
when a count is given. Each retry is logged (logger ``asgd_client``, level WARNING).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

from .errors import ConnectionFailed, ServiceError, error_class

__all__ = ["Connection", "Response", "DEFAULT_URL"]

DEFAULT_URL = "http://127.0.0.1:8080"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
USER_AGENT = "asgd-client-python/0.2"
DEFAULT_RETRY_BUDGET_S = 60.0

log = logging.getLogger("asgd_client")


class Response:
    """A finished HTTP answer: ``status``, ``headers`` (lower-case names), ``body`` (bytes)."""

    __slots__ = ("status", "headers", "body", "method", "url")

    def __init__(self, status: int, headers: Dict[str, str], body: bytes, method: str, url: str) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.method = method
        self.url = url

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))

    @property
    def version(self) -> Optional[int]:
        """The session version from the ETag ("<version>") or X-Session-Version."""
        for raw in (self.headers.get("etag"), self.headers.get("x-session-version")):
            if raw:
                value = raw.strip()
                if value.startswith("W/"):
                    value = value[2:]
                value = value.strip('"')
                if value.isdigit():
                    return int(value)
        return None


def _is_refused(err: BaseException) -> bool:
    return isinstance(err, ConnectionRefusedError)


_CONNECTION_ERRORS: Tuple[type, ...] = (
    ConnectionError,  # refused, reset, aborted, broken pipe
    http.client.HTTPException,  # RemoteDisconnected, BadStatusLine, IncompleteRead
    socket.timeout,
    TimeoutError,
    OSError,
)


class Connection:
    """Talks to one asgd-serve base URL. Thread-safe: each thread keeps its own keep-alive connection.

    Arguments:
        url: base URL, e.g. ``http://127.0.0.1:8080`` (default: ``$ASGD_URL`` or that).
        token: bearer token (default: ``$ASGD_TOKEN``); sent as ``Authorization: Bearer <token>``.
        timeout: socket timeout in seconds for one attempt.
        retries: how many times a retryable failure is retried at most (None: as often as the budget allows).
        retry_budget_s: total seconds a request keeps retrying (from its first attempt).
        backoff, max_backoff: first wait and cap of the exponential backoff, in seconds.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        *,
        timeout: float = 300.0,
        retries: Optional[int] = None,
        retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
        backoff: float = 0.2,
        max_backoff: float = 2.0,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        url = url or os.environ.get("ASGD_URL") or DEFAULT_URL
        parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"url: unsupported scheme {parts.scheme!r} (use http or https)")
        self.url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self._scheme = parts.scheme
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self.token = token if token is not None else (os.environ.get("ASGD_TOKEN") or None)
        self.timeout = timeout
        self.retries = None if retries is None else max(0, int(retries))
        self.retry_budget_s = float(retry_budget_s)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._ssl_context = ssl_context
        self._local = threading.local()
        #: Seconds a kept-alive connection may idle before a non-repeatable request opens a new one.
        self.idle_reuse = 2.0
        #: Set by tests: called with (attempt, error_or_response) before a retry.
        self.on_retry = None

    # -- connections -------------------------------------------------------------------------
    def _new_connection(self) -> http.client.HTTPConnection:
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout, context=self._ssl_context)
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._new_connection()
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # pragma: no cover - closing a broken socket
                pass

    def close(self) -> None:
        """Closes this thread's keep-alive connection."""
        self._drop_connection()

    def __del__(self) -> None:
        try:
            self._drop_connection()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    # -- requests ----------------------------------------------------------------------------
    def path_url(self, path: str, query: Optional[Mapping[str, Any]] = None) -> str:
        target = self._prefix + path
        if query:
            items = []
            for key, value in query.items():
                if value is None:
                    continue
                if isinstance(value, bool):
                    value = "true" if value else "false"
                items.append((key, str(value)))
            if items:
                target += "?" + urllib.parse.urlencode(items)
        return target

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Optional[Mapping[str, Any]] = None,
        json_body: Any = None,
        body: Optional[Union[bytes, bytearray, memoryview]] = None,
        content_type: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
        accept: Optional[str] = None,
        expect: Iterable[int] = (200, 201, 204),
        retry: Optional[bool] = None,
    ) -> Response:
        """Sends a request and returns the answer; raises :class:`ServiceError` for an unexpected status.

        ``retry``: None decides from the method and an Idempotency-Key header (see the module doc).
        """
        method = method.upper()
        hdrs: Dict[str, str] = {"User-Agent": USER_AGENT}
        if json_body is not None:
            body = json.dumps(json_body, separators=(",", ":"), allow_nan=False).encode("utf-8")
            content_type = "application/json"
        if body is not None:
            hdrs["Content-Type"] = content_type or "application/octet-stream"
        elif method in ("POST", "PUT", "PATCH"):
            hdrs["Content-Length"] = "0"
        if accept:
            hdrs["Accept"] = accept
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        if headers:
            hdrs.update(headers)
        if retry is None:
            retry = method in IDEMPOTENT_METHODS or any(k.lower() == "idempotency-key" for k in hdrs)
        target = self.path_url(path, query)
        full_url = self._origin + target
        expect = tuple(expect)

        if not retry:
            # A request that must not be repeated goes on a fresh connection when the kept one has
            # idled: the service (or a proxy) may have closed it, and a send on a closed socket
            # fails in a way that cannot be told apart from a lost answer.
            last = getattr(self._local, "last_used", None)
            if last is not None and time.monotonic() - last > self.idle_reuse:
                self._drop_connection()
        attempt = 0
        deadline = time.monotonic() + self.retry_budget_s
        while True:
            attempt += 1
            try:
                response = self._send(method, target, body, hdrs, full_url)
            except _CONNECTION_ERRORS as err:
                self._drop_connection()
                if (retry or _is_refused(err)) and self._may_retry(attempt, deadline):
                    self._retrying(method, full_url, attempt, err, None, deadline)
                    continue
                raise ConnectionFailed(method, full_url, err, attempt) from err
            if response.status in expect:
                return response
            if response.status in RETRY_STATUSES and retry and self._may_retry(attempt, deadline):
                self._retrying(method, full_url, attempt, response, response.headers.get("retry-after"), deadline)
                continue
            raise self._error(response, hdrs.get("Content-Type"))

    def _may_retry(self, attempt: int, deadline: float) -> bool:
        return (self.retries is None or attempt <= self.retries) and time.monotonic() < deadline

    def _retrying(self, method: str, url: str, attempt: int, cause: Any, retry_after: Optional[str], deadline: float) -> None:
        what = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else f"HTTP {cause.status}"
        log.warning("%s %s: %s; retry %d (%.0f s of the retry budget left)", method, url, what, attempt,
                    max(0.0, deadline - time.monotonic()))
        if self.on_retry:
            self.on_retry(attempt, cause)
        self._sleep(attempt, retry_after, deadline)

    def _send(self, method: str, target: str, body: Any, headers: Dict[str, str], full_url: str) -> Response:
        conn = self._connection()
        conn.request(method, target, body=body, headers=headers)
        res = conn.getresponse()
        data = res.read()
        self._local.last_used = time.monotonic()
        response = Response(res.status, {k.lower(): v for k, v in res.getheaders()}, data, method, full_url)
        if res.will_close:
            self._drop_connection()
        return response

    def _sleep(self, attempt: int, retry_after: Optional[str], deadline: Optional[float] = None) -> None:
        delay = None
        if retry_after:
            try:
                delay = float(retry_after)
            except ValueError:
                delay = None
        if delay is None:
            delay = self.backoff * (2 ** (attempt - 1))
            delay *= 0.5 + random.random()  # jitter: replicas of a job do not retry in lockstep
        delay = min(delay, self.max_backoff)
        if deadline is not None:  # the last attempt still happens at the end of the budget
            delay = min(delay, max(0.0, deadline - time.monotonic()))
        time.sleep(max(0.0, delay))

    @staticmethod
    def _error(response: Response, request_content_type: Optional[str]) -> ServiceError:
        body: Any = None
        code = f"HTTP_{response.status}"
        message = ""
        try:
            body = response.json()
        except Exception:
            body = response.body.decode("utf-8", "replace")[:2000]
            message = body
        if isinstance(body, dict):
            code = str(body.get("code") or code)
            message = str(body.get("message") or body.get("error") or "")
        cls = error_class(response.status, code)
        return cls(response.status, code, message, method=response.method, url=response.url, body=body,
                   request_content_type=request_content_type, headers=response.headers)
