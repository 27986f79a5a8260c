"""Hostile HTTP on raw sockets against real gunicorn: JSON replies, no redirects.

Whatever gunicorn refuses itself is answered with OpenAI's JSON error shape and the status
gunicorn chose (never its HTML page, never a traceback in the log), and the relay keeps
serving.
"""

import itertools

import pytest
import requests
from conftest import SECRETS_SEEN, UPSTREAM_KEY, RelayServer, relay_settings
from fake_upstream import FakeUpstream
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from raw_http import exchange, request

from relay.app import create_app

pytestmark = pytest.mark.server
HOST = [b"Host: x"]
CHAT_LINE = b"POST /v1/chat/completions HTTP/1.1"
LEGACY_LINE = b"POST /api/v1/chat/completions HTTP/1.1"
HTTP10_LINE = b"POST /v1/chat/completions HTTP/1.0"
CHUNKED = [b"Transfer-Encoding: chunked", b"Content-Type: application/json"]


@pytest.fixture(scope="module")
def upstream():
    """One fake upstream for the module's shared relay."""
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, upstream):
    """One relay under gunicorn (one worker) for the cases that need no settings of their own."""
    env = {
        "RELAY_UPSTREAM_BASE_URL": upstream.base_url,
        "RELAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "RELAY_ADMIN_TOKEN": "admin-token-for-hostile-tests",
    }
    server = RelayServer(tmp_path_factory.mktemp("hostile"), env, workers=1).start()
    yield server
    server.stop()


def still_serving(server):
    """The relay answers /healthz, and nothing it logged is a traceback."""
    assert requests.get(server.base_url + "/healthz", timeout=10).status_code == 200
    assert "Traceback" not in server.output()


def json_error(reply, status, code):
    """Check a refusal: the status, OpenAI's error shape as JSON, and a closed connection."""
    assert reply.status == status, reply.raw[:300]
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["connection"] == "close"
    assert b"<html" not in reply.raw.lower()
    body = reply.json()
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", code)
    assert error["message"]
    return body


def rule_url(rule):
    """A URL the rule matches, with `path` converters filled in."""
    url = rule.rule.replace("<path:path>", "chat/completions")
    return url.replace("<path:filename>", "style.css")


def spellings(url):
    """The URL, with its trailing slash toggled, and with each of its slashes doubled."""
    yield url
    yield url[:-1] if url.endswith("/") and url != "/" else url + "/"
    for n, char in enumerate(url):
        if char == "/":
            yield url[:n] + "/" + url[n:]


def test_no_redirect_is_built_from_the_host_header(relay, upstream, tmp_path):
    app = create_app(relay_settings(tmp_path, upstream))
    rules = list(app.url_map.iter_rules())
    app.extensions["relay"].close()
    tried = 0
    for rule in rules:
        url = rule_url(rule)
        paths = list(spellings(url))
        targets = [(path, path) for path in paths] + [(url, "http://evil.example" + url)]
        for (path, target), method in itertools.product(
            targets, rule.methods - {"HEAD", "OPTIONS"}
        ):
            line = f"{method} {target} HTTP/1.1".encode()
            reply = exchange(relay.port, request(line, host=b"evil.example"))
            tried += 1
            assert reply.status not in (301, 302, 303, 307, 308) or (
                reply.headers["location"].startswith("/")  # the app's own, never from Host
            ), (line, reply.raw[:300])
            assert "evil.example" not in reply.headers.get("location", ""), line
            if "//" in path[1:]:  # werkzeug reads a leading // as one slash
                assert reply.status == 404, (line, reply.raw[:300])
                assert reply.json()["error"]["code"] == "not_found"
    # The empty path of an absolute-form target (werkzeug redirected it to http://<Host>/).
    reply = exchange(relay.port, request(b"GET http://evil.example HTTP/1.1", host=b"evil.example"))
    assert reply.status == 200 and "location" not in reply.headers
    assert tried > 100
    still_serving(relay)


# (request bytes, status gunicorn chose, error code)
REFUSED = {
    "header over 8190 bytes": (
        request(b"GET /healthz HTTP/1.1", [b"X-Big: " + b"a" * 9000]),
        431,
        "request_header_fields_too_large",
    ),
    "over 100 headers": (
        request(b"GET /healthz HTTP/1.1", [b"X-H%d: v" % n for n in range(120)]),
        431,
        "request_header_fields_too_large",
    ),
    "request line over 8190 bytes": (
        request(b"GET /" + b"a" * 9000 + b" HTTP/1.1"),
        414,
        "request_uri_too_large",
    ),
    "Content-Length not a number": (
        request(CHAT_LINE, [b"Content-Length: abc"], b"{}"),
        400,
        "invalid_request",
    ),
    "negative Content-Length": (
        request(CHAT_LINE, [b"Content-Length: -1"]),
        400,
        "invalid_request",
    ),
    "two Content-Lengths": (
        request(CHAT_LINE, [b"Content-Length: 2", b"Content-Length: 3"], b"{}"),
        400,
        "invalid_request",
    ),
    "Content-Length and Transfer-Encoding": (
        request(CHAT_LINE, [b"Content-Length: 5", b"Transfer-Encoding: chunked"], b"0\r\n\r\n"),
        400,
        "invalid_request",
    ),
    "Transfer-Encoding without chunked": (
        request(CHAT_LINE, [b"Transfer-Encoding: gzip"]),
        400,
        "invalid_request",
    ),
    "chunked twice": (
        request(CHAT_LINE, [b"Transfer-Encoding: chunked, chunked"]),
        400,
        "invalid_request",
    ),
    "unknown Transfer-Encoding": (
        request(CHAT_LINE, [b"Transfer-Encoding: foo"]),
        501,
        "not_implemented",
    ),
    "chunked on HTTP/1.0": (
        request(
            b"POST /v1/chat/completions HTTP/1.0", [b"Transfer-Encoding: chunked"], b"0\r\n\r\n"
        ),
        400,
        "invalid_request",
    ),
    "obsolete line folding": (
        request(b"GET /healthz HTTP/1.1", [b"X-A: b", b" c"]),
        400,
        "invalid_request",
    ),
    "garbage request line": (b"GARBAGE\r\n\r\n", 400, "invalid_request"),
    "lower-case method": (request(b"get /healthz HTTP/1.1"), 400, "invalid_request"),
    "HTTP/9.9": (request(b"GET /healthz HTTP/9.9"), 400, "invalid_request"),
    "NUL in the target": (request(b"GET /heal\x00thz HTTP/1.1"), 400, "invalid_request"),
    "bare LF line ends": (b"GET /healthz HTTP/1.1\nHost: x\n\n", 400, "invalid_request"),
    "space in a header name": (
        request(b"GET /healthz HTTP/1.1", [b"Bad Name: x"]),
        400,
        "invalid_request",
    ),
    "header line without a colon": (
        request(b"GET /healthz HTTP/1.1", [b"NoColonHere"]),
        400,
        "invalid_request",
    ),
    "control byte in a value": (
        request(b"GET /healthz HTTP/1.1", [b"X-A: a\x01b"]),
        400,
        "invalid_request",
    ),
    "two Host headers": (request(b"GET /healthz HTTP/1.1", HOST), 400, "invalid_request"),
    "unknown expectation": (
        request(CHAT_LINE, [b"Expect: teapot", b"Content-Length: 2"], b"{}"),
        417,
        "expectation_failed",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_gunicorn_refuses_is_json(relay, case):
    data, status, code = REFUSED[case]
    json_error(exchange(relay.port, data), status, code)
    still_serving(relay)


@pytest.mark.parametrize("line", [LEGACY_LINE, b"POST /index.php/api/v1/chat/completions HTTP/1.1"])
def test_refusals_on_the_legacy_face_carry_its_envelope(relay, line):
    body = json_error(
        exchange(relay.port, request(line, [b"Content-Length: 1", b"Content-Length: 2"])),
        400,
        "invalid_request",
    )
    assert body["code"] == 400
    assert body["msg"] == body["error"]["message"]


def test_refusal_messages_never_echo_the_request(relay):
    # A malformed header line may hold a key; gunicorn's own page quotes it back (and logs it).
    secret = b"sk-relay-never-echoed-0123456789"
    SECRETS_SEEN.add(secret.decode())  # the audit at the end of the run looks for it too
    reply = exchange(relay.port, request(b"GET /healthz HTTP/1.1", [b"Authorization " + secret]))
    json_error(reply, 400, "invalid_request")
    assert secret not in reply.raw
    assert secret.decode() not in relay.output()


def test_malformed_body_left_unread_just_closes(relay):
    # /healthz reads no body: its answer goes out, then gunicorn's drain of the body
    # fails. Nothing more may be written (gunicorn wrote an HTML 400 after the 200).
    data = request(b"GET /healthz HTTP/1.1", CHUNKED, b"zz\r\n\r\n")
    reply = exchange(relay.port, data, until_close=True)
    assert reply.status == 200
    assert reply.raw.count(b"HTTP/1.1") == 1
    assert reply.raw.endswith(reply.body)
    still_serving(relay)


# Hypothesis: request heads of every shape; the answer is JSON or nothing, never HTML or a 5xx.
VALID = {
    "method": st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE"]),
    "target": st.sampled_from(
        [b"/healthz", b"/v1/models", b"/v1/chat/completions", b"/api/v1/chat/completions"]
    ),
    "version": st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
    "end": st.just(b"\r\n"),
    "headers": st.lists(
        st.sampled_from(
            [b"Accept: */*", b"Content-Length: 0", b"Connection: close", b"X-A: b", b"Expect:"]
        ),
        max_size=3,
    ),
}
header_names = st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Host", b"Expect"])
header_values = st.sampled_from([b"0", b"-1", b"chunked", b"x", b"100-continue", b"1, 2", b""])
GARBAGE = {
    "method": st.sampled_from([b"get", b"G\x00T", b"", b"BREW", b"GET /", b"\xff"])
    | st.binary(max_size=10),
    "target": st.sampled_from([b"/v1//x", b"*", b"", b"/\xff", b"http://h", b"/a b", b"//x"])
    | st.binary(max_size=30),
    "version": st.sampled_from([b"HTTP/2.0", b"HTTP/1", b"http/1.1", b"", b"HTTP/1.1 x"])
    | st.binary(max_size=10),
    "end": st.sampled_from([b"\n", b"\r\n ", b"\r", b"\r\n\t"]),
    "headers": st.lists(
        st.tuples(header_names | st.binary(min_size=1, max_size=12), header_values).map(b": ".join)
        | st.binary(max_size=20),
        min_size=1,
        max_size=6,
    ),
}


@st.composite
def request_heads(draw):
    """A request head, valid to start with, with up to three of its parts made garbage."""
    broken = draw(st.lists(st.sampled_from(sorted(VALID)), max_size=3, unique=True))
    part = {name: draw(GARBAGE[name] if name in broken else VALID[name]) for name in VALID}
    line = b" ".join([part["method"], part["target"], part["version"]])
    return part["target"], part["end"].join([line, b"Host: x", *part["headers"]]) + b"\r\n\r\n"


def human_page(target):
    """Whether a target names one of the relay's HTML pages (the key holder's, /admin)."""
    path = target.split(b"?")[0]
    if path.lower().startswith(b"http://"):
        path = b"/" + path[7:].partition(b"/")[2]
    path = path.lstrip(b"/")
    return path in (b"", b"usage") or path.startswith(b"admin")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request_head=request_heads())
def test_garbage_heads_get_json_or_nothing(relay, request_head):
    target, head = request_head
    reply = exchange(relay.port, head, timeout=15)
    event(f"status {reply.status}")
    assert "Traceback" not in relay.output()
    if reply.status == 0:  # closed unanswered
        assert reply.raw == b"", reply.raw[:300]
        return
    assert reply.status < 500 or reply.status == 501, reply.raw[:300]
    if reply.status >= 400 and not human_page(target):
        assert b"<html" not in reply.raw.lower()
        assert reply.headers["content-type"] == "application/json"
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
