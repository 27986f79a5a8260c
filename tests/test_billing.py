"""Billing a key holder cannot dodge: the real end of a stream, ids never reused, checked
numbers, every paid endpoint metered, reservations against parallel calls, lost workers."""

import concurrent.futures
import io
import json
import os
import signal
import sqlite3
import threading
import time

import pytest
import requests
import sqlite_utils
from conftest import auth, relay_settings
from fake_upstream import (
    FAKE_COMPLETION_TOKENS,
    FAKE_PROMPT_TOKENS,
    SPEECH_BYTES,
    json_reply,
    sse_reply,
)

from relay.store import Store, schema

PRICES = (
    "gpt-4o=10:30,dall-e-2=0.02/image,dall-e-3=0.04/image,dall-e-3@1024x1792@hd=0.12/image,"
    "tts-1=0.001/character,whisper-1=0.006/second"
)
TOKENS_PER_MONEY = 1000
STREAM = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def settings(tmp_path, fake):
    """Prices for tokens and units, and a small token rate so unit charges are easy to read."""
    return relay_settings(tmp_path, fake, PRICES=PRICES, TOKENS_PER_MONEY=TOKENS_PER_MONEY)


def chunk(text, spaced=False):
    """A chat.completion.chunk carrying text, as compact or spaced JSON."""
    payload = {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    separators = (", ", ": ") if spaced else (",", ":")
    return b"data: " + json.dumps(payload, separators=separators).encode() + b"\n\n"


def usage_chunk(prompt, completion, total=None):
    """The usage chunk OpenAI sends last when asked (choices empty)."""
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion if total is None else total,
    }
    payload = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o", "choices": []}
    return b"data: " + json.dumps({**payload, "usage": usage}).encode() + b"\n\n"


def last_row(app):
    """The newest usage row."""
    return app.extensions["relay"].store.db.query_one("SELECT * FROM usage ORDER BY id DESC")


def key_record(app, name):
    """A key's current record."""
    return app.extensions["relay"].store.keys.by_name(name)


# --- the end of a stream -----------------------------------------------------------------


@pytest.mark.parametrize("marker", ["[DONE]", "data: [DONE]", "\n\ndata: [DONE]\n\n"])
def test_the_end_marker_in_generated_text_does_not_end_the_billing(
    app, client, make_key, fake, marker
):
    key = make_key("talker")
    events = [chunk("Sure: "), chunk(marker), chunk(" and more"), usage_chunk(100, 5000), "[DONE]"]
    fake.queue(sse_reply(events, interval=0.05))
    body = client.post("/v1/chat/completions", json=STREAM, headers=auth(key)).get_data()
    assert body.endswith(b"data: [DONE]\n\n") and b"and more" in body
    row = last_row(app)
    assert (row["usage_source"], row["total_tokens"], row["outcome"]) == ("upstream", 5100, "ok")
    assert key_record(app, "talker").used_tokens == 5100


def test_nothing_after_the_end_event_reaches_the_client(app, client, key, fake):
    events = [chunk("a"), usage_chunk(3, 1), "[DONE]", chunk("smuggled"), "[DONE]"]
    fake.queue(sse_reply(events, interval=0.02))
    body = client.post("/v1/chat/completions", json=STREAM, headers=auth(key)).get_data()
    assert b"smuggled" not in body and body.count(b"[DONE]") == 1
    assert last_row(app)["total_tokens"] == 4


@pytest.mark.parametrize("one_read", [False, True])
def test_bytes_out_and_first_byte_when_the_end_comes_with_the_last_content(
    app, client, key, fake, one_read
):
    tail = chunk("last words") + usage_chunk(5, 2) + b"data: [DONE]\n\n"
    events = [tail] if one_read else [chunk("first "), tail]  # bytes: sent as one read
    fake.queue(sse_reply(events, interval=0.02))
    body = client.post("/v1/chat/completions", json=STREAM, headers=auth(key)).get_data()
    row = last_row(app)
    assert row["bytes_out"] == len(body) > 0
    assert row["ttfb_ms"] is not None and row["ttfb_ms"] > 0
    assert (row["total_tokens"], row["usage_source"]) == (7, "upstream")


# --- estimates -----------------------------------------------------------------------------


def test_a_cut_stream_of_spaced_json_is_estimated_from_its_text(app, client, key, fake):
    words = " ".join(f"word{n}" for n in range(40))
    fake.queue(sse_reply([chunk(words, spaced=True), chunk(words, spaced=True)], drop_after=2))
    client.post("/v1/chat/completions", json=STREAM, headers=auth(key)).get_data()
    row = last_row(app)
    assert row["outcome"] == "upstream_dropped" and row["usage_source"] == "estimated"
    assert row["completion_tokens"] >= 80 * 1.3 - 1  # 80 words came through


def test_an_emoji_prompt_is_not_free(app, client, key, fake):
    fake.send_usage = False
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "😀" * 20000}]}
    assert client.post("/v1/chat/completions", json=body, headers=auth(key)).status_code == 200
    row = last_row(app)
    assert row["usage_source"] == "estimated" and row["prompt_tokens"] >= 20000


def test_the_legacy_face_shows_the_old_rule_and_bills_the_new_one(app, client, key, fake):
    fake.send_usage = False
    body = {
        "messages": [{"role": "user", "content": "你好\uff0c世界\uff01"}],
        "api_secret_key": key,
    }
    shown = client.post("/api/v1/chat/completions", json=body).get_json()["usage"]
    assert shown["prompt_tokens"] == 4  # CJK characters + words x 1.3: punctuation is free
    assert last_row(app)["prompt_tokens"] == 6  # the relay's rule counts the two marks


# --- upstream numbers that are not believable ------------------------------------------------


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": -1000000},
        {"prompt_tokens": -50, "completion_tokens": 5, "total_tokens": 15},
        {"prompt_tokens": "10", "completion_tokens": 5, "total_tokens": 15},
        {"prompt_tokens": 10, "completion_tokens": 5.5, "total_tokens": 15},
        {"prompt_tokens": 10**12, "completion_tokens": 5, "total_tokens": 10**12 + 5},
    ],
)
def test_unbelievable_upstream_usage_is_replaced_by_the_estimate(
    app, client, make_key, fake, usage
):
    key = make_key("counted", quota_tokens=100000)
    before = key_record(app, "counted").used_tokens
    reply = {
        "id": "x",
        "object": "chat.completion",
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "four words in all"}}],
        "usage": usage,
    }
    fake.queue(json_reply(reply))
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200
    row = last_row(app)
    assert row["usage_source"] == "replaced" and 0 < row["total_tokens"] < 100
    assert key_record(app, "counted").used_tokens == before + row["total_tokens"]


def test_a_total_below_prompt_plus_completion_is_recomputed(app, client, key, fake):
    reply = {"id": "x", "object": "chat.completion", "model": "gpt-4o", "choices": []}
    reply["usage"] = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 1}
    fake.queue(json_reply(reply))
    client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    row = last_row(app)
    assert (row["total_tokens"], row["usage_source"]) == (15, "upstream")


# --- key ids -------------------------------------------------------------------------------


def test_a_deleted_keys_id_and_calls_never_pass_to_a_newer_key(app, client, make_key, runner):
    old = make_key("old")
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(old)).status_code == 200
    old_id = key_record(app, "old").id
    assert runner.invoke(args=["keys", "delete", "old"]).exit_code == 0
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(old)).status_code == 401
    new = make_key("new")
    assert key_record(app, "new").id > old_id
    usage = client.get("/v1/dashboard/billing/usage", headers=auth(new)).get_json()
    assert usage["total_usage"] == 0 and usage["daily_costs"] == []
    assert client.get("/v1/relay/key", headers=auth(new)).get_json()["used"] == 0
    report = runner.invoke(args=["usage", "--by", "key"]).output
    assert "old (deleted)" in report and "new" not in report
    again = make_key("old")  # the name is free again, with an id of its own
    assert key_record(app, "old").id not in (old_id, key_record(app, "new").id) and again


def test_an_existing_store_is_migrated_so_ids_are_never_reused(tmp_path):
    path = str(tmp_path / "old.sqlite")
    old = sqlite_utils.Database(path)
    old.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    for name, step in schema.MIGRATIONS[:2]:  # the schema the first release created
        step(old)
        old.execute("INSERT INTO _migrations VALUES (?, ?)", [name, 0])
    for number in (1, 2, 3):
        old["keys"].insert(
            {"id": number, "name": f"k{number}", "key_hash": f"h{number}", "created_at": 0}
        )
    old["usage"].insert_all({"ts": 0, "key_id": n, "total_tokens": 5} for n in (1, 2, 3, 3))
    old.execute("DELETE FROM keys WHERE id = 3")  # deleted before the upgrade: rows remain
    old.conn.commit()
    old.close()
    store = Store(path)
    store.migrate()
    _, record = store.keys.create("newcomer")
    assert record.id == 4  # past every id a usage row names, not 3
    assert store.keys.by_name("k1").id == 1 and store.keys.authenticate("anything") is None
    store.close()


# --- every paid endpoint is metered ------------------------------------------------------------


def test_images_are_billed_per_image_in_money_and_in_quota_tokens(app, client, make_key, fake):
    budget = make_key("budget", budget=1.0)
    body = {"model": "dall-e-3", "prompt": "a cat", "size": "1024x1792", "quality": "hd"}
    assert client.post("/v1/images/generations", json=body, headers=auth(budget)).status_code == 200
    row = last_row(app)
    assert (row["unit"], row["units"], row["cost"]) == ("image", 1, pytest.approx(0.12))
    quota = make_key("quota", quota_tokens=1000)
    assert client.post("/v1/images/generations", json=body, headers=auth(quota)).status_code == 200
    assert last_row(app)["charged_tokens"] == 0.12 * TOKENS_PER_MONEY
    assert key_record(app, "quota").used_tokens == 0.12 * TOKENS_PER_MONEY


def test_an_image_without_a_model_is_checked_and_priced_as_the_default(app, client, make_key, fake):
    narrow = make_key("chat-only", models="gpt-3.5*")
    for body in ({"prompt": "a cat"}, {"model": "dall-e-3", "prompt": "a cat"}):
        reply = client.post("/v1/images/generations", json=body, headers=auth(narrow))
        assert reply.status_code == 403 and reply.get_json()["error"]["code"] == "model_not_allowed"
    assert not any(r.path == "/v1/images/generations" for r in fake.requests)
    metered = make_key("metered", budget=1.0)
    assert (
        client.post(
            "/v1/images/generations", json={"prompt": "a dog"}, headers=auth(metered)
        ).status_code
        == 200
    )
    assert fake.requests[-1].json["model"] == "dall-e-2"  # what was checked is what runs
    assert last_row(app)["cost"] == pytest.approx(0.02)


def test_unpriced_or_unmeasurable_calls_are_refused_for_metered_keys_only(
    app, client, make_key, fake
):
    metered = make_key("metered", quota_tokens=100000)
    free = make_key("free")
    unpriced = {"model": "gpt-image-9", "prompt": "x"}
    for path, body in (("/v1/images/generations", unpriced), ("/v1/batches", {"input": "f"})):
        reply = client.post(path, json=body, headers=auth(metered))
        assert reply.status_code == 403
        assert reply.get_json()["error"]["code"] == "endpoint_not_allowed"
    assert fake.requests == []
    assert (
        client.post("/v1/images/generations", json=unpriced, headers=auth(free)).status_code == 200
    )
    assert [r.path for r in fake.requests] == ["/v1/images/generations"]
    assert last_row(app)["units"] == 1  # an unmetered key's images are still counted


def test_batches_are_refused_to_keys_with_a_model_allow_list(client, make_key, fake):
    narrow = make_key("narrow", models="gpt-4o")
    reply = client.post("/v1/batches", json={"input_file_id": "f"}, headers=auth(narrow))
    assert reply.status_code == 403 and fake.requests == []


def test_speech_is_billed_per_character(app, client, make_key, fake):
    key = make_key("speaker", budget=5.0)
    body = {"model": "tts-1", "input": "Hello there", "voice": "alloy"}
    reply = client.post("/v1/audio/speech", json=body, headers=auth(key))
    assert reply.get_data() == SPEECH_BYTES
    row = last_row(app)
    assert (row["unit"], row["units"], row["cost"]) == ("character", 11, pytest.approx(0.011))


@pytest.mark.parametrize(
    ("reply", "seconds", "source"),
    [
        ({"text": "hi", "usage": {"type": "duration", "seconds": 3}}, 3, "none"),
        ({"text": "hi", "duration": 2.5}, 2.5, "none"),
        ({"text": "hi"}, 32000 / 16000, "estimated"),  # timed by its size
    ],
)
def test_transcriptions_are_billed_per_second(app, client, make_key, fake, reply, seconds, source):
    key = make_key("listener", budget=5.0)
    fake.queue(json_reply(reply))
    audio = io.BytesIO(bytes(32000))
    client.post(
        "/v1/audio/transcriptions",
        data={"model": "whisper-1", "file": (audio, "a.mp3", "audio/mpeg")},
        headers=auth(key),
        content_type="multipart/form-data",
    )
    row = last_row(app)
    assert row["unit"] == "second" and row["units"] == pytest.approx(seconds, rel=0.02)
    assert row["cost"] == pytest.approx(0.006 * row["units"]) and row["usage_source"] == source


# --- reservations ------------------------------------------------------------------------------


def test_a_call_that_states_max_tokens_must_fit_whole(app, client, make_key, fake):
    key = make_key("small", quota_tokens=20)
    reply = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 50}, headers=auth(key))
    assert reply.status_code == 429
    message = reply.get_json()["error"]["message"]
    assert "leave 20" in message and "needs at least" in message and fake.requests == []
    ok = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10}, headers=auth(key))
    assert ok.status_code == 200  # prompt ~1 + 10 fits in 20


def test_a_call_in_flight_holds_the_room_it_reserved(app, make_key, fake):
    key = make_key("holder", quota_tokens=30)
    fake.queue(json_reply({"choices": [], "usage": {"total_tokens": 5}}, delay=1.0))
    first_done = threading.Event()

    def first():
        app.test_client().post("/v1/chat/completions", json=CHAT, headers=auth(key))
        first_done.set()

    thread = threading.Thread(target=first)
    thread.start()
    assert fake.wait_for_requests(1)
    held = app.test_client().post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert (
        held.status_code == 429 and "held by calls in flight" in held.get_json()["error"]["message"]
    )
    thread.join()
    assert first_done.is_set() and key_record(app, "holder").used_tokens == 5
    assert (
        app.extensions["relay"].store.db.query_one("SELECT COUNT(*) AS n FROM inflight")["n"] == 0
    )
    again = app.test_client().post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert again.status_code == 200  # the reservation went back when the first call ended


def test_thirty_parallel_calls_on_three_workers_overrun_by_one_estimate_at_most(relay_server, fake):
    server = relay_server(workers=3)
    quota = 50
    key = server.create_key("shared", "--quota", str(quota))
    # The prompt's estimate is exact (11 CJK characters = the fake's 11 prompt tokens) and
    # max_tokens covers the fake's 7 completion tokens: each call's estimate error is 0.
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "一二三四五六七八九十百"}]}
    body["max_tokens"] = FAKE_COMPLETION_TOKENS
    per_call = FAKE_PROMPT_TOKENS + FAKE_COMPLETION_TOKENS
    reply = {"id": "x", "object": "chat.completion", "model": "gpt-4o", "choices": []}
    reply["usage"] = {"prompt_tokens": FAKE_PROMPT_TOKENS, "completion_tokens": 7}
    for _ in range(30):
        fake.queue(json_reply(reply, delay=0.3))  # all thirty are in flight together
    start = threading.Barrier(30)

    def call(_):
        start.wait()
        return requests.post(
            server.base_url + "/v1/chat/completions", json=body, headers=auth(key), timeout=20
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        statuses = list(pool.map(call, range(30)))
    assert set(statuses) <= {200, 429}
    with sqlite3.connect(server.db_path) as conn:
        used = conn.execute("SELECT used_tokens FROM keys WHERE name = 'shared'").fetchone()[0]
        held = conn.execute("SELECT COUNT(*) FROM inflight").fetchone()[0]
    assert used == statuses.count(200) * per_call and held == 0
    assert used <= quota  # overrun at most one call's estimate error, here 0
    assert statuses.count(200) == quota // per_call  # and the room was used


# --- a worker that dies leaves rows ------------------------------------------------------------


def test_streams_of_a_killed_worker_each_leave_exactly_one_row(relay_server, fake):
    server = relay_server(workers=2)
    key = server.create_key("streamer")
    events = [chunk(f"piece {n} ") for n in range(60)] + ["[DONE]"]
    for _ in range(20):
        fake.queue(sse_reply(events, interval=0.1))
    first_bytes = []
    lock = threading.Lock()

    def stream(_):
        try:
            with requests.post(
                server.base_url + "/v1/chat/completions",
                json=STREAM,
                headers=auth(key),
                stream=True,
                timeout=30,
            ) as reply:
                pieces = reply.iter_content(chunk_size=None)  # one iterator: a second would
                next(pieces)  # close the first, and with it the connection
                with lock:
                    first_bytes.append(1)
                for _ in pieces:
                    pass
        except requests.RequestException:
            pass

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(stream, n) for n in range(20)]
        deadline = time.monotonic() + 20
        while len(first_bytes) < 20:  # every stream has sent a byte
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with sqlite3.connect(server.db_path) as conn:  # the worker holding most streams
            victim = conn.execute(
                "SELECT pid FROM inflight GROUP BY pid ORDER BY COUNT(*) DESC"
            ).fetchone()[0]
        os.kill(victim, signal.SIGKILL)
        server.wait_workers(gone=[victim])  # its replacement records what it left
        concurrent.futures.wait(futures)
    with sqlite3.connect(server.db_path) as conn:
        rows = conn.execute("SELECT call_id, outcome, total_tokens FROM usage").fetchall()
        left = conn.execute("SELECT COUNT(*) FROM inflight").fetchone()[0]
    assert len(rows) == 20 and len({r[0] for r in rows}) == 20 and left == 0
    lost = [r for r in rows if r[1] == "worker_lost"]
    assert lost and all(r[2] > 0 for r in lost)  # billed with the best estimate
    assert {r[1] for r in rows} <= {"ok", "worker_lost"}
