"""Bad input on both faces, from hypothesis: always a clean OpenAI-shaped reply, never a 500."""

import json
import socket

import pytest
import requests
from conftest import UPSTREAM_KEY, auth
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FACES = ["/v1/chat/completions", "/api/v1/chat/completions", "/index.php/api/v1/completions"]
CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=utf-8",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "multipart/form-data; boundary=",
    "multipart/form-data; boundary=xyz",
    "application/octet-stream",
    "application/json; charset=latin-1",
    "text/html",
    "application/xml",
    "*/*",
    "application/json\r\nX-Evil: 1",
]
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
chat_like = st.fixed_dictionaries(
    {},
    optional={
        "model": json_values | st.sampled_from(["gpt-4o", "gpt-3.5", ""]),
        "messages": json_values
        | st.lists(
            st.fixed_dictionaries(
                {
                    "role": json_values | st.sampled_from(["user", "system", "assistant"]),
                    "content": json_values | st.text(max_size=50),
                }
            ),
            max_size=4,
        ),
        "stream": json_values,
        "temperature": json_values,
        "max_tokens": json_values,
        "n": json_values,
        "user": json_values,
        "stream_options": json_values,
        "api_secret_key": json_values,
    },
)
raw_bodies = st.one_of(
    st.binary(max_size=300),
    chat_like.map(lambda d: json.dumps(d).encode()),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [
            b"messages[0][role]=user&messages[0][content]=%FF",
            b"messages[=1&a]]=2",
            b"temperature=hot",
            b"messages[99999999][x]=1",
            b"stream[]=1&stream[]=0",
        ]
    ),
)


def check_reply(reply):
    """The one property: a JSON reply; an error is OpenAI-shaped and never a 5xx from us."""
    body = reply.get_data()
    assert reply.status_code < 500 or reply.status_code in (502, 504), (reply.status_code, body)
    assert UPSTREAM_KEY.encode() not in body
    if reply.status_code >= 400:
        payload = json.loads(body)
        error = payload["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert set(error) >= {"message", "type", "param", "code"}
        if reply.request.path.startswith(("/api/", "/index.php/")):
            assert payload["code"] == reply.status_code and payload["msg"]


@FUZZ
@given(path=st.sampled_from(FACES), body=raw_bodies, content_type=st.sampled_from(CONTENT_TYPES))
def test_any_body_gets_a_clean_reply(client, key, path, body, content_type):
    headers = auth(key)
    if content_type is not None:
        headers["Content-Type"] = content_type.replace("\r\n", " ")
    reply = client.post(path, data=body, headers=headers)
    check_reply(reply)
    reply.close()


@FUZZ
@given(body=chat_like)
def test_chat_shaped_bodies_on_both_faces(client, key, body):
    for path in ("/v1/chat/completions", "/api/v1/chat/completions"):
        reply = client.post(path, json={**body, "api_secret_key": key})
        check_reply(reply)
        reply.close()


@FUZZ
@given(key_text=st.text(min_size=0, max_size=600))
def test_keys_of_every_shape(client, key_text):
    for headers in (
        {"Authorization": f"Bearer {key_text}"},
        {"x-api-key": key_text},
        {"Authorization": key_text},
    ):
        try:
            reply = client.get("/v1/models", headers=headers)
        except ValueError:
            continue  # the test client refuses to build such a header at all
        assert reply.status_code in (401, 429)
        assert reply.get_json()["error"]["code"] in ("invalid_api_key", "rate_limit_exceeded")
    reply = client.post("/api/v1/chat/completions", json={"api_secret_key": key_text})
    assert reply.status_code in (400, 401, 429)


@FUZZ
@given(
    segments=st.lists(
        st.sampled_from(
            [
                "..",
                ".",
                "%2e%2e",
                "%2E.",
                "a",
                "",
                "%2f",
                "..%2f",
                "@evil.com",
                "\\..",
                "%00",
                "http:",
                "//evil.com",
            ]
        ),
        min_size=1,
        max_size=6,
    )
)
def test_path_tricks_never_leave_the_upstream(client, key, fake, segments):
    path = "/v1/" + "/".join(segments)
    reply = client.get(path, headers=auth(key))
    check_reply(reply)
    for recorded in fake.requests:
        assert recorded.path.startswith("/v1/")
        assert recorded.headers["host"].startswith("127.0.0.1:")
    fake.reset()


@pytest.mark.parametrize(
    "header",
    ["X-Test: a\r\nInjected: yes", "X-Test: a\nInjected: yes", "Authorization: Bearer x\r\nY: 1"],
)
def test_header_injection_is_refused_by_the_server(relay_server, fake, header):
    server = relay_server(workers=1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        name, _, value = header.partition(": ")
        sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{name}: {value}\r\n\r\n".encode())
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 4")
    assert all(b"injected" not in r.body.lower() for r in fake.requests)
    assert all("injected" not in r.headers for r in fake.requests)
    assert requests.get(server.base_url + "/healthz", timeout=5).status_code == 200


def test_huge_body_and_process_keeps_serving(client, key, app):
    app.config["MAX_BODY_BYTES"] = 1024 * 1024
    reply = client.post(
        "/v1/chat/completions",
        data=b"{" + b" " * (2 * 1024 * 1024) + b"}",
        headers={**auth(key), "Content-Type": "application/json"},
    )
    assert reply.status_code == 413
    assert client.get("/healthz").status_code == 200
