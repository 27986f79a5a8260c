"""Several relay instances on one PostgreSQL: one truth for keys, quotas and usage; a slow or
stopped database holds up nothing else and loses no row; a SQLite store moved over whole."""

import concurrent.futures
import itertools
import json
import os
import threading
import time
from urllib.parse import urlsplit

import gevent
import psycopg
import pytest
import requests
from conftest import SECRETS_SEEN, auth, close_app, relay_settings
from fake_upstream import FAKE_COMPLETION_TOKENS, FAKE_PROMPT_TOKENS, json_reply, sse_reply

from relay.app import create_app
from relay.store.group_commit import GroupCommit
from relay.store.postgres import PostgresDatabase

pytestmark = pytest.mark.server
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}
PER_CALL = FAKE_PROMPT_TOKENS + FAKE_COMPLETION_TOKENS


def chunk(text):
    """One SSE chat.completion.chunk carrying text."""
    payload = {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def rows(url, sql, params=()):
    """Rows of a query on the database at url (our own connection, not the relay's)."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def instance(relay_server, tmp_path, url, name, **env):
    """A relay instance (its own gunicorn master) on the shared database, its own spool."""
    SECRETS_SEEN.add(urlsplit(url).password)  # the audit checks no log line ever shows it
    spool = str(tmp_path / f"spool-{name}.jsonl")
    return relay_server(RELAY_DATABASE=url, RELAY_SPOOL_FILE=spool, **env)


# --- one truth across instances ------------------------------------------------------------


def test_a_quota_holds_across_two_instances(relay_server, fake, pg_url, tmp_path):
    first = instance(relay_server, tmp_path, pg_url, "a")
    second = instance(relay_server, tmp_path, pg_url, "b")
    quota = 50
    key = first.create_key("shared", "--quota", str(quota))
    # As in test_billing: each call's estimate is exact and max_tokens covers its answer,
    # so its estimate error is 0 and no overrun at all is allowed.
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "一二三四五六七八九十百"}]}
    body["max_tokens"] = FAKE_COMPLETION_TOKENS
    reply = {"id": "x", "object": "chat.completion", "model": "gpt-4o", "choices": []}
    reply["usage"] = {"prompt_tokens": FAKE_PROMPT_TOKENS, "completion_tokens": 7}
    for _ in range(30):
        fake.queue(json_reply(reply, delay=0.3))  # all thirty are in flight together
    start = threading.Barrier(30)

    def call(number):
        server = (first, second)[number % 2]  # alternating instances
        start.wait()
        return requests.post(
            server.base_url + "/v1/chat/completions", json=body, headers=auth(key), timeout=30
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        statuses = list(pool.map(call, range(30)))
    assert set(statuses) <= {200, 429}
    [(used,)] = rows(pg_url, "SELECT used_tokens FROM keys WHERE name = 'shared'")
    [(held,)] = rows(pg_url, "SELECT COUNT(*) FROM inflight")
    assert used == statuses.count(200) * PER_CALL and held == 0
    assert used <= quota  # overrun at most one call's estimate error, here 0
    assert statuses.count(200) == quota // PER_CALL  # and the room was used


def test_keys_and_usage_are_one_truth_for_every_instance(relay_server, fake, pg_url, tmp_path):
    first = instance(relay_server, tmp_path, pg_url, "a")
    key = first.create_key("roamer")
    # A stream in flight on the first instance while the second starts (and recovers lost
    # calls): the same machine, a live worker, so its call is not taken for a lost one.
    events = [chunk(f"piece {n} ") for n in range(20)] + [b"data: [DONE]\n\n"]
    fake.queue(sse_reply(events, interval=0.1))
    with requests.post(
        first.base_url + "/v1/chat/completions",
        json=STREAM,
        headers=auth(key),
        stream=True,
        timeout=30,
    ) as streamed:
        pieces = streamed.iter_content(chunk_size=None)
        next(pieces)
        second = instance(relay_server, tmp_path, pg_url, "b")
        assert b"[DONE]" in b"".join(pieces)
    for _ in range(2):
        assert (
            requests.post(
                second.base_url + "/v1/chat/completions", json=CHAT, headers=auth(key), timeout=10
            ).status_code
            == 200
        )
    outcomes = rows(pg_url, "SELECT outcome FROM usage ORDER BY id")
    assert outcomes == [("ok",)] * 3  # no `worker_lost` row for the live stream
    report = first.flask("usage", "--by", "key", "--csv")
    assert report.returncode == 0 and "roamer,3," in report.stdout  # B's calls seen from A
    info = requests.get(first.base_url + "/v1/relay/key", headers=auth(key), timeout=10).json()
    assert info["used"] > 2 * PER_CALL  # the stream's tokens and B's two calls
    assert first.flask("keys", "disable", "roamer").returncode == 0
    refused = requests.post(
        second.base_url + "/v1/chat/completions", json=CHAT, headers=auth(key), timeout=10
    )
    assert refused.status_code == 401 and "disabled" in refused.json()["error"]["message"]
    assert second.flask("keys", "enable", "roamer").returncode == 0
    again = requests.post(
        first.base_url + "/v1/chat/completions", json=CHAT, headers=auth(key), timeout=10
    )
    assert again.status_code == 200


def test_one_failing_write_in_a_batch_leaves_the_others_alone(pg_url, tmp_path):
    db = PostgresDatabase(pg_url, spool_path=str(tmp_path / "spool.jsonl"))
    db.migrate()
    commits = GroupCommit(db, batch=True)  # savepoints sent along with the next statement
    outcomes = {}

    def call_ends(number):
        insert = "INSERT INTO health (id, checked_at) VALUES (?, 0)"
        clash = 1 if number == 3 else number
        try:
            outcomes[number] = commits.run(lambda conn: conn.execute(insert, (clash,)).rowcount)
        except psycopg.IntegrityError:
            outcomes[number] = "clash"

    gevent.joinall([gevent.spawn(call_ends, n) for n in range(5)])
    db.close()
    assert outcomes == {0: 1, 1: 1, 2: 1, 3: "clash", 4: 1}
    assert rows(pg_url, "SELECT id FROM health ORDER BY id") == [(0,), (1,), (2,), (4,)]


# --- a slow database holds up nothing else -----------------------------------------------------


def test_streams_flow_while_a_write_waits_for_a_lock(relay_server, fake, pg_url, tmp_path):
    server = instance(relay_server, tmp_path, pg_url, "a", workers=1)  # both calls on one worker
    streamer, waiter = server.create_key("streamer"), server.create_key("waiter")
    events = [chunk(f"piece {n} ") for n in range(40)] + [b"data: [DONE]\n\n"]
    fake.queue(sse_reply(events, interval=0.1))
    arrivals = []
    with requests.post(
        server.base_url + "/v1/chat/completions",
        json=STREAM,
        headers=auth(streamer),
        stream=True,
        timeout=30,
    ) as streamed:
        pieces = streamed.iter_content(chunk_size=None)
        next(pieces)
        # Our own connection holds the waiter's key row: its admission (SELECT … FOR UPDATE)
        # waits in the relay's worker, the same worker that relays the stream.
        blocker = psycopg.connect(pg_url, autocommit=True)
        blocker.execute("BEGIN")
        blocker.execute("SELECT id FROM keys WHERE name = 'waiter' FOR UPDATE")
        waited = {}

        def blocked_call():
            began = time.monotonic()
            try:
                waited["status"] = requests.post(
                    server.base_url + "/v1/chat/completions",
                    json=CHAT,
                    headers=auth(waiter),
                    timeout=30,
                ).status_code
            except requests.RequestException as exc:  # a worker frozen by a blocking wait
                waited["status"] = repr(exc)
            waited["seconds"] = time.monotonic() - began

        thread = threading.Thread(target=blocked_call)
        thread.start()
        released_at = time.monotonic() + 2.0
        for piece in pieces:
            arrivals.append(time.monotonic())
            if blocker is not None and time.monotonic() >= released_at:
                assert thread.is_alive()  # still waiting for the lock after 2 s
                blocker.execute("ROLLBACK")
                blocker.close()
                blocker = None
            if b"[DONE]" in piece:
                break
        thread.join(30)
    assert blocker is None and waited["status"] == 200 and waited["seconds"] >= 2.0
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert len(arrivals) > 15 and max(gaps) < 0.6  # chunks kept coming every ~0.1 s


# --- a stopped database loses nothing -------------------------------------------------------


def test_calls_while_the_database_is_down_get_503_store_unavailable(
    postgres_factory, fake, tmp_path
):
    database = postgres_factory()
    url = database.create_database("relay")
    settings = relay_settings(tmp_path, fake, DATABASE=url, SPOOL_FILE=str(tmp_path / "s.jsonl"))
    app = create_app(settings)
    try:
        key, _ = app.extensions["relay"].store.keys.create("k")
        client = app.test_client()
        assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200
        database.kill()
        for path, body in (
            ("/v1/chat/completions", CHAT),
            ("/api/v1/chat/completions", {**CHAT, "api_secret_key": key}),
        ):
            reply = client.post(path, json=body, headers=auth(key))
            assert reply.status_code == 503 and reply.mimetype == "application/json"
            assert reply.get_json()["error"]["code"] == "store_unavailable"
        health = client.get("/healthz")
        assert health.status_code == 503 and health.get_json()["error"]["code"]
        assert len(fake.requests) == 1  # nothing reached the upstream unchecked
        database.start()
        assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200
    finally:
        close_app(app)


def test_a_restart_of_the_database_loses_and_doubles_no_row(
    relay_server, fake, postgres_factory, tmp_path
):
    database = postgres_factory()
    url = database.create_database("relay")
    server = instance(relay_server, tmp_path, url, "a")
    key = server.create_key("steady")
    events = [chunk(f"piece {n} ") for n in range(30)] + [b"data: [DONE]\n\n"]
    for _ in range(6):
        fake.queue(sse_reply(events, interval=0.1))  # ~3 s each
    first_bytes = threading.Semaphore(0)

    def stream(_):
        with requests.post(
            server.base_url + "/v1/chat/completions",
            json=STREAM,
            headers=auth(key),
            stream=True,
            timeout=60,
        ) as reply:
            pieces = reply.iter_content(chunk_size=None)
            next(pieces)
            first_bytes.release()
            return b"[DONE]" in b"".join(pieces)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stream, n) for n in range(6)]
        for _ in range(6):
            assert first_bytes.acquire(timeout=20)
        database.stop()  # every stream ends while the database is down
        assert all(future.result() for future in futures)
    refused = requests.post(
        server.base_url + "/v1/chat/completions", json=CHAT, headers=auth(key), timeout=30
    )
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
    spool = tmp_path / "spool-a.jsonl"
    assert len(spool.read_text().splitlines()) == 6  # the six streams' rows wait there
    database.start()  # the same port: the relay's pools reconnect
    deadline = time.monotonic() + 30
    while True:  # the first call after the restart moves the spool in
        ok = requests.post(
            server.base_url + "/v1/chat/completions", json=CHAT, headers=auth(key), timeout=30
        )
        if ok.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ok.status_code == 200 and spool.stat().st_size == 0  # moved in by that call
    calls = rows(url, "SELECT call_id, outcome, stream FROM usage")
    assert len(calls) == len({row[0] for row in calls})  # no call twice
    assert sorted(row[1:] for row in calls) == [("ok", 0), *[("ok", 1)] * 6]  # none lost
    assert rows(url, "SELECT COUNT(*) FROM inflight") == [(0,)]
    [(used,)] = rows(url, "SELECT used_tokens FROM keys WHERE name = 'steady'")
    [(charged,)] = rows(url, "SELECT SUM(charged_tokens) FROM usage WHERE key_id IS NOT NULL")
    assert used == charged  # every row charged once


# --- moving over -------------------------------------------------------------------------


def test_copy_to_moves_a_sqlite_store_whole(relay_server, fake, pg_url, tmp_path):
    old = relay_server()  # on its SQLite file
    keys = {name: old.create_key(name, "--quota", "100000") for name in ("ann", "bob", "gone")}
    for name in ("ann", "bob", "gone", "ann"):
        requests.post(
            old.base_url + "/v1/chat/completions", json=CHAT, headers=auth(keys[name]), timeout=10
        )
    assert old.flask("keys", "delete", "gone").returncode == 0
    old.stop()
    copied = old.flask("db", "copy-to", pg_url)
    assert copied.returncode == 0, copied.stderr
    assert "keys: 3 in SQLite, 3 in PostgreSQL" in copied.stdout
    assert "usage rows: 4 in SQLite, 4 in PostgreSQL" in copied.stdout
    assert "next key id: 4" in copied.stdout
    again = old.flask("db", "copy-to", pg_url)
    assert again.returncode == 1 and "not empty" in again.stderr + again.stdout
    new = instance(relay_server, tmp_path, pg_url, "new")
    reply = requests.post(
        new.base_url + "/v1/chat/completions", json=CHAT, headers=auth(keys["ann"]), timeout=10
    )
    assert reply.status_code == 200  # a copied key works, its hash came along
    info = requests.get(new.base_url + "/v1/relay/key", headers=auth(keys["ann"]), timeout=10)
    assert info.json()["used"] == 3 * PER_CALL  # two calls before the move, one after
    assert (
        requests.post(
            new.base_url + "/v1/chat/completions", json=CHAT, headers=auth(keys["gone"]), timeout=10
        ).status_code
        == 401
    )
    new.create_key("carol")
    assert rows(pg_url, "SELECT id FROM keys WHERE name = 'carol'") == [(4,)]  # never 1..3
    report = new.flask("usage", "--by", "key", "--csv").stdout
    assert "gone (deleted),1," in report and "ann,3," in report


def test_copy_to_refuses_calls_in_flight(relay_server, fake, pg_url, tmp_path):
    old = relay_server(workers=1)
    key = old.create_key("busy")
    fake.queue(json_reply({"choices": []}, delay=3.0))
    thread = threading.Thread(
        target=requests.post,
        args=(old.base_url + "/v1/chat/completions",),
        kwargs={"json": CHAT, "headers": auth(key), "timeout": 10},
    )
    thread.start()
    assert fake.wait_for_requests(1)
    refused = old.flask("db", "copy-to", pg_url)
    thread.join()
    assert refused.returncode == 1 and "in flight" in refused.stderr
    assert rows(pg_url, "SELECT COUNT(*) FROM pg_tables WHERE tablename = 'keys'") == [(0,)]
    assert os.path.exists(old.db_path)
