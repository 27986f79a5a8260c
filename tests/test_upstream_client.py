"""The upstream client: requests without a Session, so no call carries another's cookies and the
relay's environment (proxies, .netrc, CA bundles) changes nothing about where calls go or what
they say; what requests' exceptions mean; compressed replies passed on decoded."""

import contextlib
import gzip
import json
import socket
import ssl
import subprocess
import threading

import pytest
import requests
from conftest import LOG_CAPTURE, UPSTREAM_KEY, auth, close_app, relay_settings
from fake_upstream import json_reply, raw
from requests.exceptions import (
    ChunkedEncodingError,
    ConnectionError,
    ConnectTimeout,
    ContentDecodingError,
    InvalidHeader,
    ReadTimeout,
    SSLError,
)

from relay.app import create_app
from relay.upstream.adapter import ONE_SEND_MAX, CachedHTTPConnection
from relay.upstream.failures import classify

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
# A cookie any cookie jar would keep and send back to 127.0.0.1 for an hour.
COOKIE = "relay_test=from-upstream; Path=/; Max-Age=3600"
GPT_MODELS = {"gpt-3.5-turbo", "gpt-4o", "gpt-3.5"}  # the fake's, with the gpt-3.5 alias
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture
def dead_port():
    """A loopback port that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def hostile_env(tmp_path, dead_port):
    """What a Session would obey: every proxy variable at a dead port, and a .netrc (named
    by NETRC, and in HOME) holding credentials for the fake upstream's host."""
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login netrc-user password netrc-secret\n")
    netrc.chmod(0o600)
    env = dict.fromkeys(PROXY_VARS, f"http://127.0.0.1:{dead_port}")
    env.update(NETRC=str(netrc), HOME=str(tmp_path), NO_PROXY="", no_proxy="")
    return env


@pytest.fixture
def in_hostile_env(monkeypatch, hostile_env):
    """This process in the hostile environment (asked for before `app`: set before it is made)."""
    for name, value in hostile_env.items():
        monkeypatch.setenv(name, value)
    return hostile_env


def assert_clean(recorded, count):
    """`count` calls reached the upstream directly, each with the upstream key alone."""
    assert len(recorded) == count
    for request in recorded:
        assert request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert "cookie" not in request.headers
        assert "proxy-authorization" not in request.headers


def test_the_control_a_session_obeys_the_hostile_environment(in_hostile_env, monkeypatch, fake):
    url = f"{fake.base_url}/models"
    with pytest.raises(requests.exceptions.ProxyError):
        requests.get(url, timeout=5)  # sent to the dead proxy
    assert fake.requests == []
    for name in PROXY_VARS:
        monkeypatch.delenv(name)
    fake.queue(json_reply({"object": "list", "data": []}, headers={"Set-Cookie": COOKIE}))
    with requests.Session() as session:
        session.get(url, headers=auth(UPSTREAM_KEY), timeout=5)
        session.get(url, headers=auth(UPSTREAM_KEY), timeout=5)
    first, second = fake.requests
    assert first.headers["authorization"].startswith("Basic ")  # .netrc's, over the key given
    assert second.headers["cookie"] == "relay_test=from-upstream"  # the jar sent it back


def test_in_process_calls_ignore_proxies_netrc_and_cookies(
    in_hostile_env, app, client, make_key, runner, fake
):
    fake.extra_headers = {"Set-Cookie": COOKIE}
    alice, bob = make_key(), make_key(models="gpt-*")  # bob's /models is the relay's union
    first = client.post("/v1/chat/completions", json=CHAT, headers=auth(alice))
    assert first.status_code == 200
    assert "Set-Cookie" not in first.headers
    streamed = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(bob))
    assert streamed.get_data().endswith(b"data: [DONE]\n\n")
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(bob)).status_code == 200
    models = client.get("/v1/models", headers=auth(bob))
    assert {m["id"] for m in models.get_json()["data"]} == GPT_MODELS
    checked = runner.invoke(args=["upstreams", "check"])
    assert checked.exit_code == 0 and "default key #1: ok" in checked.output
    assert_clean(fake.requests, 5)


def test_gunicorn_calls_ignore_proxies_netrc_and_cookies(relay_server, hostile_env, fake):
    fake.extra_headers = {"Set-Cookie": COOKIE}
    server = relay_server(workers=1, **hostile_env)  # one worker: every call shares its adapter
    alice = server.create_key("alice")
    bob = server.create_key("bob", "--models", "gpt-*")
    url = f"{server.base_url}/v1/chat/completions"
    first = requests.post(url, json=CHAT, headers=auth(alice), timeout=10)
    assert first.status_code == 200
    assert "Set-Cookie" not in first.headers
    with requests.post(
        url, json={**CHAT, "stream": True}, headers=auth(bob), stream=True, timeout=10
    ) as streamed:
        assert b"".join(streamed.iter_content(None)).endswith(b"data: [DONE]\n\n")
    assert requests.post(url, json=CHAT, headers=auth(bob), timeout=10).status_code == 200
    models = requests.get(f"{server.base_url}/v1/models", headers=auth(bob), timeout=10)
    assert {m["id"] for m in models.json()["data"]} == GPT_MODELS
    checked = server.flask("upstreams", "check")  # the CLI, in the same environment
    assert checked.returncode == 0 and "default key #1: ok" in checked.stdout
    assert_clean(fake.requests, 5)


@pytest.fixture
def tls_upstream(tmp_path):
    """(base URL, certificate file) of a TLS server on loopback with a self-signed certificate;
    it answers every request with an empty 200, once its handshake succeeds."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    openssl += ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
    openssl += ["-addext", "subjectAltName=IP:127.0.0.1"]
    made = subprocess.run(
        openssl,
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"openssl cannot make a certificate here: {made.stderr.decode()[-200:]}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve():
        """Accept until stopped; a failed handshake (the client refused us) just ends that one."""
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.settimeout(5)
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(65536)
                    tls.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{listener.getsockname()[1]}/v1", str(cert)
    stop.set()
    thread.join(5)
    listener.close()


def test_https_upstreams_are_checked_against_certifi_alone(
    tls_upstream, monkeypatch, tmp_path, fake
):
    base_url, cert = tls_upstream
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.setenv(name, cert)
    # The control: a Session trusts the certificate the environment names.
    assert requests.get(base_url, timeout=5).status_code == 200
    app = create_app(relay_settings(tmp_path, fake, UPSTREAM_BASE_URL=base_url))
    try:
        key, _ = app.extensions["relay"].store.keys.create("tls")
        reply = app.test_client().post("/v1/chat/completions", json=CHAT, headers=auth(key))
    finally:
        close_app(app)
    assert reply.status_code == 502  # certifi's bundle does not know a self-signed certificate
    assert any("unreachable: SSLError" in line for line in LOG_CAPTURE.lines)


# -- what requests' exceptions mean (relay/upstream/failures.py)


@pytest.mark.parametrize(
    ("exc", "stage", "status", "outcome", "retry", "broken", "rest"),
    [
        (ConnectTimeout(), "send", 504, "upstream_timeout", True, False, True),
        (ConnectionError(), "send", 502, "upstream_error", True, True, True),
        (SSLError(), "send", 502, "upstream_error", True, True, True),
        (ReadTimeout(), "send", 504, "upstream_timeout", False, False, False),
        (InvalidHeader(), "send", 400, "invalid_request", False, False, False),
        (OSError(), "send", 502, "upstream_error", True, True, True),
        (ReadTimeout(), "body", 504, "upstream_timeout", False, False, False),
        (ChunkedEncodingError(), "body", 502, "upstream_error", False, False, False),
        (ContentDecodingError(), "body", 502, "upstream_error", False, False, False),
        (ReadTimeout(), "stream", 504, "upstream_timeout", False, False, False),
        (ChunkedEncodingError(), "stream", 502, "upstream_dropped", False, False, False),
        (ConnectionError(), "stream", 502, "upstream_dropped", False, False, False),
    ],
)
def test_each_exception_means_one_thing(exc, stage, status, outcome, retry, broken, rest):
    failed = classify(exc, stage, read_timeout=120)
    assert failed.error.status == status
    assert (failed.outcome, failed.retry, failed.broken, failed.rest) == (
        outcome,
        retry,
        broken,
        rest,
    )


def test_a_header_that_cannot_be_forwarded_is_400_and_never_sent(client, key, fake):
    reply = client.post(
        "/v1/chat/completions",
        json=CHAT,
        headers=auth(key),
        environ_overrides={"HTTP_USER_AGENT": "one\r\nX-Injected: two"},
    )
    assert reply.status_code == 400
    assert reply.get_json()["error"]["code"] == "invalid_request"
    assert fake.requests == []


def test_whitespace_around_a_header_value_is_forwarded_not_refused(client, key, fake):
    reply = client.post(
        "/v1/chat/completions",
        json=CHAT,
        headers=auth(key),
        environ_overrides={"HTTP_USER_AGENT": " v "},
    )
    assert reply.status_code == 200
    assert fake.requests[-1].headers["user-agent"] == "v"


# -- Content-Encoding: the relay decodes what the upstream compressed, and says so


def gzipped_reply(body, content_type, chunks=None):
    """An HTTP reply whose body is `body` gzipped: Content-Length framed, or in `chunks` chunks."""
    packed = gzip.compress(body)
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Encoding: gzip\r\n"
    if chunks is None:
        return raw(head.encode() + f"Content-Length: {len(packed)}\r\n\r\n".encode() + packed)
    size = -(-len(packed) // chunks)
    pieces = [packed[i : i + size] for i in range(0, len(packed), size)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    return raw(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n" + framed)


def test_a_gzipped_json_reply_is_passed_on_decoded(client, key, fake, app):
    completion = {
        "id": "chatcmpl-gz",
        "object": "chat.completion",
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    fake.queue(gzipped_reply(json.dumps(completion).encode(), "application/json"))
    reply = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert reply.status_code == 200
    assert reply.get_json() == completion
    assert "Content-Encoding" not in reply.headers
    assert fake.requests[-1].headers["accept-encoding"] == "gzip, deflate"
    row = app.extensions["relay"].store.db.query_one("SELECT * FROM usage ORDER BY id DESC")
    assert (row["total_tokens"], row["usage_source"]) == (7, "upstream")


def test_a_gzipped_event_stream_is_passed_on_decoded(client, key, fake):
    events = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\ndata: [DONE]\n\n'
    fake.queue(gzipped_reply(events, "text/event-stream", chunks=3))
    reply = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    assert reply.get_data() == events
    assert "Content-Encoding" not in reply.headers
    assert fake.requests[-1].headers["accept-encoding"] == "identity"  # asked for it plain


def test_a_gzipped_binary_reply_is_passed_on_decoded(client, key, fake):
    audio = bytes(range(256)) * 64
    fake.queue(gzipped_reply(audio, "audio/mpeg"))
    reply = client.post(
        "/v1/audio/speech", json={"model": "tts-1", "input": "hi", "voice": "a"}, headers=auth(key)
    )
    assert reply.get_data() == audio
    assert "Content-Encoding" not in reply.headers


def test_a_corrupt_gzipped_reply_is_a_clean_502(client, key, fake):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
    fake.queue(raw(head + b"Content-Length: 12\r\n\r\nnot gzip at!"))
    reply = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert reply.status_code == 502
    assert reply.get_json()["error"]["code"] == "upstream_error"


# -- one send per request: the head goes out with its body


class SendSpy:
    """A real socket that remembers what each sendall passed to it."""

    def __init__(self, sock):
        self.sock = sock
        self.sent = []

    def sendall(self, data):
        self.sent.append(bytes(data))
        return self.sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def spied_exchange(fake, method, body):
    """Make one request on the relay's own upstream connection class; (sends, reply body)."""
    conn = CachedHTTPConnection("127.0.0.1", fake.port, timeout=10)
    conn.connect()
    spy = conn.sock = SendSpy(conn.sock)
    headers = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, "/v1/chat/completions", body=body, headers=headers)
        reply = conn.getresponse()
        return spy.sent, reply.data  # read in full by urllib3 (preload_content)
    finally:
        conn.close()


def test_a_request_head_and_body_go_out_in_one_send(fake):
    body = json.dumps(CHAT).encode()
    sent, reply = spied_exchange(fake, "POST", body)
    assert len(sent) == 1
    assert sent[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert sent[0].endswith(b"\r\n\r\n" + body)
    assert json.loads(reply)["object"] == "chat.completion"
    assert fake.requests[-1].body == body


def test_a_large_body_follows_its_head_and_a_bodyless_request_still_goes(fake):
    body = json.dumps({**CHAT, "pad": "x" * (ONE_SEND_MAX + 1)}).encode()
    sent, _ = spied_exchange(fake, "POST", body)
    assert [len(part) for part in sent][1:] == [len(body)]  # the upload is never copied
    assert sent[0].endswith(b"\r\n\r\n")
    assert fake.requests[-1].body == body
    sent, reply = spied_exchange(fake, "GET", None)
    assert len(sent) == 1
    assert sent[0].startswith(b"GET /v1/chat/completions HTTP/1.1\r\n")
    assert fake.requests[-1].method == "GET"
    assert reply
