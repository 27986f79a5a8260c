"""Reloads and stops keep running streams (up to RELAY_GRACEFUL_TIMEOUT), and a stream that
must still be cut ends with an error event and a `shutdown` usage row."""

import concurrent.futures
import json
import os
import signal
import sqlite3
import threading

import pytest
import requests
from conftest import auth
from fake_upstream import sse_reply

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def chunk(n):
    """One chat.completion.chunk event."""
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": f"w{n} "}, "finish_reason": None}],
    }


def stream_to_the_end(server, key, started):
    """A streamed call read to its end: (all bytes, whether the HTTP body ended cleanly).

    `started` is released once its first bytes arrived.
    """
    body = b""
    with requests.post(
        server.base_url + "/v1/chat/completions",
        json=CHAT,
        headers=auth(key),
        stream=True,
        timeout=120,
    ) as reply:
        try:
            for piece in reply.iter_content(chunk_size=None):
                if not body:
                    started.release()
                body += piece
        except requests.exceptions.ChunkedEncodingError:
            return body, False
    return body, True


def outcomes(server):
    """Each usage row's outcome."""
    with sqlite3.connect(server.db_path) as conn:
        return [r[0] for r in conn.execute("SELECT outcome FROM usage ORDER BY id")]


def wait_started(started, count, timeout=30):
    """Until `count` streams have had their first bytes."""
    for _ in range(count):
        assert started.acquire(timeout=timeout)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])
def test_45_second_streams_outlive_a_reload_or_a_stop(relay_server, fake, signum):
    # The Procfile's settings, not the suite's short graceful timeout.
    server = relay_server(workers=2, GUNICORN_CMD_ARGS="")
    key = server.create_key("long")
    events = [chunk(n) for n in range(450)] + ["[DONE]"]  # 45 s at 100 ms
    for _ in range(3):
        fake.queue(sse_reply(events, interval=0.1))
    started = threading.Semaphore(0)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(stream_to_the_end, server, key, started) for _ in range(3)]
        wait_started(started, 3)
        os.kill(server.process.pid, signum)
        results = [f.result(timeout=120) for f in futures]
    for body, clean in results:
        assert clean and body.rstrip().endswith(b"data: [DONE]")
        assert b"w449 " in body
    assert outcomes(server) == ["ok"] * 3


def test_a_stream_past_the_graceful_timeout_ends_with_an_event_and_a_shutdown_row(
    relay_server, fake
):
    server = relay_server(workers=1, GUNICORN_CMD_ARGS="", RELAY_GRACEFUL_TIMEOUT="4")
    key = server.create_key("longer")
    fake.queue(sse_reply([chunk(n) for n in range(300)] + ["[DONE]"], interval=0.1))
    started = threading.Semaphore(0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(stream_to_the_end, server, key, started)
        wait_started(started, 1)
        os.kill(server.process.pid, signal.SIGTERM)
        body, clean = future.result(timeout=60)
    assert clean  # the HTTP body ends properly, not cut mid-chunk
    last = body.rstrip().split(b"\n\n")[-1]
    error = json.loads(last.removeprefix(b"data: "))["error"]
    assert error["code"] == "shutdown" and "restarting" in error["message"]
    assert server.process.wait(timeout=30) == 0
    with sqlite3.connect(server.db_path) as conn:
        outcome, tokens = conn.execute("SELECT outcome, completion_tokens FROM usage").fetchone()
    assert outcome == "shutdown" and tokens > 0  # billed with what was sent
