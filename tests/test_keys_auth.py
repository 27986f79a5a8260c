"""Keys: where the client may put them, what happens to bad ones, and the keys CLI."""

import time

import pytest
from conftest import auth, database_dump

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("place", ["bearer", "body", "api-key", "x-api-key"])
def test_key_accepted_from_each_place(client, key, fake, place):
    body = dict(CHAT)
    headers = {}
    if place == "bearer":
        headers = auth(key)
    elif place == "body":
        body["api_secret_key"] = key
    else:
        headers = {place: key}
    reply = client.post("/v1/chat/completions", json=body, headers=headers)
    assert reply.status_code == 200
    recorded = fake.requests[-1]
    assert key not in str(recorded.headers) and key.encode() not in recorded.body


def _assert_invalid_key(reply, key=None):
    assert reply.status_code == 401
    error = reply.get_json()["error"]
    assert error["code"] == "invalid_api_key"
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("Incorrect API key provided")
    if key:
        assert key not in reply.get_data(as_text=True)


def test_missing_unknown_disabled_expired_deleted_keys(client, app, make_key, fake):
    _assert_invalid_key(client.post("/v1/chat/completions", json=CHAT))
    _assert_invalid_key(
        client.post("/v1/chat/completions", json=CHAT, headers=auth("sk-nope-123456")),
        "sk-nope-123456",
    )
    store = app.extensions["relay"].store.keys
    disabled = make_key("off")
    store.set_enabled("off", False)
    reply = client.post("/v1/chat/completions", json=CHAT, headers=auth(disabled))
    _assert_invalid_key(reply, disabled)
    assert "disabled" in reply.get_json()["error"]["message"]
    expired = make_key("old", expires_at=time.time() - 1)
    reply = client.post("/v1/chat/completions", json=CHAT, headers=auth(expired))
    _assert_invalid_key(reply, expired)
    assert "expired" in reply.get_json()["error"]["message"]
    gone = make_key("gone")
    store.delete("gone")
    _assert_invalid_key(client.post("/v1/chat/completions", json=CHAT, headers=auth(gone)), gone)
    assert fake.requests == []


def test_disable_takes_effect_on_the_next_request(client, app, key):
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200
    app.extensions["relay"].store.keys.set_enabled("default-key", False)
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 401
    app.extensions["relay"].store.keys.set_enabled("default-key", True)
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200


def test_only_hashes_are_stored(app, key):
    dump = database_dump(app)
    assert key not in dump
    assert key[-12:] not in dump


def test_cli_create_prints_key_alone_on_last_line(runner, client):
    result = runner.invoke(
        args=[
            "keys",
            "create",
            "alice",
            "--quota",
            "1000",
            "--rpm",
            "5",
            "--models",
            "gpt-4o,gpt-3.5*",
            "--expires",
            "2099-12-31",
        ]
    )
    assert result.exit_code == 0, result.output
    new_key = result.output.strip().splitlines()[-1]
    assert new_key.startswith("sk-relay-") and " " not in new_key
    reply = client.get("/v1/relay/key", headers=auth(new_key))
    assert reply.status_code == 200
    info = reply.get_json()
    assert (info["name"], info["quota"], info["rpm"]) == ("alice", 1000, 5)
    listing = runner.invoke(args=["keys", "list"]).output
    assert "alice" in listing and new_key not in listing


def test_cli_adopts_an_existing_key(runner, client):
    old = "dd61320fddde6c6568be8a0b0004a53a"
    result = runner.invoke(args=["keys", "create", "legacy-php", "--key", old])
    assert result.exit_code == 0
    assert result.output.strip().splitlines()[-1] == old
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(old)).status_code == 200
    again = runner.invoke(args=["keys", "create", "other", "--key", old])
    assert again.exit_code != 0 and "already in use" in again.output


def test_cli_disable_enable_delete_topup(runner, client, key):
    assert runner.invoke(args=["keys", "disable", "default-key"]).exit_code == 0
    assert client.get("/v1/models", headers=auth(key)).status_code == 401
    assert runner.invoke(args=["keys", "enable", "default-key"]).exit_code == 0
    assert client.get("/v1/models", headers=auth(key)).status_code == 200
    topped = runner.invoke(args=["keys", "topup", "default-key", "500"])
    assert topped.exit_code == 0 and "quota 500" in topped.output
    assert runner.invoke(args=["keys", "delete", "default-key"]).exit_code == 0
    assert client.get("/v1/models", headers=auth(key)).status_code == 401
    missing = runner.invoke(args=["keys", "disable", "nobody"])
    assert missing.exit_code != 0 and "no key named" in missing.output


def test_cli_rejects_bad_values(runner):
    bad_date = runner.invoke(args=["keys", "create", "x", "--expires", "tomorrow"])
    assert bad_date.exit_code != 0 and "2026-12-31" in bad_date.output
    assert runner.invoke(args=["keys", "create", "y", "--rpm", "0"]).exit_code != 0


@pytest.mark.parametrize("quoted", [True, False])
@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/api/v1/audio/transcriptions"])
def test_a_key_in_a_multipart_field_never_reaches_the_upstream(client, key, fake, path, quoted):
    name = '"api_secret_key"' if quoted else "api_secret_key"
    body = (
        f"--b\r\nContent-Disposition: form-data; name={name}\r\n\r\n{key}\r\n"
        '--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        '--b\r\nContent-Disposition: form-data; name="file"; filename="a.mp3"\r\n'
        "Content-Type: audio/mpeg\r\n\r\n" + "x" * 100 + "\r\n--b--\r\n"
    ).encode()
    reply = client.post(
        path, data=body, headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert reply.status_code == 200
    sent = fake.requests[-1]
    assert key.encode() not in sent.body and b"api_secret_key" not in sent.body
    assert b"whisper-1" in sent.body and b"x" * 100 in sent.body


def test_a_key_in_a_urlencoded_field_never_reaches_the_upstream(client, key, fake):
    body = f"api_secret_key={key}&purpose=fine-tune".encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    reply = client.post("/v1/some/form/endpoint", data=body, headers=headers)
    assert reply.status_code == 404  # the fake does not know the path; the relay forwarded it
    sent = fake.requests[-1]
    assert sent.body == b"purpose=fine-tune" and key.encode() not in sent.body
