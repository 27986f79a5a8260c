"""Forwarding on the OpenAI face: each content kind, headers, paths and the upstream's key."""

import json

from conftest import UPSTREAM_KEY, auth
from fake_upstream import SPEECH_BYTES, json_reply


def test_json_body_passes_byte_exact_when_nothing_changes(client, key, fake):
    raw = (
        b'{ "model" : "gpt-4o",  "messages": [{"role":"user","content":"\\u4f60\\u597d"}],'
        b' "x_unknown": {"deep": [1, 2.50, null]} }'
    )
    reply = client.post(
        "/v1/chat/completions", data=raw, headers={**auth(key), "Content-Type": "application/json"}
    )
    assert reply.status_code == 200
    assert fake.requests[-1].body == raw


def test_body_key_field_and_alias_are_rewritten_and_unknown_fields_kept(client, key, fake):
    body = {
        "api_secret_key": key,
        "model": "gpt-3.5",
        "messages": [{"role": "user", "content": "hi"}],
        "odd_field": {"keep": ["me", 1.5]},
    }
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200
    sent = fake.requests[-1].json
    assert "api_secret_key" not in sent
    assert sent["model"] == "gpt-3.5-turbo"
    assert sent["odd_field"] == {"keep": ["me", 1.5]}
    assert reply.get_json()["model"] == "gpt-3.5-turbo"  # the upstream's model name


def test_multipart_upload_passes_byte_exact(client, key, fake):
    audio = bytes(range(256)) * 40
    reply = client.post(
        "/v1/audio/transcriptions",
        data={"model": "whisper-1", "file": (__import__("io").BytesIO(audio), "a.mp3")},
        headers=auth(key),
        content_type="multipart/form-data",
    )
    assert reply.status_code == 200
    recorded = fake.requests[-1]
    assert recorded.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert audio in recorded.body
    assert reply.get_json()["received_bytes"] == len(recorded.body)


def test_binary_reply_passes_byte_exact(client, key, fake):
    reply = client.post(
        "/v1/audio/speech", json={"model": "tts-1", "input": "hi", "voice": "a"}, headers=auth(key)
    )
    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == "audio/mpeg"
    assert reply.get_data() == SPEECH_BYTES


def test_method_query_and_path_pass_through(client, make_key, fake):
    key = make_key("file-keeper", endpoints="files")  # account-wide: opened for this key
    fake.queue(json_reply({"id": "file-abc", "deleted": True}))
    reply = client.delete("/v1/files/file-abc?purpose=x&limit=2", headers=auth(key))
    assert reply.status_code == 200
    recorded = fake.requests[-1]
    assert (recorded.method, recorded.path, recorded.query) == (
        "DELETE",
        "/v1/files/file-abc",
        "purpose=x&limit=2",
    )


def test_get_models_passes_through(client, key, fake):
    reply = client.get("/v1/models", headers=auth(key))
    assert reply.status_code == 200
    assert "gpt-4o" in [m["id"] for m in reply.get_json()["data"]]


def test_client_secrets_never_reach_upstream(client, key, fake):
    headers = {
        **auth(key),
        "api-key": key,
        "x-api-key": key,
        "Cookie": f"session={key}",
        "X-Forwarded-For": "203.0.113.9",
        "OpenAI-Beta": "assistants=v2",
    }
    body = {
        "model": "gpt-4o",
        "api_secret_key": key,
        "messages": [{"role": "user", "content": "x"}],
    }
    assert client.post("/v1/chat/completions", json=body, headers=headers).status_code == 200
    recorded = fake.requests[-1]
    assert recorded.upstream_key == UPSTREAM_KEY
    assert key not in json.dumps(recorded.headers) and key.encode() not in recorded.body
    assert "cookie" not in recorded.headers and "x-forwarded-for" not in recorded.headers
    assert recorded.headers["openai-beta"] == "assistants=v2"


def test_upstream_account_headers_are_not_passed_back(client, key, fake):
    fake.queue(
        json_reply(
            {"ok": 1},
            headers={
                "Set-Cookie": "__cf=1",
                "openai-organization": "org-secret",
                "x-request-id": "req_1",
            },
        )
    )
    reply = client.get("/v1/whatever", headers=auth(key))
    assert reply.status_code == 200
    assert "Set-Cookie" not in reply.headers and "openai-organization" not in reply.headers
    assert reply.headers["x-request-id"] == "req_1"


def test_path_traversal_never_leaves_the_base(client, key, fake):
    for path in ("/v1/%2e%2e/admin", "/v1/files/../../secret", "/v1/a/%2E%2E/%2E%2E/x"):
        reply = client.get(path, headers=auth(key))
        assert reply.status_code in (400, 403, 404), path
        assert "error" in reply.get_json()
    assert all(r.path.startswith("/v1/") for r in fake.requests)


def test_upstream_key_echoed_by_upstream_is_redacted(client, key, fake):
    fake.queue(json_reply({"weird": f"your key is {UPSTREAM_KEY}"}))
    reply = client.get("/v1/echo", headers=auth(key))
    assert UPSTREAM_KEY not in reply.get_data(as_text=True)


def test_upstream_cookies_are_not_kept_between_calls(client, key, fake):
    fake.queue(json_reply({"ok": 1}, headers={"Set-Cookie": "__cf_bm=abc; Path=/"}))
    client.get("/v1/first", headers=auth(key))
    client.get("/v1/models", headers=auth(key))
    assert "cookie" not in fake.requests[-1].headers


def test_odd_query_strings_are_quoted_not_refused(client, key, fake):
    reply = client.get("/v1/models?q=a b&name=%E4%BD%A0&raw=\xe4", headers=auth(key))
    assert reply.status_code == 200
    assert fake.requests[-1].query == "q=a%20b&name=%E4%BD%A0&raw=%C3%A4"
