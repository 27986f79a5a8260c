"""Usage rows of calls that finish together go into one SQLite transaction."""

import sqlite3
from collections.abc import Callable
from typing import Any

from gevent import sleep
from gevent.event import Event

from relay.runtime import gevent_active

Rows = list[dict[str, Any]]


class GroupCommit:
    """Writes rows with write_rows(rows), batching the rows of calls finishing together.

    Under gevent every SQLite call blocks the whole worker, and the ends of streams
    come in bursts (20 streams started together end together). One transaction per
    row made the last of them wait for all the others' commits (and lock waits)
    before its client saw [DONE]. Here the first caller yields once so that every
    call finishing in the same loop turn can queue its row, then commits them all;
    each caller returns only after its own row is committed, as before. Without
    gevent (threads, the CLI) rows are written one by one.
    """

    def __init__(self, write_rows: Callable[[Rows], None], batch: bool | None = None) -> None:
        self.write_rows = write_rows  # raises sqlite3.Error when the database refuses
        self.batch = gevent_active() if batch is None else batch
        self.queue: list[list[Any]] = []  # [row, committed event, error] of waiting callers
        self.leading = False

    def write(self, row: dict[str, Any]) -> None:
        """Write one row; return once it is committed, else raise the sqlite3.Error."""
        if not self.batch:
            self.write_rows([row])
            return
        entry = [row, Event(), None]
        self.queue.append(entry)
        if self.leading:
            entry[1].wait()  # another caller commits the queue, this row included
        else:
            self.leading = True
            try:
                sleep(0)  # the other calls ending in this loop turn queue their rows now
            finally:
                self._drain()
        if entry[2] is not None:
            raise entry[2]

    def _drain(self) -> None:
        """Commit what is queued, in batches, until nothing waits; wake every caller."""
        batch: list[list[Any]] = []
        try:
            while self.queue:
                batch, self.queue = self.queue, []
                error = None
                try:
                    self.write_rows([row for row, _, _ in batch])
                except sqlite3.Error as exc:
                    error = exc
                _wake(batch, error)
                batch = []
        finally:
            self.leading = False
            # Only when this greenlet was stopped mid-way (a kill at shutdown): nobody else
            # would wake these callers, and nothing was committed for them, so they spool.
            stranded, self.queue = batch + self.queue, []
            _wake(stranded, sqlite3.OperationalError("the usage write was interrupted"))


def _wake(entries: list[list[Any]], error: sqlite3.Error | None) -> None:
    """Tell each waiting caller how its commit went."""
    for entry in entries:
        entry[2] = error
        entry[1].set()
