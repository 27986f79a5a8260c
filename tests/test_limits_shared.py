"""Limits shared by several relay instances: counted by the key itself, never by a row id."""

import contextlib
import hashlib

import pytest
import redis
import requests
from conftest import SECRETS_SEEN, auth, close_app, relay_settings
from fake_upstream import sse_reply

from relay.app import create_app
from relay.call import KeyRecord, limit_id

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
CHUNK = {
    "id": "c",
    "object": "chat.completion.chunk",
    "model": "gpt-4o",
    "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
}
# One key string adopted by both instances (`keys create --key`), as an operator would.
SHARED = "sk-shared-0123456789abcdef0123456789abcdef"
SECRETS_SEEN.add(SHARED)


def sha256(text):
    """The store's hash of a key."""
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def pair(relay_server, redis_url, tmp_path):
    """Factory: two relay instances (own SQLite databases) on one Redis, with extra env."""

    def start(**env):
        servers = [
            relay_server(
                workers=2,
                RELAY_DATABASE=str(tmp_path / f"{name}.sqlite"),
                RELAY_RATELIMIT_STORAGE_URI=redis_url,
                **env,
            )
            for name in ("a", "b")
        ]
        # Databases with different pasts: the same key gets different row ids.
        servers[0].create_key("filler")
        return servers

    return start


def adopt(servers, name, *options, key=SHARED):
    """Create the same key on every instance; returns the key."""
    for server in servers:
        assert server.create_key(name, "--key", key, *options) == key
    return key


def chat(server, key, **extra):
    """One chat call."""
    return requests.post(
        server.base_url + "/v1/chat/completions", json=CHAT, headers=auth(key), timeout=10, **extra
    )


def held_stream():
    """A fake upstream stream for stream requests only, held open after one chunk."""
    return sse_reply([CHUNK], hang_after=1, match=lambda req: (req.json or {}).get("stream"))


def open_stream(server, key):
    """Start a stream that the fake upstream holds open; (reply, its reader)."""
    reply = requests.post(
        server.base_url + "/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers=auth(key),
        stream=True,
        timeout=10,
    )
    if reply.status_code != 200:
        return reply, None
    # Keep the iterator: a dropped one makes urllib3 close the connection (a hang-up).
    reader = reply.iter_content(chunk_size=None)
    assert b"chat.completion.chunk" in next(reader)
    return reply, reader


def redis_names(url):
    """Every key name in the Redis database."""
    with redis.Redis.from_url(url) as client:
        return [name.decode() for name in client.keys("*")]


def test_limit_id_is_the_same_for_the_same_key_and_reveals_neither_key_nor_hash():
    row = {"id": 7, "name": "k", "enabled": 1, "created_at": 0.0, "key_hash": sha256(SHARED)}
    record = KeyRecord.from_row(row)
    elsewhere = KeyRecord.from_row({**row, "id": 1})  # the same key in another database
    other = KeyRecord.from_row({**row, "key_hash": sha256(SHARED + "x")})
    assert record.limit_id == elsewhere.limit_id == limit_id(sha256(SHARED))
    assert record.limit_id != other.limit_id
    assert 16 <= len(record.limit_id) <= 24
    assert record.limit_id not in sha256(SHARED) and SHARED not in record.limit_id
    # A deleted key (no hash left) can make no call: it has no limit name.
    assert KeyRecord.from_row({**row, "key_hash": None}).limit_id == ""


def test_sqlite_limits_file_counts_by_key_not_row_id(tmp_path, fake):
    """Two apps on one SQLite limits file: the same key shares its window even under
    different row ids, and different keys under the same row id never do."""
    limits_file = f"sqlite:///{tmp_path / 'limits.sqlite'}"
    apps = []
    for name in ("a", "b"):
        settings = relay_settings(tmp_path, fake, RATELIMIT_STORAGE_URI=limits_file)
        apps.append(create_app({**settings, "DATABASE": str(tmp_path / f"{name}.sqlite")}))
    try:
        keys_a, keys_b = (app.extensions["relay"].store.keys for app in apps)
        keys_a.create("filler")  # shifts row ids: SHARED is id 2 in a, id 1 in b
        keys_a.create("shared", key=SHARED, rpm=3)
        keys_b.create("shared", key=SHARED, rpm=3)
        clients = [app.test_client() for app in apps]

        def post(n, key):
            reply = clients[n].post("/v1/chat/completions", json=CHAT, headers=auth(key))
            return reply.status_code

        assert [post(n % 2, SHARED) for n in range(6)] == [200, 200, 200, 429, 429, 429]
        # Row id 3 in a and in b: two unrelated keys, each with its own window.
        alpha, _ = keys_a.create("alpha", rpm=1)
        keys_b.create("filler")
        beta, _ = keys_b.create("beta", rpm=1)
        SECRETS_SEEN.update((alpha, beta))
        assert [post(0, alpha), post(0, alpha), post(1, beta)] == [200, 429, 200]
    finally:
        for app in apps:
            close_app(app)


def test_rpm_holds_across_two_instances(pair):
    a, b = pair()
    key = adopt((a, b), "shared", "--rpm", "10")
    statuses = [chat(server, key).status_code for server in (a, b) * 15]
    assert statuses == [200] * 10 + [429] * 20


def test_tokens_per_minute_hold_across_two_instances(pair):
    a, b = pair()
    key = adopt((a, b), "shared", "--tpm", "100")
    # Each fake call uses 18 tokens: calls are admitted while fewer than 100 are counted.
    replies = [chat(server, key) for server in (a, b) * 7]
    assert [r.status_code for r in replies] == [200] * 6 + [429] * 8
    assert "tokens per minute" in replies[-1].json()["error"]["message"]


def test_calls_at_once_hold_across_two_instances(pair, fake):
    a, b = pair()
    key = adopt((a, b), "shared", "--max-concurrent", "3")
    fake.queue(*[held_stream() for _ in range(4)])
    held = []
    try:
        for server in (a, b, a):
            reply, reader = open_stream(server, key)
            assert reply.status_code == 200
            held.append((reply, reader))
        for server in (b, a, b):
            refused = chat(server, key)
            assert refused.status_code == 429
            assert "in flight" in refused.json()["error"]["message"]
        held.pop(0)[0].close()  # one stream ends: the other instance may take its slot
        reply, reader = open_stream(b, key)
        for _ in range(50):  # the release is written as the relay sees the hang-up
            if reply.status_code == 200:
                break
            reply, reader = open_stream(b, key)
        assert reply.status_code == 200
        held.append((reply, reader))
        assert chat(a, key).status_code == 429
    finally:
        for reply, _ in held:
            reply.close()


def test_unrelated_keys_with_the_same_row_id_never_share_a_counter(pair, fake, redis_url):
    a, b = pair()
    b.create_key("filler")
    # The same row ids on both instances (2 and 3), different keys.
    alpha = a.create_key("alpha", "--rpm", "2", "--tpm", "30")
    gamma = a.create_key("gamma", "--max-concurrent", "1")
    beta = b.create_key("beta", "--rpm", "2", "--tpm", "30")
    delta = b.create_key("delta", "--max-concurrent", "1")
    assert [chat(a, alpha).status_code for _ in range(3)] == [200, 200, 429]
    assert [chat(b, beta).status_code for _ in range(2)] == [200, 200]
    fake.queue(held_stream(), held_stream())
    with contextlib.ExitStack() as streams:
        readers = []  # kept: a dropped reader hangs up its stream
        for server, key in ((a, gamma), (b, delta)):
            reply, reader = open_stream(server, key)
            streams.callback(reply.close)
            assert reply.status_code == 200
            readers.append(reader)
        names = redis_names(redis_url)
    # Counters are named by each key's limit id: never the key, never its hash.
    for key in (alpha, beta, gamma, delta):
        assert not [n for n in names if key in n or sha256(key) in n]
    for key in (alpha, beta):
        assert [n for n in names if limit_id(sha256(key)) in n and "key-rpm" in n]
        assert [n for n in names if limit_id(sha256(key)) in n and "tpm" in n]
    for key in (gamma, delta):
        assert f"relay:inflight:{limit_id(sha256(key))}" in names
