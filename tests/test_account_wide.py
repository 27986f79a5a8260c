"""Endpoints that reach the whole upstream account are closed to keys unless opened."""

import pytest
from conftest import auth, on_store, relay_settings
from fake_upstream import json_reply

from relay.app import create_app
from relay.config import ConfigError
from relay.endpoints import account_group

SHARED = [
    ("GET", "/v1/files"),
    ("GET", "/v1/files/file-abc/content"),
    ("POST", "/v1/uploads"),
    ("GET", "/v1/batches"),
    ("GET", "/v1/chat/completions"),  # stored completions of every key holder
    ("GET", "/v1/chat/completions/chatcmpl-123/messages"),
    ("DELETE", "/v1/responses/resp_123"),
    ("GET", "/v1/vector_stores"),
    ("POST", "/v1/assistants"),
    ("GET", "/v1/threads/thread_1/runs"),
    ("GET", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/organization/usage/completions"),
]


@pytest.mark.parametrize(("method", "path"), SHARED)
def test_account_wide_endpoints_are_closed_by_default(client, key, fake, method, path):
    reply = client.open(path, method=method, json={"x": 1}, headers=auth(key))
    assert reply.status_code == 403
    error = reply.get_json()["error"]
    assert error["code"] == "endpoint_not_allowed" and "--endpoints" in error["message"]
    assert fake.requests == []


def test_the_legacy_face_closes_them_too(client, key, fake):
    reply = client.get("/api/v1/files", headers=auth(key))
    assert reply.status_code == 403 and reply.get_json()["code"] == 403
    assert fake.requests == []


def test_a_key_opened_for_a_group_calls_it_and_says_so(client, make_key, fake):
    key = make_key("files-only", endpoints="files")
    fake.queue(json_reply({"object": "list", "data": []}))
    assert client.get("/v1/files", headers=auth(key)).status_code == 200
    assert client.get("/v1/batches", headers=auth(key)).status_code == 403
    info = client.get("/v1/relay/key", headers=auth(key)).get_json()
    assert info["endpoints"] == ["files"]


def test_a_relay_can_open_a_group_for_every_key(tmp_path, fake, store_url):
    settings = relay_settings(tmp_path, fake, OPEN_ENDPOINTS="batches,files")
    app = create_app(on_store(settings, store_url, tmp_path))
    key, _ = app.extensions["relay"].store.keys.create("anyone")
    fake.queue(json_reply({"object": "list", "data": []}))
    client = app.test_client()
    assert client.get("/v1/batches", headers=auth(key)).status_code == 200
    assert client.get("/v1/relay/key", headers=auth(key)).get_json()["endpoints"] == [
        "batches",
        "files",
    ]
    app.extensions["relay"].close()
    with pytest.raises(ConfigError, match="not an endpoint group"):
        create_app(relay_settings(tmp_path, fake, OPEN_ENDPOINTS="files,everything"))


def test_the_cli_opens_and_checks_groups(app, runner, make_key):
    make_key("worker")
    assert (
        runner.invoke(args=["keys", "set", "worker", "--endpoints", "files,batches"]).exit_code == 0
    )
    assert app.extensions["relay"].store.keys.by_name("worker").endpoints == ("files", "batches")
    wrong = runner.invoke(args=["keys", "set", "worker", "--endpoints", "secrets"])
    assert wrong.exit_code != 0 and "not an endpoint group" in wrong.output


def test_calls_of_a_keys_own_are_not_account_wide():
    assert account_group("chat/completions", "POST") is None
    assert account_group("responses", "POST") is None
    assert account_group("embeddings", "POST") is None
    assert account_group("images/generations", "POST") is None
    assert account_group("filesystem", "GET") is None  # a prefix is a whole segment


def test_the_relays_own_namespace_and_old_account_billing_are_never_forwarded(client, key, fake):
    for path in ("/v1/relay/key/", "/v1/relay/anything", "/api/v1/relay/x/y"):
        reply = client.post(path, json={}, headers=auth(key))
        assert reply.status_code == 404, path
    credit = client.get("/v1/dashboard/billing/credit_grants", headers=auth(key))
    assert credit.status_code == 403
    assert client.get("/v1/dashboard/billing/subscription", headers=auth(key)).status_code == 200
    assert fake.requests == []


def test_a_key_with_an_allow_list_must_name_its_model(client, make_key, fake):
    narrow = make_key("narrow", models="gpt-4o")
    body = {"messages": [{"role": "user", "content": "hi"}]}
    reply = client.post("/v1/chat/completions", json=body, headers=auth(narrow))
    assert reply.status_code == 403 and "names none" in reply.get_json()["error"]["message"]
    assert fake.requests == []
