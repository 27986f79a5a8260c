"""SQLite access: one long-lived WAL connection per worker thread; writes retry when busy."""

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

import sqlite_utils
from gevent.monkey import get_original

from relay.store import schema

T = TypeVar("T")
RowDict = dict[str, Any]

log = logging.getLogger("relay.db")
# The unpatched get_ident: gevent patches threading into greenlets, but a SQLite connection
# belongs to an OS thread.
_get_ident = get_original("_thread", "get_ident")

# SQLite's own busy handler sleeps in C, which would freeze a whole gevent worker;
# keep it short and do longer waits in Python, where gevent can run other requests.
BUSY_TIMEOUT_MS = 20


def _real_thread_id() -> int:
    """The OS thread id, even when gevent has patched threading into greenlets."""
    return int(_get_ident())


class Database:
    """The relay's store: opens, migrates and hands out connections to one SQLite file.

    Opening a connection costs ~0.3 ms (schema load, WAL index mapping), far more
    than the queries a request makes, so each process keeps one per OS thread.
    Under gevent all greenlets share that connection; that is safe because every
    transaction runs to completion without yielding (SQLite calls never yield).
    """

    def __init__(self, path: str, write_timeout: float = 30.0, synchronous: str = "NORMAL") -> None:
        self.path = path
        self.write_timeout = write_timeout
        self.synchronous = synchronous
        self._connections: dict[tuple[int, int], sqlite3.Connection] = {}

    def connect(self) -> sqlite3.Connection:
        """Open a new connection with the relay's pragmas."""
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # Setting a pragma reads the file's header, which a sibling worker may hold locked for
        # a moment (it is creating the file or switching it to WAL): wait for that too.
        self._retry_busy(lambda: conn.execute(f"PRAGMA synchronous={self.synchronous}"))
        self._retry_busy(lambda: conn.execute("PRAGMA foreign_keys=ON"))
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        """This process's and thread's connection, opened on first use (and again after fork)."""
        ident = (os.getpid(), _real_thread_id())
        conn = self._connections.get(ident)
        if conn is None:
            conn = self.connect()
            self._connections[ident] = conn
        return conn

    def migrate(self) -> None:
        """Create or upgrade the schema; safe to call from every worker at start."""
        deadline = time.monotonic() + self.write_timeout
        while True:
            try:
                self._migrate_once()
                return
            except sqlite3.OperationalError as exc:
                # Workers starting together on a new file race to create it and switch it to
                # WAL: SQLite refuses the loser at once (waiting could deadlock), or past the
                # short busy timeout of a new connection. Every step is idempotent: go again.
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def _migrate_once(self) -> None:
        """One attempt at migrate: prove the file writable, switch it to WAL, apply migrations."""
        self.write(lambda conn: None)  # fail early and clearly when the file is not writable
        db = sqlite_utils.Database(self.connect())
        try:
            db.execute("PRAGMA busy_timeout=10000")  # at start, waiting for a sibling is fine
            if db.journal_mode != "wal":
                db.enable_wal()
            schema.migrate(db)
        finally:
            db.close()

    def query(self, sql: str, params: tuple | list = ()) -> list[RowDict]:
        """Run a read and return all rows as dicts."""
        return [dict(row) for row in self.conn.execute(sql, params).fetchall()]

    def query_one(self, sql: str, params: tuple | list = ()) -> RowDict | None:
        """Run a read and return the first row as a dict, or None."""
        row = self.conn.execute(sql, params).fetchone()
        return dict(row) if row is not None else None

    def write(self, fn: Callable[[sqlite3.Connection], T], timeout: float | None = None) -> T:
        """Run fn(conn) inside BEGIN IMMEDIATE … COMMIT, retrying while the file is locked.

        Retries sleep with time.sleep, which gevent turns into a cooperative wait,
        so a long lock (a backup, another process) delays this call only.
        """
        return self._retry_busy(lambda: self._transaction(fn), timeout)

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """One attempt: fn inside BEGIN IMMEDIATE … COMMIT, rolled back if anything fails."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def _retry_busy(self, step: Callable[[], T], timeout: float | None = None) -> T:
        """Run a step, retrying while the file is locked, up to the (write) timeout."""
        deadline = time.monotonic() + (self.write_timeout if timeout is None else timeout)
        delay = 0.002
        while True:
            try:
                return step()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def close(self) -> None:
        """Close this process's connections (tests and CLI commands)."""
        for key, conn in list(self._connections.items()):
            if key[0] == os.getpid():
                conn.close()
            del self._connections[key]


def _is_busy(exc: sqlite3.Error) -> bool:
    """Whether an OperationalError means 'locked, try again' rather than a real failure."""
    text = str(exc).lower()
    return "locked" in text or "busy" in text
