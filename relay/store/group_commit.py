"""Store writes of calls that start or end together go into one SQLite transaction."""

import functools
import sqlite3
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from gevent import sleep
from gevent.event import Event

from relay.runtime import gevent_active
from relay.store.db import Database

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]


class _Entry(Generic[T]):
    """One caller's operation waiting for the shared commit."""

    __slots__ = ("done", "error", "op", "result")

    def __init__(self, op: Callable[[sqlite3.Connection], T]) -> None:
        self.op = op
        self.done = Event()
        self.result: Any = None
        self.error: BaseException | None = None


class GroupCommit:
    """Runs write operations `op(conn)`, batching those of calls starting or ending together.

    Under gevent every SQLite call blocks the whole worker, and calls come in bursts
    (20 streams started together end together). One transaction per operation made
    the last of them wait for all the others' commits (and lock waits). Here the first
    caller yields once so that every call in the same loop turn can queue its
    operation, then runs them all in one transaction, each in its own savepoint (one
    operation's error leaves the others alone); each caller returns only after its own
    operation is committed, as before. Without gevent (threads, the CLI) operations
    run one by one.
    """

    def __init__(self, db: Database, batch: bool | None = None) -> None:
        self.db = db
        self.batch = gevent_active() if batch is None else batch
        self.queue: list[_Entry[Any]] = []
        self.leading = False

    def run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run one operation inside a committed transaction; its result, or its error."""
        if not self.batch:
            return self.db.write(op)
        entry: _Entry[T] = _Entry(op)
        self.queue.append(entry)
        if self.leading:
            entry.done.wait()  # another caller commits the queue, this operation included
        else:
            self.leading = True
            try:
                sleep(0)  # the other calls of this loop turn queue their operations now
            finally:
                self._drain()
        if entry.error is not None:
            raise entry.error
        result: T = entry.result
        return result

    def _drain(self) -> None:
        """Commit what is queued, in batches, until nothing waits; wake every caller."""
        batch: list[_Entry[Any]] = []
        try:
            while self.queue:
                batch, self.queue = self.queue, []
                try:
                    self.db.write(functools.partial(_run_each, batch=batch))
                except sqlite3.Error as exc:
                    for entry in batch:
                        entry.result, entry.error = None, exc
                _wake(batch)
                batch = []
        finally:
            self.leading = False
            # Only when this greenlet was stopped mid-way (a kill at shutdown): nobody else
            # would wake these callers, and nothing was committed for them.
            stranded, self.queue = batch + self.queue, []
            for entry in stranded:
                entry.error = sqlite3.OperationalError("the store write was interrupted")
            _wake(stranded)


def _run_each(conn: sqlite3.Connection, batch: list[_Entry[Any]]) -> None:
    """Run each operation in its own savepoint; a failing one is undone alone."""
    for entry in batch:
        entry.error = None
        conn.execute("SAVEPOINT op")
        try:
            entry.result = entry.op(conn)
        except Exception as exc:  # noqa: BLE001 - handed to that caller, the batch goes on
            conn.execute("ROLLBACK TO op")
            entry.error = exc
        conn.execute("RELEASE op")


def _wake(entries: list[_Entry[Any]]) -> None:
    """Tell each waiting caller its operation is done (or failed)."""
    for entry in entries:
        entry.done.set()
