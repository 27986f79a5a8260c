"""Backups of the live store, checks and restores (the store's functions; the CLI in
test_usage_cli_demo)."""

import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import sqlite_utils

from relay.store import Store, backup, schema


def fill(store, rows):
    """A key and `rows` usage rows."""
    store.keys.create("filler")
    store.db.write(
        lambda conn: conn.executemany(
            "INSERT INTO usage (ts, key_id, total_tokens, call_id) VALUES (?, 1, 5, ?)",
            [(float(n), f"c{n}") for n in range(rows)],
        )
    )


def test_a_backup_of_a_store_being_written_is_consistent_and_checked(tmp_path):
    store = Store(str(tmp_path / "live.sqlite"))
    store.migrate()
    fill(store, 20000)
    stop = threading.Event()
    written = []

    def keep_writing():
        writer = Store(store.description)
        n = 0
        while not stop.is_set():
            writer.db.write(
                lambda conn, n=n: conn.execute(
                    "INSERT INTO usage (ts, key_id, total_tokens, call_id) VALUES (?, 1, 1, ?)",
                    (1e9 + n, f"w{n}"),
                )
            )
            n += 1
            written.append(n)
        writer.close()

    thread = threading.Thread(target=keep_writing)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(written) < 50:  # the writer is going
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.01)
        summary = backup.backup(store.description, str(tmp_path / "copy.sqlite"))
    finally:
        stop.set()
        thread.join()
    assert summary.sound and summary.keys == 1 and summary.usage_rows >= 20050
    assert oct(os.stat(tmp_path / "copy.sqlite").st_mode)[-3:] == "600"
    with pytest.raises(FileExistsError):
        backup.backup(store.description, str(tmp_path / "copy.sqlite"))
    store.close()


def test_a_restore_refuses_a_store_in_use_and_a_broken_backup(tmp_path):
    live = tmp_path / "relay.sqlite"
    store = Store(str(live))
    store.migrate()
    fill(store, 10)
    saved = backup.backup(str(live), str(tmp_path / "saved.sqlite"))
    fill_more = Store(str(live))
    fill_more.keys.create("after-the-backup")
    fill_more.close()
    store.close()
    hold = (  # another process with the database open, as a running relay has it
        "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1]); "
        "c.execute('SELECT 1 FROM keys').fetchall(); print('open', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(live)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(RuntimeError, match="in use by process"):
            backup.restore(saved.path, str(live))
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    broken = tmp_path / "broken.sqlite"
    broken.write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
    with pytest.raises(ValueError, match="integrity"):
        backup.restore(str(broken), str(live))
    restored = backup.restore(saved.path, str(live))
    assert restored.sound and restored.keys == 1  # the key made after the backup is gone
    again = Store(str(live))
    assert again.keys.by_name("after-the-backup") is None and again.keys.by_name("filler")
    again.close()


def test_pending_migrations_of_a_store_from_the_first_release(tmp_path):
    path = str(tmp_path / "first.sqlite")
    first = sqlite_utils.Database(path)
    first.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    for name, step in schema.MIGRATIONS[:2]:
        step(first)
        first.execute("INSERT INTO _migrations VALUES (?, ?)", [name, 0])
    first.conn.commit()
    assert schema.pending(first) == [name for name, _ in schema.MIGRATIONS[2:]]
    first.close()
    store = Store(path)
    store.migrate()
    assert schema.pending(sqlite_utils.Database(sqlite3.connect(path))) == []
    store.close()
