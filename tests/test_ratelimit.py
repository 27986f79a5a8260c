"""Per-key limits that hold across gunicorn workers, on SQLite by default and on a real Redis."""

import concurrent.futures
import time

import requests
from conftest import auth
from fake_upstream import sse_reply

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def burst(server, key, count, path="/v1/chat/completions", body=None):
    """Fire `count` calls at once; return the replies."""
    session = requests.Session()

    def call(_):
        return requests.post(
            server.base_url + path, json=body or CHAT, headers=auth(key), timeout=20
        )

    with concurrent.futures.ThreadPoolExecutor(15) as pool:
        replies = list(pool.map(call, range(count)))
    session.close()
    return replies


def check_exactly_ten_of_thirty(server):
    """The rpm=10 key gets exactly 10 of 30 rapid calls through, the rest well-formed 429s."""
    key = server.create_key("limited", "--rpm", "10")
    replies = burst(server, key, 30)
    statuses = [r.status_code for r in replies]
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 20
    passed = next(r for r in replies if r.status_code == 200)
    assert passed.headers["X-RateLimit-Limit"] == "10" and "Retry-After" not in passed.headers
    refused = next(r for r in replies if r.status_code == 429)
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "10" in error["message"]
    assert error["message"].count("Rate limit") == 1
    assert int(refused.headers["Retry-After"]) > 0
    assert refused.headers["X-RateLimit-Limit"] == "10"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert int(refused.headers["X-RateLimit-Reset"]) > time.time()
    legacy = requests.post(
        server.base_url + "/index.php/api/v1/chat/completions",
        json={**CHAT, "api_secret_key": key},
        timeout=10,
    )
    assert legacy.status_code == 429
    assert legacy.json()["code"] == 429 and legacy.json()["msg"]
    assert "Retry-After" in legacy.headers


def test_ten_per_minute_across_two_workers_sqlite(relay_server, fake):
    server = relay_server(workers=2)
    assert len(server.worker_pids()) == 2
    check_exactly_ten_of_thirty(server)


def test_ten_per_minute_across_two_workers_redis(relay_server, fake, redis_url):
    server = relay_server(workers=2, RELAY_RATELIMIT_STORAGE_URI=redis_url)
    check_exactly_ten_of_thirty(server)


def test_limit_change_takes_effect_without_restart(relay_server, fake):
    server = relay_server(workers=2)
    key = server.create_key("changing", "--rpm", "100")
    assert [r.status_code for r in burst(server, key, 5)].count(200) == 5
    assert server.flask("keys", "set", "changing", "--rpm", "6").returncode == 0
    # A new limit is a new counter: the next minute allows exactly 6.
    assert [r.status_code for r in burst(server, key, 10)].count(200) == 6
    assert server.flask("keys", "set", "changing", "--no-rpm").returncode == 0
    assert [r.status_code for r in burst(server, key, 10)].count(200) == 10


def test_default_rpm_applies_to_keys_without_their_own(relay_server, fake):
    server = relay_server(workers=2, RELAY_DEFAULT_RPM="4")
    plain = server.create_key("plain")
    own = server.create_key("own", "--rpm", "8")
    assert [r.status_code for r in burst(server, plain, 8)].count(200) == 4
    assert [r.status_code for r in burst(server, own, 12)].count(200) == 8
    info = requests.get(server.base_url + "/v1/relay/key", headers=auth(plain), timeout=5).json()
    assert info["rpm"] == 4


def test_concurrency_cap_with_held_streams(relay_server, fake):
    server = relay_server(workers=2)
    key = server.create_key("capped", "--max-concurrent", "2")
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
    }
    fake.queue(sse_reply([chunk], hang_after=1), sse_reply([chunk], hang_after=1))
    url = server.base_url + "/v1/chat/completions"
    held = [
        requests.post(
            url, json={**CHAT, "stream": True}, headers=auth(key), stream=True, timeout=10
        )
        for _ in range(2)
    ]
    # Keep the iterators: a discarded one makes urllib3 close the connection (a real hang-up).
    readers = [reply.iter_content(chunk_size=None) for reply in held]
    for reply, reader in zip(held, readers, strict=True):
        assert reply.status_code == 200
        assert b"chat.completion.chunk" in next(reader)  # the stream is open and flowing
    third = requests.post(url, json=CHAT, headers=auth(key), timeout=10)
    assert third.status_code == 429
    assert "in flight" in third.json()["error"]["message"]
    held[0].close()
    deadline = time.monotonic() + 5
    while requests.post(url, json=CHAT, headers=auth(key), timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "slot not released after the stream closed"
        time.sleep(0.05)
    held[1].close()


def test_tokens_per_minute(client, make_key, fake):
    key = make_key("tpm", tpm=30)  # each fake call uses 18 tokens
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200
    third = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert third.status_code == 429 and "tokens per minute" in third.get_json()["error"]["message"]
    assert int(third.headers["Retry-After"]) >= 1


def test_global_limit(relay_server, fake):
    server = relay_server(workers=2, RELAY_GLOBAL_RPM="6")
    alice, bob = server.create_key("alice"), server.create_key("bob")
    statuses = [r.status_code for r in burst(server, alice, 4) + burst(server, bob, 4)]
    assert statuses.count(200) == 6
    assert requests.get(server.base_url + "/healthz", timeout=5).status_code == 200


def test_forwarded_for_spoofing_does_not_bypass_address_limit(relay_server, fake):
    direct = relay_server(workers=2, RELAY_UNAUTHENTICATED_RPM="5")
    statuses = [
        requests.get(
            direct.base_url + "/v1/models",
            timeout=5,
            headers={"Authorization": f"Bearer sk-guess-{n}", "X-Forwarded-For": f"198.51.100.{n}"},
        ).status_code
        for n in range(10)
    ]
    assert statuses == [401] * 5 + [429] * 5
    proxied = relay_server(workers=2, RELAY_UNAUTHENTICATED_RPM="5", RELAY_PROXY_COUNT="1")
    statuses = [
        requests.get(
            proxied.base_url + "/v1/models",
            timeout=5,
            headers={
                "Authorization": "Bearer sk-guess",
                "X-Forwarded-For": f"198.51.100.{n}, 203.0.113.7",
            },
        ).status_code
        for n in range(6)
    ]
    # Only the hop our one proxy added counts; the forged first entries change nothing.
    assert statuses == [401] * 5 + [429]
