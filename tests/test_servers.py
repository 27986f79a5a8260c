"""The real test servers (tests/servers.py) start, answer, stop and fail as the later tests need."""

import hashlib
import http.server
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis
import requests
import servers
from redis.backoff import NoBackoff
from redis.retry import Retry
from servers import NginxServer, PostgresServer, RedisServer, ServerError, psql

pytestmark = pytest.mark.server


def refused(port):
    """Whether a TCP connect to 127.0.0.1:port is refused (nothing listens there)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _procs():
    """(pid, state, ppid, process group) of every process, read from /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone while we looked
        yield int(stat.parent.name), fields[0], int(fields[1]), int(fields[2])


def family(pid):
    """Live PIDs of a process's children and of its process group, the process included."""
    return {p for p, state, ppid, group in _procs() if state != "Z" and pid in (ppid, group, p)}


def dead(pids):
    """Whether none of `pids` is alive (a zombie holds nothing: it counts as dead)."""
    return not any(state != "Z" for p, state, _, _ in _procs() if p in pids)


def wait_for(condition, timeout=10.0):
    """Poll `condition` until true; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {condition.__doc__}"
        time.sleep(0.02)


@pytest.fixture
def busy_port():
    """A port something else listens on (so a server given it has to move)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_missing_program_skips_unless_root(monkeypatch):
    """Without the program a non-root run skips, saying how to install it; root fails instead."""
    missing = [None, "/nonexistent/bin/nothing"]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match=r"tests/install-system-deps\.sh"):
        servers._program("nothing", missing)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(ServerError, match="nothing is not installed"):
        servers._program("nothing", missing)
    assert servers._program("sh", [None, "/bin/sh"]) == "/bin/sh"


# PostgreSQL


def test_fresh_databases_do_not_share_tables(pg_url, postgres_server):
    """A table made in the test's database exists there and nowhere else."""
    psql(pg_url, "CREATE TABLE marker (id int); INSERT INTO marker VALUES (42)")
    other_url = postgres_server.create_database("servers_other_db")
    try:
        assert pg_url != other_url
        assert psql(pg_url, "SELECT id FROM marker").strip() == "42"
        assert psql(other_url, "SELECT to_regclass('marker') IS NULL").strip() == "t"
        with pytest.raises(ServerError, match='relation "marker" does not exist'):
            psql(other_url, "SELECT id FROM marker")
    finally:
        postgres_server.drop_database("servers_other_db")


def test_pg_url_needs_its_password(pg_url):
    """TCP logins are checked: the URL works, the same URL with a wrong password does not."""
    assert psql(pg_url, "SELECT current_user").strip() == "relay"
    user, rest = pg_url.split("@", 1)
    wrong = user.rsplit(":", 1)[0] + ":not-the-password@" + rest
    with pytest.raises(ServerError, match="password authentication failed"):
        psql(wrong, "SELECT 1")


def test_postgres_stop_start_same_port_keeps_data(postgres_factory):
    """stop() frees the port; start() comes back on the same one with the data."""
    server = postgres_factory()
    url = server.create_database("kept")
    psql(url, "CREATE TABLE t (v text); INSERT INTO t VALUES ('survives')")
    port, first_pid = server.port, server.process.pid

    server.stop()
    assert not server.is_running()
    assert refused(port)

    server.start()
    assert server.port == port and server.process.pid != first_pid
    assert server.url("kept") == url
    assert psql(url, "SELECT v FROM t").strip() == "survives"


def test_postgres_kill_takes_backends_down_then_restart_recovers(postgres_factory):
    """kill() is a crash: postmaster and every backend die at once; a new start recovers."""
    server = postgres_factory()
    url = server.create_database("crash")
    psql(url, "CREATE TABLE t (v int); INSERT INTO t VALUES (7)")
    psql_binary = servers._postgres_bindir() / "psql"
    sleeper = subprocess.Popen(
        [psql_binary, "-X", url, "-c", "SELECT pg_sleep(60)"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def sleeping():
            """the sleeper's query in pg_stat_activity"""
            sql = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"
            return psql(url, sql).strip() == "1"

        wait_for(sleeping)
        processes = family(server.process.pid)
        # Postmaster, checkpointer, background writer, walwriter, ..., the sleeper's backend.
        assert len(processes) >= 5, processes

        server.kill()
        assert not server.is_running()
        assert dead(processes)
        assert refused(server.port)
        assert sleeper.wait(10) != 0  # its connection died with the server
        with pytest.raises(ServerError):
            psql(url, "SELECT 1")
    finally:
        sleeper.kill()
        sleeper.wait()

    server.start()
    assert psql(url, "SELECT v FROM t").strip() == "7"


def test_postgres_moves_off_a_taken_port_but_not_when_pinned(tmp_path, busy_port):
    """A port taken before the first start makes it pick another; a pinned one is an error."""
    server = PostgresServer(tmp_path)
    try:
        server.port = busy_port
        server.start()
        assert server.port != busy_port
        assert server.query("SHOW port", tcp=True).strip() == str(server.port)

        server.stop()
        server.port = busy_port  # as if someone took our port while we were stopped
        with pytest.raises(ServerError, match="taken"):
            server.start()
        assert not server.is_running()
    finally:
        server.cleanup()


# Redis


def test_redis_set_get(redis_url):
    """SET then GET through redis-py on the URL the fixture gives."""
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0
        client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"


def test_redis_pause_times_out_then_resume_answers(redis_factory):
    """A paused Redis makes a 0.2 s socket timeout expire; resumed, the same client answers."""
    server = redis_factory()
    no_retries = Retry(NoBackoff(), 0)  # redis-py's default retries would stretch the timeout
    with redis.Redis.from_url(server.url, socket_timeout=0.2, retry=no_retries) as client:
        client.set("k", "v")
        server.pause()
        began = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.get("k")
        assert 0.15 < time.monotonic() - began < 5
        server.resume()
        assert client.get("k") == b"v"


def test_redis_stop_start_same_port(redis_factory):
    """stop() frees the port; start() is a new, empty Redis on the same one (no persistence)."""
    server = redis_factory()
    port, first_pid = server.port, server.process.pid
    with server.client() as client:
        client.set("k", "v")

    server.stop()
    assert refused(port)

    server.start()
    assert server.port == port and server.process.pid != first_pid
    with server.client() as client:
        assert client.info("server")["process_id"] == server.process.pid
        assert client.get("k") is None


def test_redis_moves_off_a_taken_port(tmp_path, busy_port):
    """A port taken before the first start makes it pick another (and answer there)."""
    server = RedisServer(tmp_path)
    try:
        server.port = busy_port
        server.start()
        assert server.port != busy_port
        with server.client() as client:
            assert client.ping()
    finally:
        server.stop()


# nginx


class _Backend(http.server.BaseHTTPRequestHandler):
    """Replies with the server's token (GET) or the size and hash of the body (POST)."""

    def do_GET(self):
        """The token, so a reply proves it came from this backend."""
        self._reply(self.server.token.encode())

    def do_POST(self):
        """Size and sha256 of what arrived."""
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._reply(f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode())

    def _reply(self, body):
        """200 with a body."""
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        """Quiet."""


@pytest.fixture
def backend():
    """A tiny HTTP server on a free loopback port, in a thread."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    server.daemon_threads = True
    server.token = f"backend-{os.urandom(8).hex()}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


def proxy_config(backend_port):
    """An http-context config proxying everything to the backend."""
    return f"""
    server {{
        listen 127.0.0.1:@PORT@;
        location / {{
            proxy_pass http://127.0.0.1:{backend_port};
        }}
    }}
    """


def test_nginx_proxies_to_backend(nginx_factory, backend):
    """GET and a 1 MiB POST (spooled to client_body_temp by a `nobody` worker) pass through."""
    nginx = nginx_factory(proxy_config(backend.server_address[1]))
    reply = requests.get(nginx.base_url + "/anything", timeout=10)
    assert reply.status_code == 200
    assert reply.text == backend.token
    assert reply.headers["Server"].startswith("nginx")

    body = os.urandom(1 << 20)
    reply = requests.post(nginx.base_url + "/upload", data=body, timeout=30)
    assert reply.text == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
    assert "buffered to a temporary file" in nginx.log_path.read_text()

    processes = family(nginx.process.pid)
    assert len(processes) == 2, processes  # master and its one worker
    nginx.stop()
    assert refused(nginx.port)
    assert dead(processes)


def test_nginx_test_config_rejects_broken_config(tmp_path):
    """nginx -t accepts a good config and rejects a broken one, saying why; start() fails too."""
    good = NginxServer(tmp_path, "server { listen 127.0.0.1:@PORT@; return 204; }")
    broken = NginxServer(tmp_path, "server { listen 127.0.0.1:@PORT@; no_such_directive on; }")
    try:
        ok, output = good.test_config()
        assert ok, output
        ok, output = broken.test_config()
        assert not ok
        assert 'unknown directive "no_such_directive"' in output
        with pytest.raises(ServerError, match="no_such_directive"):
            broken.start()
        assert not broken.is_running()
    finally:
        good.cleanup()
        broken.cleanup()


def test_nginx_reload_switches_config(nginx_factory):
    """reload() serves the new config with new workers; a broken one is refused, the old stays."""
    nginx = nginx_factory("server { listen 127.0.0.1:@PORT@; return 200 'one'; }")
    assert requests.get(nginx.base_url, timeout=10).text == "one"
    old_workers = nginx.worker_pids()

    nginx.reload("server { listen 127.0.0.1:@PORT@; return 200 'two'; }")
    assert requests.get(nginx.base_url, timeout=10).text == "two"
    assert nginx.worker_pids().isdisjoint(old_workers)

    with pytest.raises(ServerError, match="nginx -t rejects"):
        nginx.reload("server { listen 127.0.0.1:@PORT@; return 200 'three' }")
    assert requests.get(nginx.base_url, timeout=10).text == "two"
