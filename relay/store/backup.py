"""Backups of the SQLite store while the relay runs, their checks, and restores.

A backup copies every page in ONE step of SQLite's online backup, reading one snapshot
of the database (WAL mode: writers go on meanwhile). `sqlite3 .backup` copies 100 pages a
step with pauses, and starts over after every write by another connection: under steady
load it finishes only when the load stops. Measured with bench/backup_load.py (50 calls a
second): one step took 0.20-0.21 s for 67 MB and 0.26-0.34 s for 133 MB, `VACUUM INTO`
0.35-0.37 s and 0.43-0.80 s, the CLI's steps never finished (bench/README.md).
"""

import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """What a database file holds, and whether SQLite finds it sound."""

    path: str
    integrity: str  # "ok", or SQLite's first complaint
    keys: int
    usage_rows: int
    bytes: int
    seconds: float = 0.0  # how long the backup took, when this summary is of one

    @property
    def sound(self) -> bool:
        """Whether the integrity check passed."""
        return self.integrity == "ok"


def backup(source: str, target: str) -> Summary:
    """Copy the live database at `source` into a new file `target`, then check the copy.

    Refuses to overwrite: a backup must never silently replace another.
    """
    if os.path.exists(target):
        raise FileExistsError(f"{target} exists; choose a new file name")
    started = time.monotonic()
    try:
        _copy(source, target)
    except BaseException:
        if os.path.exists(target):
            os.remove(target)  # half a backup is worse than none
        raise
    seconds = time.monotonic() - started
    os.chmod(target, 0o600)  # it holds key hashes and usage, as the store does
    found = check(target)
    return Summary(found.path, found.integrity, found.keys, found.usage_rows, found.bytes, seconds)


def _copy(source: str, target: str) -> None:
    """Every page of `source` into `target` in one step of SQLite's online backup."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(target)
    try:
        src.execute("PRAGMA busy_timeout=10000")
        src.backup(dst, pages=-1)
        # The copy keeps the source's WAL mode, and any reader would give it -wal and -shm
        # files beside it: a backup is one self-contained file (the relay sets WAL again).
        dst.execute("PRAGMA journal_mode=DELETE")
    finally:
        dst.close()
        src.close()


def check(path: str) -> Summary:
    """SQLite's integrity check of a database file, and what it holds."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=10000")
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        keys = _count(conn, "keys")
        usage = _count(conn, "usage")
    except sqlite3.DatabaseError as exc:  # not a database at all
        return Summary(path, str(exc), 0, 0, os.path.getsize(path))
    finally:
        conn.close()
    return Summary(path, integrity, keys, usage, os.path.getsize(path))


def _count(conn: sqlite3.Connection, table: str) -> int:
    """Rows in one of the store's tables (0 when the file has no such table)."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    if not exists:
        return 0
    return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # noqa: S608


def users_of(path: str) -> list[int]:
    """Other processes of this machine that hold the database (or its WAL) open."""
    names = {os.path.realpath(path + suffix) for suffix in ("", "-wal", "-shm")}
    users = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue  # gone, or not ours to look at
        for fd in fds:
            try:
                if os.path.realpath(f"/proc/{entry}/fd/{fd}") in names:
                    users.append(int(entry))
                    break
            except OSError:
                continue
    return users


def restore(backup_file: str, target: str, force: bool = False) -> Summary:
    """Replace the database at `target` with a checked backup.

    Refuses while other processes use the target (the relay is running) unless forced,
    and refuses a backup that fails its integrity check. The old file's -wal and -shm go
    with it: applied to the restored file they would corrupt it.
    """
    found = check(backup_file)
    if not found.sound:
        raise ValueError(f"{backup_file} fails SQLite's integrity check: {found.integrity}")
    users = users_of(target)
    if users and not force:
        raise RuntimeError(
            f"{target} is in use by process {', '.join(map(str, users))} (the relay?); "
            "stop it first, or pass --force"
        )
    directory = os.path.dirname(os.path.abspath(target))
    handle, staging = tempfile.mkstemp(prefix=".restore-", dir=directory)
    os.close(handle)
    try:
        _copy(backup_file, staging)
        os.chmod(staging, 0o600)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(target + suffix):
                os.remove(target + suffix)
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return check(target)
