"""Hostile HTTP on raw sockets against real gunicorn: JSON replies, no redirects, no slow holds.

Whatever gunicorn refuses itself, a malformed chunked body, a late head or body: each is
answered with OpenAI's JSON error shape and the status gunicorn chose (never its HTML page,
never a traceback in the log), and the relay keeps serving.
"""

import itertools
import statistics
import threading
import time

import pytest
import requests
from conftest import SECRETS_SEEN, UPSTREAM_KEY, RelayServer, auth, relay_settings
from fake_upstream import sse_reply
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from raw_http import Reply, SlowCrowd, exchange, request, timed_get

from relay.app import create_app

pytestmark = pytest.mark.server
HOST = [b"Host: x"]
CHAT_LINE = b"POST /v1/chat/completions HTTP/1.1"
LEGACY_LINE = b"POST /api/v1/chat/completions HTTP/1.1"
HTTP10_LINE = b"POST /v1/chat/completions HTTP/1.0"
CHUNKED = [b"Transfer-Encoding: chunked", b"Content-Type: application/json"]
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.fixture(scope="module")
def relay(tmp_path_factory, upstream):
    """One relay under gunicorn (one worker) for the cases that need no settings of their own."""
    env = {
        "RELAY_UPSTREAM_BASE_URL": upstream.base_url,
        "RELAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "RELAY_ADMIN_TOKEN": "admin-token-for-hostile-tests",
        # Short, so that requests the relay waits on (hypothesis makes some) end soon.
        "RELAY_CLIENT_HEADER_TIMEOUT": "1.5",
        "RELAY_CLIENT_BODY_TIMEOUT": "1.5",
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
    assert body["error"]["message"].startswith("Content-Length must be one non-negative number")
    # msg in the legacy language (zh by default), said by the worker before the app runs
    assert body["msg"] == "Content-Length 必须是一个非负数，且不能与 Transfer-Encoding 同时出现。"  # noqa: RUF001


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


# Malformed chunked bodies the app reads: a 400 in the face's shape, never a 500.
@pytest.mark.parametrize(
    "body",
    [b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n", b'2;a="\r\n{}\r\n0\r\n\r\n'],
    ids=["bad size", "no terminator", "bad extension"],
)
@pytest.mark.parametrize("line", [CHAT_LINE, LEGACY_LINE], ids=["openai", "legacy"])
def test_malformed_chunked_body_is_400(relay, upstream, line, body):
    reply = exchange(relay.port, request(line, CHUNKED, body))
    answer = json_error(reply, 400, "invalid_request")
    assert "chunked" in answer["error"]["message"]
    if line == LEGACY_LINE:
        assert answer["code"] == 400
    assert upstream.requests == []
    still_serving(relay)


def test_chunked_body_cut_short_is_400(relay):
    reply = exchange(relay.port, request(CHAT_LINE, CHUNKED, b'10\r\n{"a":'), shut=True)
    json_error(reply, 400, "invalid_request")
    still_serving(relay)


# Slow clients: a head or body that does not arrive in time is a 408 and frees its slot.
SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
SLOW_BODY = b"\r\n".join(
    [CHAT_LINE, b"Host: x", b"Content-Type: application/json", b"Content-Length: 1000", b"", b""]
)


def assert_timed_out(crowd, seconds, slack, what):
    """Every connection got a 408 request_timeout JSON reply after `seconds`, then a close."""
    assert crowd.wait_closed(seconds + slack), what
    for client in crowd.clients:
        json_error(Reply.parse(client.received), 408, "request_timeout")
        waited = client.answered_at - crowd.started
        assert seconds - 0.3 < waited < seconds + slack, (what, waited)


@pytest.mark.parametrize(
    ("head", "rest"),
    [(b"", b""), (SLOW_HEAD, b"X-Slow: " + b"a" * 100)],
    ids=["silent", "trickling"],
)
def test_slow_request_head_is_408(relay_server, head, rest):
    server = relay_server(workers=1, RELAY_CLIENT_HEADER_TIMEOUT="1")
    crowd = SlowCrowd(server.port, 3, head, rest, interval=0.2)
    try:
        assert_timed_out(crowd, 1.0, 3.0, "head")
    finally:
        crowd.close()
    still_serving(server)


@pytest.mark.parametrize(
    ("line", "framing", "rest"),
    [
        (CHAT_LINE, b"Content-Length: 1000", b" " * 1000),
        (LEGACY_LINE, b"Content-Length: 1000", b" " * 1000),
        (CHAT_LINE, b"Transfer-Encoding: chunked", b"3e8\r\n" + b" " * 1000),
    ],
    ids=["openai", "legacy", "chunked"],
)
def test_slow_request_body_is_408(relay_server, fake, line, framing, rest):
    server = relay_server(workers=1, RELAY_CLIENT_BODY_TIMEOUT="1")
    head = request(line, [b"Content-Type: application/json", framing])
    crowd = SlowCrowd(server.port, 3, head, rest, interval=0.2)
    try:
        assert_timed_out(crowd, 1.0, 3.0, "body")
    finally:
        crowd.close()
    if line == LEGACY_LINE:
        assert Reply.parse(crowd.clients[0].received).json()["code"] == 408
    assert fake.requests == []
    still_serving(server)


def test_slow_bodies_free_the_connection_slots(relay_server):
    # The report's setup: one worker with 100 connections, all held by trickling bodies.
    server = relay_server(workers=1, RELAY_WORKER_CONNECTIONS="100", RELAY_CLIENT_BODY_TIMEOUT="2")
    crowd = SlowCrowd(server.port, 100, SLOW_BODY, b" " * 1000, interval=0.25)
    try:
        time.sleep(0.5)  # every slot taken
        waited, reply = timed_get(server.port, timeout=10)
        assert reply.status == 200
        assert waited < 2.0 + 3.0  # answered once the bodies timed out, not after they end
        assert_timed_out(crowd, 2.0, 4.0, "bodies")
    finally:
        crowd.close()


def stream_in_thread(server, key, timings):
    """Run one stream through the relay, noting when each piece arrives."""

    def run():
        with requests.post(
            server.base_url + "/v1/chat/completions",
            json={
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
            },
            headers=auth(key),
            stream=True,
            timeout=30,
        ) as reply:
            for data in reply.iter_content(chunk_size=None):
                timings.append((time.monotonic(), data))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def p99(samples):
    """The 99th percentile."""
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


def test_slow_crowds_do_not_slow_the_relay(relay_server, fake):
    # The Procfile's defaults (2 workers, 10000 connections each), 100 connections trickling
    # heads and 100 trickling bodies: /healthz and a running stream keep their pace, and
    # every slow connection is answered 408 when its time is up.
    header_timeout, body_timeout = 4.0, 5.0
    server = relay_server(
        RELAY_CLIENT_HEADER_TIMEOUT=str(header_timeout),
        RELAY_CLIENT_BODY_TIMEOUT=str(body_timeout),
    )
    key = server.create_key("streamer")
    idle = [timed_get(server.port)[0] for _ in range(50)]
    chunk = {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
    fake.queue(sse_reply([chunk] * 60 + ["[DONE]"], interval=0.1))
    timings = []
    stream = stream_in_thread(server, key, timings)
    heads = SlowCrowd(server.port, 100, SLOW_HEAD, b"X-Slow: " + b"a" * 100)
    bodies = SlowCrowd(server.port, 100, SLOW_BODY, b" " * 1000)
    try:
        busy = []
        for _ in range(50):
            waited, reply = timed_get(server.port)
            assert reply.status == 200
            busy.append(waited)
            time.sleep(0.03)
        assert_timed_out(heads, header_timeout, 3.0, "heads")
        assert_timed_out(bodies, body_timeout, 3.0, "bodies")
    finally:
        heads.close()
        bodies.close()
    stream.join(timeout=30)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(timings)]
    assert b"".join(data for _, data in timings).rstrip().endswith(b"data: [DONE]")
    figures = (
        f"healthz p99 idle {p99(idle) * 1000:.0f} ms, with 200 slow clients "
        f"{p99(busy) * 1000:.0f} ms (median {statistics.median(busy) * 1000:.0f} ms); "
        f"stream's largest gap {max(gaps) * 1000:.0f} ms (events every 100 ms)"
    )
    print(figures)
    # 100 ms is the goal (measured and reported separately); a busy 2-core CI box gets slack.
    assert p99(busy) < 0.5, figures
    assert max(gaps) < 0.1 + 0.5, figures
    still_serving(server)


# A stranger's body is refused before it is read: no key in the headers, at most
# RELAY_KEYLESS_MAX_BODY_BYTES; a wrong Bearer key, nothing at all.
BIG_HEAD = [b"Content-Type: application/json", b"Content-Length: 32505856"]  # 31 MiB


@pytest.mark.parametrize("line", [CHAT_LINE, LEGACY_LINE], ids=["openai", "legacy"])
def test_a_big_body_without_a_key_is_refused_unread(relay, upstream, line):
    forwarded = len(upstream.requests)
    # Only the head is sent: an answer proves the relay did not wait for the 31 MiB.
    reply = exchange(relay.port, request(line, BIG_HEAD))
    answer = json_error(reply, 413, "request_too_large")
    assert "RELAY_KEYLESS_MAX_BODY_BYTES" in answer["error"]["message"]
    chunk = b"x" * 65536
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(17)) + b"0\r\n\r\n"
    reply = exchange(relay.port, request(line, CHUNKED, chunked))  # 1.06 MiB, counted
    json_error(reply, 413, "request_too_large")
    assert len(upstream.requests) == forwarded
    still_serving(relay)


def test_a_wrong_bearer_key_is_refused_before_its_body(relay, upstream):
    forwarded = len(upstream.requests)
    wrong = [b"Authorization: Bearer sk-relay-not-a-key", *BIG_HEAD]
    reply = exchange(relay.port, request(CHAT_LINE, wrong))
    assert reply.status == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert len(upstream.requests) == forwarded
    still_serving(relay)


def test_a_key_in_a_small_body_still_works_and_a_header_key_sends_a_big_body(relay, upstream):
    key = relay.create_key("keyless-cap")
    upstream.queue(sse_reply([{"choices": [{"delta": {"content": "ok"}}]}, "[DONE]"]))
    legacy = {**CHAT, "api_secret_key": key, "messages": [{"role": "user", "content": "y" * 900}]}
    reply = requests.post(relay.base_url + "/api/v1/chat/completions", json=legacy, timeout=30)
    assert reply.status_code == 200 and b"ok" in reply.content
    big = {**CHAT, "stream": False, "padding": "z" * (2 * 1024 * 1024)}  # over 1 MiB
    reply = requests.post(
        relay.base_url + "/v1/chat/completions", json=big, headers=auth(key), timeout=30
    )
    assert reply.status_code == 200
    assert upstream.requests[-1].json["padding"] == big["padding"]


def test_malformed_keyless_bodies_count_toward_the_block(relay_server, fake):
    # A stranger repeating a refused body pays like a key guesser: after the limit, the
    # address is blocked and even a 31 MiB head is answered at once and the connection closed.
    server = relay_server(workers=2, RELAY_UNAUTHENTICATED_RPM="3")
    bomb = b"&".join([b"a[]=1"] * 2000)  # more fields than a PHP form may have
    form = [b"Content-Type: application/x-www-form-urlencoded", b"Content-Length: %d" % len(bomb)]
    statuses = [exchange(server.port, request(LEGACY_LINE, form, bomb)).status for _ in range(5)]
    assert statuses[:3] == [400] * 3 and statuses[3:] == [429, 429], statuses
    started = time.monotonic()
    reply = exchange(server.port, request(CHAT_LINE, BIG_HEAD))
    assert reply.status == 429 and reply.headers["connection"] == "close"
    assert time.monotonic() - started < 5
    assert fake.requests == []
    still_serving(server)
