"""Store writes of calls that start or end together go into one database transaction."""

import functools
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from gevent import sleep
from gevent.event import Event

from relay.runtime import gevent_active
from relay.store.db import Connection, Database, StoreError, spoiling_errors, spoils_transaction

T = TypeVar("T")
Op = Callable[[Connection], Any]


class _Entry(Generic[T]):
    """One caller's operation waiting for the shared commit."""

    __slots__ = ("deadline", "done", "durable", "error", "lead", "op", "result")

    def __init__(self, op: Callable[[Connection], T], deadline: float, durable: bool) -> None:
        self.op = op
        self.durable = durable
        self.deadline = deadline  # when this caller stops waiting for the database
        # Made only for a caller that waits for another's batch: a leader commits its own.
        self.done: Event | None = None
        self.lead = False  # woken to lead the next batch rather than with a result
        self.result: Any = None
        self.error: BaseException | None = None


class GroupCommit:
    """Runs write operations `op(conn)`, batching those of calls starting or ending together.

    Under gevent every SQLite call blocks the whole worker (and every PostgreSQL
    transaction costs round trips), and calls come in bursts
    (20 streams started together end together). One transaction per operation made
    the last of them wait for all the others' commits (and lock waits). Here the first
    caller yields once so that every call in the same loop turn can queue its
    operation, then runs them all in one transaction, each in its own savepoint (one
    operation's error leaves the others alone; on PostgreSQL, where a savepoint costs a
    round trip, without them, and a batch that fails is run again one operation at a
    time); each caller returns only after its own operation is committed, as before.
    The leader commits one batch only and hands the next to the first caller that queued
    meanwhile, and a batch gives up at the earliest
    deadline in it, so no caller waits for a locked database longer than the write
    timeout. Without gevent (threads, the CLI) operations run one by one.
    """

    def __init__(self, db: Database[Connection], batch: bool | None = None) -> None:
        self.db = db
        self.batch = gevent_active() if batch is None else batch
        self.queue: list[_Entry[Any]] = []
        self.leading = False

    def run(self, op: Callable[[Connection], T], durable: bool = True) -> T:
        """Run one operation inside a committed transaction; its result, or its error.

        durable=False: the operation may be lost if the database server crashes right
        after the commit (see Database.write); a batch is durable if any of its ops is.
        """
        if not self.batch:
            return _write(self.db, op, None, durable)
        entry: _Entry[T] = _Entry(op, time.monotonic() + self.db.write_timeout, durable)
        self.queue.append(entry)
        if not self.leading:
            self._lead()
        else:
            entry.done = Event()
            entry.done.wait()  # another caller commits it, or hands this one the lead
            if entry.lead:
                self._lead()
        if entry.error is not None:
            raise entry.error
        result: T = entry.result
        return result

    def _lead(self) -> None:
        """Commit the queued operations as one batch, then pass the lead on."""
        self.leading = True
        batch: list[_Entry[Any]] = []
        try:
            sleep(0)  # the other calls of this loop turn queue their operations now
            batch, self.queue = self.queue, []
            timeout = max(min(e.deadline for e in batch) - time.monotonic(), 0.0)
            if len(batch) == 1:
                _run_alone(self.db, batch[0], timeout)
            elif getattr(self.db, "batch_savepoints", True):  # stand-ins in tests lack it
                durable = any(entry.durable for entry in batch)
                try:
                    _write(self.db, functools.partial(_run_each, batch=batch), timeout, durable)
                except StoreError as exc:
                    for entry in batch:
                        entry.result, entry.error = None, exc
            else:
                _run_all_or_each(self.db, batch, timeout)
            _wake(batch)
            batch = []
        finally:
            self.leading = False
            if batch:
                # Only when this greenlet was stopped mid-way (a kill at shutdown): nobody
                # else would wake these callers, and nothing was committed for them.
                # A sqlite3 error, as before PostgreSQL: callers catch StoreError, which has it.
                for entry in batch:
                    entry.error = sqlite3.OperationalError("the store write was interrupted")
                _wake(batch)
            if self.queue:  # queued while this batch ran: the first of them leads next
                self.leading = True
                self.queue[0].lead = True
                _wake(self.queue[:1])


def _write(
    db: Database[Connection], fn: Callable[[Connection], T], timeout: float | None, durable: bool
) -> T:
    """db.write, telling it only when a commit need not be durable (the usual call otherwise)."""
    if durable:
        return db.write(fn, timeout=timeout)
    return db.write(fn, timeout=timeout, durable=False)


def _run_alone(db: Database[Connection], entry: _Entry[Any], timeout: float) -> None:
    """A batch of one: its own transaction, no savepoint (PostgreSQL: two round trips less)."""
    try:
        entry.result = _write(db, entry.op, timeout, entry.durable)
    except Exception as exc:  # noqa: BLE001 - handed to its caller, as in a batch
        entry.result, entry.error = None, exc


def _run_all_or_each(db: Database[Connection], batch: list[_Entry[Any]], timeout: float) -> None:
    """The whole batch in one transaction without savepoints; if anything in it fails (an
    operation's own error, or the commit), each operation again in a transaction of its
    own, so that every caller gets its own result or error. Errors are rare: the extra
    transactions are the price of not paying a round trip per savepoint."""
    durable = any(entry.durable for entry in batch)

    def run_all(conn: Connection) -> list[Any]:
        return [entry.op(conn) for entry in batch]

    try:
        results = _write(db, run_all, timeout, durable)
    except spoiling_errors() as exc:
        for entry in batch:  # the database's own trouble, retried until the deadline
            entry.result, entry.error = None, exc
        return
    except Exception:  # noqa: BLE001 - one operation failed: find out which, one by one
        left = max(min(e.deadline for e in batch) - time.monotonic(), 0.0)
        for entry in batch:
            _run_alone(db, entry, left)
        return
    for entry, result in zip(batch, results, strict=True):
        entry.result, entry.error = result, None


def _run_each(conn: Connection, batch: list[_Entry[Any]]) -> None:
    """Run each operation in its own savepoint; a failing one is undone alone (unless its
    error spoiled the whole transaction, a lost connection or a deadlock: all retry)."""
    for entry in batch:
        entry.error = None
        conn.execute("SAVEPOINT op")
        try:
            entry.result = entry.op(conn)
        except Exception as exc:
            if spoils_transaction(exc):
                raise
            conn.execute("ROLLBACK TO op")
            entry.error = exc
        conn.execute("RELEASE op")


def _wake(entries: list[_Entry[Any]]) -> None:
    """Tell each waiting caller its operation is done (or failed)."""
    for entry in entries:
        if entry.done is not None:
            entry.done.set()
