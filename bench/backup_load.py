"""Backups of a large store while calls are written to it: the relay's (one step of SQLite's
online backup) against VACUUM INTO and the steps `sqlite3 .backup` takes.

    python -m bench.backup_load [--mb 64] [--calls 50] [--seconds 20]

A writer process records `--calls` calls a second the way the relay's workers do (an
in-flight row at admission, then the usage row, the key's charge and the in-flight row's
removal in one transaction), while each method copies the store; each copy is then
checked with PRAGMA integrity_check.
"""

import argparse
import json
import multiprocessing
import os
import sqlite3
import tempfile
import time

from relay.call import Call
from relay.metering import Need
from relay.store import Store, backup

ROW_BYTES = 170  # about what one usage row (with its indexes) takes in the file


def build(path, megabytes):
    """A store of about `megabytes` MB: one key and usage rows."""
    store = Store(path)
    store.migrate()
    store.keys.create("load")
    rows = megabytes * 1024 * 1024 // ROW_BYTES
    batch = 50_000
    for start in range(0, rows, batch):
        store.db.write(
            lambda conn, start=start: conn.executemany(
                "INSERT INTO usage (ts, key_id, face, method, path, model_requested, "
                "model_served, prompt_tokens, completion_tokens, total_tokens, usage_source, "
                "cost, status, outcome, latency_ms, call_id, charged_tokens) VALUES "
                "(?, 1, 'openai', 'POST', 'chat/completions', 'gpt-4o', 'gpt-4o-2024-08-06', "
                "11, 7, 18, 'upstream', 0.0, 200, 'ok', 12.5, ?, 18)",
                [(1.7e9 + n, f"seed-{n}") for n in range(start, min(start + batch, rows))],
            )
        )
    store.close()


def write_calls(path, per_second, stop):
    """Record calls at a steady rate until told to stop (another process, like a worker)."""
    store = Store(path)
    key = store.keys.by_name("load")
    interval, next_at, n = 1.0 / per_second, time.monotonic(), 0
    while not stop.is_set():
        call = Call(face="openai", method="POST", path="chat/completions", key=key)
        call.json = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        call.model = "gpt-4o"
        store.admit(call, Need(18, 11, 0.0, 0.0))
        call.set_usage((11, 7, 18), "upstream")
        call.status = 200
        store.record(call)
        n += 1
        next_at += interval
        time.sleep(max(next_at - time.monotonic(), 0))
    store.close()


def online_backup(source, target, pages):
    """SQLite's online backup API, `pages` at a time with the CLI's pause."""
    started = time.monotonic()
    src = sqlite3.connect(source)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst, pages=pages, sleep=0.25)
    finally:
        dst.close()
        src.close()
    return time.monotonic() - started


def vacuum_into(source, target):
    """`VACUUM INTO`: a compacted copy in one statement."""
    started = time.monotonic()
    conn = sqlite3.connect(source, isolation_level=None)
    try:
        conn.execute("VACUUM INTO ?", (target,))
    finally:
        conn.close()
    return time.monotonic() - started


def measure(path, workdir, method, limit):
    """Seconds one method took (None past `limit`), and whether its copy is sound."""
    target = os.path.join(workdir, f"{method}.sqlite")
    if method == "relay-db-backup":
        summary = backup.backup(path, target)  # what `flask --app app db backup` runs
        return summary.seconds, summary.sound
    with multiprocessing.get_context("fork").Pool(1) as pool:
        if method == "vacuum-into":
            pending = pool.apply_async(vacuum_into, (path, target))
        else:  # sqlite3's CLI .backup: 100 pages a step, pausing between steps
            pending = pool.apply_async(online_backup, (path, target, 100))
        try:
            seconds = pending.get(timeout=limit)
        except multiprocessing.TimeoutError:
            return None, False
    return seconds, backup.check(target).sound


def main(argv=None):
    """Build the store, start the writer, time each method, print a JSON line per method."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0, help="give up on a method after")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="relay-backup-") as workdir:
        path = os.path.join(workdir, "relay.sqlite")
        build(path, args.mb)
        size = os.path.getsize(path) / 1024 / 1024
        context = multiprocessing.get_context("fork")
        stop = context.Event()
        writer = context.Process(target=write_calls, args=(path, args.calls, stop))
        writer.start()
        time.sleep(2)  # the writer is up to speed (a load generator, not a test)
        try:
            for method in ("relay-db-backup", "vacuum-into", "sqlite3-cli-steps"):
                seconds, sound = measure(path, workdir, method, args.seconds)
                print(
                    json.dumps(
                        {
                            "method": method,
                            "database_mb": round(size, 1),
                            "calls_per_second": args.calls,
                            "seconds": None if seconds is None else round(seconds, 3),
                            "gave_up_after": args.seconds if seconds is None else None,
                            "integrity_ok": sound,
                        }
                    )
                )
        finally:
            stop.set()
            writer.join()


if __name__ == "__main__":
    main()
