"""Faults: read-only or locked database (at start too), a killed worker, garbage upstream.

All but the start-up ones run under real gunicorn.
"""

import concurrent.futures
import os
import signal
import sqlite3
import subprocess
import threading
import time
from contextlib import closing

import pytest
import requests
import sqlite_utils
from conftest import auth
from fake_upstream import raw, sse_reply

from relay.store.db import SQLiteDatabase

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def rows(server):
    """Usage rows in the server's database."""
    with sqlite3.connect(server.db_path) as conn:
        return conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0]


def journal_mode(path):
    """The journal mode of a SQLite file."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute("PRAGMA journal_mode").fetchone()[0]


def chattr(flag, *paths):
    """Set or clear the immutable flag (root only); skip the test where that is impossible."""
    result = subprocess.run(["chattr", flag, *paths], capture_output=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"chattr {flag} is not available here: {result.stderr.decode().strip()}")


def test_read_only_database_keeps_serving_and_loses_no_row(relay_server, fake):
    server = relay_server(workers=2)
    key = server.create_key("ro")

    def post():
        return requests.post(
            server.base_url + "/v1/chat/completions", json=CHAT, headers=auth(key), timeout=10
        )

    assert post().status_code == 200
    files = [server.db_path, server.db_path + "-wal"]
    chattr("+i", *files)
    try:
        assert [post().status_code for _ in range(4)] == [200] * 4  # clients are served anyway
        health = requests.get(server.base_url + "/healthz", timeout=10)
        assert health.status_code == 503
        assert health.json()["error"]["code"] == "service_unavailable"
    finally:
        chattr("-i", *files)
    assert requests.get(server.base_url + "/healthz", timeout=10).status_code == 200
    assert post().status_code == 200  # the next good write replays the spooled rows
    deadline = time.monotonic() + 10
    while rows(server) < 6:
        assert time.monotonic() < deadline, f"rows: {rows(server)} of 6"
        time.sleep(0.1)
    assert "Traceback" not in server.output()


def test_start_waits_for_a_sibling_holding_a_new_file(tmp_path):
    """A worker starting while another holds the new file locked waits, not fails to boot."""
    path = str(tmp_path / "relay.sqlite")
    sibling = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    sibling.execute("CREATE TABLE creating (x)")
    sibling.execute("BEGIN EXCLUSIVE")  # as while it creates the file or switches it to WAL
    release = threading.Timer(0.3, lambda: sibling.execute("COMMIT"))
    release.start()
    try:
        SQLiteDatabase(path).migrate()
    finally:
        release.join()
        sibling.close()
    assert journal_mode(path) == "wal"


def test_start_retries_a_wal_switch_refused_at_once(tmp_path, monkeypatch):
    """Two workers switching a new file to WAL together: SQLite refuses one without waiting."""
    refusals = []
    enable_wal = sqlite_utils.Database.enable_wal

    def refused_once(db):
        if not refusals:
            refusals.append(1)
            raise sqlite3.OperationalError("database is locked")
        enable_wal(db)

    monkeypatch.setattr(sqlite_utils.Database, "enable_wal", refused_once)
    path = str(tmp_path / "relay.sqlite")
    SQLiteDatabase(path).migrate()
    assert refusals == [1]
    assert journal_mode(path) == "wal"


def test_database_locked_for_seconds_delays_rows_but_loses_none(relay_server, fake):
    server = relay_server(workers=2)
    key = server.create_key("locked")
    blocker = sqlite3.connect(server.db_path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    release = threading.Timer(2.0, lambda: blocker.execute("ROLLBACK"))
    release.start()
    started = time.monotonic()

    def call(_):
        return requests.post(
            server.base_url + "/v1/chat/completions", json=CHAT, headers=auth(key), timeout=30
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(call, range(20)))
    release.join()
    blocker.close()
    assert statuses == [200] * 20
    assert time.monotonic() - started >= 1.5  # they really waited for the lock
    assert rows(server) == 20
    assert "database is locked" not in server.output()


def test_killed_worker_during_streams(relay_server, fake):
    server = relay_server(workers=2)
    key = server.create_key("streams")
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
    }
    events = [chunk] * 20 + ["[DONE]"]
    for _ in range(8):
        fake.queue(sse_reply(events, interval=0.05))
    results = []

    def stream(_):
        try:
            with requests.post(
                server.base_url + "/v1/chat/completions",
                json={**CHAT, "stream": True},
                headers=auth(key),
                stream=True,
                timeout=20,
            ) as reply:
                body = b"".join(reply.iter_content(chunk_size=None))
            results.append(body.rstrip().endswith(b"data: [DONE]"))
        except requests.RequestException:
            results.append(False)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream, n) for n in range(8)]
        time.sleep(0.4)  # every stream is under way
        victim = server.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        concurrent.futures.wait(futures)
    finished = results.count(True)
    assert finished >= 1  # the other worker's streams carried on
    # Every stream a client saw to its end has its row; the rest died with their worker.
    deadline = time.monotonic() + 5
    while rows(server) < finished:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with sqlite3.connect(server.db_path) as conn:
        complete = conn.execute("SELECT COUNT(*) FROM usage WHERE outcome = 'ok'").fetchone()[0]
    assert complete == finished
    # The relay keeps serving (gunicorn replaced the worker).
    server.wait_workers(gone=[victim])
    ok = [
        requests.post(
            server.base_url + "/v1/chat/completions", json=CHAT, headers=auth(key), timeout=10
        ).status_code
        for _ in range(6)
    ]
    assert ok == [200] * 6


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01\x02 not http at all\r\n\r\n",
        b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{"a"',
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\nnot json!",
    ],
)
def test_garbage_from_upstream(relay_server, fake, garbage):
    server = relay_server(workers=1)
    key = server.create_key("garbage")
    fake.queue(raw(garbage), raw(garbage))
    reply = requests.post(
        server.base_url + "/v1/chat/completions", json=CHAT, headers=auth(key), timeout=10
    )
    assert reply.status_code in (200, 502)
    if reply.status_code == 502:
        assert reply.json()["error"]["code"] == "upstream_error"
    assert requests.get(server.base_url + "/healthz", timeout=5).status_code == 200
    assert "Traceback" not in server.output()
