"""A local HTTP server for tests: a fake service with scripted answers, or a fault-injecting proxy."""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, List, Optional, Tuple
from urllib.parse import urlsplit


class Recorded:
    def __init__(self, method: str, path: str, headers: dict, body: bytes, peer: int = 0) -> None:
        self.method, self.path, self.headers, self.body = method, path, headers, body
        self.peer = peer  # the client's port: which connection the request came on
        self.arrived_at = time.monotonic()
        self.answered_at: Optional[float] = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _handle(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        req = Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body, self.client_address[1])
        owner: "LocalServer" = self.server.owner  # type: ignore[attr-defined]
        with owner.lock:
            owner.requests.append(req)
        action = owner.decide(req)
        if action == "drop":  # close without answering
            self.close_connection = True
            return
        status, headers, payload = action
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "keep-alive"):
                self.send_header(k, v)
        if ("connection", "close") in [(k.lower(), v.lower()) for k, v in headers]:  # the answer closes the connection
            self.send_header("Connection", "close")
            self.close_connection = True
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        # Stamped before the body is written: the client cannot have the answer sooner, and once it is
        # written the client may send its next request and have it read on another thread before this one
        # runs again (a stamp after the write was once 0.3 ms later than the next request's arrival).
        owner.answered(req)
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


Answer = Tuple[int, List[Tuple[str, str]], bytes]


class LocalServer:
    """``decide(request)`` returns (status, headers, body) or "drop". ``upstream``: forward helper."""

    def __init__(self, decide: Callable[[Recorded], object], upstream: Optional[str] = None) -> None:
        self.requests: List[Recorded] = []
        self.lock = threading.Lock()
        self._decide = decide
        self.upstream = upstream
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def decide(self, req: Recorded):
        return self._decide(req)

    def answered(self, req: Recorded) -> None:
        """Called as an answer's body starts to be written (its time is req.answered_at)."""
        req.answered_at = time.monotonic()

    def forward(self, req: Recorded) -> Answer:
        parts = urlsplit(self.upstream)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            headers = {k: v for k, v in req.headers.items() if k not in ("host", "connection", "content-length")}
            conn.request(req.method, req.path, body=req.body or None, headers=headers)
            res = conn.getresponse()
            return res.status, res.getheaders(), res.read()
        finally:
            conn.close()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
