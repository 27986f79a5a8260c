"""Several upstreams and keys: routing by model, failover before the first byte, cool-downs."""

import pytest
from conftest import UPSTREAM_KEY, auth, free_port, relay_settings
from fake_upstream import FakeUpstream, hang, json_reply, sse_reply

from relay.app import create_app
from relay.config import ConfigError

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
ERROR_500 = {
    "error": {
        "message": "The server had an error",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}


@pytest.fixture
def second():
    """A second fake upstream."""
    upstream = FakeUpstream().start()
    upstream.models = ["claude-3-5-sonnet", "deepseek-chat"]
    yield upstream
    upstream.stop()


def others_upstream(second):
    """An upstreams.toml entry sending claude-* and deepseek-* models to the second fake."""
    return f"""
[[upstream]]
name = "others"
base_url = "{second.base_url}"
keys = ["sk-second"]
prefixes = ["claude-", "deepseek-"]
"""


def make_app(tmp_path, fake, toml=None, **settings):
    """An app with an upstreams file (and the default upstream unless overridden)."""
    if toml is not None:
        path = tmp_path / "upstreams.toml"
        path.write_text(toml)
        settings["UPSTREAMS_FILE"] = str(path)
    app = create_app(relay_settings(tmp_path, fake, **settings))
    key, _ = app.extensions["relay"].store.keys.create("router-test")
    return app, app.test_client(), key


def test_routes_by_exact_name_and_prefix(tmp_path, fake, second):
    toml = others_upstream(second) + 'models = ["special-model"]\n'
    app, client, key = make_app(tmp_path, fake, toml)
    for model, upstream in (
        ("claude-3-5-sonnet", second),
        ("deepseek-chat", second),
        ("special-model", second),
        ("gpt-4o", fake),
    ):
        before = len(upstream.requests)
        reply = client.post(
            "/v1/chat/completions", json={**CHAT, "model": model}, headers=auth(key)
        )
        assert reply.status_code == 200
        assert len(upstream.requests) == before + 1, model
    assert {r.upstream_key for r in second.requests} == {"sk-second"}
    assert {r.upstream_key for r in fake.requests} == {UPSTREAM_KEY}
    rows = app.extensions["relay"].store.db.query("SELECT upstream FROM usage ORDER BY id")
    assert [r["upstream"] for r in rows] == ["others", "others", "others", "default"]


def test_keys_take_turns(tmp_path, fake):
    _, client, key = make_app(tmp_path, fake, UPSTREAM_API_KEY="sk-a,sk-b,sk-c")
    for _ in range(6):
        client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    used = [r.upstream_key for r in fake.requests]
    assert sorted(used) == ["sk-a", "sk-a", "sk-b", "sk-b", "sk-c", "sk-c"]
    assert used[:3] != [used[0]] * 3


@pytest.mark.parametrize("status", [500, 429, 401, 503])
def test_failing_key_is_skipped_and_rests(tmp_path, fake, status):
    app, client, key = make_app(tmp_path, fake, UPSTREAM_API_KEY="sk-bad,sk-good")
    fake.queue(
        *[
            json_reply(ERROR_500, status=status, match=lambda r: r.upstream_key == "sk-bad")
            for _ in range(5)
        ]
    )
    for _ in range(4):
        reply = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
        assert reply.status_code == 200
    keys = [r.upstream_key for r in fake.requests]
    assert keys.count("sk-bad") == 1  # tried once, then resting for RELAY_UPSTREAM_COOLDOWN
    assert keys.count("sk-good") == 4
    db = app.extensions["relay"].store.db
    row = db.query_one("SELECT attempts FROM usage WHERE attempts > 1")
    assert row["attempts"] == 2


def test_refused_connection_falls_back_to_another_upstream(tmp_path, fake, second):
    toml = f"""
[[upstream]]
name = "primary"
base_url = "http://127.0.0.1:{free_port()}/v1"
keys = ["sk-primary"]
default = true
fallback = "backup"

[[upstream]]
name = "backup"
base_url = "{second.base_url}"
keys = ["sk-backup"]
"""
    _, client, key = make_app(tmp_path, fake, toml, UPSTREAM_BASE_URL=None)
    reply = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert reply.status_code == 200
    assert [r.upstream_key for r in second.requests] == ["sk-backup"]


def test_no_retry_once_a_stream_has_started(tmp_path, fake):
    _, client, key = make_app(tmp_path, fake, UPSTREAM_API_KEY="sk-a,sk-b")
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
    }
    fake.queue(sse_reply([chunk, chunk, chunk], interval=0.01, drop_after=2))
    reply = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    body = reply.get_data()
    reply.close()
    assert body.count(b"chat.completion.chunk") == 2
    assert b'"upstream_dropped"' in body
    assert len(fake.requests) == 1  # the second key was never asked: the stream had begun


def test_hanging_upstream_times_out_with_504(tmp_path, fake):
    _, client, key = make_app(
        tmp_path, fake, UPSTREAM_API_KEY="sk-a,sk-b", UPSTREAM_READ_TIMEOUT=0.3
    )
    fake.queue(hang(3))
    reply = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert reply.status_code == 504
    assert len(fake.requests) == 1  # a read timeout is not retried: it might run twice


def test_models_union_across_upstreams(tmp_path, fake, second):
    toml = others_upstream(second)
    app, client, key = make_app(tmp_path, fake, toml)
    ids = [m["id"] for m in client.get("/v1/models", headers=auth(key)).get_json()["data"]]
    assert {"gpt-3.5-turbo", "gpt-4o", "claude-3-5-sonnet", "deepseek-chat"} <= set(ids)
    assert "gpt-3.5" in ids  # the default alias of a served model
    assert "gpt-4" not in ids  # a real model name, no alias by default, and not served here
    limited, _ = app.extensions["relay"].store.keys.create("limited", models="claude-*")
    ids = [m["id"] for m in client.get("/v1/models", headers=auth(limited)).get_json()["data"]]
    assert ids == ["claude-3-5-sonnet"]


def test_upstreams_check_cli(tmp_path, fake):
    fake.rejected_keys.add("sk-revoked")
    app, _, _ = make_app(tmp_path, fake, UPSTREAM_API_KEY=f"{UPSTREAM_KEY},sk-revoked")
    result = app.test_cli_runner().invoke(args=["upstreams", "check"])
    assert result.exit_code == 1
    assert "default key #1: ok" in result.output and "default key #2: HTTP 401" in result.output
    assert UPSTREAM_KEY not in result.output


def test_bad_upstreams_file_is_one_sentence(tmp_path, fake):
    for text, phrase in (
        ("[[upstream]]\nname='x'\nkeys=['k']\n", "has no base_url"),
        ("[[upstream]\n", "is not valid TOML"),
        ("[[upstream]]\nbase_url='http://h/v1'\n", "has no keys"),
        (
            "[[upstream]]\nbase_url='http://h/v1'\nkeys=['k']\nfallback='nope'\n",
            "which is not configured",
        ),
    ):
        with pytest.raises(ConfigError, match=phrase):
            make_app(tmp_path, fake, text)


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1", "/index.php/api/v1"])
def test_model_list_follows_the_allow_list_on_every_face(app, client, make_key, prefix):
    limited = make_key("only-gpt-4o", models="gpt-4o")
    reply = client.get(f"{prefix}/models", headers=auth(limited))
    assert reply.status_code == 200
    ids = [m["id"] for m in reply.get_json()["data"]]
    aliases = app.config["MODEL_ALIASES"]
    assert "gpt-4o" in ids and {aliases.get(i, i) for i in ids} == {"gpt-4o"}
    everything = client.get(f"{prefix}/models", headers=auth(make_key("all-models")))
    assert len(everything.get_json()["data"]) > 1
    if prefix != "/v1":
        assert (reply.get_json()["code"], reply.get_json()["msg"]) == (0, "")
