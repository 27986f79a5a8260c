"""A `limits` storage in a SQLite file: counters shared by all workers on one machine, no server."""

import sqlite3
import time
from typing import Any

from limits.storage import MovingWindowSupport, Storage

from relay.store.db import SQLiteDatabase


class SQLiteStorage(Storage, MovingWindowSupport):
    """Rate-limit counters for `sqlite:///absolute/path.sqlite`.

    Gunicorn workers are separate processes, so limits' in-memory storage would give
    each worker its own count (2 workers = twice the limit). A small SQLite file in
    WAL mode is shared by all of them, needs no server, and one counter update is a
    ~25 µs transaction. Durability is not needed for counters, so fsync is off.
    """

    STORAGE_SCHEME = ["sqlite"]  # noqa: RUF012 - limits reads this class attribute

    def __init__(self, uri: str, wrap_exceptions: bool = False, **options: Any) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        path = uri.split("://", 1)[1]
        self.db = SQLiteDatabase(path, write_timeout=5.0, synchronous="OFF")
        self.db.write(self._create)

    @property
    def base_exceptions(self) -> type[Exception]:
        """Errors limits may wrap."""
        return sqlite3.Error

    @staticmethod
    def _create(conn: sqlite3.Connection) -> None:
        """Make the tables on first use."""
        conn.execute(
            "CREATE TABLE IF NOT EXISTS counters "
            "(key TEXT PRIMARY KEY, value INTEGER NOT NULL, expires_at REAL NOT NULL)"
        )
        conn.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT NOT NULL, ts REAL NOT NULL)")
        conn.execute("CREATE INDEX IF NOT EXISTS entries_key_ts ON entries (key, ts)")

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        """Add to a counter, starting a fresh window when the old one has expired."""
        now = time.time()
        row = self.db.write(
            lambda conn: conn.execute(
                "INSERT INTO counters (key, value, expires_at) VALUES (?1, ?2, ?3) "
                "ON CONFLICT (key) DO UPDATE SET "
                "value = CASE WHEN expires_at <= ?4 THEN ?2 ELSE value + ?2 END, "
                "expires_at = CASE WHEN expires_at <= ?4 THEN ?3 ELSE expires_at END "
                "RETURNING value",
                (key, amount, now + expiry, now),
            ).fetchone()
        )
        return int(row[0])

    def decr(self, key: str, amount: int = 1) -> int:
        """Take from a counter (never below zero)."""
        self.db.write(
            lambda conn: conn.execute(
                "UPDATE counters SET value = MAX(value - ?, 0) WHERE key = ?", (amount, key)
            )
        )
        return self.get(key)

    def get(self, key: str) -> int:
        """A counter's value, 0 when absent or expired."""
        row = self.db.conn.execute(
            "SELECT value FROM counters WHERE key = ? AND expires_at > ?", (key, time.time())
        ).fetchone()
        return row[0] if row else 0

    def get_expiry(self, key: str) -> float:
        """When a counter's window ends (now, when there is none)."""
        now = time.time()
        row = self.db.conn.execute(
            "SELECT expires_at FROM counters WHERE key = ? AND expires_at > ?", (key, now)
        ).fetchone()
        return row[0] if row else now

    def check(self) -> bool:
        """Whether the file answers."""
        try:
            self.db.conn.execute("SELECT 1").fetchone()
        except Exception:  # noqa: BLE001 - limits asks for a yes/no health answer
            return False
        return True

    def reset(self) -> int:
        """Remove every counter and entry."""
        return self.db.write(
            lambda conn: (
                conn.execute("DELETE FROM counters").rowcount
                + conn.execute("DELETE FROM entries").rowcount
            )
        )

    def clear(self, key: str) -> None:
        """Remove one key's counter and entries."""
        self.db.write(
            lambda conn: (
                conn.execute("DELETE FROM counters WHERE key = ?", (key,)),
                conn.execute("DELETE FROM entries WHERE key = ?", (key,)),
            )
        )

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """Moving window: admit `amount` entries if the last `expiry` seconds hold room."""
        if amount > limit:
            return False
        now = time.time()

        def acquire(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM entries WHERE key = ? AND ts <= ?", (key, now - expiry))
            count = conn.execute("SELECT COUNT(*) FROM entries WHERE key = ?", (key,)).fetchone()
            if count[0] + amount > limit:
                return False
            conn.executemany("INSERT INTO entries VALUES (?, ?)", [(key, now)] * amount)
            return True

        return self.db.write(acquire)

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """(start of the window, entries in it) for a moving-window key."""
        now = time.time()
        row = self.db.conn.execute(
            "SELECT MIN(ts), COUNT(*) FROM entries WHERE key = ? AND ts > ?", (key, now - expiry)
        ).fetchone()
        return (row[0] if row[1] else now), row[1]
