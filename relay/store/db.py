"""The store's database: one small interface, and SQLite behind it (one WAL file, a
connection per worker thread, writes retried while busy).

`Database` is what the rest of the store uses: `query`/`query_one` for reads, `write(fn)`
for a transaction in which `fn(conn)` runs statements with `conn.execute(sql, params)`
(`?` placeholders; rows readable by index and by column name), `migrate`, `close`.
`SQLiteDatabase` is today's store; `postgres.PostgresDatabase` the one several machines share.
"""

import logging
import os
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import psycopg
import sqlite_utils
from gevent.monkey import get_original

from relay.store import schema
from relay.store.dialect import SQLITE, Dialect

T = TypeVar("T")
C_co = TypeVar("C_co", covariant=True)  # the connection type a database hands to write()
RowDict = dict[str, Any]
Params = Sequence[Any]
# What a store raises when its database refuses (locked, read-only, gone, unreachable):
# the engines' own errors, caught as one with `except StoreError`.
StoreError: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)
# What a single row can cause that says "this row is bad", not "the database is": a
# spooled row is then set aside rather than retried forever.
BadRow: tuple[type[Exception], ...] = (
    sqlite3.IntegrityError,
    psycopg.IntegrityError,
    psycopg.DataError,
    psycopg.ProgrammingError,
    KeyError,
    TypeError,
    ValueError,
)

log = logging.getLogger("relay.db")


def spoiling_errors() -> tuple[type[Exception], ...]:
    """The errors spoils_transaction() is true of."""
    return (psycopg.OperationalError,)


def spoils_transaction(exc: BaseException) -> bool:
    """Whether an error inside a transaction spoils all of it (retry the whole), rather than
    the one statement that raised it (undo that savepoint): PostgreSQL's lost connections,
    deadlocks and lock timeouts. SQLite's never do: BEGIN IMMEDIATE took the lock first."""
    return isinstance(exc, spoiling_errors())


# The unpatched get_ident: gevent patches threading into greenlets, but a SQLite connection
# belongs to an OS thread.
_get_ident = get_original("_thread", "get_ident")

# SQLite's own busy handler sleeps in C, which would freeze a whole gevent worker;
# keep it short and do longer waits in Python, where gevent can run other requests.
BUSY_TIMEOUT_MS = 20


def _real_thread_id() -> int:
    """The OS thread id, even when gevent has patched threading into greenlets."""
    return int(_get_ident())


class Cursor(Protocol):
    """What `conn.execute` returns on either engine."""

    @property
    def rowcount(self) -> int:
        """Rows an UPDATE or DELETE touched."""

    def fetchone(self) -> Any:
        """The next row (by index and by column name), or None."""

    def fetchall(self) -> list[Any]:
        """The remaining rows."""


class Connection(Protocol):
    """What `write(fn)` hands to `fn`: statements with `?` placeholders, in one transaction."""

    def execute(self, sql: str, parameters: Params = (), /) -> Cursor:
        """Run one statement."""


class Database(ABC, Generic[C_co]):
    """A store database: reads, retried write transactions, migrations."""

    dialect: Dialect
    write_timeout: float  # seconds a write retries a busy or locked database
    description: str  # for messages: a file path, or a URL without its password
    spool_path: str  # where usage rows wait while the database refuses them
    # Whether GroupCommit gives each operation of a batch its own savepoint (SQLite: they
    # cost nothing) or runs a failed batch again one operation at a time (PostgreSQL).
    batch_savepoints = True

    @abstractmethod
    def query(self, sql: str, params: Params = ()) -> list[RowDict]:
        """Run a read and return all rows as dicts."""

    @abstractmethod
    def query_one(self, sql: str, params: Params = ()) -> RowDict | None:
        """Run a read and return the first row as a dict, or None."""

    @abstractmethod
    def write(
        self, fn: Callable[[C_co], T], timeout: float | None = None, durable: bool = True
    ) -> T:
        """Run fn(conn) in one transaction, retried while the database is busy or locked
        (up to `timeout`, default write_timeout); StoreError when it never takes it.

        durable=False lets the commit return before it is flushed to disk (PostgreSQL's
        asynchronous commit: a server crash may lose it; later durable commits flush it).
        SQLite's WAL commits are never flushed one by one (synchronous=NORMAL) anyway."""

    @abstractmethod
    def migrate(self) -> None:
        """Create or upgrade the schema; safe to call from every worker at start."""

    def pending_migrations(self) -> list[str]:
        """The migrations this database has not had yet, in the order `migrate` runs them."""
        done: set[str] = set()
        if self.query_one(self.dialect.table_exists, ("_migrations",)):
            done = {row["name"] for row in self.query("SELECT name FROM _migrations")}
        return schema.pending(done)

    @abstractmethod
    def close(self) -> None:
        """Close this process's connections (tests and CLI commands)."""


class SQLiteDatabase(Database[sqlite3.Connection]):
    """The relay's store in one SQLite file: opens, migrates and hands out connections.

    Opening a connection costs ~0.3 ms (schema load, WAL index mapping), far more
    than the queries a request makes, so each process keeps one per OS thread.
    Under gevent all greenlets share that connection; that is safe because every
    transaction runs to completion without yielding (SQLite calls never yield).
    """

    dialect = SQLITE

    def __init__(self, path: str, write_timeout: float = 30.0, synchronous: str = "NORMAL") -> None:
        self.path = path
        self.description = path
        self.spool_path = path + ".spool.jsonl"
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

    def query(self, sql: str, params: Params = ()) -> list[RowDict]:
        """Run a read and return all rows as dicts."""
        return [dict(row) for row in self.conn.execute(sql, params).fetchall()]

    def query_one(self, sql: str, params: Params = ()) -> RowDict | None:
        """Run a read and return the first row as a dict, or None."""
        row = self.conn.execute(sql, params).fetchone()
        return dict(row) if row is not None else None

    def write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        timeout: float | None = None,
        durable: bool = True,
    ) -> T:
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
