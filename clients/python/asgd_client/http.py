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

import datetime
import email.utils
import http.client
import io
import json
import logging
import os
import random
import re
import select
import selectors
import socket
import ssl
import threading
import time
import urllib.parse
import weakref
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from .errors import ConnectionFailed, ServiceError, error_class

__all__ = ["Connection", "Response", "DEFAULT_URL"]

DEFAULT_URL = "http://127.0.0.1:8080"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# The retries' own random source: a retry must not move the user's `random` stream (a data order seeded
# with random.seed; found by a review).
_JITTER = random.Random()


def _readable(sock: socket.socket) -> bool:
    """Whether `sock` has something to read (or was closed) now, without waiting. poll(), not select():
    select() takes no descriptor numbers of 1024 and above, which a training process holding many files or
    DataLoader workers reaches (a review: every request on a kept-alive connection then failed with
    ValueError, and RemoteASGD could not be made)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    with selectors.DefaultSelector() as sel:  # no poll() (Windows): select() there has no such bound
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(0))


def _retry_after_date(value: str) -> Optional[float]:
    """Seconds until a Retry-After given as an HTTP-date (RFC 9110 10.2.3: a proxy may send one), or None."""
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
USER_AGENT = "asgd-client-python/0.2"
DEFAULT_RETRY_BUDGET_S = 60.0

log = logging.getLogger("asgd_client")



#: What urlencode (quote_plus) leaves as it is: letters, digits and "_.-~".
_UNQUOTED = re.compile(r"[A-Za-z0-9_.~-]*\Z")


def _query_part(text: str) -> str:
    """A query key or value as urllib.parse.urlencode writes it; the common ones (numbers, plain names) as
    they are, without its per-character work (a training loop builds a step's query every step)."""
    return text if _UNQUOTED.match(text) else urllib.parse.quote_plus(text)

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


def _is_timeout(err: BaseException) -> bool:
    """A socket timeout (no byte of the answer for ``timeout`` seconds, or one that trickled in too slowly)."""
    return isinstance(err, (socket.timeout, TimeoutError))


def _is_refused(err: BaseException) -> bool:
    return isinstance(err, ConnectionRefusedError)


#: OpenSSL's reasons for a handshake with a peer that does not speak TLS (a plain-HTTP port).
_NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"})


def _tls_hint(err: BaseException) -> Optional[str]:
    """Why a TLS handshake can never succeed, for an error no retry mends (a review: an https:// url to the
    service's plain-HTTP port was retried for the whole budget), or None."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return ("; the service's TLS certificate was not accepted (%s): pass ssl_context= with the CA that signed it"
                % (getattr(err, "verify_message", None) or err))
    if isinstance(err, ssl.SSLError) and getattr(err, "reason", None) in _NOT_TLS_REASONS:
        return "; the TLS handshake failed: nothing speaks TLS at that port (the service itself serves plain HTTP: use http://, or the address of the TLS terminator in front of it)"
    return None


_CONNECTION_ERRORS: Tuple[type, ...] = (
    ConnectionError,  # refused, reset, aborted, broken pipe
    http.client.HTTPException,  # RemoteDisconnected, BadStatusLine, IncompleteRead
    socket.timeout,
    TimeoutError,
    OSError,
)


#: Every connection to a service this process opened (_new_connection), and every Connection, for
#: _forget_inherited after a fork.
_SOCKETS: "weakref.WeakSet[Any]" = weakref.WeakSet()
_CONNECTIONS: "weakref.WeakSet[Connection]" = weakref.WeakSet()


#: What a forked child inherited (see _forget_inherited): kept, never closed or freed there.
_INHERITED: List[Any] = []


def _forget_inherited() -> None:
    """In a child made by fork(): the sockets of the connections it inherited are closed (this process's copies
    of them; the parent's stay open, nothing is sent) and each Connection opens its own when next used; a
    request started before the fork is read by sending it again (its Idempotency-Key makes that safe). Two
    processes reading one socket take each other's answers (found by a review: one RemoteASGD used by two
    forked workers credited a fifth of the steps to the wrong one, and with 2 MB steps tore answers apart).
    Only the file descriptors are closed: a connection's buffered reader may be locked by a thread of the
    parent's that was reading an answer (a step(wait=False)), which the child does not have, so closing or
    freeing it would wait for ever (a diff review: DataLoader workers forked while a step was in flight hung).
    The inherited objects are kept instead, unused."""
    for conn in list(_SOCKETS):
        _INHERITED.append(conn)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                os.close(sock.detach())
            except (OSError, ValueError):  # pragma: no cover - a socket closed already
                pass
            if getattr(sock, "_sslobj", None) is not None:
                sock._sslobj = None  # a TLS socket's would still read its old descriptor number (a review)
    for conn in list(_CONNECTIONS):
        _INHERITED.append(conn._local)
        conn._local = threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited)


class Connection:
    """Talks to one asgd-serve base URL. Thread-safe: each thread keeps its own keep-alive connection.

    Arguments:
        url: base URL, e.g. ``http://127.0.0.1:8080`` (default: ``$ASGD_URL`` or that).
        token: bearer token (default: ``$ASGD_TOKEN``); sent as ``Authorization: Bearer <token>``.
        timeout: socket timeout in seconds for one attempt.
        retries: how many times a retryable failure is retried at most (None: as often as the budget allows).
        retry_budget_s: total seconds a request keeps retrying (from its first attempt; for a round
            contribution, from the end of the hold it asks the service for).
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
        #: True when neither ``url`` nor ``$ASGD_URL`` was given: the client uses DEFAULT_URL, and a refused
        #: first connection fails at once (a missing url would otherwise look like a hang of the retry budget).
        self.default_url = not (url or os.environ.get("ASGD_URL"))
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
        self._reached = False  # some answer has come from the service (see default_url)
        self._warned_default = False
        if self.default_url:
            log.info("no url given and $ASGD_URL unset: using the default %s", self.url)
        #: Seconds a kept-alive connection may idle before a non-repeatable request opens a new one.
        self.idle_reuse = 2.0
        #: Set by tests: called with (attempt, error_or_response) before a retry.
        self.on_retry = None
        _CONNECTIONS.add(self)

    # -- pickling (a Client given to a spawned process: multiprocessing's spawn, torch.multiprocessing) --
    def __getstate__(self) -> Dict[str, Any]:
        if self._ssl_context is not None:
            raise TypeError("a Connection with an ssl_context cannot be pickled (an SSLContext cannot be): make it in the process that uses it")
        state = self.__dict__.copy()
        del state["_local"]  # the sockets are this process's; the other opens its own
        state["on_retry"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        _CONNECTIONS.add(self)

    # -- connections -------------------------------------------------------------------------
    def _new_connection(self) -> Union[http.client.HTTPConnection, "_PlainConnection"]:
        conn: Union[http.client.HTTPConnection, _PlainConnection]
        if self._scheme == "https":
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout, context=self._ssl_context)
        else:
            conn = _PlainConnection(self._host, self._port, self.timeout)
        _SOCKETS.add(conn)
        return conn

    def _connection(self) -> Union[http.client.HTTPConnection, "_PlainConnection"]:
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
        """Closes this thread's keep-alive connections."""
        self._drop_connection()
        spare, self._local.spare = getattr(self._local, "spare", None), None
        if spare is not None:
            spare.close()

    def __del__(self) -> None:
        # The spare too (a pipelined loop keeps a second connection): a script that never calls close() got
        # a ResourceWarning for it at exit (found by a review).
        try:
            self.close()
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
                target += "?" + "&".join(f"{_query_part(k)}={_query_part(v)}" for k, v in items)
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
        hold_s: float = 0.0,
    ) -> Response:
        """Sends a request and returns the answer; raises :class:`ServiceError` for an unexpected status.

        ``retry``: None decides from the method and an Idempotency-Key header (see the module doc).
        ``hold_s``: how long the service may hold the request before it answers, as asked (a round's
        ``?wait=``): each attempt's socket timeout is ``timeout`` on top of it, and the retry budget starts
        once it has passed, so a connection lost late in a hold is still retried.
        """
        method = method.upper()
        if json_body is not None:
            body = json.dumps(json_body, separators=(",", ":"), allow_nan=False).encode("utf-8")
            content_type = "application/json"
        hdrs = self._headers(method, body, content_type, accept, headers)
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
        timed_out_once = False
        maybe_applied = False
        hold_s = max(0.0, float(hold_s))
        deadline = time.monotonic() + hold_s + self.retry_budget_s
        while True:
            attempt += 1
            try:
                response = self._send(method, target, body, hdrs, full_url, self.timeout + hold_s)
            except _CONNECTION_ERRORS as err:
                self._drop_connection()
                tls = _tls_hint(err)
                if tls is not None:
                    raise ConnectionFailed(method, full_url, err, attempt, hint=tls) from err  # nothing was sent
                # With no url given, a refused connection may be a service still starting at the default (a
                # worker started with `npm start`: the retry budget outlasts its cold start) or no service
                # there at all: it is retried, and said once, and the final error says it too.
                hint = ""
                if self.default_url and not self._reached and _is_refused(err):
                    hint = (f"; no url was given and $ASGD_URL is unset, so the client used the default {self.url}, "
                            "where nothing answers: pass url=... (or set $ASGD_URL) to the service's address")
                    if not self._warned_default:
                        self._warned_default = True
                        log.warning("nothing answers at %s, the default url (no url given, $ASGD_URL unset): retrying "
                                    "for up to %.0f s in case the service is starting", self.url, self.retry_budget_s)
                if not _is_refused(err):
                    maybe_applied = True  # the request may have reached the service: its answer was lost
                if (retry or _is_refused(err)) and self._may_retry(attempt, deadline):
                    self._retrying(method, full_url, attempt, err, None, deadline)
                    continue
                if retry and not timed_out_once and _is_timeout(err) and (self.retries is None or attempt <= self.retries):
                    # An attempt that waited `timeout` with no answer can outlast the whole budget (the default
                    # timeout, 300 s, is five budgets): it is sent once more, so that a step the service took
                    # meanwhile is answered (the same Idempotency-Key) instead of the loop ending (found by a review).
                    timed_out_once = True
                    self._retrying(method, full_url, attempt, err, None, None)
                    continue
                raise ConnectionFailed(method, full_url, err, attempt, hint=hint) from err
            if response.status in expect:
                return response
            if response.status in RETRY_STATUSES and retry and self._may_retry(attempt, deadline):
                self._retrying(method, full_url, attempt, response, response.headers.get("retry-after"), deadline)
                continue
            error = self._error(response, hdrs.get("Content-Type"))
            if response.status == 404 and getattr(error, "code", None) == "ROUTE_NOT_FOUND" and self._prefix.endswith("/v1"):
                # The url names the API's version, which the client adds itself (a review: /v1/v1/... only).
                hint = (f"; the url ends in /v1, which the client adds to every path itself: give the service's "
                        f"address without it ({self._origin}{self._prefix[:-3]})")
                error.message += hint
                error.args = (f"{error.args[0]}{hint}",)
            if maybe_applied and response.status == 404 and method == "DELETE" and getattr(error, "code", None) == "SESSION_NOT_FOUND":
                # A DELETE sent again after a lost answer: the first attempt may be what deleted it (a review:
                # delete_session raised SessionNotFound after a delete that was made).
                error.outcome_unknown = True
                error.args = (f"{error.args[0]} (an earlier attempt of this request lost its answer and may have "
                              f"deleted it)",)
            if maybe_applied and response.status == 412 and method != "GET":
                # Sent again after a lost answer, with If-Match: the first attempt may be what moved the session
                # past that version (found by a review: a PUT state_dict that was applied reported a mismatch).
                error.outcome_unknown = True
                error.args = (f"{error.args[0]} (an earlier attempt of this request lost its answer and may have been "
                              f"applied: that would be what moved the session; read it to know)",)
            raise error

    def start(
        self,
        method: str,
        path: str,
        *,
        query: Optional[Mapping[str, Any]] = None,
        body: Optional[Union[bytes, bytearray, memoryview]] = None,
        content_type: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
        accept: Optional[str] = None,
        expect: Iterable[int] = (200,),
    ) -> Optional["Started"]:
        """Sends a repeatable request (an Idempotency-Key, or an idempotent method) now and returns a handle
        whose ``finish()`` reads its answer later: the caller works meanwhile, with no thread. None for an
        https URL (the caller uses request()). Should sending or reading fail, or the answer be a status
        worth retrying, ``finish()`` sends the request again through request(), with its retries."""
        if self._scheme != "http":
            return None
        spare = getattr(self._local, "spare", None)
        if spare is not None and getattr(spare, "unproven", False):
            # The spare's first started request goes before any other can be in flight over the kept one (a
            # pipelined loop's first step): the other way round, the service read the second step, the first
            # over the spare, before the first, one loop in three on a busy machine (CI; only ever the first
            # two steps of a loop). This request owns the spare until finished; the kept one stays free.
            conn, self._local.spare = spare, None
            spare.unproven = False
        else:
            conn = getattr(self._local, "conn", None)
            if conn is None:  # the kept one is busy with a started request: the spare, or a new one
                conn, self._local.spare = spare, None
            if conn is None:
                conn = self._new_connection()
            self._local.conn = None  # this request owns the connection until finished
        args = dict(query=query, body=body, content_type=content_type, headers=headers, accept=accept, expect=tuple(expect), retry=True)
        started = Started(self, method, path, args, conn)
        try:
            hdrs = self._headers(method, body, content_type, accept, headers)
            conn.send(method, self.path_url(path, query), body, hdrs)  # type: ignore[union-attr]
            started.fresh = bool(getattr(conn, "fresh", False))
        except _CONNECTION_ERRORS:
            started.failed()
        except BaseException:  # an interrupt inside the send: the connection (half a request) is closed
            started.failed()
            raise
        return started

    def open_spare(self) -> None:
        """Opens this thread's second keep-alive connection now (a GET of /healthz), for a pipelined loop's
        second step in flight: sent over a connection opened for it, that step could be read by the service
        after the next one, sent over the first connection, and the two committed in the other order."""
        if self._scheme != "http" or getattr(self._local, "spare", None) is not None:
            return
        conn = self._new_connection()
        try:
            status, _, _, will_close = conn.exchange("GET", self.path_url("/healthz", None), None, self._headers("GET", None, None, None, None))  # type: ignore[union-attr]
        except _CONNECTION_ERRORS:
            conn.close()
            return
        if will_close or status != 200:
            conn.close()
            return
        conn.unproven = True
        self._local.spare = conn

    def _give_back(self, conn: "_PlainConnection", will_close: bool) -> None:
        """A connection a started request is done with: this thread's keep-alive one again, else its spare
        (a pipelined loop has two steps in flight at times, so it keeps two), else closed."""
        self._local.last_used = time.monotonic()
        if will_close:
            conn.close()
        elif getattr(self._local, "conn", None) is None:
            self._local.conn = conn
        elif getattr(self._local, "spare", None) is None:
            self._local.spare = conn
        else:
            conn.close()

    def _headers(self, method: str, body: Any, content_type: Optional[str], accept: Optional[str],
                 headers: Optional[Mapping[str, str]]) -> Dict[str, str]:
        hdrs: Dict[str, str] = {"User-Agent": USER_AGENT}
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
        return hdrs

    def _may_retry(self, attempt: int, deadline: float) -> bool:
        return (self.retries is None or attempt <= self.retries) and time.monotonic() < deadline

    def _retrying(self, method: str, url: str, attempt: int, cause: Any, retry_after: Optional[str], deadline: Optional[float]) -> None:
        what = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else f"HTTP {cause.status}"
        if deadline is None:
            log.warning("%s %s: %s; the retry budget is spent, but an attempt that timed out is sent once more "
                        "(retry %d)", method, url, what, attempt)
        else:
            log.warning("%s %s: %s; retry %d (%.0f s of the retry budget left)", method, url, what, attempt,
                        max(0.0, deadline - time.monotonic()))
        if self.on_retry:
            self.on_retry(attempt, cause)
        self._sleep(attempt, retry_after, deadline)

    def _send(self, method: str, target: str, body: Any, headers: Dict[str, str], full_url: str, timeout: float) -> Response:
        conn = self._connection()
        try:
            if isinstance(conn, _PlainConnection):
                status, names, data, will_close = conn.exchange(method, target, body, headers, timeout)
            else:
                conn.timeout = timeout
                if conn.sock is not None and conn.sock.gettimeout() != timeout:
                    conn.sock.settimeout(timeout)
                conn.request(method, target, body=body, headers=headers)
                res = conn.getresponse()
                data = res.read()
                status, names, will_close = res.status, {k.lower(): v for k, v in res.getheaders()}, res.will_close
        except BaseException:
            # Anything but a whole answer read (a connection error, and also KeyboardInterrupt, SystemExit or
            # a signal handler's exception between sending and the end of the answer): the connection may
            # hold a request half sent or an answer unread, so it is never used again; the next request
            # opens a new one (and cannot read this request's answer as its own).
            self._drop_connection()
            raise
        self._local.last_used = time.monotonic()
        self._reached = True
        response = Response(status, names, data, method, full_url)
        if will_close:
            self._drop_connection()
        return response

    def _sleep(self, attempt: int, retry_after: Optional[str], deadline: Optional[float] = None) -> None:
        delay = None
        if retry_after:
            try:
                delay = float(retry_after)
            except ValueError:
                delay = _retry_after_date(retry_after)
            # RFC 9110 10.2.3: delay-seconds is a non-negative integer. A negative or NaN value (a broken proxy)
            # would make every retry at once, a tight loop for the whole budget (found by a review).
            if delay is not None and not delay >= 0:
                delay = None
        if delay is None:
            delay = self.backoff * (2 ** (attempt - 1))
            delay *= 0.5 + _JITTER.random()  # jitter: replicas of a job do not retry in lockstep
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


class Started:
    """A request sent by Connection.start(): ``answered()`` tells without waiting whether its answer has
    begun to arrive, ``finish()`` reads it (once) and returns the Response as request() does, or raises
    as request() does."""

    __slots__ = ("_owner", "_method", "_path", "_args", "_conn", "_result", "fresh")

    def __init__(self, owner: Connection, method: str, path: str, args: Dict[str, Any], conn: Any) -> None:
        #: Sent over a connection opened for it: the service accepts a new connection after it has read what
        #: the connections it holds brought, so a request sent next over one of those may be read first.
        self.fresh = False
        self._owner = owner
        self._method = method
        self._path = path
        self._args = args
        self._conn: Optional[_PlainConnection] = conn
        self._result: Optional[Response] = None

    def failed(self) -> None:
        """Sending failed: finish() sends the request again through request()."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def answered(self) -> bool:
        return self._result is not None or self._conn is None or self._conn.answered()

    def arrived(self) -> bool:
        """True when the answer has begun to arrive (finish() reads it, sending nothing again); False while
        it has not, and when the connection closed without it (finish() would send the request again, with
        request()'s retries: what a call that never waits must not do)."""
        if self._result is not None:
            return True
        conn = self._conn
        return conn is not None and conn.has_data()

    def finish(self) -> Response:
        if self._result is not None:
            return self._result
        owner, args = self._owner, self._args
        conn, self._conn = self._conn, None
        url = owner._origin + owner.path_url(self._path, args["query"])
        cause = "the request could not be sent, or its answer was not read"
        if conn is not None:
            try:
                status, names, data, will_close = conn.receive(self._method)
            except _CONNECTION_ERRORS as err:
                conn.close()
                cause = f"{type(err).__name__}: {err}"
            except BaseException:
                # Interrupted while the answer arrives (KeyboardInterrupt, SystemExit, a signal handler's
                # exception): the rest of it is left in the socket, so the connection is closed, never given
                # back. A later finish() sends the request again with its Idempotency-Key (applied once).
                conn.close()
                raise
            else:
                owner._give_back(conn, will_close)
                response = Response(status, names, data, self._method, url)
                if status in args["expect"]:
                    self._result = response
                    return response
                if status not in RETRY_STATUSES:
                    raise owner._error(response, args["content_type"])
                cause = f"HTTP {status}"
        log.warning("%s %s: %s; sending it again", self._method, url, cause)
        # Not sent, no answer, or a status worth retrying: the request again, with request()'s retries (it
        # is repeatable: a step carries its Idempotency-Key and is applied at most once).
        self._result = owner.request(self._method, self._path, **args)
        return self._result


_MAX_LINE = 64 * 1024  # bytes of one status or header line
_MAX_HEADERS = 100
_SEND_TOGETHER = 256 * 1024  # a body up to this size goes out in the same send as the headers


#: An answer must arrive within the socket timeout plus one second per this many bytes received: a peer that
#: sends a byte now and then (a broken proxy) no longer holds an attempt for ever (found by a review: each
#: byte reset the socket's timeout), and a big download over a slow link (at least this rate) is not cut.
_MIN_ANSWER_RATE = 64 * 1024


class _AnswerReader(io.RawIOBase):
    """The socket's bytes for the connection's buffered reader, within the answer's deadline while armed."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.idle: Optional[float] = None
        self.started = 0.0
        self.got = 0
        self.shortened = False

    def readable(self) -> bool:
        return True

    def arm(self) -> None:
        self.idle = self.sock.gettimeout()
        self.started = time.monotonic()
        self.got = 0

    def disarm(self) -> None:
        if self.shortened:
            self.sock.settimeout(self.idle)
            self.shortened = False
        self.idle = None

    def readinto(self, b: Any) -> int:
        if self.idle is not None:
            left = self.started + self.idle + self.got / _MIN_ANSWER_RATE - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"the answer did not arrive in {self.idle:.0f} s plus 1 s per "
                                     f"{_MIN_ANSWER_RATE // 1024} KiB ({self.got} bytes came)")
            if left < self.idle:  # near the deadline: wait no longer than it
                self.sock.settimeout(left)
                self.shortened = True
        n = self.sock.recv_into(b)
        self.got += n
        return n


class _PlainConnection:
    """HTTP/1.1 over a plain TCP socket, for ``http://`` URLs: a request is one send (headers and a body of
    up to 256 KiB together), the answer is read through one buffered reader (a body of known length in one
    read, straight into its bytes). http.client cost a training step about 0.4 ms of CPU more in the client
    and more in the service (headers and body in two sends, headers parsed by the email package), as much
    as the service's own work for a small model. Same failures as http.client: RemoteDisconnected when the
    connection closes before an answer, IncompleteRead when it closes inside one, socket.timeout after
    ``timeout`` seconds without data."""

    __slots__ = ("host", "port", "timeout", "sock", "fp", "fresh", "unproven", "_host_header", "__weakref__")

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sock: Optional[socket.socket] = None
        self.fp: Any = None
        #: The last request went over a connection opened for it (see Started.fresh).
        self.fresh = False
        #: Opened ahead by open_spare and not yet used for a started request (see start()).
        self.unproven = False
        self._host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        sock, fp = self.sock, self.fp
        self.sock = self.fp = None
        if fp is not None:
            fp.close()
        if sock is not None:
            sock.close()

    def exchange(self, method: str, target: str, body: Any, headers: Mapping[str, str],
                 timeout: Optional[float] = None) -> Tuple[int, Dict[str, str], bytes, bool]:
        """Sends one request and reads its answer: (status, headers with lower-case names, body, will_close).
        ``timeout``: the socket timeout for this exchange (the connection's own when None)."""
        self.send(method, target, body, headers)
        want = self.timeout if timeout is None else timeout
        if self.sock is not None and self.sock.gettimeout() != want:  # a system call: only when a hold changes it
            self.sock.settimeout(want)
        return self.receive(method)

    def answered(self) -> bool:
        """True when (part of) the answer to the request sent has arrived: receive() would not wait long."""
        if self.sock is None:
            return True
        return _readable(self.sock)

    def has_data(self) -> bool:
        """True when bytes of an answer wait to be read; False when none have come, or the peer closed."""
        sock = self.sock
        if sock is None or not _readable(sock):
            return False
        try:
            return bool(sock.recv(1, socket.MSG_PEEK))  # readable: no wait; b"" is the peer's close
        except OSError:  # reset: no answer to read
            return False

    def send(self, method: str, target: str, body: Any, headers: Mapping[str, str]) -> None:
        """Sends one request (its answer is read by receive())."""
        if self.sock is not None and self.answered():
            # A kept-alive connection with something to read before any request: the server closed it while
            # it was idle (or sent what no request asked for). A request written into it would be lost (a
            # pipelined step then waits for its answer instead of overlapping): a new connection instead.
            self.close()
        self.fresh = self.sock is None
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.fp = io.BufferedReader(_AnswerReader(self.sock), 65536)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header}", "Accept-Encoding: identity"]
        lines.extend(f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("host", "content-length"))
        size = 0 if body is None else memoryview(body).nbytes
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {size}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if body is not None and size <= _SEND_TOGETHER:
            self.sock.sendall(head + bytes(body))
        else:
            self.sock.sendall(head)
            if body is not None:
                self.sock.sendall(body)

    def receive(self, method: str) -> Tuple[int, Dict[str, str], bytes, bool]:
        """Reads the answer to the request sent: (status, headers with lower-case names, body, will_close),
        within the socket's timeout plus a second per 64 KiB received (socket.timeout otherwise)."""
        if self.fp is None:
            raise http.client.RemoteDisconnected("the connection was closed")
        raw = self.fp.raw
        raw.arm()
        try:
            return self._receive(method)
        finally:
            raw.disarm()

    def _receive(self, method: str) -> Tuple[int, Dict[str, str], bytes, bool]:
        first = True
        while True:
            status, version, names = self._read_head(first)
            first = False
            if not 100 <= status < 200:
                break
        will_close = version == "HTTP/1.0" or "close" in names.get("connection", "").lower()
        if method == "HEAD" or status in (204, 304):
            data = b""
        elif "chunked" in names.get("transfer-encoding", "").lower():
            data = self._read_chunked()
        elif "content-length" in names:
            try:
                length = int(names["content-length"])
            except ValueError:
                raise http.client.HTTPException(f"bad Content-Length {names['content-length']!r}") from None
            data = self._read_exact(length)
        else:
            data = self.fp.read()
            will_close = True
        return status, names, data, will_close

    def _line(self) -> bytes:
        line = self.fp.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise http.client.LineTooLong("header line")
        return line

    def _read_head(self, first: bool) -> Tuple[int, str, Dict[str, str]]:
        # Usually the whole head is in the reader's buffer after its first read: parsed in one piece.
        buffered = self.fp.peek(1)
        end = buffered.find(b"\r\n\r\n")
        if end >= 0:
            return _parse_head(self.fp.read(end + 4).decode("latin-1").split("\r\n")[:-2])
        # A head spread over several reads: line by line.
        lines: List[str] = []
        while True:
            line = self._line()
            if not line:
                if first and not lines:
                    raise http.client.RemoteDisconnected("Remote end closed connection without response")
                raise http.client.IncompleteRead(b"")
            if line in (b"\r\n", b"\n"):
                return _parse_head(lines)
            if len(lines) > _MAX_HEADERS:
                raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")
            lines.append(line.decode("latin-1").rstrip("\r\n"))

    def _read_exact(self, n: int) -> bytes:
        data = self.fp.read(n)
        if len(data) < n:
            raise http.client.IncompleteRead(data, n - len(data))
        return data

    def _read_chunked(self) -> bytes:
        parts: List[bytes] = []
        while True:
            size_line = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise http.client.HTTPException(f"bad chunk size {size_line!r}") from None
            if size == 0:
                while self._line() not in (b"\r\n", b"\n", b""):  # trailers, up to the empty line
                    pass
                return b"".join(parts)
            parts.append(self._read_exact(size))
            if self._line() not in (b"\r\n", b"\n"):
                raise http.client.HTTPException("a chunk is not followed by CRLF")


def _parse_head(lines: List[str]) -> Tuple[int, str, Dict[str, str]]:
    """(status, HTTP version, headers with lower-case names; repeated ones joined by ", ") of an answer's head."""
    parts = lines[0].split(" ", 2) if lines else []
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise http.client.BadStatusLine(lines[0] if lines else "")
    if len(lines) > _MAX_HEADERS + 1:
        raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")
    names: Dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            name = name.strip().lower()
            value = value.strip()
            names[name] = f"{names[name]}, {value}" if name in names else value
    return int(parts[1]), parts[0], names
