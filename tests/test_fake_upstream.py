"""Self-tests for the socket-level fake upstream in tests/fake_upstream.py."""

import itertools
import json
import socket
import time

import openai
import pytest
import requests

try:
    import fake_upstream as fu
except ImportError:  # tests/ became a package
    from tests import fake_upstream as fu

AUTH = {"Authorization": "Bearer sk-upstream-1"}


@pytest.fixture
def fake():
    """A started fake upstream, stopped after the test."""
    upstream = fu.FakeUpstream().start()
    yield upstream
    upstream.stop()
    assert not upstream.errors


def sse_data(resp):
    """Return the data payloads of an SSE response, JSON-decoded where possible."""
    out = []
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            payload = line[6:].decode()
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def raw_request(port, request: bytes, timeout=2.0):
    """Open a socket to the fake, send request bytes and return the socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(request)
    return sock


def recv_until(sock, marker: bytes) -> bytes:
    """Read from sock until marker has been seen."""
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def chat(fake, session=None, **body):
    """POST a chat completion to the fake."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **body}
    post = (session or requests).post
    return post(
        f"{fake.base_url}/chat/completions",
        json=body,
        headers=AUTH,
        timeout=5,
        stream=bool(body.get("stream")),
    )


def test_auth_and_models(fake):
    """Missing and rejected keys get OpenAI errors; others see the model list."""
    with requests.get(f"{fake.base_url}/models", timeout=5) as resp:
        assert resp.status_code == 401
        assert resp.json()["error"]["message"] == "You didn't provide an API key."
    fake.rejected_keys.add("sk-bad")
    with requests.get(
        f"{fake.base_url}/models", headers={"Authorization": "Bearer sk-bad"}, timeout=5
    ) as resp:
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
    with requests.get(f"{fake.base_url}/models?x=1", headers=AUTH, timeout=5) as resp:
        assert resp.status_code == 200
        assert [m["id"] for m in resp.json()["data"]] == fake.models
    req = fake.requests[-1]
    assert (req.method, req.path, req.query) == ("GET", "/v1/models", "x=1")
    assert req.upstream_key == "sk-upstream-1"
    assert req.headers["authorization"] == "Bearer sk-upstream-1"
    assert fake.requests[0].upstream_key is None
    with requests.get(f"{fake.base_url}/nope", headers=AUTH, timeout=5) as resp:
        assert resp.status_code == 404
        assert resp.json()["error"] == {
            "message": "Unknown path /v1/nope",
            "type": "invalid_request_error",
            "param": None,
            "code": "not_found",
        }


def test_chat_non_stream(fake):
    """A plain chat completion carries usage, ids and the request's model."""
    with chat(fake) as resp:
        assert resp.status_code == 200
        assert resp.headers["x-request-id"].startswith("req_fake")
        body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-fake")
    assert body["model"] == "gpt-4o"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": fake.reply_text}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": fu.FAKE_PROMPT_TOKENS,
        "completion_tokens": fu.FAKE_COMPLETION_TOKENS,
        "total_tokens": 18,
    }
    assert fake.requests[0].json["messages"][0]["content"] == "hi"
    fake.send_usage = False
    with chat(fake) as resp:
        assert "usage" not in resp.json()


def test_chat_stream_usage_only_when_asked(fake):
    """Streams carry a usage chunk only with include_usage and send_usage."""
    with chat(fake, stream=True) as resp:
        assert resp.headers["content-type"] == "text/event-stream"
        assert resp.headers["transfer-encoding"] == "chunked"
        events = sse_data(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == fake.reply_text
    assert len(chunks) == fake.stream_chunks + 2
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }

    with chat(fake, stream=True, stream_options={"include_usage": True}) as resp:
        events = sse_data(resp)
    assert all(e["usage"] is None for e in events[:-2])
    assert events[-2]["choices"] == []
    assert events[-2]["usage"]["total_tokens"] == 18

    fake.send_usage = False
    with chat(fake, stream=True, stream_options={"include_usage": True}) as resp:
        events = sse_data(resp)
    assert all("usage" not in e for e in events[:-1])
    assert all(e["choices"] for e in events[:-1])


def test_openai_sdk_parses_default_replies(fake):
    """The official client understands the default replies, streamed or not."""
    messages = [{"role": "user", "content": "hi"}]
    with openai.OpenAI(base_url=fake.base_url, api_key="sk-sdk", max_retries=0) as client:
        reply = client.chat.completions.create(model="gpt-4o", messages=messages)
        assert reply.choices[0].message.content == fake.reply_text
        assert reply.usage.total_tokens == 18
        stream = client.chat.completions.create(
            model="gpt-4o", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        with stream:
            chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            fake.reply_text
        )
        assert chunks[-1].usage.prompt_tokens == fu.FAKE_PROMPT_TOKENS
        assert len(client.embeddings.create(model="e", input=["a", "b", "c"]).data) == 3
        assert client.completions.create(model="i", prompt="p").choices[0].text == (fake.reply_text)
    assert {r.upstream_key for r in fake.requests} == {"sk-sdk"}


def test_other_default_endpoints(fake):
    """Completions, embeddings, speech, transcription and images answer like OpenAI."""
    url = fake.base_url
    with requests.post(
        f"{url}/completions", json={"model": "m", "prompt": "x"}, headers=AUTH, timeout=5
    ) as resp:
        body = resp.json()
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == fake.reply_text
        assert body["usage"]["completion_tokens"] == fu.FAKE_COMPLETION_TOKENS
    with requests.post(
        f"{url}/completions",
        json={"prompt": "x", "stream": True},
        headers=AUTH,
        timeout=5,
        stream=True,
    ) as resp:
        events = sse_data(resp)
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == fake.reply_text
        assert events[-2]["choices"][0]["finish_reason"] == "stop"
    with requests.post(
        f"{url}/embeddings", json={"model": "e", "input": ["a", "b"]}, headers=AUTH, timeout=5
    ) as resp:
        body = resp.json()
        assert [d["index"] for d in body["data"]] == [0, 1]
        assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    with requests.post(
        f"{url}/audio/speech", json={"input": "hi"}, headers=AUTH, timeout=5
    ) as resp:
        assert resp.headers["content-type"] == "audio/mpeg"
        assert resp.content == bytes(range(256)) * 4
    files = {"file": ("a.mp3", b"\x00" * 1000, "audio/mpeg")}
    with requests.post(
        f"{url}/audio/transcriptions",
        files=files,
        data={"model": "whisper-1"},
        headers=AUTH,
        timeout=5,
    ) as resp:
        body = resp.json()
        assert body["text"] == "transcribed"
        assert body["received_bytes"] == len(fake.requests[-1].body) > 1000
    with requests.post(
        f"{url}/images/generations", json={"prompt": "cat"}, headers=AUTH, timeout=5
    ) as resp:
        assert resp.json()["data"][0]["url"] == "https://example.invalid/img.png"
    with requests.post(
        f"{url}/chat/completions", data=b"{not json", headers=AUTH, timeout=5
    ) as resp:
        assert resp.status_code == 400
    assert fake.requests[-1].json is None


def test_keep_alive_and_connection_close(fake):
    """Requests on one session reuse one connection; Connection: close ends it."""
    with requests.Session() as session:
        for _ in range(2):
            with chat(fake, session) as resp:
                assert resp.status_code == 200
        with chat(fake, session, stream=True) as resp:
            assert sse_data(resp)[-1] == "[DONE]"
        with chat(fake, session) as resp:
            assert resp.status_code == 200
        assert fake.connections_accepted == 1
        with session.get(
            f"{fake.base_url}/models", headers={**AUTH, "Connection": "close"}, timeout=5
        ) as resp:
            assert resp.headers["connection"] == "close"
        with session.get(f"{fake.base_url}/models", headers=AUTH, timeout=5) as resp:
            assert resp.status_code == 200
        assert fake.connections_accepted == 2


def test_chunked_request_body(fake):
    """A chunked request body is reassembled."""
    payload = json.dumps({"model": "gpt-4o", "messages": []}).encode()
    parts = iter([payload[:10], payload[10:]])
    with requests.post(
        f"{fake.base_url}/chat/completions", data=parts, headers=AUTH, timeout=5
    ) as resp:
        assert resp.status_code == 200
    req = fake.requests[0]
    assert req.headers["transfer-encoding"] == "chunked"
    assert req.body == payload
    assert req.json == {"model": "gpt-4o", "messages": []}


def test_expect_continue_and_bad_request(fake):
    """Expect: 100-continue is honoured and a garbage request line gets a 400."""
    sock = raw_request(
        fake.port,
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer k\r\nContent-Length: 2\r\n"
        b"Expect: 100-continue\r\n\r\n",
    )
    with sock:
        assert recv_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"{}")
        assert b"example.invalid" in recv_until(sock, b"}]}")
    with raw_request(fake.port, b"NOT HTTP\r\n\r\n") as sock:
        assert recv_until(sock, b"\x00").startswith(b"HTTP/1.1 400 Bad Request")


def test_json_reply_delay_headers_and_bytes(fake):
    """json_reply waits delay, applies headers, and sends bytes verbatim."""
    fake.queue(
        fu.json_reply({"ok": 1}, status=429, headers={"Retry-After": "2"}, delay=0.2),
        fu.json_reply(b"<not json>", headers={"Content-Type": "text/plain"}),
    )
    start = time.monotonic()
    with requests.get(f"{fake.base_url}/models", timeout=5) as resp:
        assert time.monotonic() - start >= 0.2
        assert resp.status_code == 429
        assert resp.headers["retry-after"] == "2"
        assert resp.json() == {"ok": 1}
    with requests.get(f"{fake.base_url}/models", timeout=5) as resp:
        assert resp.headers["content-type"] == "text/plain"
        assert resp.content == b"<not json>"


def test_sse_interval_and_event_kinds(fake):
    """Events arrive one per chunk, interval apart; dicts, strings and bytes encode right."""
    fake.queue(fu.sse_reply([{"a": 1}, "plain", b": comment\n\n", "[DONE]"], interval=0.05))
    arrivals, chunks = [], []
    with requests.get(f"{fake.base_url}/x", timeout=5, stream=True) as resp:
        for chunk in resp.iter_content(chunk_size=None):
            arrivals.append(time.monotonic())
            chunks.append(chunk)
    assert chunks == [
        b'data: {"a":1}\n\n',
        b"data: plain\n\n",
        b": comment\n\n",
        b"data: [DONE]\n\n",
    ]
    assert all(b - a >= 0.04 for a, b in itertools.pairwise(arrivals))


def test_sse_unchunked_closes(fake):
    """chunked=False streams without framing and closes at the end."""
    fake.queue(fu.sse_reply([{"a": 1}, "[DONE]"], interval=0, chunked=False))
    with requests.get(f"{fake.base_url}/x", timeout=5, stream=True) as resp:
        assert "transfer-encoding" not in resp.headers
        assert "content-length" not in resp.headers
        assert resp.content == b'data: {"a":1}\n\ndata: [DONE]\n\n'


def test_sse_drop_after_truncates(fake):
    """drop_after closes the socket without the final chunk."""
    fake.queue(fu.sse_reply([{"n": i} for i in range(5)], interval=0.01, drop_after=2))
    got = []
    with (
        requests.get(f"{fake.base_url}/x", timeout=5, stream=True) as resp,
        pytest.raises(requests.exceptions.ChunkedEncodingError),
    ):
        got.extend(resp.iter_content(chunk_size=None))
    assert got == [b'data: {"n":0}\n\n', b'data: {"n":1}\n\n']


def test_hang_read_timeout(fake):
    """hang() answers nothing, so the client times out."""
    fake.queue(fu.hang(seconds=5))
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(f"{fake.base_url}/models", headers=AUTH, timeout=(1, 0.2))
    assert len(fake.requests) == 1


def test_reset_and_raw(fake):
    """reset() gives a ConnectionError; raw() sends arbitrary bytes."""
    fake.queue(fu.reset())
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{fake.base_url}/models", headers=AUTH, timeout=5)
    fake.queue(fu.raw(b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\n\r\n<html>502"))
    with requests.get(f"{fake.base_url}/models", headers=AUTH, timeout=5) as resp:
        assert resp.status_code == 502
        assert resp.text == "<html>502"
    fake.queue(fu.raw(b"\x00\xffgarbage that is not HTTP\r\n\r\n"))
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{fake.base_url}/models", headers=AUTH, timeout=5)
    fake.queue(fu.binary_reply(b"RIFF", content_type="audio/wav"))
    with requests.get(f"{fake.base_url}/models", headers=AUTH, timeout=5) as resp:
        assert resp.headers["content-type"] == "audio/wav"
        assert resp.content == b"RIFF"


def test_match_routing(fake):
    """Matched behaviours wait for their request; unmatched take the next one."""
    fake.queue(
        fu.json_reply({"who": "models"}, match=lambda r: r.path == "/v1/models"),
        fu.json_reply({"who": "any"}),
    )
    with chat(fake) as resp:
        assert resp.json() == {"who": "any"}
    with chat(fake) as resp:
        assert resp.json()["object"] == "chat.completion"
    with requests.get(f"{fake.base_url}/models", headers=AUTH, timeout=5) as resp:
        assert resp.json() == {"who": "models"}
    with requests.get(f"{fake.base_url}/models", headers=AUTH, timeout=5) as resp:
        assert resp.json()["object"] == "list"


def test_stream_closed_detected_quickly(fake):
    """Closing the client mid-stream is noticed within 100 ms, while hanging or sending."""
    for behaviour in (
        fu.sse_reply([{"a": 1}, {"b": 2}], hang_after=1),
        fu.sse_reply([{"n": i} for i in range(100)], interval=0.2),
    ):
        fake.reset()
        fake.queue(behaviour)
        sock = raw_request(fake.port, b"GET /v1/x HTTP/1.1\r\nHost: x\r\n\r\n")
        with sock:
            assert b'data: {"' in recv_until(sock, b"\n\n\r\n")
            time.sleep(0.05)
            closed_at = time.monotonic()
        noticed = fake.wait_stream_closed(timeout=2)
        assert noticed is not None
        assert 0 <= noticed - closed_at < 0.1
        assert len(fake.stream_closed) == 1


def test_reset_and_wait_helpers(fake):
    """reset() clears requests and the queue; wait helpers time out cleanly."""
    with chat(fake) as resp:
        assert resp.status_code == 200
    assert fake.wait_for_requests(1, timeout=0.05) is True
    fake.queue(fu.hang())
    fake.reset()
    assert fake.requests == []
    assert fake.wait_for_requests(1, timeout=0.05) is False
    assert fake.wait_stream_closed(timeout=0.05) is None
    with chat(fake) as resp:
        assert resp.status_code == 200
    assert len(fake.requests) == 1


def test_stop_is_quick_with_hanging_handlers():
    """stop() returns promptly even while handlers hang or stream."""
    upstream = fu.FakeUpstream().start()
    upstream.queue(fu.hang(seconds=30), fu.sse_reply(["x"], hang_after=0))
    socks = [raw_request(upstream.port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(2)]
    idle = raw_request(upstream.port, b"")
    try:
        assert upstream.wait_for_requests(2)
        start = time.monotonic()
        upstream.stop()
        assert time.monotonic() - start < 1.0
        assert upstream.stream_closed == []
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", upstream.port), timeout=1).close()
    finally:
        for sock in [*socks, idle]:
            sock.close()
