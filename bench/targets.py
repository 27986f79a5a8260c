"""What a bench run talks to: the fake upstream, and the proxies put in front of it."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import tempfile
from urllib.parse import urlsplit, urlunsplit

import psycopg

from bench.processes import PYTHON, ROOT, VENV_BIN, BenchError, free_port, wait_healthy
from relay.serve.launch import procfile_command


class Target:
    """Something that answers POST /v1/chat/completions: the upstream itself or a proxy."""

    name = "direct"
    url = ""
    key = "x"
    proc = None

    def root_pid(self):
        """The pid whose process tree is this target (None: not monitored)."""
        return self.proc.pid if self.proc is not None else None

    def start(self):
        """Start the target and wait until it answers."""

    def stop(self):
        """Stop the target."""

    def usage_outcomes(self):
        """Relay usage rows by outcome (empty for other targets)."""
        return {}


class Direct(Target):
    """The fake upstream, called directly."""

    def __init__(self, upstream):
        """Call the upstream's own URL."""
        self.upstream = upstream
        self.url = f"http://127.0.0.1:{upstream.port}/v1/chat/completions"
        self.proc = upstream.proc


class Upstream:
    """The bench fake upstream (bench/fake_upstream.py), shared by every target of a run."""

    def __init__(self, procs, workdir, stream_seconds, chunks, nprocs, name="upstream"):
        """Choose a port and the stream timing; start() runs it (log and events named `name`)."""
        self.procs = procs
        self.name = name
        self.port = free_port()
        self.events = os.path.join(workdir, f"{name}-events.jsonl")
        self.chunks = chunks
        self.chunk_delay = stream_seconds / chunks
        self.nprocs = nprocs
        self.proc = None

    def start(self):
        """Start it and wait for /healthz."""
        argv = [PYTHON, "-m", "bench.fake_upstream", "--port", str(self.port)]
        argv += ["--chunks", str(self.chunks), "--chunk-delay", f"{self.chunk_delay:g}"]
        argv += ["--procs", str(self.nprocs), "--events", self.events]
        self.proc = self.procs.start(self.name, argv)
        wait_healthy(self.proc, self.port, "/healthz", timeout=15)


class EventLog:
    """Reads the fake upstream's hang-up records as they are appended."""

    def __init__(self, path):
        """Read the file from its start."""
        self.path = path
        self.offset = 0
        self.entries = []

    def read_new(self):
        """Parse lines appended since the last read; return them."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        new = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        self.entries.extend(new)
        return new


def worker_command(model):
    """The Procfile command for a worker model: `gevent` as is, `gthread:N` with N threads."""
    command = procfile_command()
    if model == "gevent":
        return command
    kind, _, threads = model.partition(":")
    if kind != "gthread" or not threads.isdigit():
        raise BenchError(f"unknown worker model {model!r} (use gevent or gthread:N)")
    command, count = re.subn(r"--worker-class\s+\S+", "--worker-class gthread", command)
    if not count:
        raise BenchError("the Procfile command has no --worker-class to replace")
    return f"{command} --threads {threads}"


class Relay(Target):
    """The relay under gunicorn, started like the Procfile says (gthread: flags replaced).

    `postgres` (a server URL) puts its store in a fresh database made on that server for
    this target (dropped again by stop()); otherwise it is a SQLite file in its directory.
    `root` is the checkout the relay runs from (its cwd: gunicorn and flask import `relay`
    from there), `label` names it in the report when several are compared.
    """

    def __init__(self, procs, workdir, upstream, model, postgres=None, root=ROOT, label=""):
        """Choose a port, a temporary directory and the environment; start() runs it."""
        self.procs = procs
        self.model = model
        self.postgres = postgres
        self.root = root
        self.label = label
        self.name = f"relay {model}" + (" pg" if postgres else "") + (f" @{label}" if label else "")
        self.log_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.name)
        self.dir = tempfile.mkdtemp(prefix=f"relay-{model.replace(':', '')}-", dir=workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        self.command = worker_command(model)
        self.database = os.path.join(self.dir, "relay.sqlite")
        if postgres:
            self.database = fresh_database(postgres, f"relay_bench_{self.port}")
        self.env = {
            **os.environ,
            "RELAY_UPSTREAM_BASE_URL": f"http://127.0.0.1:{upstream.port}/v1",
            "RELAY_UPSTREAM_API_KEY": "x",
            "RELAY_DATABASE": self.database,
            "RELAY_SPOOL_FILE": os.path.join(self.dir, "relay.spool.jsonl"),
            "RELAY_RATELIMIT_STORAGE_URI": f"sqlite:///{self.dir}/rl.sqlite",
            "PORT": str(self.port),
            "RELAY_BIND": "127.0.0.1",
            "WEB_CONCURRENCY": "2",
            "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
        }

    def create_key(self, name, *options):
        """Create a relay key with `flask --app app keys create NAME [options]`; return it."""
        made = subprocess.run(
            [os.path.join(VENV_BIN, "flask"), "--app", "app", "keys", "create", name, *options],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        lines = made.stdout.strip().splitlines()
        if made.returncode or not lines:
            raise BenchError(f"`flask keys create` failed: {made.stderr.strip()[-500:]}")
        return lines[-1].strip()

    def start(self):
        """Create the bench key, start gunicorn, wait for /healthz."""
        self.key = self.create_key("bench")
        self.proc = self.procs.start(
            self.log_name, ["/bin/sh", "-c", "exec " + self.command], env=self.env, cwd=self.root
        )
        wait_healthy(self.proc, self.port, "/healthz", timeout=60)

    def stop(self):
        """SIGTERM the master (graceful), SIGKILL after 10 s."""
        if self.proc is not None:
            self.procs.stop(self.proc, signal.SIGTERM, grace=10.0)

    def drop(self):
        """Drop a PostgreSQL target's database (after its books were read)."""
        if self.postgres:
            with psycopg.connect(self.postgres, autocommit=True) as conn:
                name = self.database.rsplit("/", 1)[1]
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def query(self, sql):
        """Rows of a query on the relay's database, opened read-only."""
        if self.postgres:
            with psycopg.connect(self.database) as conn:
                return conn.execute(sql).fetchall()
        conn = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def usage_outcomes(self):
        """Usage rows by outcome, read from the relay's database."""
        try:
            rows = self.query(
                "SELECT stream, outcome, COUNT(*) FROM usage GROUP BY stream, outcome"
            )
        except (sqlite3.Error, psycopg.Error) as exc:
            return {"error": str(exc)}
        return {f"{'stream' if s else 'json'}:{o}": n for s, o, n in rows}


def fresh_database(server, name):
    """CREATE DATABASE `name` on the PostgreSQL at `server` (a URL); the new database's URL."""
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(server)
    return urlunsplit(parts._replace(path="/" + name))


class OpenAIForward(Target):
    """openai-forward (a peer relay) from its own venv, two uvicorn workers, same upstream."""

    name = "openai-forward"

    def __init__(self, procs, workdir, upstream, venv):
        """Choose a port and build the command; start() runs it."""
        self.procs = procs
        self.venv = os.path.abspath(venv)
        self.dir = tempfile.mkdtemp(prefix="openai-forward-", dir=workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        config = [{"base_url": f"http://127.0.0.1:{upstream.port}", "route": "/", "type": "openai"}]
        self.env = {**os.environ, "FORWARD_CONFIG": json.dumps(config)}
        self.argv = [
            os.path.join(self.venv, "bin", "uvicorn"),
            "openai_forward.app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "2",
            "--log-level",
            "warning",
        ]

    def command(self):
        """The exact command line, for the report."""
        return f"FORWARD_CONFIG='{self.env['FORWARD_CONFIG']}' " + " ".join(self.argv)

    def start(self):
        """Start uvicorn in an empty directory (openai-forward reads ./.env) and wait."""
        if not os.path.exists(self.argv[0]):
            raise BenchError(f"{self.argv[0]} not found: pip install openai-forward into it")
        log_name = self.name.replace(" #", "-")
        self.proc = self.procs.start(log_name, self.argv, env=self.env, cwd=self.dir)
        wait_healthy(self.proc, self.port, "/healthz", timeout=60)

    def stop(self):
        """SIGINT (uvicorn's quick stop), then SIGKILL."""
        if self.proc is not None:
            self.procs.stop(self.proc, signal.SIGINT, grace=10.0)
