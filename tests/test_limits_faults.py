"""Redis trouble is not an outage: limits fail open, fast, visibly, and come back by themselves."""

import os
import re
import signal
import time

import pytest
import requests
from conftest import SECRETS_SEEN, auth, close_app, relay_settings
from test_limits_shared import CHAT, adopt, chat, held_stream, open_stream

from relay.app import create_app

WARNING = "limits storage is unavailable"
TIMEOUT = 0.25  # the default RELAY_RATELIMIT_STORAGE_TIMEOUT
LIMITED = ("--rpm", "10", "--tpm", "1000000", "--max-concurrent", "3")


def health(server):
    """What /healthz says about the limits (it stays 200 either way)."""
    reply = requests.get(server.base_url + "/healthz", timeout=10)
    assert reply.status_code == 200
    return reply.json()["limits"]


def unavailable(server):
    """The relay_limits_unavailable_total counter on /metrics."""
    text = requests.get(server.base_url + "/metrics", timeout=10).text
    found = re.search(r"^relay_limits_unavailable_total (\S+)$", text, re.MULTILINE)
    assert found, text
    return float(found.group(1))


def wait_for(condition, seconds, what):
    """Poll until condition() is true; seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, f"no {what} after {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - started


def timed_calls(server, key, count, at_least=0.0):
    """`count` chat calls in a row (more until `at_least` seconds passed): statuses, seconds."""
    statuses, seconds = [], []
    began = time.monotonic()
    while len(statuses) < count or time.monotonic() - began < at_least:
        started = time.monotonic()
        statuses.append(chat(server, key).status_code)
        seconds.append(time.monotonic() - started)
    return statuses, seconds


def check_outage(server, key, fault):
    """Calls during a Redis outage: served, quickly, counted, and /healthz says degraded."""
    before = unavailable(server)
    fault()
    # More calls than the key's rpm, over more than two of the breaker's retry intervals.
    statuses, seconds = timed_calls(server, key, 15, at_least=2.5)
    assert statuses == [200] * len(statuses)
    # A failing storage costs at most one timeout per worker and retry interval (1 s),
    # never one per call: the breaker skips the storage in between.
    slow = [s for s in seconds if s >= TIMEOUT]
    assert len(slow) <= 1 + sum(seconds), seconds
    assert max(seconds) < 1.0, seconds
    guess = requests.get(server.base_url + "/v1/models", headers=auth("sk-wrong-guess"), timeout=5)
    assert guess.status_code == 401  # the guessing guard fails open too
    assert health(server) == "degraded"
    # Counted once per request that went without limits: the calls, the guess, this scrape.
    assert len(seconds) <= unavailable(server) - before <= len(seconds) + 2
    return seconds


@pytest.mark.parametrize("fault", ["stopped", "hung"])
def test_redis_trouble_serves_calls_then_limits_apply_again(relay_server, redis_factory, fault):
    own = redis_factory()
    server = relay_server(workers=1, RELAY_RATELIMIT_STORAGE_URI=own.url)
    key = server.create_key("k", *LIMITED)
    fresh = server.create_key("fresh", "--rpm", "10")
    assert chat(server, key).status_code == 200
    assert health(server) == "ok"
    seconds = check_outage(server, key, own.stop if fault == "stopped" else own.pause)
    back = time.monotonic()
    if fault == "stopped":
        own.start()  # same port, empty: no persistence
    else:
        own.resume()
    recovered = wait_for(lambda: health(server) == "ok", 10, "recovery on /healthz")
    slow = [round(s, 3) for s in seconds if s >= 0.1]
    print(
        f"{fault}: {len(seconds)} calls, first {seconds[0]:.3f} s, median "
        f"{sorted(seconds)[len(seconds) // 2]:.3f} s, over 0.1 s: {slow}; "
        f"limits back {recovered:.2f} s after Redis"
    )
    assert time.monotonic() - back < 5
    # Limits apply again at once. A hung Redis may still run the commands of checks that
    # timed out, so the check uses a key the outage did not touch.
    checked = key if fault == "stopped" else fresh
    assert timed_calls(server, checked, 11)[0] == [200] * 10 + [429]
    assert server.output().count(WARNING) == 1  # one worker, within a minute: one warning
    assert "Traceback" not in server.output()


def test_leases_of_a_killed_worker_expire_and_live_ones_are_renewed(
    relay_server, redis_url, fake, tmp_path
):
    lifetime = 6
    a, b = (
        relay_server(
            workers=1,
            RELAY_DATABASE=str(tmp_path / f"{name}.sqlite"),
            RELAY_RATELIMIT_STORAGE_URI=redis_url,
            RELAY_LEASE_SECONDS=str(lifetime),
        )
        for name in ("a", "b")
    )
    key = adopt((a, b), "capped", "--max-concurrent", "3")
    fake.queue(*[held_stream() for _ in range(5)])
    held = [open_stream(a, key), open_stream(a, key)]
    held.append(open_stream(b, key))
    b_opened = time.monotonic()
    try:
        assert [reply.status_code for reply, _ in held] == [200] * 3
        assert chat(b, key).status_code == 429
        os.kill(a.worker_pids()[0], signal.SIGKILL)  # its two leases are left behind
        freed = wait_for(lambda: chat(b, key).status_code == 200, lifetime + 5, "freed slot")
        print(f"a SIGKILLed worker's leases freed after {freed:.2f} s (lifetime {lifetime} s)")
        # B's stream outlives its lease's first lifetime: renewed, it still holds its slot.
        wait_for(lambda: time.monotonic() > b_opened + lifetime + 1, lifetime + 2, "renewal")
        held += [open_stream(b, key), open_stream(b, key)]
        assert [reply.status_code for reply, _ in held[-2:]] == [200, 200]
        assert chat(b, key).status_code == 429
    finally:
        for reply, _ in held:
            reply.close()


def test_sqlite_leases_expire_unless_their_holder_renews_them(make_app_on, tmp_path):
    app = make_app_on(f"sqlite:///{tmp_path / 'limits.sqlite'}", LEASE_SECONDS=1.0)
    leases = app.extensions["relay"].limits.leases
    # Taken straight in the store, as by a holder that stopped renewing without dying
    # (a hung process, or one whose pid was reused): only the expiry frees it.
    assert leases.store.acquire("abandoned", 1) is not None
    assert leases.store.acquire("abandoned", 1) is None
    taken = time.monotonic()
    live = leases.acquire("live", 1)  # this process renews it while it is held
    assert live is not None
    freed = wait_for(lambda: leases.store.acquire("abandoned", 1) is not None, 5, "expiry")
    assert 0.5 < freed < 3
    wait_for(lambda: time.monotonic() > taken + 2, 3, "two lifetimes")
    assert leases.acquire("live", 1) is None  # renewed: still held
    leases.release(live)
    assert leases.acquire("live", 1) is not None


@pytest.mark.server
def test_hung_redis_in_process_costs_one_short_timeout_per_second(
    redis_factory, make_app_on, caplog
):
    own = redis_factory()
    app = make_app_on(own.url)
    keys = app.extensions["relay"].store.keys
    key, _ = keys.create("k", rpm=10, tpm=1000000, max_concurrent=3)
    SECRETS_SEEN.add(key)
    client = app.test_client()
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200
    own.pause()
    started = time.monotonic()
    first = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    first_seconds = time.monotonic() - started
    assert first.status_code == 200 and first_seconds < TIMEOUT + 0.2, first_seconds
    seconds = []
    for _ in range(10):
        started = time.monotonic()
        assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200
        seconds.append(time.monotonic() - started)
    assert len([s for s in seconds if s >= TIMEOUT]) <= 1 + sum(seconds), seconds
    assert client.get("/healthz").get_json() == {"status": "ok", "limits": "degraded"}
    metrics = client.get("/metrics").get_data(as_text=True)
    assert re.search(r"^relay_limits_unavailable_total [1-9]", metrics, re.MULTILINE), metrics
    assert [r.levelname for r in caplog.records if WARNING in r.getMessage()] == ["WARNING"]
    own.resume()
    wait_for(lambda: client.get("/healthz").get_json()["limits"] == "ok", 5, "recovery")


@pytest.fixture
def make_app_on(tmp_path, fake):
    """Factory: an in-process app whose limits live at a given storage URI."""
    apps = []

    def make(uri, **overrides):
        app = create_app(relay_settings(tmp_path, fake, RATELIMIT_STORAGE_URI=uri, **overrides))
        apps.append(app)
        return app

    yield make
    for app in apps:
        close_app(app)
