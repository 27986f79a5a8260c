"""Streams under real gunicorn: timing kept, usage taken, disconnects close the upstream at once."""

import itertools
import json
import socket
import sqlite3
import time

import requests
from conftest import auth
from fake_upstream import FAKE_COMPLETION_TOKENS, FAKE_PROMPT_TOKENS, sse_reply

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def chunk(n):
    """One chat.completion.chunk event."""
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": f"w{n} "}, "finish_reason": None}],
    }


def read_events(reply):
    """(arrival time, event bytes) for each SSE event as it arrives."""
    events, buffer = [], b""
    for data in reply.iter_content(chunk_size=None):
        buffer += data
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            events.append((time.monotonic(), event))
    return events


def test_chunk_timing_is_preserved(relay_server, fake):
    # Pacing off: a busy CI box can make a worker's loop late for a moment, and then the
    # relay lets events gather on purpose (tests/test_stream_path.py covers that).
    server = relay_server(RELAY_STREAM_MAX_PAUSE="0")
    key = server.create_key("k")
    fake.queue(sse_reply([chunk(n) for n in range(6)] + ["[DONE]"], interval=0.05))
    with requests.post(
        server.base_url + "/v1/chat/completions",
        json=CHAT,
        headers=auth(key),
        stream=True,
        timeout=10,
    ) as reply:
        assert reply.headers["X-Accel-Buffering"] == "no"
        assert reply.headers["Cache-Control"] == "no-cache"
        events = read_events(reply)
    assert events[-1][1] == b"data: [DONE]"
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(events)]
    assert len(gaps) == 6
    assert all(gap > 0.035 for gap in gaps), gaps  # 50 ms apart, not bunched together


def test_client_disconnect_closes_upstream_within_100ms(relay_server, fake):
    server = relay_server()
    key = server.create_key("k")
    # One event, then the upstream goes quiet: only the watcher can notice the hang-up.
    fake.queue(sse_reply([chunk(0)], interval=0.05, hang_after=1))
    body = json.dumps(CHAT).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    received = b""
    while b"w0" not in received:
        received += sock.recv(65536)
    sock.close()
    closed_at = time.monotonic()
    upstream_closed = fake.wait_stream_closed(timeout=3)
    assert upstream_closed is not None
    assert upstream_closed - closed_at < 0.1
    # The cut stream still gets its usage row, estimated from what was sent and received.
    row = wait_for_row(server)
    assert row["outcome"] == "client_disconnected"
    assert row["usage_source"] == "estimated"
    assert row["completion_tokens"] >= 1


def stream_events(server, key, body=CHAT):
    """POST a streamed chat to a running relay; return (arrival time, event) pairs."""
    with requests.post(
        server.base_url + "/v1/chat/completions",
        json=body,
        headers=auth(key),
        stream=True,
        timeout=10,
    ) as reply:
        return read_events(reply)


def wait_for_row(server, count=1, timeout=5):
    """Poll the server's database until it has `count` usage rows; return the last."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(server.db_path) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT * FROM usage ORDER BY id").fetchall()
        if len(rows) >= count:
            return dict(rows[-1])
        time.sleep(0.05)
    raise AssertionError("usage row not written")


def test_usage_chunk_only_when_the_client_asked(relay_server, fake):
    server = relay_server()
    key = server.create_key("k")
    url = server.base_url + "/v1/chat/completions"
    with requests.post(url, json=CHAT, headers=auth(key), stream=True, timeout=10) as reply:
        plain = [e for _, e in read_events(reply)]
    assert not any(b'"usage":{' in e for e in plain)
    assert plain[-1] == b"data: [DONE]"
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}
    asked = {**CHAT, "stream_options": {"include_usage": True}}
    with requests.post(url, json=asked, headers=auth(key), stream=True, timeout=10) as reply:
        with_usage = [e for _, e in read_events(reply)]
    usage_events = [json.loads(e[6:]) for e in with_usage if b'"usage":{' in e]
    assert len(usage_events) == 1 and usage_events[0]["choices"] == []
    # Apart from the usage chunk the two streams are the same, byte for byte (ids aside).
    assert len(with_usage) == len(plain) + 1
    row = wait_for_row(server, 2)
    expected = (FAKE_PROMPT_TOKENS, FAKE_COMPLETION_TOKENS, "upstream")
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == expected


def test_dropped_stream_ends_with_error_event_and_row(relay_server, fake):
    server = relay_server()
    key = server.create_key("k")
    fake.queue(sse_reply([chunk(n) for n in range(5)], interval=0.01, drop_after=2))
    events = [e for _, e in stream_events(server, key)]
    last = json.loads(events[-1][6:])
    assert last["error"]["code"] == "upstream_dropped"
    row = wait_for_row(server)
    assert (row["outcome"], row["usage_source"]) == ("upstream_dropped", "estimated")


def test_silent_stream_ends_with_timeout_event(relay_server, fake):
    server = relay_server(RELAY_UPSTREAM_READ_TIMEOUT="0.5")
    key = server.create_key("k")
    fake.queue(sse_reply([chunk(0)], interval=0.01, hang_after=1))
    started = time.monotonic()
    events = [e for _, e in stream_events(server, key)]
    assert time.monotonic() - started < 3
    assert json.loads(events[-1][6:])["error"]["code"] == "upstream_timeout"
    assert wait_for_row(server)["outcome"] == "upstream_timeout"


def test_stream_in_test_client_records_row(client, key, fake, app):
    reply = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    body = reply.get_data()
    reply.close()
    assert body.endswith(b"data: [DONE]\n\n")
    row = app.extensions["relay"].store.db.query_one("SELECT * FROM usage")
    assert (row["stream"], row["total_tokens"], row["outcome"]) == (1, 18, "ok")
