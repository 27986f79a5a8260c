"""Shared fixtures: a real fake upstream on loopback, the app on a temp database, gunicorn runs."""

import contextlib
import gc
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import psycopg
import pytest
import requests
from hypothesis import settings as hypothesis_settings

sys.path.insert(0, os.path.dirname(__file__))

from fake_upstream import FakeUpstream
from servers import (  # noqa: F401 - fixtures, registered by being imported here
    nginx_factory,
    pg_url,
    postgres_factory,
    postgres_server,
    redis_factory,
    redis_server,
    redis_url,
)

from relay.app import create_app
from relay.serve.launch import free_port, procfile_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CI replays the same generated examples every run (.ci/run sets HYPOTHESIS_PROFILE=ci);
# developers' runs keep searching new ones.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
UPSTREAM_KEY = "sk-upstream-SECRET-0123456789abcdef"
# Every secret the suite uses, and everything the relay said while the suite ran:
# tests/test_zzz_secrets.py (run last) checks that no secret appears anywhere in it.
SECRETS_SEEN = {UPSTREAM_KEY}
CAPTURED_REPLIES = []
CAPTURED_LOG_FILES = []
# gunicorn_conf's post_worker_init logs this once a worker has loaded the app.
WORKER_READY = re.compile(r"relay worker (\d+) ready")


class _LogCapture(logging.Handler):
    """Keeps every log line the relay (and anything else in-process) emits."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        """Store the formatted line, with any traceback."""
        self.lines.append(self.format(record))


LOG_CAPTURE = _LogCapture()
logging.getLogger().addHandler(LOG_CAPTURE)
logging.getLogger("relay").addHandler(LOG_CAPTURE)


class _TeeReplies:
    """WSGI middleware keeping a copy of every reply body (streams too) the app sends."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        def start(status, headers, exc_info=None):
            CAPTURED_REPLIES.append(f"{status} {headers}".encode())
            return start_response(status, headers, exc_info)

        body = self.app(environ, start)
        return _TeeBody(body)


class _TeeBody:
    """An iterable that records each chunk it passes on."""

    def __init__(self, body):
        self.body = body

    def __iter__(self):
        for chunk in self.body:
            CAPTURED_REPLIES.append(chunk)
            yield chunk

    def close(self):
        """Close the wrapped body."""
        if hasattr(self.body, "close"):
            self.body.close()


_original_send = requests.Session.send


def _recording_send(self, request, **kwargs):
    """requests' send, keeping a copy of whole (non-streamed) replies from gunicorn runs."""
    response = _original_send(self, request, **kwargs)
    CAPTURED_REPLIES.append(str(response.headers).encode())
    if not kwargs.get("stream"):
        CAPTURED_REPLIES.append(response.content)
    return response


requests.Session.send = _recording_send
# A developer's shell may carry RELAY_* settings (or a metrics directory) for their own
# relay: the in-process apps of the tests must not pick them up.
for _name in [n for n in os.environ if n.startswith("RELAY_") or n == "PROMETHEUS_MULTIPROC_DIR"]:
    del os.environ[_name]

AUDIT_MODULE = "test_secrets_audit.py"
# The modules that exercise the store: each of their tests that builds the app runs on both
# stores, SQLite and a real PostgreSQL (the latter carry the `server` marker).
STORE_MODULES = {
    "test_quota",
    "test_billing",
    "test_keys_auth",
    "test_spool",
    "test_guessing",
    "test_admin",
    "test_usage_cli_demo",
    "test_account_wide",
}
STORES = ["sqlite", "postgresql"]


def pytest_generate_tests(metafunc):
    """Run the store modules' app tests once per store."""
    if metafunc.module.__name__ in STORE_MODULES and "store_url" in metafunc.fixturenames:
        metafunc.parametrize("store_url", STORES, indirect=True)


def pytest_collection_modifyitems(config, items):
    """Mark tests that start servers (`-m "not server"` is the fast loop); audit last."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("store_url") == "postgresql"
        if "relay_server" in item.fixturenames or on_postgres:
            item.add_marker(pytest.mark.server)
    # The audit reads what every other test made the relay say, so it must come last,
    # whatever its name sorts as and whichever tests were selected.
    items.sort(key=lambda item: item.path.name == AUDIT_MODULE)


@pytest.fixture
def fake():
    """A fresh fake upstream for one test."""
    upstream = FakeUpstream().start()
    yield upstream
    upstream.stop()
    if upstream.errors:
        raise AssertionError(f"fake upstream errors: {upstream.errors}")


@pytest.fixture(scope="module")
def upstream():
    """One fake upstream for a module's shared relay (the hostile suites: their upstreams
    misbehave on purpose, so its errors are not checked)."""
    shared = FakeUpstream().start()
    yield shared
    shared.stop()


def relay_settings(tmp_path, fake, **overrides):
    """App settings pointing at the fake, on files under tmp_path."""
    settings = {
        "DATABASE": str(tmp_path / "relay.sqlite"),
        "RATELIMIT_STORAGE_URI": f"sqlite:///{tmp_path / 'ratelimit.sqlite'}",
        "UPSTREAM_BASE_URL": fake.base_url,
        "UPSTREAM_API_KEY": UPSTREAM_KEY,
        "UNAUTHENTICATED_RPM": 1000,
        "UPSTREAM_READ_TIMEOUT": 5.0,
        "UPSTREAM_CONNECT_TIMEOUT": 2.0,
    }
    settings.update(overrides)
    return settings


@pytest.fixture
def settings(tmp_path, fake):
    """Overridable test settings (tests may change entries before using `app`)."""
    return relay_settings(tmp_path, fake)


@pytest.fixture
def store_url(request):
    """The store the app runs on: None for the settings' own SQLite file (the default), or the
    URL of a fresh database on the session's PostgreSQL (STORE_MODULES run both)."""
    if getattr(request, "param", "sqlite") == "postgresql":
        url = request.getfixturevalue("pg_url")
        SECRETS_SEEN.add(request.getfixturevalue("postgres_server").password)  # never said
        return url
    return None


def on_store(settings, store_url, tmp_path):
    """Settings moved onto `store_url` when it is PostgreSQL (the spool kept in tmp_path)."""
    if store_url is None:
        return settings
    spool = str(tmp_path / "relay-postgres.spool.jsonl")
    return {**settings, "DATABASE": store_url, "SPOOL_FILE": spool}


@contextlib.contextmanager
def database_locked(app):
    """Hold the store's write lock from a connection of our own: the relay's writes wait
    (and give up at their write timeout) until the block ends; its reads go on."""
    target = app.config["DATABASE"]
    if "://" in target:
        blocker = psycopg.connect(target, autocommit=True)
        blocker.execute("BEGIN")
        blocker.execute(
            "LOCK TABLE keys, usage, inflight, health, admin_sessions IN EXCLUSIVE MODE"
        )
    else:
        blocker = sqlite3.connect(target, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def database_dump(app):
    """Every row of every table of the app's store, as text."""
    target = app.config["DATABASE"]
    if "://" not in target:
        return "\n".join(sqlite3.connect(target).iterdump())
    with psycopg.connect(target) as conn:
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
        return "\n".join(
            repr(row)
            for (table,) in tables
            for row in conn.execute(f'SELECT * FROM "{table}"')  # noqa: S608
        )


@pytest.fixture
def app(settings, store_url, tmp_path):
    """The relay app on a temp database, forwarding to the fake upstream."""
    application = create_app(on_store(settings, store_url, tmp_path))
    application.wsgi_app = _TeeReplies(application.wsgi_app)
    yield application
    close_app(application)


def close_app(application):
    """Close what an in-process app holds open: upstream connections and SQLite files."""
    application.extensions["relay"].close()


@pytest.fixture
def client(app):
    """Flask's test client."""
    return app.test_client()


@pytest.fixture
def runner(app):
    """Flask's CLI runner."""
    return app.test_cli_runner()


@pytest.fixture
def make_key(app):
    """Create a key with settings; returns the plaintext key."""

    def make(name=None, **settings):
        make.count += 1
        keys = app.extensions["relay"].store.keys
        plaintext, _ = keys.create(name or f"key{make.count}", **settings)
        SECRETS_SEEN.add(plaintext)
        return plaintext

    make.count = 0
    return make


@pytest.fixture
def key(make_key):
    """One unlimited key."""
    return make_key("default-key")


def auth(key):
    """Authorization header for a key."""
    return {"Authorization": f"Bearer {key}"}


class RelayServer:
    """The relay under real gunicorn (the Procfile's command) in a subprocess."""

    def __init__(self, tmp_path, env, workers=2, worker_class="gevent"):
        self.tmp_path = tmp_path
        self.workers = workers
        self.db_path = env.get("RELAY_DATABASE") or str(tmp_path / "relay.sqlite")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
            "RELAY_DATABASE": self.db_path,
            "RELAY_RATELIMIT_STORAGE_URI": f"sqlite:///{tmp_path / 'ratelimit.sqlite'}",
            "RELAY_UNAUTHENTICATED_RPM": "1000",
            "RELAY_BIND": "127.0.0.1",
            "WEB_CONCURRENCY": str(workers),
            "GUNICORN_CMD_ARGS": "--graceful-timeout 5",
            **env,
        }
        self.worker_class = worker_class
        self.process = None
        self.log = None
        self._use_port(free_port())

    def _use_port(self, port):
        """Listen on `port` (a fresh log file for each try)."""
        self.port = port
        self.env["PORT"] = str(port)
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = self.tmp_path / f"gunicorn-{port}.log"
        CAPTURED_LOG_FILES.append(self.log_path)

    def command(self):
        """The Procfile's web command, as the operator would run it."""
        bindir = os.path.dirname(sys.executable)
        return f"exec {bindir}/{procfile_command()}"

    def start(self, timeout=30.0, tries=3):
        """Start gunicorn; return once it listens on our port and every worker is ready.

        The port is picked free, but another process may take it before gunicorn binds:
        then gunicorn exits saying so, and the next try uses another port.
        """
        for attempt in range(tries):
            if attempt:
                self._use_port(free_port())
            self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
            self.process = subprocess.Popen(
                ["/bin/sh", "-c", self.command()],
                cwd=ROOT,
                env=self.env,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            if self._wait_ready(timeout):
                return self
            self.log.close()
        raise RuntimeError(f"gunicorn could not bind a free port:\n{self.output()}")

    def _wait_ready(self, timeout):
        """True once our master listens on our port and all workers loaded the app.

        False when the port was taken; any other failure raises with gunicorn's output.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            output = self.output()
            if self.process.poll() is not None:
                if "Address already in use" in output or "Connection in use" in output:
                    return False
                raise RuntimeError(f"gunicorn exited early:\n{output}")
            listening = f"Listening at: http://127.0.0.1:{self.port} ({self.master_pid()})"
            if listening in output and len(self.ready_workers()) >= self.workers:
                return True
            time.sleep(0.05)
        raise RuntimeError(f"gunicorn did not get ready in {timeout:g} s:\n{self.output()}")

    def master_pid(self):
        """gunicorn's master (the process started; a wrapper such as strace overrides it)."""
        return self.process.pid

    def ready_workers(self):
        """PIDs of the current workers that have loaded the app (gunicorn_conf logs each)."""
        ready = {int(pid) for pid in WORKER_READY.findall(self.output())}
        return sorted(ready & set(self.worker_pids()))

    def wait_workers(self, timeout=30.0, gone=()):
        """Wait until `workers` workers are ready again (after one was killed, say)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = self.ready_workers()
            if len(ready) >= self.workers and not set(ready) & set(gone):
                return ready
            time.sleep(0.05)
        raise RuntimeError(f"workers did not come back in {timeout:g} s:\n{self.output()}")

    def worker_pids(self):
        """PIDs of the gunicorn workers (children of the master)."""
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split()]

    def output(self):
        """Everything gunicorn and the relay logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self):
        """Stop gunicorn gracefully (then forcefully)."""
        gc.collect()  # closes client sockets left in dropped requests pools (keep-alive)
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.log is not None:
            self.log.close()

    def flask(self, *args):
        """Run `flask --app app ...` against this server's database."""
        return subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "flask"), "--app", "app", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )

    def create_key(self, name, *options):
        """Create a key through the CLI and return it (the last line of stdout)."""
        result = self.flask("keys", "create", name, *options)
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
        plaintext = result.stdout.strip().splitlines()[-1]
        SECRETS_SEEN.add(plaintext)
        return plaintext


@pytest.fixture
def relay_server(tmp_path, fake):
    """Factory: start gunicorn with extra RELAY_* env; all stopped at the end."""
    servers = []

    def start(workers=2, **env):
        base = {"RELAY_UPSTREAM_BASE_URL": fake.base_url, "RELAY_UPSTREAM_API_KEY": UPSTREAM_KEY}
        server = RelayServer(tmp_path, {**base, **env}, workers=workers)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
