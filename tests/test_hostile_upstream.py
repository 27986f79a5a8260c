"""Careless and hostile upstreams against real gunicorn: bounded replies, no leaks, no HTML.

An upstream that sends an endless or gzip-bombed body, trickles its reply, echoes the
relay's upstream key, sends headers the client must not see or that are invalid: the client
gets a normal reply or OpenAI's JSON error, the upstream connection is closed when the relay
is done with it, and the call leaves its usage row (issue 18, the upstream half; the client
half is test_hostile_http.py).
"""

import contextlib
import json
import re
import socket
import sqlite3
import time
import uuid

import pytest
import requests
from conftest import UPSTREAM_KEY, RelayServer, auth
from fake_upstream import (
    GZIP_BOMB_PREFIX,
    endless_body,
    gzip_bomb,
    json_reply,
    sse_reply,
    trickle,
    writes,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from raw_http import Reply, dechunk, exchange, header_lines, request

pytestmark = pytest.mark.server
MIB = 1024 * 1024
ADMIN_TOKEN = "admin-token-hostile-upstream-5d1c"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
SPEECH = {"model": "tts-1", "input": "hi", "voice": "alloy"}
CHAT_PATH = "/v1/chat/completions"
SPEECH_PATH = "/v1/audio/speech"
RSS_LIMIT_MB = 250
# The upstream headers a client may see; the relay's own (Date, Server, Content-Length...)
# come on top.
ALLOWED_UPSTREAM = {
    "content-type",
    "content-disposition",
    "x-request-id",
    "openai-processing-ms",
    "openai-version",
    "openai-model",
}
# What the relay may send the upstream besides the client's allowed headers.
RELAY_REQUEST_HEADERS = {"authorization", "host", "content-length", "accept-encoding"}
ALLOWED_CLIENT = {"content-type", "accept", "user-agent", "openai-beta", "idempotency-key"}
# 6-character pieces of the upstream key; the ones made only of the word "upstream" (which
# replies say, as in `text/event-stream`) are left out.
KEY_PIECES = [
    UPSTREAM_KEY[n : n + 6].encode()
    for n in range(len(UPSTREAM_KEY) - 5)
    if UPSTREAM_KEY[n : n + 6] not in "-upstream-"
]


@pytest.fixture(scope="module")
def relay(tmp_path_factory, upstream):
    """One relay under gunicorn (one worker, default reply limit) for the cases that need no
    settings of their own; /metrics behind ADMIN_TOKEN."""
    env = {
        "RELAY_UPSTREAM_BASE_URL": upstream.base_url,
        "RELAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "RELAY_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    server = RelayServer(tmp_path_factory.mktemp("hostile-upstream"), env, workers=1).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(relay):
    """An unlimited key on the shared relay."""
    return relay.create_key("hostile-upstream")


def new_user():
    """A fresh end-user id: it picks the call's scripted answer and its usage row."""
    return f"hostup-{uuid.uuid4().hex[:16]}"


def for_user(user):
    """Match the upstream request made for `user` (so a script never answers another call)."""
    return lambda req: isinstance(req.json, dict) and req.json.get("user") == user


def forwarded(upstream, user, timeout=10.0):
    """Wait until `user`'s call reached the upstream; whether it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(for_user(user)(req) for req in list(upstream.requests)):
            return True
        time.sleep(0.02)
    return False


def call_bytes(key, user, path=CHAT_PATH, body=None, stream=False, headers=()):
    """A POST's bytes: JSON body naming `user`, the key as Bearer, Connection: close."""
    data = json.dumps({**(body or CHAT), "user": user, "stream": stream}).encode()
    lines = [
        b"Authorization: Bearer " + key.encode(),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(data),
        b"Connection: close",
        *headers,
    ]
    return request(f"POST {path} HTTP/1.1".encode(), lines, data)


def fetch(port, data, timeout=20.0, cap=4 * MIB):
    """Send data on a fresh connection; read until the reply is whole, the relay closes,
    `cap` bytes came or `timeout` passed. Returns (Reply, when the socket was closed)."""
    deadline = time.monotonic() + timeout
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        while len(received) < cap and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                more = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not more:
                break
            received += more
            if Reply.parse(received).complete():
                break
    return Reply.parse(received), time.monotonic()


def payload(reply):
    """A reply's body, de-chunked when it came chunked."""
    if "chunked" in reply.headers.get("transfer-encoding", "").lower():
        return dechunk(reply.body)
    return reply.body


def shown(reply):
    """A reply's start, for assertion messages."""
    return reply.raw[:400] if reply.raw else b"(no reply)"


def usage_row(server, user, timeout=10.0, where=lambda row: True):
    """The usage row of `user`'s call once it is written (and `where` holds), or None."""
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        with sqlite3.connect(server.db_path, timeout=5) as conn:
            conn.row_factory = sqlite3.Row
            found = conn.execute("SELECT * FROM usage WHERE end_user = ?", (user,)).fetchone()
        row = dict(found) if found else None
        if row is not None and where(row):
            return row
        time.sleep(0.05)
    return row


def assert_json_error(reply, status, code):
    """OpenAI's error shape as JSON with this status and code; never HTML."""
    assert reply.status == status, shown(reply)
    assert reply.headers.get("content-type", "").startswith("application/json"), shown(reply)
    assert b"<html" not in reply.raw.lower()
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    return error


def assert_no_key(data, where="the client"):
    """Neither the upstream key nor any 6-character piece of it is in data."""
    assert UPSTREAM_KEY.encode() not in data, f"the upstream key reached {where}"
    for piece in KEY_PIECES:
        assert piece not in data, f"a piece of the upstream key ({piece!r}) reached {where}"


def assert_same_but_key(got, expected):
    """got is expected, except that where the key was may stand anything free of it."""
    parts = expected.split(UPSTREAM_KEY.encode())
    found = re.fullmatch(b"(.*?)".join(re.escape(part) for part in parts), got, re.DOTALL)
    assert found, f"the reply was changed beyond the key:\n{got[:600]!r}\n{expected[:600]!r}"
    for stand_in in found.groups():
        assert_no_key(stand_in)


def peak_rss_mb(pids):
    """The highest resident set (VmHWM, MB) any of these processes has had so far."""
    peak = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) // 1024)
    return peak


def streams_open(server):
    """relay_streams_open on /metrics."""
    reply = requests.get(server.base_url + "/metrics", headers=auth(ADMIN_TOKEN), timeout=10)
    assert reply.status_code == 200
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            if sample.name == "relay_streams_open":
                return sample.value
    raise AssertionError("no relay_streams_open on /metrics")


def chunk_event(n, content):
    """One chat.completion.chunk SSE event's bytes."""
    chunk = {
        "id": "chatcmpl-hostile",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
COMPLETION = {
    "id": "chatcmpl-hostile",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "fine"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


# --- 1. Bounded non-stream replies ------------------------------------------------------------


def test_an_endless_json_reply_is_a_502_and_the_upstream_is_closed(relay_server, fake):
    server = relay_server(workers=1, RELAY_MAX_REPLY_BYTES=str(MIB))
    key = server.create_key("endless")
    user = new_user()
    script = endless_body(match=for_user(user))
    fake.queue(script)
    reply, answered = fetch(server.port, call_bytes(key, user), timeout=20)
    assert reply.status != 0, "no answer in 20 s: the relay is still reading the endless body"
    error = assert_json_error(reply, 502, "upstream_error")
    assert "RELAY_MAX_REPLY_BYTES" in error["message"]
    closed = script.wait_closed(timeout=10)
    assert closed is not None, "the relay kept the upstream connection open"
    assert closed - answered < 5.0
    row = usage_row(server, user)
    assert row is not None and row["status"] == 502, row


def test_a_gzip_bombed_json_reply_is_a_502_in_bounded_memory(relay_server, fake):
    server = relay_server(workers=1, RELAY_MAX_REPLY_BYTES=str(MIB))
    key = server.create_key("bomb")
    workers = server.ready_workers()
    user = new_user()
    script = gzip_bomb(match=for_user(user))  # ~300 KB inflating to ~300 MB
    fake.queue(script)
    reply, answered = fetch(server.port, call_bytes(key, user), timeout=30)
    peak = peak_rss_mb(workers)
    assert reply.status != 0, "no answer in 30 s"
    error = assert_json_error(reply, 502, "upstream_error")
    assert "RELAY_MAX_REPLY_BYTES" in error["message"]
    assert peak < RSS_LIMIT_MB, f"the worker's RSS peaked at {peak} MB"
    closed = script.wait_closed(timeout=10)
    assert closed is not None, "the relay kept the upstream connection open"
    assert closed - answered < 5.0
    row = usage_row(server, user)
    assert row is not None and row["status"] == 502, row


# --- 2. Bounded decompression of streamed bodies ---------------------------------------------


def test_a_gzip_bombed_binary_reply_is_inflated_as_it_goes(relay_server, fake):
    server = relay_server(workers=1)
    key = server.create_key("binary-bomb")
    workers = server.ready_workers()
    user = new_user()
    script = gzip_bomb(content_type="application/octet-stream", match=for_user(user))
    fake.queue(script)
    # The client reads the first 4 MB, then hangs up (fetch closes its socket).
    reply, hung_up = fetch(server.port, call_bytes(key, user, SPEECH_PATH, SPEECH), cap=4 * MIB)
    assert reply.status == 200, shown(reply)
    body = payload(reply)
    assert body.startswith(GZIP_BOMB_PREFIX + b"a" * 1000), body[:200]  # inflated, passed on
    assert len(body) > 3 * MIB
    closed = script.wait_closed(timeout=10)
    assert closed is not None, "the relay kept the upstream connection open"
    assert closed - hung_up < 2.0, f"the upstream was closed {closed - hung_up:.2f} s after"
    peak = peak_rss_mb(workers)
    assert peak < RSS_LIMIT_MB, f"the worker's RSS peaked at {peak} MB"
    assert usage_row(server, user) is not None


# --- 3. The client leaving during a JSON read ------------------------------------------------


def test_a_client_leaving_during_a_json_read_closes_the_upstream(relay, key, upstream):
    user = new_user()
    body = json.dumps({**COMPLETION, "padding": "p" * 400}).encode()  # 600 bytes: 60 s
    script = trickle(body, every=0.1, match=for_user(user))
    upstream.queue(script)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(call_bytes(key, user))
        assert forwarded(upstream, user), "the call never reached the upstream"
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):  # the client gives up waiting after 0.5 s
            sock.recv(65536)
    left = time.monotonic()
    closed = script.wait_closed(timeout=10)
    assert closed is not None, "the upstream connection was still open 10 s after the client left"
    assert closed - left < 2.0, f"the upstream was closed {closed - left:.2f} s after"
    row = usage_row(server=relay, user=user, where=lambda row: row is not None)
    assert row is not None, "no usage row"
    assert row["outcome"] == "client_disconnected", row


# --- 4. The upstream key never reaches the client ---------------------------------------------


def split_key_stream():
    """(steps, whole body) of an SSE stream whose second event echoes the key, the key split
    across two writes 50 ms apart."""
    first = chunk_event(0, "")
    echo = chunk_event(1, f"your key is {UPSTREAM_KEY}, isn't it?")
    rest = [chunk_event(2, " And more."), chunk_event(3, " The end."), DONE]
    cut = echo.index(UPSTREAM_KEY.encode()) + len(UPSTREAM_KEY) // 2
    steps = [first, 0.02, echo[:cut], 0.05, echo[cut:] + rest[0], 0.02, rest[1], rest[2]]
    return steps, first + echo + b"".join(rest)


def split_key_binary():
    """(steps, whole body) of a binary body with the key inside, split across two writes."""
    filler = bytes(reversed(range(256)))  # never a run like 0123456789 or abcdef
    whole = b"ID3" + filler + b"key=" + UPSTREAM_KEY.encode() + b";" + filler + b"END"
    cut = whole.index(UPSTREAM_KEY.encode()) + len(UPSTREAM_KEY) // 2
    return [whole[:cut], 0.05, whole[cut:]], whole


ECHOING_HEADERS = {"X-Debug-Auth": f"Bearer {UPSTREAM_KEY}", "x-request-id": f"req_{UPSTREAM_KEY}"}
CLEAN_EVENTS = [chunk_event(0, "Hello"), chunk_event(1, " there."), DONE]


def echo_case(case, user):
    """(script, path, body, stream, expected payload) for one way of echoing the key."""
    match = for_user(user)
    if case == "sse content split across writes":
        steps, whole = split_key_stream()
        return writes(steps, match=match), CHAT_PATH, CHAT, True, whole
    if case == "binary body split across writes":
        steps, whole = split_key_binary()
        script = writes(steps, content_type="application/octet-stream", chunked=False, match=match)
        return script, SPEECH_PATH, SPEECH, False, whole
    if case == "sse headers":
        script = sse_reply(CLEAN_EVENTS, interval=0.01, headers=ECHOING_HEADERS, match=match)
        return script, CHAT_PATH, CHAT, True, b"".join(CLEAN_EVENTS)
    if case == "json headers":
        body = json.dumps(COMPLETION).encode()
        script = json_reply(body, headers=ECHOING_HEADERS, match=match)
        return script, CHAT_PATH, CHAT, False, body
    completion = {**COMPLETION, "choices": [{**COMPLETION["choices"][0]}]}
    completion["choices"][0]["message"] = {"role": "assistant", "content": f"{UPSTREAM_KEY}!"}
    body = json.dumps(completion).encode()
    return json_reply(body, match=match), CHAT_PATH, CHAT, False, body


@pytest.mark.parametrize(
    "case",
    [
        "sse content split across writes",
        "binary body split across writes",
        "sse headers",
        "json headers",
        "json body",
    ],
)
def test_the_upstream_key_never_reaches_the_client(relay, key, upstream, case):
    user = new_user()
    script, path, body, stream, expected = echo_case(case, user)
    upstream.queue(script)
    reply, _ = fetch(relay.port, call_bytes(key, user, path, body, stream=stream))
    assert reply.status == 200, shown(reply)
    assert_no_key(reply.raw)
    got = payload(reply)
    assert_same_but_key(got, expected)
    if stream:
        assert got.rstrip().endswith(b"data: [DONE]")
    row = usage_row(relay, user)
    assert row is not None and row["status"] == 200, row


# --- 5. Upstream response headers pass an allow-list ------------------------------------------

# Each with a value of its own that names evil.example, so that the relay's own header of
# the same name (Access-Control-*, say) is told from the upstream's.
DROPPED_UPSTREAM = [
    b"X-Accel-Redirect: /internal/evil.example",
    b"Location: https://evil.example/phish",
    b"Refresh: 0; url=https://evil.example/",
    b"Access-Control-Allow-Origin: https://evil.example",
    b"Access-Control-Allow-Credentials: true; evil.example",
    b"Set-Cookie: session=evil.example; Path=/",
    b"Content-Security-Policy: script-src https://evil.example",
    b'Link: <https://evil.example/x.js>; rel="preload"',
    b"X-Frame-Options: ALLOW-FROM https://evil.example",
    b"Strict-Transport-Security: max-age=1; evil.example",
    b'WWW-Authenticate: Basic realm="evil.example"',
    b"x-ratelimit-remaining-requests: 4242 evil.example",
    b"openai-organization: org-evil.example",
    b"X-Custom: evil.example",
]
PASSED_UPSTREAM = {
    "content-disposition": 'inline; filename="reply.json"',
    "x-request-id": "req_allowed_0042",
    "openai-processing-ms": "42",
    "openai-version": "2020-10-01",
    "openai-model": "gpt-4o-2024-08-06",
}


@pytest.fixture(scope="module")
def own_headers(relay, key, upstream):
    """The names of the headers the relay sends of its own, on a JSON reply and on a stream
    (the upstream sending no more than Content-Type, framing and x-request-id)."""
    names = {}
    for stream in (False, True):
        reply, _ = fetch(relay.port, call_bytes(key, new_user(), stream=stream))
        assert reply.status == 200, shown(reply)
        names["sse" if stream else "json"] = {name for name, _ in header_lines(reply)}
    return names


@pytest.mark.parametrize("kind", ["json", "sse"])
def test_only_allowed_upstream_headers_reach_the_client(relay, key, upstream, own_headers, kind):
    user = new_user()
    lines = DROPPED_UPSTREAM + [f"{k}: {v}".encode() for k, v in PASSED_UPSTREAM.items()]
    if kind == "json":
        upstream.queue(json_reply(COMPLETION, header_lines=lines, match=for_user(user)))
    else:
        script = sse_reply(CLEAN_EVENTS, interval=0.01, header_lines=lines, match=for_user(user))
        upstream.queue(script)
    reply, _ = fetch(relay.port, call_bytes(key, user, stream=kind == "sse"))
    assert reply.status == 200, shown(reply)
    head = reply.raw.partition(b"\r\n\r\n")[0]
    seen = header_lines(reply)
    leaked = [(n, v) for n, v in seen if "evil.example" in v]
    assert not leaked, f"upstream headers reached the client: {leaked}"
    assert b"evil.example" not in head
    for line in DROPPED_UPSTREAM:
        name = line.partition(b":")[0].decode().lower()
        assert name not in dict(seen) or name in own_headers[kind], (name, head)
    for name, value in PASSED_UPSTREAM.items():
        assert (name, value) in seen, (name, head)
    expected_type = "application/json" if kind == "json" else "text/event-stream"
    assert dict(seen)["content-type"].startswith(expected_type)


# --- 6. Client request headers pass an allow-list ---------------------------------------------

PASSED_CLIENT = {
    "accept": "application/json",
    "user-agent": "OpenAI/Python 1.50.0",
    "openai-beta": "assistants=v2",
    "idempotency-key": "idem-7d1f",
    "x-stainless-lang": "python",
    "x-stainless-retry-count": "0",
}
DROPPED_CLIENT = [
    b"X-HTTP-Method-Override: DELETE",
    b"X-Original-URL: /v1/files",
    b"X-Rewrite-URL: /v1/files",
    b"True-Client-IP: 203.0.113.7",
    b"X-Forwarded-For: 203.0.113.7",
    b"X-Real-IP: 203.0.113.7",
    b"Forwarded: for=203.0.113.7",
    b"Cookie: session=client-cookie",
    b"X-Custom: client-custom",
    b"Proxy-Authorization: Basic Zm9vOmJhcg==",
    b"OpenAI-Organization: org-client",
    b"Connection: keep-alive, X-Secret",  # names X-Secret hop-by-hop
    b"X-Secret: 1",
]


@pytest.mark.parametrize("path", [CHAT_PATH, "/api/v1/chat/completions"], ids=["openai", "legacy"])
def test_only_allowed_client_headers_reach_the_upstream(relay, key, upstream, path):
    user = new_user()
    data = json.dumps({**CHAT, "user": user}).encode()
    lines = [
        b"Authorization: Bearer " + key.encode(),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(data),
        *(f"{k}: {v}".encode() for k, v in PASSED_CLIENT.items()),
        *DROPPED_CLIENT,
    ]
    reply = exchange(relay.port, request(f"POST {path} HTTP/1.1".encode(), lines, data))
    assert reply.status == 200, shown(reply)
    got = next(r for r in reversed(upstream.requests) if for_user(user)(r)).headers
    assert got["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert got["content-type"].startswith("application/json")
    for name, value in PASSED_CLIENT.items():
        assert got.get(name) == value, (name, got)
    allowed = ALLOWED_CLIENT | RELAY_REQUEST_HEADERS
    leaked = sorted(n for n in got if n not in allowed and not n.startswith("x-stainless-"))
    assert not leaked, f"client headers reached the upstream: {leaked}"


# --- 7. Invalid upstream headers never break a reply -----------------------------------------

BAD_VALUES = [b"x-request-id: a\x01b", b"openai-processing-ms: 1\x7f2"]
INVALID_CASES = {
    "json": ("json", BAD_VALUES),
    "json, bad content type": ("json", [b"Content-Type: application/json\x01", *BAD_VALUES]),
    "sse": ("sse", BAD_VALUES),
    "sse, bad content type": ("sse", [b"Content-Type: text/event-stream\x01", *BAD_VALUES]),
}


@pytest.mark.parametrize("case", INVALID_CASES)
def test_invalid_upstream_headers_never_break_a_reply(relay_server, fake, case):
    kind, lines = INVALID_CASES[case]
    # A relay of its own: the open-streams gauge must be back to 0, not to what others left.
    server = relay_server(workers=1, RELAY_ADMIN_TOKEN=ADMIN_TOKEN)
    key = server.create_key("one-at-a-time", "--max-concurrent", "1")
    user = new_user()
    if kind == "json":
        fake.queue(json_reply(COMPLETION, header_lines=lines, match=for_user(user)))
    else:
        fake.queue(sse_reply(CLEAN_EVENTS, interval=0.01, header_lines=lines, match=for_user(user)))
    reply, _ = fetch(server.port, call_bytes(key, user, stream=kind == "sse"))
    assert reply.status == 200, shown(reply)
    assert b"<html" not in reply.raw.lower()
    assert not reply.headers.get("content-type", "").startswith("text/html"), shown(reply)
    for name, value in header_lines(reply):
        assert not re.search(r"[\x00-\x1f\x7f]", value), (name, value)
    if kind == "json":
        assert reply.json() == COMPLETION
    else:
        assert payload(reply) == b"".join(CLEAN_EVENTS)
    row = usage_row(server, user)
    assert row is not None, "no usage row"
    assert (row["status"], row["outcome"]) == (200, "ok"), row
    deadline = time.monotonic() + 5
    while streams_open(server) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert streams_open(server) == 0
    # The key may make one call at a time: its slot is free again at once.
    reply, _ = fetch(server.port, call_bytes(key, new_user()))
    assert reply.status == 200, shown(reply)


# --- 8. Half-closed and closed clients ---------------------------------------------------------


def data_lines(body):
    """The data of each SSE event in a body, in order."""
    return [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]


def test_a_half_closed_client_still_gets_its_whole_stream(relay, key, upstream):
    user = new_user()
    events = [chunk_event(n, f"c{n:02d}") for n in range(50)]
    upstream.queue(sse_reply([*events, DONE], interval=0.02, match=for_user(user)))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=15) as sock:
        sock.sendall(call_bytes(key, user, stream=True))
        sock.shutdown(socket.SHUT_WR)  # sent everything; still reading
        received = b""
        with contextlib.suppress(TimeoutError):  # 15 s: the assertions below say what came
            while more := sock.recv(65536):
                received += more
    reply = Reply.parse(received)
    assert reply.status == 200, shown(reply)
    got = data_lines(payload(reply))
    assert got == [*data_lines(b"".join(events)), b"[DONE]"], f"{len(got)} events came"
    row = usage_row(relay, user)
    assert row is not None and row["outcome"] == "ok", row


def test_a_client_closing_mid_stream_closes_the_upstream_at_once(relay, key, upstream):
    user = new_user()
    events = [chunk_event(n, f"c{n:03d}") for n in range(200)]
    script = sse_reply([*events, DONE], interval=0.05, match=for_user(user))
    upstream.queue(script)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=15) as sock:
        sock.sendall(call_bytes(key, user, stream=True))
        received = b""
        while b"data: " not in received:
            more = sock.recv(65536)
            assert more, "the relay closed before the first event"
            received += more
    left = time.monotonic()
    closed = script.wait_closed(timeout=10)
    assert closed is not None, "the upstream stream was not closed"
    assert closed - left < 1.0, f"the upstream was closed {closed - left:.2f} s after"


# --- 9. Hypothesis: random upstream headers on a JSON reply ----------------------------------

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Framing and the content type change how the body is read: other tests' business.
FRAMING = {
    "content-length",
    "transfer-encoding",
    "connection",
    "content-encoding",
    "content-type",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
}
NAMED = sorted(ALLOWED_UPSTREAM - {"content-type"}) + [
    line.partition(b":")[0].decode() for line in DROPPED_UPSTREAM
]
NAMED += ["Server", "Date", "Cache-Control", "X-Accel-Buffering", "Retry-After", "Vary"]
NAMED += ["X-RateLimit-Limit-Requests", "ETag", "Via", "X-Powered-By", "Proxy-Authenticate"]
header_names = st.sampled_from(NAMED) | st.text(TCHAR, min_size=1, max_size=24).filter(
    lambda name: name.lower() not in FRAMING
)
# Any character but CR and LF (they would end the line): control bytes, non-ASCII (sent as
# UTF-8), very long values, and the upstream key inside.
any_text = st.text(st.characters(blacklist_characters="\r\n", codec="utf-8"), max_size=40)
header_values = st.one_of(
    any_text,
    st.builds(lambda a, b: a + UPSTREAM_KEY + b, any_text, any_text),
    st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(1000, 16000)).filter(
        lambda v: "\r" not in v and "\n" not in v
    ),
    st.sampled_from(["", " ", "a\x01b", "\x00", "\x7f", "é", "日本", f"Bearer {UPSTREAM_KEY}"]),
)
header_sets = st.lists(st.tuples(header_names, header_values), max_size=12)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(headers=header_sets)
def test_random_upstream_headers_never_break_or_leak(relay, key, upstream, own_headers, headers):
    user = new_user()
    lines = [f"{name}: ".encode() + value.encode() for name, value in headers]
    upstream.queue(json_reply(COMPLETION, header_lines=lines, match=for_user(user)))
    reply, _ = fetch(relay.port, call_bytes(key, user))
    assert reply.status == 200, shown(reply)
    assert b"<html" not in reply.raw.lower()
    assert reply.json() == COMPLETION
    assert_no_key(reply.raw)
    sent = {}
    for name, value in headers:
        sent.setdefault(name.lower(), set()).add(value.encode().decode("latin-1").strip())
    for name, value in header_lines(reply):
        assert name in ALLOWED_UPSTREAM or name in own_headers["json"], (name, value)
        assert not re.search(r"[\x00-\x1f\x7f]", value), (name, value)
        if name not in ALLOWED_UPSTREAM and value:
            assert value not in sent.get(name, ()), f"the upstream's {name} reached the client"
