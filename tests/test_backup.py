"""Backups of the live store, checks and restores (the store's functions; the CLI in
test_usage_cli_demo)."""

import os
import subprocess
import sys
import threading
import time

import pytest
import requests
import sqlite_utils
from conftest import ROOT, UPSTREAM_KEY

from relay.serve.db_commands import leaves_store_alone
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
    first.close()
    store = Store(path)
    assert store.pending_migrations() == [name for name, _ in schema.MIGRATIONS[2:]]
    store.migrate()
    assert store.pending_migrations() == []
    store.close()


# --- the `flask --app app db ...` commands ------------------------------------------------------


def db_command(tmp_path, *args, database=None):
    """Run `flask --app app db ...` (as an operator would) against a store under tmp_path."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env = {
        **clean,
        "RELAY_UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1",
        "RELAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "RELAY_DATABASE": database or str(tmp_path / "relay.sqlite"),
        "RELAY_INSTANCE_PATH": str(tmp_path / "instance"),
    }
    flask = os.path.join(os.path.dirname(sys.executable), "flask")
    return subprocess.run(
        [flask, "--app", "app", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def first_release_store(path):
    """A store as the first release left it: two migrations, a key, three usage rows."""
    old = sqlite_utils.Database(path)
    old.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    for name, step in schema.MIGRATIONS[:2]:
        step(old)
        old.execute("INSERT INTO _migrations VALUES (?, ?)", [name, 0])
    old["keys"].insert({"id": 1, "name": "veteran", "key_hash": "h1", "created_at": 0})
    old["usage"].insert_all({"ts": 0, "key_id": 1, "total_tokens": 5} for _ in range(3))
    old.conn.commit()
    old.close()


def test_db_migrate_upgrades_a_first_release_store_and_a_dry_run_changes_nothing(tmp_path):
    path = tmp_path / "relay.sqlite"
    first_release_store(str(path))
    later = [name for name, _ in schema.MIGRATIONS[2:]]
    checked = db_command(tmp_path, "db", "check")
    assert checked.returncode == 0, checked.stderr
    assert "integrity ok; 1 keys, 3 usage rows" in checked.stdout
    assert f"migrations pending: {', '.join(later)}" in checked.stdout
    dry = db_command(tmp_path, "db", "migrate", "--dry-run")
    assert dry.returncode == 0 and f"Would apply to {path}: {', '.join(later)}" in dry.stdout
    untouched = Store(str(path))
    assert untouched.pending_migrations() == later  # neither the check nor the dry run migrated
    untouched.close()
    done = db_command(tmp_path, "db", "migrate")
    assert done.returncode == 0, done.stderr
    assert f"Applied to {path}: {', '.join(later)}" in done.stdout
    again = db_command(tmp_path, "db", "migrate", "--dry-run")
    assert "no migration pending" in again.stdout
    listed = db_command(tmp_path, "keys", "list")
    assert listed.returncode == 0 and "veteran" in listed.stdout
    assert backup.check(str(path)).usage_rows == 3


def test_db_backup_check_and_restore_refuse_what_they_cannot_do_safely(tmp_path):
    missing = db_command(tmp_path, "db", "backup", str(tmp_path / "b.sqlite"))
    assert missing.returncode == 1 and "no store to back up yet" in missing.stderr
    assert not (tmp_path / "relay.sqlite").exists()  # nothing created on the way
    store = Store(str(tmp_path / "relay.sqlite"))
    store.migrate()
    fill(store, 5)
    store.close()
    nowhere = db_command(tmp_path, "db", "backup", str(tmp_path / "no-such-dir" / "b.sqlite"))
    assert nowhere.returncode == 1 and "nothing was kept" in nowhere.stderr
    made = db_command(tmp_path, "db", "backup", str(tmp_path / "b.sqlite"))
    assert made.returncode == 0, made.stderr
    assert "integrity ok; 1 keys, 5 usage rows" in made.stdout
    # One self-contained file: no -wal or -shm beside it, even once it has been read.
    assert db_command(tmp_path, "db", "check", str(tmp_path / "b.sqlite")).returncode == 0
    assert sorted(p.name for p in tmp_path.glob("b.sqlite*")) == ["b.sqlite"]
    twice = db_command(tmp_path, "db", "backup", str(tmp_path / "b.sqlite"))
    assert twice.returncode == 1 and "exists; choose a new file name" in twice.stderr
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    bad = db_command(tmp_path, "db", "check", str(junk))
    assert bad.returncode == 1 and "file is not a database" in bad.stdout
    refused = db_command(tmp_path, "db", "restore", str(junk))
    assert refused.returncode == 1 and "integrity check" in refused.stderr
    assert backup.check(str(tmp_path / "relay.sqlite")).usage_rows == 5  # untouched
    postgres = db_command(
        tmp_path, "db", "backup", "x.sqlite", database="postgresql://relay:pw@127.0.0.1:9/relay"
    )
    assert postgres.returncode == 1 and "pg_dump" in postgres.stderr
    assert "pw" not in postgres.stdout + postgres.stderr


@pytest.mark.parametrize(
    ("argv", "alone"),
    [
        (["/venv/bin/flask", "--app", "app", "db", "check"], True),
        (["flask", "-A", "app", "--env-file", "x.env", "db", "migrate", "--dry-run"], True),
        (["/usr/lib/python3/site-packages/flask/__main__.py", "--app=app", "db", "backup"], True),
        (["flask", "--app", "app", "keys", "list", "db"], False),
        (["flask", "--app", "db", "keys", "list"], False),  # an app module called db
        (["/venv/bin/gunicorn", "-c", "relay/serve/gunicorn_conf.py", "app:app"], False),
        ([], False),
    ],
)
def test_only_db_commands_leave_the_store_unmigrated(argv, alone):
    assert leaves_store_alone(argv) is alone


def test_a_serving_relay_is_backed_up_and_restored_once_it_stops(relay_server, fake, tmp_path):
    server = relay_server(workers=2)
    key = server.create_key("before")
    for _ in range(5):
        reply = requests.post(
            server.base_url + "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert reply.status_code == 200
    saved = str(tmp_path / "saved.sqlite")
    made = server.flask("db", "backup", saved)
    assert made.returncode == 0, made.stderr
    assert "integrity ok; 1 keys, 5 usage rows" in made.stdout
    refused = server.flask("db", "restore", saved)
    assert refused.returncode == 1 and "in use by process" in refused.stderr
    server.stop()
    server.create_key("after")  # made after the backup: the restore takes it away
    restored = server.flask("db", "restore", saved)
    assert restored.returncode == 0, restored.stderr
    assert "integrity ok; 1 keys, 5 usage rows" in restored.stdout
    listed = server.flask("keys", "list").stdout
    assert "before" in listed and "after" not in listed
