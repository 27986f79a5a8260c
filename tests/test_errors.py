"""Every failure has OpenAI's error shape and the documented status, never HTML."""

import socket

import pytest
from conftest import UPSTREAM_KEY, auth
from fake_upstream import hang, json_reply, raw, reset

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def error_of(reply, status, code):
    """Check shape and return the error object."""
    assert reply.status_code == status, reply.get_data(as_text=True)
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert UPSTREAM_KEY not in reply.get_data(as_text=True)
    return body["error"]


def test_unknown_route_and_method(client, key):
    error_of(client.get("/nope"), 404, "not_found")
    error_of(client.post("/healthz"), 405, "method_not_allowed")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/v1/dashboard/billing/subscription", "GET, HEAD, OPTIONS"),
        ("DELETE", "/v1/dashboard/billing/usage", "GET, HEAD, OPTIONS"),
        ("PUT", "/v1/relay/key", "GET, POST, HEAD, OPTIONS"),
        ("POST", "/v1/models", "GET, HEAD, OPTIONS"),
    ],
)
def test_own_paths_are_never_forwarded(client, key, fake, method, path, allow):
    for headers in (auth(key), {}):  # a wrong method is a 405 with or without a key
        reply = client.open(path, method=method, headers=headers, json={"model": "gpt-4o"})
        error = error_of(reply, 405, "method_not_allowed")
        assert reply.headers["Allow"] == allow
        assert error["message"].endswith(f"use {allow}.")
    assert fake.requests == []


@pytest.mark.parametrize(
    ("raw_body", "content_type"),
    [
        (b'{"model": "gpt-4o", ', "application/json"),
        (b"[1, 2, 3]", "application/json"),
        (b'"just a string"', "application/json"),
        (b'{"a": "\xff\xfe"}', "application/json"),
        (b'{"a": NaN}', "application/json"),
        (b'{"a": 1e999}', "application/json"),
        (b"[" * 100000, "application/json"),
    ],
)
def test_bad_json_is_400_and_not_forwarded(client, key, fake, raw_body, content_type):
    reply = client.post(
        "/v1/chat/completions", data=raw_body, headers={**auth(key), "Content-Type": content_type}
    )
    error_of(reply, 400, "invalid_request")
    assert fake.requests == []


def test_body_over_limit_is_413(client, key, app, fake):
    limit = app.config["MAX_BODY_BYTES"]
    reply = client.post(
        "/v1/embeddings",
        data=b"x" * (limit + 1),
        headers={**auth(key), "Content-Type": "application/octet-stream"},
    )
    error_of(reply, 413, "request_too_large")
    assert fake.requests == []


def test_chunked_body_over_limit_is_413(relay_server, fake):
    server = relay_server(workers=1, RELAY_MAX_BODY_BYTES="2048")
    key = server.create_key("k")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        head = (
            "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n\r\n"
        )
        sock.sendall(head.encode())
        chunk = b"a" * 1000
        for _ in range(4):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
        sock.settimeout(5)
        answer = b""
        while b"}}" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413")
    assert '"request_too_large"' in answer
    assert fake.requests == []


def test_upstream_unreachable_is_502(client, key, app):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app.extensions["relay"].upstreams.router.default.base_url = f"http://127.0.0.1:{port}/v1"
    error = error_of(
        client.post("/v1/chat/completions", json=CHAT, headers=auth(key)), 502, "upstream_error"
    )
    assert str(port) not in error["message"]


def test_upstream_timeout_is_504(client, key, fake, app):
    app.config["UPSTREAM_READ_TIMEOUT"] = 0.3
    fake.queue(hang(5))
    error_of(
        client.post("/v1/chat/completions", json=CHAT, headers=auth(key)), 504, "upstream_timeout"
    )


def test_upstream_reset_is_502(client, key, fake):
    fake.queue(reset(), reset(), reset())
    error_of(
        client.post("/v1/chat/completions", json=CHAT, headers=auth(key)), 502, "upstream_error"
    )


def test_upstream_html_error_page_is_wrapped(client, key, fake):
    page = b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>"
    response = (
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s"
    )
    for _ in range(3):
        fake.queue(raw(response % (len(page), page)))
    error = error_of(
        client.post("/v1/chat/completions", json=CHAT, headers=auth(key)), 502, "upstream_error"
    )
    assert "<html>" not in error["message"]


def test_upstream_4xx_body_passes_through_as_it_came(client, key, fake):
    body = (
        b'{"error": {"message": "This model\'s maximum context length is 8192 tokens.", '
        b'"type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}'
    )
    fake.queue(json_reply(body, status=400))
    reply = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert reply.status_code == 400
    assert reply.get_data() == body


def test_upstream_rejecting_its_own_key_is_not_blamed_on_the_client(client, key, fake):
    fake.rejected_keys.add(UPSTREAM_KEY)
    error = error_of(
        client.post("/v1/chat/completions", json=CHAT, headers=auth(key)), 502, "upstream_error"
    )
    assert "credentials" in error["message"]


def test_usage_row_records_failures(client, key, fake, app):
    fake.queue(reset(), reset(), reset())
    client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    row = app.extensions["relay"].store.db.query_one("SELECT * FROM usage ORDER BY id DESC")
    assert (row["status"], row["outcome"], row["total_tokens"]) == (502, "upstream_error", 0)


@pytest.mark.parametrize("face", ["/v1/chat/completions", "/api/v1/chat/completions"])
def test_a_name_given_twice_in_a_json_object_is_refused(client, key, fake, face):
    twice = (
        b'{"model": "gpt-4o", "model": "gpt-3.5-turbo", '
        b'"messages": [{"role": "user", "content": "hi"}]}'
    )
    headers = {**auth(key), "Content-Type": "application/json"}
    reply = client.post(face, data=twice, headers=headers)
    assert reply.status_code == 400 and "twice" in reply.get_json()["error"]["message"]
    assert fake.requests == []


def test_json_behind_a_byte_order_mark_reaches_the_upstream_without_it(client, key, fake):
    body = b'\xef\xbb\xbf{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
    headers = {**auth(key), "Content-Type": "application/json"}
    assert client.post("/v1/chat/completions", data=body, headers=headers).status_code == 200
    assert not fake.requests[-1].body.startswith(b"\xef\xbb\xbf")
    assert fake.requests[-1].json["model"] == "gpt-4o"
