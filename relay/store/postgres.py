"""PostgreSQL behind the store's Database interface: pooled psycopg 3 connections, write
transactions retried while locked or reconnecting, the same named migrations.

psycopg (3.1.14 on) waits on its sockets through gevent once gevent has patched the
standard library, so a slow query or a lock wait holds only the greenlet that made it,
never the worker's other streams.
"""

import atexit
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import Pipeline
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from relay.config import default_instance_path, default_spool_file
from relay.store import schema
from relay.store.db import Cursor, Database, Params, RowDict
from relay.store.dialect import POSTGRES, Dialect

T = TypeVar("T")
POOL_SIZE = 10  # connections per worker process: reads are short, writes group-committed
# How long a call waits for a pooled connection: when PostgreSQL is unreachable, a key lookup
# fails (503) and a usage row goes to the spool after this long, not after the write timeout.
CONNECT_WAIT = 5.0
STATEMENT_TIMEOUT_MS = 300_000  # no statement (reports included) runs longer
IDLE_IN_TRANSACTION_MS = 60_000  # a stuck worker never holds a key row's lock longer
MIGRATION_LOCK = 0x72656C6179  # pg_advisory_lock key ("relay"): one migrator at a time
_BUSY = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected, pg_errors.LockNotAvailable)


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Row:
    """A result row readable by index, by column name and as a dict, like sqlite3.Row."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values = values
        self._index = index

    def __getitem__(self, key: int | str) -> Any:
        """A value by position or by column name."""
        return self._values[self._index[key] if isinstance(key, str) else key]

    def __iter__(self) -> Iterator[Any]:
        """The values in column order (so rows unpack like tuples)."""
        return iter(self._values)

    def __len__(self) -> int:
        """How many columns."""
        return len(self._values)

    def keys(self) -> list[str]:
        """The column names (so dict(row) works)."""
        return list(self._index)


Pool = ConnectionPool[psycopg.Connection[Row]]


def _rows(cursor: Any) -> Callable[[Sequence[Any]], Row]:
    """psycopg row factory: each row a Row over the cursor's column names."""
    names = [column.name for column in cursor.description or ()]
    index = {name: position for position, name in enumerate(names)}
    return lambda values: Row(values, index)


class PgConnection:
    """What `write(fn)` hands to fn: a psycopg connection taking the store's `?` SQL.

    In a pipelined write a statement is only sent: the round trip happens when its
    result is read (fetchone, fetchall, rowcount) or at COMMIT, so statements nobody
    reads from cost none of their own, and an error may surface at a later statement or
    at COMMIT (the whole transaction then fails: GroupCommit runs a failed batch's
    operations again one by one). Between SAVEPOINT and RELEASE or ROLLBACK TO, every
    statement is answered before execute() returns, so its error is its own.
    """

    __slots__ = ("conn", "pending", "pipeline", "savepoints")
    dialect: Dialect = POSTGRES  # read by migrations (schema.dialect_of)

    def __init__(self, conn: psycopg.Connection[Any], pipeline: Pipeline | None = None) -> None:
        self.conn = conn
        self.pipeline = pipeline
        self.pending = False  # statements sent whose results have not been read
        self.savepoints = 0

    def execute(self, sql: str, parameters: Params = (), /) -> Cursor:
        """Run (pipelined: send) one statement inside the current transaction."""
        cursor = self.conn.execute(POSTGRES.sql(sql), tuple(parameters))
        if self.pipeline is None:
            return cursor
        if sql.startswith("SAVEPOINT "):
            self.savepoints += 1
        elif sql.startswith(("RELEASE ", "ROLLBACK TO ")):
            self.savepoints -= sql.startswith("RELEASE ")
        elif self.savepoints:
            self.pending = False
            self.pipeline.sync()
            return cursor
        self.pending = True
        return _Answer(cursor, self)

    def sync(self) -> None:
        """Wait for the answers to every statement sent so far (raising the first error)."""
        if self.pending and self.pipeline is not None:
            self.pending = False
            self.pipeline.sync()


class _Answer:
    """A pipelined statement's cursor: reading it waits for the answer first."""

    __slots__ = ("connection", "cursor")

    def __init__(self, cursor: Cursor, connection: PgConnection) -> None:
        self.cursor = cursor
        self.connection = connection

    @property
    def rowcount(self) -> int:
        """Rows the statement touched."""
        self.connection.sync()
        return self.cursor.rowcount

    def fetchone(self) -> Any:
        """The next row, or None."""
        self.connection.sync()
        return self.cursor.fetchone()

    def fetchall(self) -> list[Any]:
        """The remaining rows."""
        self.connection.sync()
        return self.cursor.fetchall()


class PostgresDatabase(Database[PgConnection]):
    """The store in one PostgreSQL database that any number of relay instances share.

    Each worker process keeps its own pool (opened on first use, again after a fork).
    Reads take a pooled connection for one statement (autocommit); a write is
    BEGIN … COMMIT on one connection, retried on a lock timeout, a deadlock, a
    serialization failure or a connection lost to a restart, until its deadline.
    """

    dialect = POSTGRES
    # GroupCommit runs a batch without a savepoint per operation (each would cost a round
    # trip or hide which operation failed) and, when it fails, each operation on its own.
    batch_savepoints = False

    def __init__(
        self,
        url: str,
        write_timeout: float = 30.0,
        spool_path: str | None = None,
        pool_size: int = POOL_SIZE,
    ) -> None:
        self.url = url
        self.description = redacted(url)
        self.write_timeout = write_timeout
        self.spool_path = spool_path or default_spool_file(url, default_instance_path())
        self.pool_size = pool_size
        self._pools: dict[int, Pool] = {}
        self._opening = threading.Lock()  # threads of one process make one pool between them

    def _connect_options(self) -> dict[str, Any]:
        """psycopg.connect keyword arguments: autocommit, bounded waits, dead peers noticed."""
        return {
            "autocommit": True,
            "row_factory": _rows,
            "connect_timeout": max(int(CONNECT_WAIT), 2),
            "application_name": "relay",
            "options": (
                f"-c statement_timeout={STATEMENT_TIMEOUT_MS} "
                f"-c lock_timeout={int(self.write_timeout * 1000)} "
                f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}"
            ),
            # A server that vanishes from the network (no reset) is noticed within ~30 s.
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": 30_000,
        }

    def _pool(self) -> Pool:
        """This process's pool, opened on first use (and again after a fork)."""
        pid = os.getpid()
        pool = self._pools.get(pid)
        if pool is not None:
            return pool
        with self._opening:
            pool = self._pools.get(pid)
            if pool is not None:
                return pool
            pool = ConnectionPool(
                self.url,
                kwargs=self._connect_options(),
                min_size=1,
                max_size=self.pool_size,
                timeout=CONNECT_WAIT,
                # Give up reconnecting soon: the next call that needs a connection starts a
                # fresh attempt at once, where the pool's own backoff would wait ever longer
                # (a minute after a minute's outage) before it tried the server again.
                reconnect_timeout=CONNECT_WAIT,
                name="relay",
                open=False,
            )
            pool.open(wait=False)
            self._pools[pid] = pool
            # Closed while the process can still run its pool's threads (greenlets in a
            # gunicorn worker): left to the garbage collector, it fails noisily at exit.
            atexit.register(self.close)
            return pool

    def _take(self, deadline: float) -> tuple[Pool, psycopg.Connection[Row]]:
        """A pooled connection (and its pool), waiting until the deadline, CONNECT_WAIT at most."""
        wait = min(max(deadline - time.monotonic(), 0.05), CONNECT_WAIT)
        pool = self._pool()
        return pool, pool.getconn(timeout=wait)

    def query(self, sql: str, params: Params = ()) -> list[RowDict]:
        """Run a read and return all rows as dicts."""
        return self._read(sql, params, one=False)  # type: ignore[no-any-return]

    def query_one(self, sql: str, params: Params = ()) -> RowDict | None:
        """Run a read and return the first row as a dict, or None."""
        return self._read(sql, params, one=True)  # type: ignore[no-any-return]

    def _read(self, sql: str, params: Params, one: bool) -> Any:
        """One autocommit statement, again on another connection while the pooled ones turn
        out cut (a server restart breaks every idle connection of the pool at once)."""
        deadline = time.monotonic() + CONNECT_WAIT
        while True:
            pool, conn = self._take(deadline)
            try:
                cursor = conn.cursor(row_factory=dict_row)
                cursor.execute(POSTGRES.sql(sql), tuple(params))
                return cursor.fetchone() if one else cursor.fetchall()
            except psycopg.OperationalError:
                if not conn.broken or time.monotonic() > deadline:
                    raise
            finally:
                pool.putconn(conn)

    def write(
        self,
        fn: Callable[[PgConnection], T],
        timeout: float | None = None,
        durable: bool = True,
        pipelined: bool = True,
    ) -> T:
        """Run fn(conn) inside BEGIN … COMMIT, retrying while locked or reconnecting.

        Retries sleep with time.sleep (gevent's when patched), so a long wait delays
        this call only. An unreachable server fails after CONNECT_WAIT (PoolTimeout).
        pipelined=False for a fn that needs the plain protocol (COPY).
        """
        deadline = time.monotonic() + (self.write_timeout if timeout is None else timeout)
        delay = 0.002
        while True:
            try:
                return self._transaction(fn, deadline, durable, pipelined)
            except psycopg.OperationalError as exc:
                if not _retryable(exc) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _transaction(
        self, fn: Callable[[PgConnection], T], deadline: float, durable: bool, pipelined: bool
    ) -> T:
        """One attempt: fn inside BEGIN … COMMIT, locks waited for until the deadline.

        Pipelined, BEGIN and the settings go out with the statements after them: the
        round trips are the reads fn makes of its statements' answers, and the commit.
        """
        pool, conn = self._take(deadline)
        lock = f"{max(int((deadline - time.monotonic()) * 1000), 1)}ms"
        try:
            with conn.pipeline() if pipelined else contextlib.nullcontext() as pipeline:
                conn.execute(b"BEGIN")
                conn.execute(b"SELECT set_config('lock_timeout', %s, true)", (lock,))
                if not durable:
                    conn.execute(b"SET LOCAL synchronous_commit = off")
                result = fn(PgConnection(conn, pipeline))
                conn.execute(b"COMMIT")
        except BaseException:
            _roll_back(conn)
            raise
        finally:
            pool.putconn(conn)
        return result

    def migrate(self) -> None:
        """Apply the named migrations not yet recorded in `_migrations`, each in its own
        transaction, under an advisory lock: every worker of every instance may call it."""
        options = {**self._connect_options(), "options": ""}
        with psycopg.connect(self.url, **options) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS _migrations "
                "(name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            done = {row[0] for row in conn.execute("SELECT name FROM _migrations").fetchall()}
            for name, step in schema.MIGRATIONS:
                if name in done:
                    continue
                with conn.transaction():
                    step(PgConnection(conn))
                    conn.execute("INSERT INTO _migrations VALUES (%s, %s)", (name, time.time()))
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))

    def close(self) -> None:
        """Close this process's pool (tests and CLI commands)."""
        for pid, pool in list(self._pools.items()):
            if pid == os.getpid():
                pool.close(timeout=1.0)
            del self._pools[pid]


def _retryable(exc: psycopg.OperationalError) -> bool:
    """Locked, deadlocked, or a connection lost mid-way (a restart): worth another try.
    Not an unreachable server (PoolTimeout) nor a statement over its timeout."""
    if isinstance(exc, _BUSY):
        return True
    return not isinstance(exc, PoolTimeout | pg_errors.QueryCanceled)


def _roll_back(conn: psycopg.Connection[Any]) -> None:
    """End a failed transaction, if the connection still has one (a broken one has not)."""
    if conn.broken or conn.info.transaction_status == TransactionStatus.IDLE:
        return
    with contextlib.suppress(psycopg.Error):  # the pool resets or drops it when it comes back
        conn.execute(b"ROLLBACK")
