"""deploy/ for real: the systemd unit checked and its signals sent, nginx in front of gunicorn."""

import contextlib
import grp
import http.client
import io
import itertools
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import dotenv
import pytest
import requests
from conftest import SECRETS_SEEN, UPSTREAM_KEY, RelayServer, auth
from fake_upstream import json_reply, sse_reply
from test_streaming import CHAT, chunk, read_events, wait_for_row

from relay.serve import gunicorn_conf
from relay.serve.launch import free_port, procfile_command
from relay.store.db import SQLiteDatabase
from relay.store.keys import KeyStore

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "relay.service"
NGINX_CONF = DEPLOY / "nginx.conf"
# What the shipped files name, and what the tests put in their place in a rendered copy.
SRV = "/srv/relay"
SRV_BIN = "/srv/relay/.venv/bin/"
UNIT_BIND = "127.0.0.1:8000"
NGINX_LISTEN = "    listen 80;\n"
NGINX_UPSTREAM = f"    server {UNIT_BIND};\n"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
MIB = 1024 * 1024
CHAT_PLAIN = {**CHAT, "stream": False}

needs_nginx = pytest.mark.skipif(
    not os.access(NGINX, os.X_OK), reason="nginx is not installed (Debian package nginx)"
)
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)"
)


# --- the systemd unit -------------------------------------------------------------------


def unit_entries(text):
    """(section, key, value) for every setting of a unit file, in order (keys may repeat)."""
    entries, section = [], None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_settings(text):
    """The [Service] settings as a dict of key to its last value."""
    return {key: value for section, key, value in unit_entries(text) if section == "Service"}


def render_unit(text, user, group):
    """The shipped unit with this checkout's paths and an existing user, everything else kept.

    systemd-analyze verify checks that ExecStart's program exists, so the venv's bin
    directory replaces /srv/relay/.venv/bin/ and the checkout replaces /srv/relay.
    """
    bindir = os.path.dirname(sys.executable) + "/"
    text = text.replace(SRV_BIN, bindir).replace(SRV, str(ROOT))
    text = re.sub(r"(?m)^User=.*$", f"User={user}", text)
    return re.sub(r"(?m)^Group=.*$", f"Group={group}", text)


def unprivileged_account():
    """An existing unprivileged user and its group (systemd warns about `nobody` itself)."""
    for name in ("daemon", "bin", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return name, grp.getgrgid(entry.pw_gid).gr_name
    pytest.skip("no unprivileged system user to render the unit with")


def systemd_verify(path):
    """Run systemd-analyze verify on a unit file; returns the completed process."""
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify_without_a_warning(tmp_path):
    shipped = UNIT.read_text()
    user, group = unprivileged_account()
    rendered = render_unit(shipped, user, group)
    # The rendering touched only the paths and the account, line for line.
    changed = [
        (a, b) for a, b in zip(shipped.splitlines(), rendered.splitlines(), strict=True) if a != b
    ]
    assert changed, "nothing was rendered"
    for before, _ in changed:
        assert SRV in before or before.startswith(("User=", "Group=")), before
    path = tmp_path / "relay.service"
    path.write_text(rendered)
    result = systemd_verify(path)
    assert result.returncode == 0, result.stderr
    # verify exits 0 on unknown keys and unparsable values too; it only warns about them.
    assert result.stderr.strip() == ""
    # ...which this check does catch.
    path.write_text(rendered.replace("LockPersonality=yes", "LockPersonality=yes\nNoSuchOption=1"))
    assert "NoSuchOption" in systemd_verify(path).stderr


@needs_systemd_analyze
def test_unit_hardening_scores_ok_in_systemd_analyze_security(tmp_path):
    user, group = unprivileged_account()
    path = tmp_path / "relay.service"
    path.write_text(render_unit(UNIT.read_text(), user, group))
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for relay\.service: ([\d.]+)", result.stdout)
    assert found, result.stdout + result.stderr
    # 0 is a sealed box, 10 an unprotected service; a network service cannot get near 0.
    assert float(found.group(1)) <= 2.0, result.stdout


def test_unit_runs_the_procfile_command_with_hardening_and_graceful_signals():
    text = UNIT.read_text()
    service = unit_settings(text)
    # ExecStart is the Procfile's web command: absolute venv path, ${VAR:-default} as ${VAR}
    # (systemd has no defaults syntax: Environment= carries them), loopback bind.
    procfile = procfile_command()
    defaults = dict(re.findall(r"\$\{(\w+):-([^}]*)\}", procfile))
    expected = re.sub(r"\$\{(\w+):-[^}]*\}", r"${\1}", procfile)
    expected = expected.replace("${RELAY_BIND}:${PORT}", UNIT_BIND)
    assert shlex.split(service["ExecStart"]) == [SRV_BIN + "gunicorn", *shlex.split(expected)[1:]]
    environment = dict(item.split("=", 1) for item in shlex.split(service["Environment"]))
    assert environment == {
        name: value for name, value in defaults.items() if name not in ("RELAY_BIND", "PORT")
    }
    assert service["EnvironmentFile"] == f"-{SRV}/.env"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillMode"] == "mixed"
    # systemd must never cut streams the relay is still allowed to finish.
    assert int(service["TimeoutStopSec"]) > gunicorn_conf.graceful_timeout
    expected_settings = {
        "Type": "notify",
        "User": "relay",
        "WorkingDirectory": SRV,
        "Restart": "on-failure",
        "LimitNOFILE": "65536",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ReadWritePaths": f"{SRV}/instance",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "LockPersonality": "yes",
        "CapabilityBoundingSet": "",
    }
    assert {k: service.get(k) for k in expected_settings} == expected_settings
    # nginx's upstream is the address gunicorn binds.
    assert NGINX_CONF.read_text().count(NGINX_UPSTREAM) == 1


def systemd_env_value(raw):
    """An EnvironmentFile= value as systemd reads it: stripped, unquoted, and `#` kept.

    Only the rules .env.example meets; systemd has no inline comments (systemd issue 12527).
    """
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def test_every_env_example_line_means_the_same_to_systemd_and_the_relay():
    # The unit hands .env to gunicorn through systemd, and systemd's value wins over the
    # relay's own reading of .env (python-dotenv never overrides the environment).
    differ = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        assignment = re.fullmatch(r"#? ?([A-Z][A-Z0-9_]*)=(.*)", line)
        if assignment is None:
            continue
        name, raw = assignment.groups()
        uncommented = f"{name}={raw}"
        dotenv_value = dotenv.dotenv_values(stream=io.StringIO(uncommented))[name]
        if systemd_env_value(raw) != dotenv_value:
            differ.append(line)
    assert differ == []


def database_with_key(path):
    """Create and migrate the relay's database at path, with one key in it; returns the key."""
    db = SQLiteDatabase(str(path))
    try:
        db.migrate()
        key, _ = KeyStore(db).create("k")
    finally:
        db.close()
    SECRETS_SEEN.add(key)
    return key


@pytest.fixture
def prepared_relay(relay_server, tmp_path):
    """Factory like relay_server, on a database prepared beforehand: (server, a key)."""

    def start(**env):
        key = database_with_key(tmp_path / "relay.sqlite")
        return relay_server(**env), key

    return start


@pytest.mark.server
def test_a_database_locked_at_start_delays_the_relay_but_does_not_stop_it(tmp_path, fake):
    # A lock on a not yet migrated file, as a sibling worker's or a CLI's migration holds it
    # on a busy machine, lasting 2 s from the moment a worker opens the file. The relay
    # waits up to RELAY_DB_WRITE_TIMEOUT (30 s) for locks elsewhere.
    path = tmp_path / "relay.sqlite"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE placeholder (x)")
    holder.execute("BEGIN EXCLUSIVE")
    env = {"RELAY_UPSTREAM_BASE_URL": fake.base_url, "RELAY_UPSTREAM_API_KEY": UPSTREAM_KEY}
    server = RelayServer(tmp_path, env, workers=2)

    def release_after_a_worker_opened_the_file():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not opened_by_a_worker(server, path):
            time.sleep(0.01)
        time.sleep(2.0)  # the lock's length: far past the 20 ms, far below the 30 s
        holder.execute("COMMIT")

    release = threading.Thread(target=release_after_a_worker_opened_the_file, daemon=True)
    release.start()
    try:
        server.start(timeout=60)
        assert requests.get(server.base_url + "/healthz", timeout=10).status_code == 200
    finally:
        release.join()
        holder.close()
        server.stop()


def opened_by_a_worker(server, path):
    """Whether a gunicorn worker holds the file open (or gunicorn is gone: stop waiting)."""
    if server.process is None:
        return False
    if server.process.poll() is not None:
        return True
    for pid in server.worker_pids():
        with contextlib.suppress(OSError):
            fds = Path(f"/proc/{pid}/fd")
            if any(os.path.realpath(fd) == os.path.realpath(path) for fd in fds.iterdir()):
                return True
    return False


@pytest.mark.server
def test_gunicorn_tells_systemd_when_it_listens(prepared_relay, tmp_path):
    # Type=notify relies on gunicorn sending READY=1 to $NOTIFY_SOCKET once it is bound.
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        listener.settimeout(20)
        server, _ = prepared_relay(NOTIFY_SOCKET=path)
        message = listener.recv(4096).decode()
    assert "READY=1" in message.splitlines()
    assert requests.get(server.base_url + "/healthz", timeout=5).status_code == 200


# --- nginx ----------------------------------------------------------------------------


def render_nginx_site(listen_port, upstream_port):
    """deploy/nginx.conf with only its listen port and upstream address changed."""
    text = NGINX_CONF.read_text()
    assert text.count(NGINX_LISTEN) == 1 and text.count(NGINX_UPSTREAM) == 1
    text = text.replace(NGINX_LISTEN, f"    listen 127.0.0.1:{listen_port};\n")
    return text.replace(NGINX_UPSTREAM, f"    server 127.0.0.1:{upstream_port};\n")


class Nginx:
    """nginx in the foreground with deploy/nginx.conf, every file it writes under one directory.

    The wrapper is what Debian's /etc/nginx/nginx.conf gives a conf.d file: an http block
    that includes it. As root, workers run as root too: pytest's temp directories are
    private, and nginx writes request bodies there.
    """

    def __init__(self, directory, upstream_port):
        self.dir = directory
        self.dir.mkdir(exist_ok=True)
        self.upstream_port = upstream_port
        self.conf = self.dir / "nginx.conf"
        self.pid_file = self.dir / "nginx.pid"
        self.error_log = self.dir / "error.log"
        self.process = None
        self.port = None

    def write_config(self, port):
        """Write the wrapper and the rendered site for a listen port."""
        (self.dir / "relay.conf").write_text(render_nginx_site(port, self.upstream_port))
        user = ""
        if os.geteuid() == 0:
            user = f"user {pwd.getpwuid(0).pw_name} {grp.getgrgid(0).gr_name};"
        temps = "\n".join(
            f"    {kind}_temp_path {self.dir / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        self.conf.write_text(
            f"""{user}
worker_processes 1;
pid {self.pid_file};
error_log {self.error_log} info;
events {{ worker_connections 1024; }}
http {{
    access_log {self.dir / "access.log"};
{temps}
    include {self.dir / "relay.conf"};
}}
"""
        )

    def command(self, *args):
        """nginx with this directory as prefix, config and error log."""
        return [NGINX, "-p", f"{self.dir}/", "-c", str(self.conf), "-e", str(self.error_log), *args]

    def check(self):
        """`nginx -t` on the current config; returns the completed process."""
        return subprocess.run(
            self.command("-t"), capture_output=True, text=True, check=False, timeout=30
        )

    def start(self, attempts=5, timeout=15.0):
        """Start on a free port (another if someone takes it first); wait until it serves."""
        for _ in range(attempts):
            self.port = free_port()
            self.write_config(self.port)
            self.error_log.unlink(missing_ok=True)  # each attempt's failure judged on its own
            self.process = subprocess.Popen(
                self.command("-g", "daemon off;"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            if self._wait_serving(timeout):
                return self
            self.process.wait(timeout=timeout)
            if "Address already in use" not in self.log():
                break
        raise RuntimeError(f"nginx did not start:\n{self.log()}")

    def _wait_serving(self, timeout):
        """True once the pid file names our master and the port accepts; False if it exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            ours = self.pid_file.exists() and self.pid_file.read_text().strip() == str(
                self.process.pid
            )
            if ours:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return True
                except OSError:
                    pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nginx did not serve within {timeout} s:\n{self.log()}")

    @property
    def base_url(self):
        """http://127.0.0.1:<port>."""
        return f"http://127.0.0.1:{self.port}"

    def log(self):
        """nginx's error log so far."""
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""

    def stop(self):
        """Graceful stop (SIGQUIT), then fast (SIGTERM), then SIGKILL to its group; always reap."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGQUIT, 5), (signal.SIGTERM, 5)):
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def nginx(tmp_path):
    """Factory: nginx with deploy/nginx.conf in front of a port; all stopped at the end."""
    started = []

    def start(upstream_port):
        proxy = Nginx(tmp_path / f"nginx{len(started)}", upstream_port)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


def error_of(reply):
    """The error object of a JSON error reply, checking it is JSON and OpenAI-shaped."""
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] is None
    return body


@needs_nginx
def test_nginx_accepts_the_site(tmp_path):
    proxy = Nginx(tmp_path, upstream_port=8000)
    proxy.write_config(8080)
    result = proxy.check()
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


@needs_nginx
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")
def test_nginx_accepts_the_commented_https_variant(tmp_path):
    # The commented HTTPS lines, switched on with a throwaway certificate.
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=relay.test", "-keyout", str(key), "-out", str(cert)),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    tls = Nginx(tmp_path / "tls", upstream_port=8000)
    tls.write_config(8443)
    site = tls.dir / "relay.conf"
    text = site.read_text().replace("    listen 127.0.0.1:8443;\n", "")
    text = re.sub(r"(?m)^    # (listen 443 ssl.*|ssl_certificate.*)$", r"    \1", text)
    text = text.replace("listen 443", "listen 127.0.0.1:8443")
    text = re.sub(r"ssl_certificate +\S+;", f"ssl_certificate {cert};", text)
    text = re.sub(r"ssl_certificate_key +\S+;", f"ssl_certificate_key {key};", text)
    assert text.count("ssl_certificate") == 2 and "listen 127.0.0.1:8443 ssl" in text
    site.write_text(text)
    result = tls.check()
    assert result.returncode == 0, result.stderr


@needs_nginx
@pytest.mark.server
def test_stream_through_nginx_keeps_its_timing(prepared_relay, fake, nginx):
    # Pacing off, as in test_streaming: a busy box must not make the relay bunch events.
    server, key = prepared_relay(RELAY_STREAM_MAX_PAUSE="0", RELAY_PROXY_COUNT="1")
    proxy = nginx(server.port)
    events = [chunk(n) for n in range(20)] + ["[DONE]"]
    # Buffering would show on every attempt; a busy machine's one-off hiccup (a gap of
    # 100 ms in either run) on one at most.
    for _ in range(3):
        runs = {}
        for name, base in (("direct", server.base_url), ("nginx", proxy.base_url)):
            fake.queue(sse_reply(events, interval=0.05))
            with requests.post(
                base + "/v1/chat/completions", json=CHAT, headers=auth(key), stream=True, timeout=20
            ) as reply:
                assert reply.status_code == 200
                runs[name] = read_events(reply)
        direct, proxied = runs["direct"], runs["nginx"]
        assert [e for _, e in proxied] == [e for _, e in direct] and len(proxied) == 21
        assert proxied[-1][1] == b"data: [DONE]"
        # Each event arrived on its own, as the upstream sent it, not gathered at the end.
        assert len({t for t, _ in proxied}) == len(proxied)
        assert proxied[-1][0] - proxied[0][0] > 0.8
        # ...spaced as when calling the relay directly: nginx neither gathers events nor holds
        # some back. (Gaps, not arrival times: the fake's pacing delays add up along a stream.)
        gaps = {
            name: [b[0] - a[0] for a, b in itertools.pairwise(run)] for name, run in runs.items()
        }
        nginx_gaps, direct_gaps = gaps["nginx"], gaps["direct"]
        if (
            abs(max(nginx_gaps) - max(direct_gaps)) < 0.03
            and abs(min(nginx_gaps) - min(direct_gaps)) < 0.03
            and abs(statistics.median(nginx_gaps) - statistics.median(direct_gaps)) < 0.01
        ):
            break
    else:
        raise AssertionError(f"gaps through nginx differ from direct ones: {gaps}")


@needs_nginx
@pytest.mark.server
def test_client_hang_up_through_nginx_closes_the_upstream_stream(prepared_relay, fake, nginx):
    server, key = prepared_relay(RELAY_PROXY_COUNT="1")
    proxy = nginx(server.port)
    # One event, then silence: only the hang-up itself can end this stream.
    fake.queue(sse_reply([chunk(0)], hang_after=1))
    body = json.dumps(CHAT).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay.test\r\n"
            + b"Content-Type: application/json\r\n"
            + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while b"w0" not in received:
            data = sock.recv(65536)
            assert data, received
            received += data
        closed_at = time.monotonic()
    upstream_closed = fake.wait_stream_closed(timeout=5)
    assert upstream_closed is not None, "the upstream stream stayed open"
    assert upstream_closed - closed_at < 1.0
    assert wait_for_row(server)["outcome"] == "client_disconnected"


def get_from(port, source, path, headers):
    """GET on a fresh connection from a chosen loopback source address: status, headers, body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers)
        reply = conn.getresponse()
        body = reply.read()
        return reply.status, reply.headers, body
    finally:
        conn.close()


@needs_nginx
@pytest.mark.server
def test_address_limit_counts_the_real_client_not_a_forged_forwarded_for(
    prepared_relay, fake, nginx
):
    server, _ = prepared_relay(RELAY_PROXY_COUNT="1", RELAY_UNAUTHENTICATED_RPM="3")
    proxy = nginx(server.port)

    def forged():
        return {"X-Forwarded-For": f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.7"}

    # Straight to the relay, nothing appends the real peer: with one trusted hop, each
    # forged value counts as a new address. nginx is what makes the limit hold.
    direct = [get_from(server.port, "127.0.0.1", "/v1/models", forged())[0] for _ in range(5)]
    assert direct == [401] * 5
    statuses = [get_from(proxy.port, "127.0.0.1", "/v1/models", forged()) for _ in range(4)]
    assert [s for s, _, _ in statuses] == [401, 401, 401, 429]
    _, headers, body = statuses[-1]
    assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
    assert int(headers["Retry-After"]) > 0
    # Another real client address has its own budget.
    assert get_from(proxy.port, "127.0.0.2", "/v1/models", forged())[0] == 401
    assert fake.requests == []


@needs_nginx
@pytest.mark.server
def test_body_over_32_mib_gets_nginx_json_413_and_at_the_limit_passes(prepared_relay, fake, nginx):
    server, key = prepared_relay(RELAY_PROXY_COUNT="1")  # the relay's default limit: 32 MiB
    proxy = nginx(server.port)
    url = proxy.base_url + "/v1/chat/completions"
    headers = {**auth(key), "Content-Type": "application/json"}
    shell = json.dumps({**CHAT_PLAIN, "messages": [{"role": "user", "content": ""}]}).encode()
    cut = shell.index(b'""') + 1
    fill = 32 * MIB - len(shell)
    at_limit = shell[:cut] + b"x" * fill + shell[cut:]
    assert len(at_limit) == 32 * MIB
    reply = requests.post(url, data=at_limit, headers=headers, timeout=60)
    assert reply.status_code == 200, reply.text
    assert len(fake.requests[-1].body) >= 32 * MIB - 100
    over = shell[:cut] + b"x" * (fill + 1) + shell[cut:]
    for body in (over, iter([over[: 16 * MIB], over[16 * MIB :]])):  # sized, then chunked
        reply = requests.post(url, data=body, headers=headers, timeout=60)
        assert reply.status_code == 413
        assert error_of(reply)["error"]["code"] == "request_too_large"
        assert reply.headers["Server"] == "nginx"
    # nginx refused both bodies itself; the relay never saw them.
    assert "client intended to send too large body" in proxy.log()
    assert "client intended to send too large chunked body" in proxy.log()
    assert len(fake.requests) == 1


@needs_nginx
@pytest.mark.server
def test_relay_errors_pass_through_nginx_untouched(prepared_relay, fake, nginx):
    server, key = prepared_relay(RELAY_PROXY_COUNT="1", RELAY_MAX_BODY_BYTES=str(MIB))
    proxy = nginx(server.port)
    two_mib = json.dumps({**CHAT_PLAIN, "pad": "x" * 2 * MIB}).encode()
    replies = {}
    for name, base in (("direct", server.base_url), ("nginx", proxy.base_url)):
        too_large = requests.post(
            base + "/v1/chat/completions", data=two_mib, headers=auth(key), timeout=30
        )
        fake.queue(json_reply({"oops": True}, status=500))
        broken = requests.post(
            base + "/v1/chat/completions", json=CHAT_PLAIN, headers=auth(key), timeout=30
        )
        replies[name] = (too_large, broken)
    for direct, proxied in zip(replies["direct"], replies["nginx"], strict=True):
        assert proxied.status_code == direct.status_code
        assert proxied.content == direct.content
    assert replies["nginx"][0].status_code == 413
    assert error_of(replies["nginx"][0])["error"]["code"] == "request_too_large"
    assert replies["nginx"][1].status_code == 502
    assert error_of(replies["nginx"][1])["error"]["code"] == "upstream_error"
    assert "too large" not in proxy.log()  # that 413 was the relay's


@needs_nginx
@pytest.mark.server
def test_relay_down_gives_json_502_and_nginx_own_errors_are_json(prepared_relay, fake, nginx):
    server, _ = prepared_relay(RELAY_PROXY_COUNT="1")
    proxy = nginx(server.port)
    assert requests.get(proxy.base_url + "/healthz", timeout=10).status_code == 200
    server.stop()
    reply = requests.get(proxy.base_url + "/v1/models", timeout=10)
    assert reply.status_code == 502
    assert error_of(reply)["error"]["code"] == "upstream_error"
    assert reply.headers["Server"] == "nginx"  # no version
    # The legacy face's clients read "code" and "msg" at the top level.
    legacy = requests.post(proxy.base_url + "/api/v1/chat/completions", json={}, timeout=10)
    assert legacy.status_code == 502
    body = error_of(legacy)
    assert body["code"] == 502 and body["msg"] == body["error"]["message"]
    # Requests nginx refuses before any location: its own 400, as JSON too (a request line it
    # cannot parse at all is the case a named error location would turn into an HTML 500).
    for request, shape in (
        (b"GET /v1/models HTTP/1.1\r\n\r\n", "openai"),  # no Host
        (b"GARBAGE\r\n\r\n", "openai"),
        (
            b"GET /api/v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
            "legacy",
        ),
    ):
        status, head, body = raw_exchange(proxy.port, request)
        assert status == 400 and "content-type: application/json" in head, (request, head)
        assert body["error"]["code"] == "invalid_request"
        assert ("code" in body) == (shape == "legacy")
    # The error pages' own addresses are not reachable from outside.
    status, head, body = raw_exchange(proxy.port, b"GET /_relay_error/502 HTTP/1.0\r\n\r\n")
    assert status == 404 and body["error"]["code"] == "not_found"


def raw_exchange(port, request):
    """Send raw bytes, read until nginx closes: (status, lower-cased head, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while data := sock.recv(65536):
            reply += data
    head, _, payload = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode().lower(), json.loads(payload)


# --- the unit's signals, as systemd sends them --------------------------------------------

# Long enough that workers end on their own: a graceful stop waits for open streams and
# for nginx to drop its idle keep-alive connections (keepalive_timeout 4s).
GRACEFUL = "--graceful-timeout 20"
FORCED = ("graceful timeout", "SIGKILL")  # what gunicorn logs when it had to cut workers


def stream_in_thread(url, key):
    """Start a stream in a thread; returns (thread, result dict with 'events' or 'error')."""
    result = {"first": threading.Event()}

    def run():
        try:
            with requests.post(url, json=CHAT, headers=auth(key), stream=True, timeout=30) as reply:
                got, buffer = [], b""
                for data in reply.iter_content(chunk_size=None):
                    buffer += data
                    while b"\n\n" in buffer:
                        event, buffer = buffer.split(b"\n\n", 1)
                        got.append(event)
                        result["first"].set()
                result["events"] = got
        except requests.RequestException as exc:
            result["error"] = exc
        finally:
            result["first"].set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def is_stream_request(req):
    """Match the streamed chat call (the fake's queue must not hand its reply to others)."""
    return isinstance(req.json, dict) and req.json.get("stream") is True


@needs_nginx
@pytest.mark.server
def test_reload_signal_keeps_open_streams_and_serving(prepared_relay, fake, nginx):
    # ExecReload sends HUP: new workers start, old ones finish their streams.
    server, key = prepared_relay(RELAY_PROXY_COUNT="1", GUNICORN_CMD_ARGS=GRACEFUL)
    proxy = nginx(server.port)
    url = proxy.base_url + "/v1/chat/completions"
    events = [chunk(n) for n in range(30)] + ["[DONE]"]
    fake.queue(sse_reply(events, interval=0.05, match=is_stream_request))
    old_workers = set(server.worker_pids())
    thread, result = stream_in_thread(url, key)
    assert result["first"].wait(10) and "error" not in result
    os.kill(server.process.pid, signal.SIGHUP)
    statuses = []
    deadline = time.monotonic() + 20
    while not (set(server.worker_pids()).isdisjoint(old_workers) and len(statuses) >= 10):
        assert time.monotonic() < deadline, (server.worker_pids(), old_workers)
        reply = requests.post(url, json=CHAT_PLAIN, headers=auth(key), timeout=10)
        statuses.append(reply.status_code)
    assert set(statuses) == {200}
    thread.join(30)
    assert "error" not in result, result
    assert len(result["events"]) == len(events)
    assert result["events"][-1] == b"data: [DONE]"
    assert server.process.poll() is None
    assert not any(word in server.output() for word in FORCED), server.output()


@needs_nginx
@pytest.mark.server
def test_stop_signal_to_the_master_lets_open_streams_finish(prepared_relay, fake, nginx):
    # KillMode=mixed: systemd's SIGTERM reaches the gunicorn master only.
    server, key = prepared_relay(RELAY_PROXY_COUNT="1", GUNICORN_CMD_ARGS=GRACEFUL)
    proxy = nginx(server.port)
    events = [chunk(n) for n in range(30)] + ["[DONE]"]
    fake.queue(sse_reply(events, interval=0.05, match=is_stream_request))
    thread, result = stream_in_thread(proxy.base_url + "/v1/chat/completions", key)
    assert result["first"].wait(10) and "error" not in result
    stopped_at = time.monotonic()
    os.kill(server.process.pid, signal.SIGTERM)
    # New calls soon find nobody listening: nginx's JSON 502 while the stream goes on.
    deadline = time.monotonic() + 10
    while (reply := requests.get(proxy.base_url + "/healthz", timeout=10)).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert reply.status_code == 502
    assert error_of(reply)["error"]["code"] == "upstream_error"
    thread.join(30)
    assert "error" not in result, result
    assert len(result["events"]) == len(events)
    assert result["events"][-1] == b"data: [DONE]"
    assert server.process.wait(timeout=30) == 0
    # Every worker ended on its own, well before the graceful timeout.
    assert time.monotonic() - stopped_at < 15
    assert not any(word in server.output() for word in FORCED), server.output()
    # The stream's usage row was written before the worker left.
    assert wait_for_row(server)["outcome"] == "ok"


# --- the unit's system call filter -------------------------------------------------------

STRACE = shutil.which("strace")


def syscall_groups():
    """systemd's system call groups as systemd-analyze lists them (members may be @groups)."""
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "syscall-filter", "--no-pager"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    groups, current = {}, None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), set())
        elif not line.startswith(" "):
            current = None  # a blank line or the closing "# Ungrouped ..." notes
        elif current is not None and not line.strip().startswith("#"):
            current.add(line.strip())
    return groups


def expand(entry, groups):
    """The system calls an entry of SystemCallFilter= names, groups expanded."""
    if not entry.startswith("@"):
        return {entry}
    return set().union(*(expand(member, groups) for member in groups[entry]))


def allowed_syscalls(unit_text):
    """What the unit's SystemCallFilter= lines let through: the allow list minus ~ entries."""
    groups = syscall_groups()
    allowed = set()
    for section, key, value in unit_entries(unit_text):
        if section != "Service" or key != "SystemCallFilter":
            continue
        if value.startswith("~"):
            allowed -= set().union(*(expand(e, groups) for e in value[1:].split()))
        else:
            allowed |= set().union(*(expand(e, groups) for e in value.split()))
    return allowed


def strace_counts(path):
    """System call names from an `strace -c` summary."""
    names, rows = set(), False
    for line in Path(path).read_text().splitlines():
        if line.startswith("------"):
            rows = not rows
            continue
        if rows and line.split():
            names.add(line.split()[-1])
    return names


class TracedRelay(RelayServer):
    """The Procfile's gunicorn under `strace -f -c`: every system call of master and workers."""

    def __init__(self, tmp_path, env, trace_path):
        super().__init__(tmp_path, env)
        self.trace_path = trace_path

    def command(self):
        """strace, then the Procfile's command."""
        plain = super().command().removeprefix("exec ")
        return f"exec {STRACE} -f -qq -c -o {self.trace_path} {plain}"

    def master_pid(self):
        """gunicorn's master: strace's one child (-1 until strace has started it)."""
        children = RelayServer.worker_pids(self)
        return children[0] if children else -1

    def worker_pids(self):
        """The master's children."""
        out = subprocess.run(
            ["pgrep", "-P", str(self.master_pid())], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split()]


@needs_systemd_analyze
@pytest.mark.skipif(STRACE is None, reason="strace is not installed (Debian package strace)")
@pytest.mark.server
def test_the_relay_makes_no_system_call_the_unit_filters_out(tmp_path, fake):
    allowed = allowed_syscalls(UNIT.read_text())
    assert {"epoll_wait", "accept4", "sendto", "prlimit64"} <= allowed
    assert not {"setuid", "mount", "reboot"} & allowed
    trace = tmp_path / "strace.txt"
    env = {"RELAY_UPSTREAM_BASE_URL": fake.base_url, "RELAY_UPSTREAM_API_KEY": UPSTREAM_KEY}
    key = database_with_key(tmp_path / "relay.sqlite")
    server = TracedRelay(tmp_path, env, trace)
    try:
        server.start(timeout=90)
        url = server.base_url + "/v1/chat/completions"
        # What a day brings: streams, plain calls, a bad key, a scrape, a client hanging up,
        # a reload and a stop.
        fake.queue(sse_reply([chunk(n) for n in range(5)] + ["[DONE]"], interval=0.02))
        with requests.post(url, json=CHAT, headers=auth(key), stream=True, timeout=30) as reply:
            assert read_events(reply)[-1][1] == b"data: [DONE]"
        assert requests.post(url, json=CHAT_PLAIN, headers=auth(key), timeout=30).ok
        assert requests.get(server.base_url + "/v1/models", timeout=30).status_code == 401
        assert requests.get(server.base_url + "/metrics", timeout=30).ok
        fake.queue(sse_reply([chunk(0)], hang_after=1))
        with requests.post(url, json=CHAT, headers=auth(key), stream=True, timeout=30) as reply:
            next(reply.iter_content(chunk_size=None))
        assert fake.wait_stream_closed(timeout=10) is not None
        old = set(server.worker_pids())
        os.kill(server.master_pid(), signal.SIGHUP)
        deadline = time.monotonic() + 60
        while len(set(server.worker_pids()) - old) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert requests.post(url, json=CHAT_PLAIN, headers=auth(key), timeout=30).ok
        os.kill(server.master_pid(), signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()
    used = strace_counts(trace)
    assert {"accept4", "epoll_wait", "connect"} <= used  # the trace did see the serving
    if os.geteuid() == 0:
        # SQLite hands its -wal and -shm files to the database's owner, only when run as
        # root (robustFchown); the unit runs the relay as the relay user.
        used.discard("fchown")
    assert used - allowed == set()
