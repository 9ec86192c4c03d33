"""Starts one asgd-serve for the whole test run (shared by every test module), stops it at exit; on
PostgreSQL, tests may ask for more processes on its database (``server().replicas(n)``).

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


class _Process:
    """One src/server.ts child on its own port. ``start`` returns once it answers; ``terminate`` is the
    one way it ends (graceful SIGTERM, SIGKILL after 30 s; or SIGKILL at once); ``restart`` is the two on
    the same port."""

    def __init__(self, root: str, env: dict, log_path: str, token) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log_path = log_path
        self._root, self._env, self._token = root, {**env, "PORT": str(self.port)}, token

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [_node(self._root), "src/server.ts"], cwd=self._root, env=self._env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        self._wait_ready(float(os.environ.get("ASGD_TEST_START_TIMEOUT", "90")))

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self, down_s: float, sig: int = signal.SIGTERM) -> None:
        self.terminate(sig)
        time.sleep(down_s)
        self.start()

    def log_tail(self, n: int = 4000) -> str:
        if not os.path.exists(self.log_path):
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
                self.proc = None
                raise RuntimeError(f"asgd-serve exited with {code} before answering:\n{self.log_tail()}")
            for path in ("/healthz", "/v1/sessions?limit=1"):
                try:
                    req = urllib.request.Request(self.url + path)
                    if self._token:
                        req.add_header("Authorization", f"Bearer {self._token}")
                    with urllib.request.urlopen(req, timeout=2) as res:
                        if res.status == 200:
                            return
                except urllib.error.HTTPError as err:
                    last = err
                except (OSError, urllib.error.URLError) as err:
                    last = err
            time.sleep(0.25)
        self.terminate()
        raise RuntimeError(f"asgd-serve did not answer at {self.url} within {timeout}s ({last}):\n{self.log_tail()}")


class Server:
    """The tests' service: one process (``url``), and on PostgreSQL more processes on its database
    (``replicas``), as a deployment runs them."""

    def __init__(self) -> None:
        self.url = os.environ.get("ASGD_TEST_URL")
        self.token = os.environ.get("ASGD_TEST_TOKEN") or None
        self.tmp = None
        self.db_admin_url = None
        self.db_name = None
        self._main = None
        self._replicas = []
        if self.url:
            return
        self._root = _find_root()
        self.tmp = tempfile.mkdtemp(prefix="asgd-client-tests-")
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "ASGD_DATA_DIR", "ASGD_ADMIN_TOKEN")}
        env.update(HOST="127.0.0.1", LOG_LEVEL=os.environ.get("ASGD_TEST_LOG_LEVEL", "warn"))
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
        self._env = env
        atexit.register(self.stop)
        try:
            self._main = self._process("server.log")
        except BaseException:
            self.stop()  # the database and the folder
            raise
        self.url = self._main.url

    def _process(self, log_name: str) -> _Process:
        process = _Process(self._root, self._env, os.path.join(self.tmp, log_name), self.token)
        process.start()
        return process

    @property
    def proc(self):
        """The main process (None while a restart has it down)."""
        return self._main.proc if self._main else None

    @property
    def restartable(self) -> bool:
        """False for a service the tests did not start (ASGD_TEST_URL)."""
        return self._main is not None

    def restart(self, down_s: float = 1.0, sig: int = signal.SIGTERM) -> None:
        """Stops the main process (SIGTERM: graceful; SIGKILL: kill -9, no shutdown code runs), keeps it down
        ``down_s`` seconds, and starts it again on the same port and database; returns once it answers."""
        if self._main is None:
            raise RuntimeError("the service was not started by the tests")
        self._main.restart(down_s, sig)

    def replicas(self, n: int):
        """URLs of ``n`` processes on this service's database (the first is ``url``; more are started on
        first use and run until the end), or None when the service is not on PostgreSQL of its own."""
        if self._main is None or self.db_name is None:
            return None
        while len(self._replicas) < n - 1:
            self._replicas.append(self._process(f"replica-{len(self._replicas) + 1}.log"))
        return [self.url] + [r.url for r in self._replicas[: n - 1]]

    def log_tail(self, n: int = 4000) -> str:
        return self._main.log_tail(n) if self._main else ""

    def stop(self) -> None:
        """Ends the processes, drops the test database and removes the temporary folder."""
        for process in [self._main, *self._replicas]:
            if process is not None:
                process.terminate()
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
