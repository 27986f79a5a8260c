"""The usage spool: whole rows only, unreadable lines set aside, a full disk loses nothing."""

import json
import os

from conftest import LOG_CAPTURE, auth, database_locked

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def usage_rows(app):
    """(status, outcome) of every usage row."""
    rows = app.extensions["relay"].store.db.query("SELECT status, outcome FROM usage ORDER BY ts")
    return [(r["status"], r["outcome"]) for r in rows]


def test_torn_and_foreign_lines_are_set_aside_and_the_rest_replayed(app, client, key, fake):
    spool = app.config["SPOOL_FILE"]
    good = {"ts": 1.0, "key_id": 1, "face": "openai", "method": "POST", "path": "models"}
    good.update(
        {c: None for c in ("model_requested", "model_served", "upstream", "end_user")},
        stream=0, prompt_tokens=1, completion_tokens=2, total_tokens=3, usage_source="upstream",
        cost=0.0, status=200, outcome="ok", latency_ms=1.0, ttfb_ms=None,
        upstream_request_id=None, bytes_out=0, attempts=1,
    )  # fmt: skip
    with open(spool, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(good) + "\n")
        handle.write('{"ts": 17, "key_id": 1, "face": "ope\n')  # what a full disk leaves
        handle.write("hello, not a row\n")
        handle.write(json.dumps({"ts": "yesterday"}) + "\n")
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200
    assert len(usage_rows(app)) == 3  # the spooled row, then both calls
    assert os.path.getsize(spool) == 0
    with open(spool + ".rejected", encoding="utf-8") as handle:
        assert len(handle.read().splitlines()) == 3
    assert any("unreadable spool lines moved" in line for line in LOG_CAPTURE.lines)


def test_a_full_disk_answers_503_and_loses_no_answered_call(app, client, key, fake):
    store = app.extensions["relay"].store
    spool = app.config["SPOOL_FILE"]
    os.symlink("/dev/full", spool)  # every write to the spool: "No space left on device"
    store.db.write_timeout = 0.3
    try:
        with database_locked(app):  # and the database takes nothing either
            answered = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
            assert answered.status_code == 200  # the upstream answered: the client gets it
            refused = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
            assert refused.status_code == 503
            assert refused.get_json()["error"]["code"] == "service_unavailable"
            assert len(fake.requests) == 1  # nothing more was sent while nothing is recorded
    finally:
        os.unlink(spool)
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 200
    assert usage_rows(app) == [(200, "ok"), (503, "service_unavailable"), (200, "ok")]
    assert store.can_record
