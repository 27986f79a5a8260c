"""Per-key caps on calls at once, shared by all workers: leases in SQLite, or a Redis sorted set."""

import os
import sqlite3
import time
import uuid
from typing import Any, Protocol

from limits.storage import Storage

from relay.limits.sqlite_storage import SQLiteStorage
from relay.store.db import Database

# A lease outlives any sane call; it only matters if a process died holding it.
LEASE_SECONDS = 3600


class Inflight(Protocol):
    """Where calls-at-once leases live: take one per call, give it back when the call ends."""

    errors: tuple[type[Exception], ...]  # what a failing store raises (the caller fails open)

    def acquire(self, limit_id: str, limit: int) -> Any:
        """Take a slot for the key; None when `limit` calls already hold one."""

    def release(self, lease: Any) -> None:
        """Give a slot back."""


def _alive(pid: int) -> bool:
    """Whether a process id is still running on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SQLiteInflight:
    """Leases in the rate-limit SQLite file; leases of dead workers are reclaimed at the cap."""

    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, db: Database) -> None:
        self.db = db
        # Named key_leases: the `leases` table of earlier versions counted by row id.
        self.db.write(
            lambda conn: conn.execute(
                "CREATE TABLE IF NOT EXISTS key_leases (id INTEGER PRIMARY KEY, limit_id TEXT "
                "NOT NULL, pid INTEGER NOT NULL, expires_at REAL NOT NULL)"
            )
        )

    def acquire(self, limit_id: str, limit: int) -> Any:
        """Take a slot for the key; None when `limit` calls already hold one."""
        pid = os.getpid()

        def take(conn: sqlite3.Connection) -> int | None:
            now = time.time()
            rows = conn.execute(
                "SELECT id, pid FROM key_leases WHERE limit_id = ? AND expires_at > ?",
                (limit_id, now),
            ).fetchall()
            if len(rows) >= limit:
                dead = [row[0] for row in rows if not _alive(row[1])]
                if len(rows) - len(dead) >= limit:
                    return None
                conn.executemany("DELETE FROM key_leases WHERE id = ?", [(d,) for d in dead])
            cursor = conn.execute(
                "INSERT INTO key_leases (limit_id, pid, expires_at) VALUES (?, ?, ?)",
                (limit_id, pid, now + LEASE_SECONDS),
            )
            return cursor.lastrowid

        return self.db.write(take)

    def release(self, lease: Any) -> None:
        """Give a slot back."""
        self.db.write(lambda conn: conn.execute("DELETE FROM key_leases WHERE id = ?", (lease,)))


ACQUIRE_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class RedisInflight:
    """Leases as members of a Redis sorted set per key, scored by their expiry."""

    def __init__(self, storage: Any) -> None:
        self.errors = _as_tuple(storage.base_exceptions)
        self.redis = storage.get_connection()
        self.script = self.redis.register_script(ACQUIRE_SCRIPT)

    @staticmethod
    def _set(limit_id: str) -> str:
        """The sorted set's name."""
        return f"relay:inflight:{limit_id}"

    def acquire(self, limit_id: str, limit: int) -> Any:
        """Take a slot for the key; None when `limit` calls already hold one."""
        member = uuid.uuid4().hex
        now = time.time()
        args = [now, limit, now + LEASE_SECONDS, member, LEASE_SECONDS]
        if self.script(keys=[self._set(limit_id)], args=args):
            return (limit_id, member)
        return None

    def release(self, lease: Any) -> None:
        """Give a slot back."""
        limit_id, member = lease
        self.redis.zrem(self._set(limit_id), member)


class MemoryInflight:
    """Counters in this process only, for the memory:// storage (one worker, tests)."""

    errors: tuple[type[Exception], ...] = ()

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}

    def acquire(self, limit_id: str, limit: int) -> Any:
        """Take a slot for the key; None when `limit` calls already hold one."""
        if self.slots.get(limit_id, 0) >= limit:
            return None
        self.slots[limit_id] = self.slots.get(limit_id, 0) + 1
        return limit_id

    def release(self, lease: Any) -> None:
        """Give a slot back."""
        self.slots[lease] = max(self.slots.get(lease, 0) - 1, 0)


def _as_tuple(errors: type[Exception] | tuple[type[Exception], ...]) -> tuple[type[Exception], ...]:
    """An exception class or tuple of them, as a tuple."""
    return errors if isinstance(errors, tuple) else (errors,)


def make_inflight(storage: Storage) -> Inflight:
    """The lease store matching the rate-limit storage."""
    if isinstance(storage, SQLiteStorage):
        return SQLiteInflight(storage.db)
    if hasattr(storage, "get_connection"):
        return RedisInflight(storage)
    return MemoryInflight()
