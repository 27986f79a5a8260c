"""Quotas, budgets, expiry and allow-lists; balance endpoints; usage writes that never get lost."""

import multiprocessing
import os
import threading
import time

from conftest import auth, database_locked, on_store, relay_settings
from fake_upstream import FAKE_COMPLETION_TOKENS, FAKE_PROMPT_TOKENS

from relay.app import create_app
from relay.call import Call, KeyRecord
from relay.store import Store

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
PER_CALL = FAKE_PROMPT_TOKENS + FAKE_COMPLETION_TOKENS


def test_quota_spent_is_429_and_topup_reopens(client, make_key, runner, fake):
    key = make_key("q", quota_tokens=PER_CALL * 2)
    for _ in range(2):
        assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200
    reply = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert reply.status_code == 429
    assert reply.get_json()["error"]["code"] == "insufficient_user_quota"
    assert len(fake.requests) == 2
    runner.invoke(args=["keys", "topup", "q", "100"])
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200


def test_model_allow_list(client, make_key, fake):
    key = make_key("m", models="gpt-4o,text-embedding-*")
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200
    reply = client.post(
        "/v1/chat/completions", json={**CHAT, "model": "gpt-4-turbo"}, headers=auth(key)
    )
    assert reply.status_code == 403
    assert reply.get_json()["error"]["code"] == "model_not_allowed"
    ok = client.post(
        "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"}, headers=auth(key)
    )
    assert ok.status_code == 200
    legacy = client.post(
        "/api/v1/chat/completions", json={**CHAT, "model": "gpt-4-turbo", "api_secret_key": key}
    )
    assert legacy.status_code == 403 and legacy.get_json()["code"] == 403


def test_money_budget_with_price_table(tmp_path, fake, store_url):
    app = create_app(
        on_store(relay_settings(tmp_path, fake, PRICES="gpt-4o=10:30"), store_url, tmp_path)
    )
    client = app.test_client()
    key, _ = app.extensions["relay"].store.keys.create("b", budget=0.5)
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200
    row = app.extensions["relay"].store.db.query_one("SELECT cost FROM usage")
    expected = (FAKE_PROMPT_TOKENS * 10 + FAKE_COMPLETION_TOKENS * 30) / 1000
    assert abs(row["cost"] - expected) < 1e-9
    for _ in range(2):
        client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    reply = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert reply.status_code == 429 and "budget" in reply.get_json()["error"]["message"]
    sub = client.get("/v1/dashboard/billing/subscription", headers=auth(key)).get_json()
    assert sub["hard_limit_usd"] == 0.5 and sub["unit"] == "usd"
    app.extensions["relay"].close()


def test_monthly_quota_starts_again(client, app, make_key, fake):
    key = make_key("monthly", quota_tokens=PER_CALL, quota_period="monthly")
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 429
    db = app.extensions["relay"].store.db
    last_month = time.time() - 40 * 86400
    db.write(lambda c: c.execute("UPDATE keys SET period_started_at = ?", (last_month,)))
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200


def test_relay_key_and_billing_endpoints(client, make_key, fake):
    key = make_key("bal", quota_tokens=1000, rpm=30, expires_at="2099-01-31")
    client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    info = client.get("/v1/relay/key", headers=auth(key)).get_json()
    assert (info["name"], info["quota"], info["used"], info["remaining"], info["rpm"]) == (
        "bal",
        1000,
        PER_CALL,
        1000 - PER_CALL,
        30,
    )
    assert info["expires_at"].startswith("2099-01-31T23:59:59")
    sub = client.get("/v1/dashboard/billing/subscription", headers=auth(key)).get_json()
    assert sub["object"] == "billing_subscription" and sub["hard_limit_usd"] == 1000
    usage = client.get("/v1/dashboard/billing/usage", headers=auth(key)).get_json()
    assert usage["total_usage"] == PER_CALL * 100
    assert usage["daily_costs"][0]["line_items"] == [{"name": "gpt-4o", "cost": PER_CALL * 100}]
    bad = client.get("/v1/dashboard/billing/usage?start_date=2026-13-01", headers=auth(key))
    assert bad.status_code == 400
    early = client.get("/v1/dashboard/billing/usage?end_date=0001-01-08", headers=auth(key))
    assert early.status_code == 400 and early.get_json()["error"]["code"] == "invalid_request"
    legacy = client.post("/index.php/api/v1/relay/key", json={"api_secret_key": key}).get_json()
    assert legacy["code"] == 0 and legacy["msg"] == "" and legacy["remaining"] == 1000 - PER_CALL
    assert client.get("/v1/relay/key").status_code == 401


def test_balance_shows_only_the_callers_key(client, make_key, fake):
    alice, bob = make_key("alice"), make_key("bob")
    client.post("/v1/chat/completions", json=CHAT, headers=auth(alice))
    assert client.get("/v1/relay/key", headers=auth(bob)).get_json()["used"] == 0
    assert (
        client.get("/v1/dashboard/billing/usage", headers=auth(bob)).get_json()["total_usage"] == 0
    )


def _write_rows(path, spool, count, key_id):
    """Child process: record `count` usage rows from many threads at once."""
    recorder = Store(path, spool_path=spool)
    record = KeyRecord.from_row({"id": key_id, "name": "w", "enabled": 1, "created_at": 0})
    barrier = threading.Barrier(50)

    def work(n):
        barrier.wait()
        for _ in range(n):
            call = Call(face="openai", method="POST", path="chat/completions", key=record)
            call.set_usage((1, 2, 3), "upstream")
            call.status = 200
            recorder.record(call)

    threads = [threading.Thread(target=work, args=(count // 50,)) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorder.close()


def test_2000_concurrent_usage_writes_from_4_processes_lose_nothing(app, make_key):
    make_key("writer")
    path, spool = app.config["DATABASE"], app.config["SPOOL_FILE"]
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_write_rows, args=(path, spool, 500, 1)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    db = app.extensions["relay"].store.db
    assert db.query_one("SELECT COUNT(*) AS n FROM usage")["n"] == 2000
    assert db.query_one("SELECT used_tokens FROM keys WHERE id = 1")["used_tokens"] == 6000
    assert not os.path.exists(spool)


def test_rows_spool_when_the_database_refuses_and_come_back(app, make_key, client, fake):
    key = make_key("spooler")
    db = app.extensions["relay"].store.db
    app.extensions["relay"].store.usage.db.write_timeout = 0.3
    with database_locked(app):  # someone holds the write lock
        reply = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
        assert reply.status_code == 200  # the client is never told about our storage trouble
    assert db.query_one("SELECT COUNT(*) AS n FROM usage")["n"] == 0
    client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert db.query_one("SELECT COUNT(*) AS n FROM usage")["n"] == 2  # spooled row replayed
    assert db.query_one("SELECT used_tokens FROM keys")["used_tokens"] == 2 * PER_CALL
