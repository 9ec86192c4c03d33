"""Starts one asgd-serve for the whole test run (shared by every test module), stops it at exit.

Environment:
    ASGD_TEST_URL         use this running service instead of starting one.
    ASGD_SERVE_ROOT       the service's checkout (default: found by walking up from this file).
    ASGD_TEST_DB          postgres | pglite | auto (default): where the service keeps its state.
                          postgres: a database of the tests' own (created, migrated, dropped at the
                          end) on the server at ASGD_TEST_DATABASE_URL (default
                          postgres://postgres@127.0.0.1:5432/postgres); pglite: the embedded
                          database in a temporary folder; auto: postgres when that server answers
                          (psql), else pglite.
    ASGD_TEST_SERVER_ENV  extra KEY=VALUE pairs (space separated) for the service, e.g. ASGD_FMA=false.
    ASGD_TEST_TOKEN       start the service with ASGD_ADMIN_TOKEN=<this> and send it (auth on).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_ROOT = os.path.dirname(HERE)
if CLIENT_ROOT not in sys.path:  # the tests run against this checkout's package, installed or not
    sys.path.insert(0, CLIENT_ROOT)

_lock = threading.Lock()
_server = None
_failure = None


def _find_root() -> str:
    root = os.environ.get("ASGD_SERVE_ROOT")
    if root:
        return root
    d = HERE
    while d != os.path.dirname(d):
        pkg = os.path.join(d, "package.json")
        if os.path.exists(pkg):
            try:
                with open(pkg) as f:
                    if json.load(f).get("name") == "asgd-serve":
                        return d
            except (OSError, ValueError):
                pass
        d = os.path.dirname(d)
    raise RuntimeError("cannot find the asgd-serve checkout above clients/python; set ASGD_SERVE_ROOT")


def _node(root: str) -> str:
    """The project's pinned Node (npm ci puts it in node_modules/.bin); the PATH's node otherwise."""
    pinned = os.path.join(root, "node_modules", ".bin", "node")
    return pinned if os.access(pinned, os.X_OK) else "node"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _psql(url: str, sql: str, timeout: float = 60) -> None:
    subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql], check=True, capture_output=True, timeout=timeout,
                   stdin=subprocess.DEVNULL)


DEFAULT_ADMIN_URL = "postgres://postgres@127.0.0.1:5432/postgres"


def _database_admin_url():
    """The PostgreSQL to create the test database on, or None for PGlite."""
    mode = os.environ.get("ASGD_TEST_DB", "auto").strip().lower()
    url = os.environ.get("ASGD_TEST_DATABASE_URL") or DEFAULT_ADMIN_URL
    if mode == "pglite":
        return None
    if mode == "postgres":
        return url
    if mode != "auto":
        raise RuntimeError(f"ASGD_TEST_DB must be postgres, pglite or auto, got {mode!r}")
    if shutil.which("psql") is None:
        return None
    try:
        _psql(url, "SELECT 1", timeout=5)
        return url
    except (subprocess.SubprocessError, OSError):
        return None


class Server:
    def __init__(self) -> None:
        self.url = os.environ.get("ASGD_TEST_URL")
        self.token = os.environ.get("ASGD_TEST_TOKEN") or None
        self.proc = None
        self.tmp = None
        self.db_admin_url = None
        self.db_name = None
        self.log_path = None
        if self.url:
            return
        root = _find_root()
        self.tmp = tempfile.mkdtemp(prefix="asgd-client-tests-")
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "ASGD_DATA_DIR", "ASGD_ADMIN_TOKEN")}
        env.update(PORT=str(port), HOST="127.0.0.1", LOG_LEVEL=os.environ.get("ASGD_TEST_LOG_LEVEL", "warn"))
        admin = _database_admin_url()
        if admin:
            self.db_admin_url = admin
            self.db_name = f"asgd_client_test_{uuid.uuid4().hex[:10]}"
            _psql(admin, f'CREATE DATABASE "{self.db_name}"')
            parts = urllib.parse.urlsplit(admin)
            env["DATABASE_URL"] = urllib.parse.urlunsplit(parts._replace(path="/" + self.db_name))
            env["ASGD_MIGRATE"] = "true"
        else:
            env["ASGD_DATA_DIR"] = os.path.join(self.tmp, "pglite")
        if self.token:
            env["ASGD_ADMIN_TOKEN"] = self.token
        for pair in os.environ.get("ASGD_TEST_SERVER_ENV", "").split():
            k, _, v = pair.partition("=")
            env[k] = v
        self.log_path = os.path.join(self.tmp, "server.log")
        self._root, self._env = root, env
        self.url = f"http://127.0.0.1:{port}"
        atexit.register(self.stop)
        self._start()

    def _start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [_node(self._root), "src/server.ts"], cwd=self._root, env=self._env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        self._wait_ready(float(os.environ.get("ASGD_TEST_START_TIMEOUT", "90")))

    @property
    def restartable(self) -> bool:
        """False for a service the tests did not start (ASGD_TEST_URL)."""
        return self.proc is not None

    def restart(self, down_s: float = 1.0) -> None:
        """Stops the service (SIGTERM, graceful), keeps it down ``down_s`` seconds, and starts it again on
        the same port and database; returns once it answers."""
        proc, self.proc = self.proc, None
        if proc is None:
            raise RuntimeError("the service was not started by the tests")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        time.sleep(down_s)
        self._start()

    def log_tail(self, n: int = 4000) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            data = f.read()
        return data[-n:].decode("utf-8", "replace")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"asgd-serve exited with {code} before answering:\n{tail}")
            for path in ("/healthz", "/v1/sessions?limit=1"):
                try:
                    req = urllib.request.Request(self.url + path)
                    if self.token:
                        req.add_header("Authorization", f"Bearer {self.token}")
                    with urllib.request.urlopen(req, timeout=2) as res:
                        if res.status == 200:
                            return
                except urllib.error.HTTPError as err:
                    last = err
                except (OSError, urllib.error.URLError) as err:
                    last = err
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"asgd-serve did not answer at {self.url} within {timeout}s ({last}):\n{tail}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self.db_name and self.db_admin_url:
            try:
                _psql(self.db_admin_url, f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            except Exception as err:  # pragma: no cover - report, do not mask the test result
                print(f"warning: could not drop test database {self.db_name}: {err}", file=sys.stderr)
            self.db_name = None
        if self.tmp and os.environ.get("ASGD_TEST_KEEP_TMP") != "1":
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def server() -> Server:
    """The shared service (started on first use)."""
    global _server, _failure
    with _lock:
        if _failure is not None:  # do not wait for a broken service once per test
            raise RuntimeError(f"asgd-serve could not be started (see the first error): {_failure}")
        if _server is None:
            try:
                _server = Server()
            except Exception as err:
                _failure = err
                raise
        return _server


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
