"""Lease stores for per-key caps on calls at once: SQLite rows, a Redis sorted set, or memory.

A lease lives `lifetime` seconds unless renewed (leases.py renews those of live calls), so
the slots of a process that died holding them (SIGKILL, a lost machine, a Redis snapshot
restored after a restart) come back on their own within that time.
"""

import os
import sqlite3
import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from limits.storage import Storage

from relay.limits.sqlite_storage import SQLiteStorage
from relay.store.db import Database


class Inflight(Protocol):
    """Where calls-at-once leases live: take one per call, renew it, give it back at the end."""

    errors: tuple[type[Exception], ...]  # what a failing store raises (the caller fails open)

    def acquire(self, limit_id: str, limit: int) -> Any:
        """Take a slot for the key; None when `limit` calls already hold one."""

    def renew(self, leases: Sequence[Any]) -> None:
        """Push the expiry of these (live) leases a full lifetime ahead."""

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

    def __init__(self, db: Database, lifetime: float) -> None:
        self.db = db
        self.lifetime = lifetime
        # Named key_leases: the `leases` table of earlier versions counted by row id.
        self.db.write(self._create)

    @staticmethod
    def _create(conn: sqlite3.Connection) -> None:
        """Make the table on first use."""
        conn.execute(
            "CREATE TABLE IF NOT EXISTS key_leases (id INTEGER PRIMARY KEY, limit_id TEXT "
            "NOT NULL, pid INTEGER NOT NULL, expires_at REAL NOT NULL)"
        )
        conn.execute("CREATE INDEX IF NOT EXISTS key_leases_limit ON key_leases (limit_id)")

    def acquire(self, limit_id: str, limit: int) -> Any:
        """Take a slot for the key; None when `limit` calls already hold one."""
        pid = os.getpid()

        def take(conn: sqlite3.Connection) -> int | None:
            now = time.time()
            conn.execute(
                "DELETE FROM key_leases WHERE limit_id = ? AND expires_at <= ?", (limit_id, now)
            )
            rows = conn.execute(
                "SELECT id, pid FROM key_leases WHERE limit_id = ?", (limit_id,)
            ).fetchall()
            if len(rows) >= limit:
                dead = [row[0] for row in rows if not _alive(row[1])]
                if len(rows) - len(dead) >= limit:
                    return None
                conn.executemany("DELETE FROM key_leases WHERE id = ?", [(d,) for d in dead])
            cursor = conn.execute(
                "INSERT INTO key_leases (limit_id, pid, expires_at) VALUES (?, ?, ?)",
                (limit_id, pid, now + self.lifetime),
            )
            return cursor.lastrowid

        return self.db.write(take)

    def renew(self, leases: Sequence[Any]) -> None:
        """Push the expiry of these (live) leases a full lifetime ahead."""
        expires_at = time.time() + self.lifetime
        self.db.write(
            lambda conn: conn.executemany(
                "UPDATE key_leases SET expires_at = ? WHERE id = ?",
                [(expires_at, lease) for lease in leases],
            )
        )

    def release(self, lease: Any) -> None:
        """Give a slot back."""
        self.db.write(lambda conn: conn.execute("DELETE FROM key_leases WHERE id = ?", (lease,)))


# Times are Redis's own (TIME), so the relay machines' clocks need not agree.
NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"
# KEYS[1]: the key's set. ARGV: limit, lifetime, new member. 1 when taken, 0 when full.
ACQUIRE_SCRIPT = (
    NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
return 1
"""
)
# KEYS[1]: the key's set. ARGV: lifetime, members. XX: a lease already gone (expired and
# removed, or released meanwhile) is not brought back.
RENEW_SCRIPT = (
    NOW
    + """
local expires = now + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expires, ARGV[i]) end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
return 1
"""
)


class RedisInflight:
    """Leases as members of a Redis sorted set per key, scored by their expiry."""

    def __init__(self, storage: Any, lifetime: float) -> None:
        self.errors = _as_tuple(storage.base_exceptions)
        self.lifetime = lifetime
        self.redis = storage.get_connection()
        self.acquire_script = self.redis.register_script(ACQUIRE_SCRIPT)
        self.renew_script = self.redis.register_script(RENEW_SCRIPT)

    @staticmethod
    def _set(limit_id: str) -> str:
        """The sorted set's name."""
        return f"relay:inflight:{limit_id}"

    def acquire(self, limit_id: str, limit: int) -> Any:
        """Take a slot for the key; None when `limit` calls already hold one."""
        member = uuid.uuid4().hex
        args = [limit, self.lifetime, member]
        if self.acquire_script(keys=[self._set(limit_id)], args=args):
            return (limit_id, member)
        return None

    def renew(self, leases: Sequence[Any]) -> None:
        """Push the expiry of these (live) leases a full lifetime ahead, in one round trip."""
        members: dict[str, list[str]] = {}
        for limit_id, member in leases:
            members.setdefault(limit_id, []).append(member)
        pipe = self.redis.pipeline(transaction=False)
        for limit_id, names in members.items():
            self.renew_script(keys=[self._set(limit_id)], args=[self.lifetime, *names], client=pipe)
        pipe.execute()

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

    def renew(self, leases: Sequence[Any]) -> None:
        """Nothing to do: these leases end with this process."""

    def release(self, lease: Any) -> None:
        """Give a slot back."""
        self.slots[lease] = max(self.slots.get(lease, 0) - 1, 0)


def _as_tuple(errors: type[Exception] | tuple[type[Exception], ...]) -> tuple[type[Exception], ...]:
    """An exception class or tuple of them, as a tuple."""
    return errors if isinstance(errors, tuple) else (errors,)


def make_inflight(storage: Storage, lifetime: float) -> Inflight:
    """The lease store matching the rate-limit storage; leases live `lifetime` s unrenewed."""
    if isinstance(storage, SQLiteStorage):
        return SQLiteInflight(storage.db, lifetime)
    if hasattr(storage, "get_connection"):
        return RedisInflight(storage, lifetime)
    return MemoryInflight()
