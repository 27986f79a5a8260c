"""Real PostgreSQL, Redis and nginx servers on free loopback ports, started by the tests."""

import atexit
import contextlib
import itertools
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from relay.serve.launch import free_port

INSTALL_HINT = "tests/install-system-deps.sh installs it"
_POLL = 0.02  # how often the waits below re-check their condition
_PORT_TRIES = 5  # a free port can be taken between probing it and the server's bind
_LIVE = set()  # servers with a process that may still run: reaped at exit, whatever happened
_PRIVATE_DIRS = set()  # temp dirs outside pytest's tree, removed at exit at the latest
_COUNTER = itertools.count(1)
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class ServerError(RuntimeError):
    """A test server did not start, stop or answer as expected (the message has its log tail)."""


class _PortTaken(ServerError):
    """The server could not bind its port: someone took it after we probed it."""


def _is_root():
    """Whether we run as root (programs are then installed, never skipped)."""
    return os.geteuid() == 0


def _program(name, candidates):
    """The first existing executable of `candidates`; skip (not root) or fail (root) without."""
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    reason = f"{name} is not installed ({INSTALL_HINT})"
    if _is_root():
        # As root the install script can always install it, so a missing program is a bug.
        raise ServerError(reason)
    pytest.skip(reason)
    return None  # unreachable: pytest.skip raises


def _private_dir(prefix, owner=None):
    """A fresh temp dir outside pytest's tree, which is 0700 root and so closed to service users.

    Also short enough for a unix socket path (at most 107 bytes), unlike a deep tmp_path.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    _PRIVATE_DIRS.add(path)
    if owner is not None:
        shutil.chown(path, owner, owner)
    return path


def _remove_private_dir(path):
    """Remove a dir made by _private_dir."""
    shutil.rmtree(path, ignore_errors=True)
    _PRIVATE_DIRS.discard(path)


def _clean_env(**extra):
    """The environment for server programs: ours without libpq's PG* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def _process_state(pid):
    """The one-letter state of a process in /proc ('T' when stopped), or None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _processes():
    """(pid, state, ppid, process group) of every process in /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        yield int(entry.name), fields[0], int(fields[1]), int(fields[2])


def _children(pid):
    """PIDs of the live children of a process."""
    return {child for child, state, ppid, _ in _processes() if ppid == pid and state != "Z"}


def _descendants(pid):
    """PIDs of the live children of a process, their children, and so on."""
    children = {}
    for child, state, ppid, _ in _processes():
        if state != "Z":
            children.setdefault(ppid, set()).add(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _group_alive(pgid):
    """PIDs of the live (not zombie) processes of a process group."""
    return {pid for pid, state, _, group in _processes() if group == pgid and state != "Z"}


def _wait_until(condition, timeout, what, error):
    """Call `condition` until it returns a true value (returned); `error(what)` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise error(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(_POLL)


def _port_answers(port):
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


@atexit.register
def _reap_all():
    """Kill whatever servers are still running and remove private dirs, e.g. after a crash."""
    for server in list(_LIVE):
        server._force_kill()
    for path in list(_PRIVATE_DIRS):
        _remove_private_dir(path)


class _Server:
    """Shared process handling: start with port retries, log tail, stop with deadlines."""

    name = "server"

    def __init__(self, tmp_dir, port=None):
        self.tmp_dir = Path(tmp_dir)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.number = next(_COUNTER)
        # A port given by the caller, or once started, is kept: restarts must reuse it.
        self.port = port or free_port()
        self.pinned = port is not None
        self.process = None
        self.log_path = self.tmp_dir / f"{self.name}-{self.number}.log"
        self._log = None
        self._log_offset = 0
        self.start_seconds = None  # how long the last start() took

    def __repr__(self):
        """Name, port and state, for assertion messages."""
        state = "running" if self.is_running() else "stopped"
        return f"<{type(self).__name__} 127.0.0.1:{self.port} {state} log={self.log_path}>"

    def log_tail(self, lines=40):
        """The last lines of the server's log (for failure messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _new_log_text(self):
        """What the server logged since the current start() began."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(self._log_offset)
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    def _error(self, message):
        """A ServerError naming this server, with its log tail."""
        return ServerError(f"{self!r}: {message}\n--- log tail ---\n{self.log_tail()}")

    def is_running(self):
        """Whether the server process is alive (a paused one counts as running)."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout=20.0):
        """Start on our port (another free one if it was taken, unless pinned); wait till ready."""
        if self.is_running():
            raise self._error("start() while already running")
        began = time.monotonic()
        for attempt in range(_PORT_TRIES):
            if attempt:
                self.port = free_port()
            try:
                self._launch_and_wait(timeout)
            except _PortTaken:
                if self.pinned or attempt == _PORT_TRIES - 1:
                    raise
                continue
            self.pinned = True
            self.start_seconds = time.monotonic() - began
            return self
        raise AssertionError("unreachable")

    def _launch_and_wait(self, timeout):
        """One start attempt on self.port: _PortTaken when the bind failed."""
        self._prepare()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed when the process ends
        self._log_offset = self._log.tell()
        self.process = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill() reaches every child
            **self._popen_options(),
        )
        _LIVE.add(self)
        try:
            _wait_until(self._ready_or_exited, timeout, f"{self.name} to be ready", self._error)
        except BaseException:
            self._force_kill()
            raise
        if self.process.poll() is not None:
            code = self.process.returncode
            self._reaped()
            text = self._new_log_text()
            if any(sign in text for sign in self._bind_failures):
                raise _PortTaken(f"port {self.port} was taken:\n{text[-2000:]}")
            raise self._error(f"exited with code {code} while starting")

    def _ready_or_exited(self):
        """True when the process exited (the caller checks why) or is ready and ours."""
        return self.process.poll() is not None or self._ready()

    def _reaped(self):
        """Bookkeeping once our process has exited and been waited for."""
        _LIVE.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _signal_and_wait(self, signals):
        """Send each (signal, seconds) in turn until the process exits; SIGKILL the group last."""
        if not self.is_running():
            self._reaped()
            return
        for signum, seconds in signals:
            try:
                self.process.send_signal(signum)
                self.process.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                continue
            self._reaped()
            return
        self._force_kill()

    def _force_kill(self):
        """SIGKILL the process, its descendants and its group at once, and reap the leader."""
        if self.process is not None and self.process.returncode is None:
            leader = self.process.pid
            # Frozen, the leader forks nothing new while we list its family. Its group alone is
            # not enough: PostgreSQL's backends each call setsid().
            with contextlib.suppress(ProcessLookupError):
                os.kill(leader, signal.SIGSTOP)
            doomed = _descendants(leader) | _group_alive(leader)
            for pid in doomed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            # The leader is not reaped yet, so its group id cannot have been reused.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(leader, signal.SIGKILL)
            self.process.wait()
            # Orphans die a moment after the signal: wait, so that a restart never meets them
            # holding the port or shared memory (zombies hold nothing: PID 1 reaps them).
            with contextlib.suppress(ServerError):
                _wait_until(
                    lambda: not any(_process_state(pid) not in {None, "Z"} for pid in doomed),
                    10,
                    "the killed processes to die",
                    ServerError,
                )
        self._reaped()

    # Subclasses fill these in.
    _bind_failures = ("Address already in use",)

    def _prepare(self):
        """Write whatever files the next launch needs."""

    def _command(self):
        """The argv of the server program."""
        raise NotImplementedError

    def _popen_options(self):
        """Extra subprocess.Popen arguments (user, cwd, env)."""
        return {}

    def _ready(self):
        """Whether the server accepts connections and is ours."""
        raise NotImplementedError


def _postgres_bindir():
    """The bin dir of the newest PostgreSQL Debian installed (/usr/lib/postgresql/<ver>/bin)."""
    versions = []
    for path in Path("/usr/lib/postgresql").glob("*/bin/postgres"):
        version = path.parent.parent.name
        if version.isdigit():
            versions.append((int(version), path.parent))
    newest = str(max(versions)[1] / "postgres") if versions else None
    return Path(_program("PostgreSQL (postgresql)", [newest])).parent


def _run_psql(bindir, target, sql):
    """psql with connection arguments `target`, SQL on stdin; the CompletedProcess."""
    return subprocess.run(
        [str(bindir / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", *target],
        input=sql,
        capture_output=True,
        text=True,
        check=False,
        env=_clean_env(PGCONNECT_TIMEOUT="5", LC_ALL="C"),
        timeout=60,
    )


def psql(url, sql):
    """Run SQL with psql on a postgresql:// URL (e.g. pg_url); its output, or ServerError."""
    result = _run_psql(_postgres_bindir(), [url], sql)
    if result.returncode != 0:
        raise ServerError(f"psql failed: {sql!r}:\n{result.stderr}")
    return result.stdout


class PostgresServer(_Server):
    """Debian's PostgreSQL in a private cluster: password (scram) on 127.0.0.1, trust on its socket.

    initdb runs at the first start() only; start() after stop() or kill() reuses the cluster
    and the port. Running as root, the server runs as the `postgres` OS user (it refuses root).
    """

    name = "postgres"
    _bind_failures = ("could not create any TCP/IP sockets", "Address already in use")

    def __init__(self, tmp_dir, port=None, user="relay", settings=None):
        super().__init__(tmp_dir, port)
        self.bindir = _postgres_bindir()
        self.user = user
        self.password = secrets.token_hex(16)
        # Extra `-c name=value` server settings, e.g. {"max_connections": 200}.
        self.settings = {"fsync": "off", **(settings or {})}
        self.os_user = "postgres" if _is_root() else None
        self.root = None  # private dir: data/ and the unix socket, made by the first start()
        self.data_dir = None
        self.initdb_seconds = None

    def _as_server_user(self):
        """Popen arguments that run a program as the OS user owning the cluster."""
        if self.os_user is None:
            return {}
        return {"user": self.os_user, "group": self.os_user, "extra_groups": []}

    def _initdb(self):
        """Create the cluster: superuser self.user with our password, fsync-free."""
        began = time.monotonic()
        self.root = _private_dir("relay-pg-", owner=self.os_user)
        # The socket lives here: others (root's psql, other users' clients) may traverse it.
        self.root.chmod(0o711)
        self.data_dir = self.root / "data"
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        password_file.chmod(0o600)
        if self.os_user is not None:
            shutil.chown(password_file, self.os_user, self.os_user)
        result = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "--pgdata",
                str(self.data_dir),
                "--username",
                self.user,
                "--pwfile",
                str(password_file),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-locale",
                "--encoding=UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.root,
            env=_clean_env(LC_ALL="C"),
            timeout=120,
            **self._as_server_user(),
        )
        password_file.unlink()
        if result.returncode != 0:
            # No half-made cluster for the next start() to trust: it will initdb again.
            _remove_private_dir(self.root)
            self.root = self.data_dir = None
            raise ServerError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        self.initdb_seconds = time.monotonic() - began

    def _prepare(self):
        """initdb on the first start."""
        if self.root is None:
            self._initdb()

    def _command(self):
        """postgres itself (not pg_ctl), so our Popen is the postmaster and kill() can reach it."""
        command = [
            str(self.bindir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-h",
            "127.0.0.1",
            "-k",
            str(self.root),
        ]
        for name, value in self.settings.items():
            command += ["-c", f"{name}={value}"]
        return command

    def _popen_options(self):
        """Run as the postgres OS user when we are root."""
        return {"cwd": self.root, "env": _clean_env(LC_ALL="C"), **self._as_server_user()}

    def _ready(self):
        """postmaster.pid says ready with our pid and port, and TCP answers from our data dir."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        # Lines: pid, data dir, start time, port, socket dir, listen address, shm key, status.
        if len(lines) < 8 or lines[0] != str(self.process.pid) or lines[3] != str(self.port):
            return False
        if lines[7].strip() != "ready":
            return False
        result = self._psql("SHOW data_directory", "postgres", tcp=True, check=False)
        if result.returncode != 0:
            return False
        if Path(result.stdout.strip()).resolve() != self.data_dir.resolve():
            raise self._error(f"port {self.port} answers from {result.stdout.strip()}")
        return True

    def url(self, dbname="postgres"):
        """postgresql://user:password@127.0.0.1:port/dbname."""
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def _psql(self, sql, dbname, tcp=False, check=True):
        """Run psql: over TCP with url() (password) or on our unix socket (trust)."""
        if tcp:
            target = [self.url(dbname)]
        else:
            target = ["-h", str(self.root), "-p", str(self.port), "-U", self.user, "-d", dbname]
        result = _run_psql(self.bindir, target, sql)
        if check and result.returncode != 0:
            raise self._error(f"psql failed: {sql!r}:\n{result.stderr}")
        return result

    def query(self, sql, dbname="postgres", tcp=False):
        """Run SQL with psql and return its unaligned, tuples-only output.

        tcp=True connects with url(dbname), as the relay would (password, 127.0.0.1).
        """
        return self._psql(sql, dbname, tcp=tcp).stdout

    def create_database(self, name):
        """Create a fresh, empty database; returns its url()."""
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"database name must match {_DB_NAME.pattern}: {name!r}")
        self.query(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name):
        """Drop a database, closing any connection still using it."""
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"database name must match {_DB_NAME.pattern}: {name!r}")
        self.query(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self, timeout=30.0):
        """Fast shutdown (SIGINT, what `pg_ctl stop -m fast` sends), SIGKILL past the deadline."""
        self._signal_and_wait([(signal.SIGINT, timeout)])

    def kill(self):
        """SIGKILL the postmaster and its backends at once: a crash (the next start recovers)."""
        self._force_kill()

    def cleanup(self):
        """Stop and remove the cluster (its log in tmp_dir stays)."""
        self.stop()
        if self.root is not None:
            _remove_private_dir(self.root)
            self.root = None


class RedisServer(_Server):
    """redis-server without persistence on 127.0.0.1; can be paused (SIGSTOP) to play a hung one."""

    name = "redis"

    def __init__(self, tmp_dir, port=None):
        super().__init__(tmp_dir, port)
        self.binary = _program("redis-server", [shutil.which("redis-server")])
        self.dir = self.tmp_dir / f"redis-{self.number}"
        self.paused = False

    @property
    def url(self):
        """redis://127.0.0.1:port/0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **options):
        """A redis-py client for this server (close it, or use it in a `with`)."""
        options.setdefault("socket_timeout", 5)
        options.setdefault("socket_connect_timeout", 5)
        # redis-py retries with backoff by default: readiness polls and fault tests want one try.
        options.setdefault("retry", Retry(NoBackoff(), 0))
        return redis.Redis(host="127.0.0.1", port=self.port, **options)

    def _prepare(self):
        """Its --dir (nothing is written there: no RDB, no AOF)."""
        self.dir.mkdir(exist_ok=True)
        self.paused = False

    def _command(self):
        """redis-server in the foreground, logging to stdout (our log file)."""
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]

    def _ready(self):
        """Our log says it listens, PING answers and INFO's process_id is our process."""
        # Without the log line a PING could reach whoever holds the port and wait for nothing.
        if "Ready to accept connections" not in self._new_log_text():
            return False
        try:
            with self.client(socket_timeout=1, socket_connect_timeout=1) as client:
                if not client.ping():
                    return False
                pid = client.info("server")["process_id"]
        except redis.RedisError:
            return False
        # Another Redis on the port means our bind failed: our process exits and we retry.
        return pid == self.process.pid

    def pause(self):
        """SIGSTOP: connections are accepted by the kernel but never answered."""
        self.process.send_signal(signal.SIGSTOP)
        _wait_until(lambda: _process_state(self.process.pid) == "T", 10, "SIGSTOP", self._error)
        self.paused = True

    def resume(self):
        """SIGCONT after pause()."""
        self.process.send_signal(signal.SIGCONT)
        _wait_until(lambda: _process_state(self.process.pid) != "T", 10, "SIGCONT", self._error)
        self.paused = False

    def flush(self):
        """FLUSHALL: every database empty."""
        with self.client() as client:
            client.flushall()

    def stop(self, timeout=10.0):
        """SIGTERM (after SIGCONT if paused), SIGKILL past the deadline."""
        if self.paused and self.is_running():
            self.resume()
        self._signal_and_wait([(signal.SIGTERM, timeout)])
        self.paused = False


_NGINX_CONF = """\
# Written by tests/servers.py: every path in the prefix or tmp_dir, never /var or /run.
daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {error_log} notice;
{main}
events {{
    worker_connections 512;
}}

http {{
    access_log {access_log};
    client_body_temp_path {prefix}/client_body_temp;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;

{http}
}}
"""


class NginxServer(_Server):
    """Debian's nginx in the foreground (daemon off) with its prefix, config and pid in temp dirs.

    `config` is what goes inside `http { }` (server blocks, upstreams, limit_req_zone...):
    either a string in which `@PORT@` stands for the port nginx must listen on and `@PREFIX@`
    for its prefix dir (plain text replacement, so nginx's own braces and $variables need no
    escaping), or a function (port, prefix) -> that text. `main` is extra main-context text
    (e.g. `worker_rlimit_nofile 4096;`). Temp paths, the access log and the pid file are set
    here, and the error log is passed with -e: nothing touches /var/log/nginx or /run.
    """

    name = "nginx"

    def __init__(self, tmp_dir, config, port=None, main="", workers=1):
        super().__init__(tmp_dir, port)
        self.binary = _program("nginx", [shutil.which("nginx"), "/usr/sbin/nginx"])
        self.config = config
        self.main = main
        self.workers = workers
        # Outside pytest's 0700 tree: workers (root makes them `nobody`) must reach temp paths.
        self.prefix = _private_dir("relay-nginx-")
        self.prefix.chmod(0o711)
        self.conf_path = self.prefix / "nginx.conf"
        self.pid_path = self.prefix / "nginx.pid"
        self.access_log_path = self.tmp_dir / f"nginx-{self.number}-access.log"

    def config_text(self):
        """The whole nginx.conf for the current port."""
        if callable(self.config):
            http = self.config(self.port, str(self.prefix))
        else:
            http = self.config.replace("@PORT@", str(self.port))
            http = http.replace("@PREFIX@", str(self.prefix))
        return _NGINX_CONF.format(
            workers=self.workers,
            prefix=self.prefix,
            error_log=self.log_path,
            access_log=self.access_log_path,
            main=self.main,
            http=http,
        )

    def _prepare(self):
        """Write nginx.conf for this attempt's port; drop a stale pid file (after a kill)."""
        self.conf_path.write_text(self.config_text())
        self.pid_path.unlink(missing_ok=True)

    def _command(self):
        """nginx with our prefix, config and error log."""
        return [
            self.binary,
            "-p",
            f"{self.prefix}/",
            "-c",
            str(self.conf_path),
            "-e",
            str(self.log_path),
        ]

    def _ready(self):
        """The pid file (written after the bind) names our process, and the port answers."""
        try:
            pid = self.pid_path.read_text().strip()
        except OSError:
            return False
        return pid == str(self.process.pid) and _port_answers(self.port)

    def test_config(self):
        """`nginx -t` on this config: (ok, output)."""
        self.conf_path.write_text(self.config_text())
        result = subprocess.run(
            [*self._command(), "-t"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        return result.returncode == 0, result.stdout + result.stderr

    @property
    def base_url(self):
        """http://127.0.0.1:port."""
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self):
        """PIDs of the master's current children (workers, cache processes)."""
        return _children(self.process.pid)

    def reload(self, config=None, timeout=20.0, wait_old=True):
        """SIGHUP (after writing `config`, if given): returns once new workers run.

        A config that fails `nginx -t` raises instead (nginx would keep the old one silently).
        wait_old also waits for the old workers to exit (they finish open requests first).
        """
        previous = self.config
        if config is not None:
            self.config = config
        ok, output = self.test_config()
        if not ok:
            self.config = previous
            self.conf_path.write_text(self.config_text())
            raise self._error(f"reload with a config nginx -t rejects:\n{output}")
        old = self.worker_pids()
        self.process.send_signal(signal.SIGHUP)

        def reloaded():
            current = self.worker_pids()
            return bool(current - old) and not (wait_old and current & old)

        _wait_until(reloaded, timeout, "new nginx workers after SIGHUP", self._error)

    def stop(self, timeout=10.0):
        """SIGQUIT (graceful), then SIGTERM (fast), then SIGKILL, each with a deadline."""
        self._signal_and_wait([(signal.SIGQUIT, timeout), (signal.SIGTERM, 5.0)])

    def cleanup(self):
        """Stop and remove the prefix (logs in tmp_dir stay)."""
        self.stop()
        _remove_private_dir(self.prefix)


def _database_name(request):
    """A short, unique, valid database name that also says which test it belongs to."""
    words = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower()).strip("_")
    return f"t{next(_COUNTER)}_{words}"[:63]


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """One PostgreSQL for the whole run (initdb once); tests get their own database (pg_url)."""
    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_url(postgres_server, request):
    """postgresql:// URL of a fresh, empty database for this test only (dropped afterwards)."""
    if not postgres_server.is_running():
        postgres_server.start()  # an earlier test stopped or killed the shared server
    name = _database_name(request)
    url = postgres_server.create_database(name)
    yield url
    if postgres_server.is_running():
        postgres_server.drop_database(name)


@pytest.fixture
def postgres_factory(tmp_path):
    """Factory: a PostgreSQL of this test's own (for stop/kill tests); all removed at the end."""
    servers = []

    def make(**options):
        server = PostgresServer(tmp_path, **options)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.cleanup()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One Redis for the whole run; tests use redis_url, which empties it first."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server):
    """redis:// URL of the shared Redis, running, answering and flushed for this test."""
    if not redis_server.is_running():
        redis_server.start()
    if redis_server.paused:
        redis_server.resume()
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def redis_factory(tmp_path):
    """Factory: a Redis of this test's own (for stop/pause tests); all stopped at the end."""
    servers = []

    def make(**options):
        server = RedisServer(tmp_path, **options)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def nginx_factory(tmp_path):
    """Factory: nginx_factory(config, **options) starts an NginxServer; all stopped at the end."""
    servers = []

    def make(config, **options):
        server = NginxServer(tmp_path, config, **options)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.cleanup()
