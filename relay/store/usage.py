"""Usage rows and reservations: admitted calls, their progress, and one usage row per call.

Writes of calls that start or end together share a transaction (GroupCommit). When
the database cannot take a usage row even after retrying (read-only file, a lock held
for longer than RELAY_DB_WRITE_TIMEOUT), the row goes to a spool file beside the
database and is replayed by the next successful write: no row is lost.
"""

import fcntl
import json
import logging
import os
import sqlite3

from relay.call import Call
from relay.store import ledger
from relay.store.db import Database
from relay.store.group_commit import GroupCommit
from relay.store.rows import Pricing, Row, draft_for, lost_row, row_for

log = logging.getLogger("relay.usage")


class UsageLedger:
    """Reservations at admission, progress of streams, usage rows at the end, recovery."""

    def __init__(self, db: Database, pricing: Pricing) -> None:
        self.db = db
        self.pricing = pricing
        self.spool_path = db.path + ".spool.jsonl"
        self.commits = GroupCommit(db)
        self.host = ledger.host_id()

    def admit(self, call: Call, need: ledger.Need) -> ledger.Refusal | None:
        """Reserve a call's likely cost against its key; a Refusal when it does not fit.

        Raises sqlite3.Error when the database does not take the write.
        """
        if call.key is None:
            return None
        draft = draft_for(call)
        key_id = call.key.id
        refusal = self.commits.run(
            lambda conn: ledger.admit(conn, call.call_id, key_id, need, draft, self.host)
        )
        call.reserved = refusal is None
        return refusal

    def progress(self, call: Call, completion_estimate: int) -> None:
        """Note a running stream's progress (best effort: a refusing database is skipped)."""
        if not call.reserved:
            return
        draft = draft_for(call, completion_estimate)
        try:
            self.commits.run(lambda conn: ledger.progress(conn, call.call_id, draft))
        except sqlite3.Error as exc:
            log.warning("stream progress not noted: %s", exc)

    def record(self, call: Call) -> Row:
        """Write the call's row and charge its key; never raises to the client."""
        row = row_for(call, self.pricing)
        try:
            self.commits.run(lambda conn: ledger.settle(conn, row))
        except sqlite3.Error as exc:
            log.error("usage row spooled, database unavailable: %s", exc)
            self._spool(row)
            return row
        if _nonempty(self.spool_path):
            self.replay_spool()
        return row

    def recover(self, alive: "ledger.Alive") -> int:
        """Turn in-flight rows of dead workers into `worker_lost` usage rows; how many."""

        def recover_all(conn: sqlite3.Connection) -> int:
            lost = ledger.lost_rows(conn, self.host, alive)
            for draft, last_seen in lost:
                ledger.settle(conn, lost_row(draft, last_seen, self.pricing))
            return len(lost)

        count = self.db.write(recover_all)
        if count:
            log.warning("recorded %d calls whose worker died as worker_lost", count)
        return count

    def _spool(self, row: Row) -> None:
        """Append a row to the spool file under an exclusive lock."""
        with open(self.spool_path, "a", encoding="utf-8") as spool:
            fcntl.flock(spool, fcntl.LOCK_EX)
            spool.write(json.dumps(row) + "\n")

    def replay_spool(self) -> int:
        """Move spooled rows into the database; the file is locked so one process does it."""
        try:
            spool = open(self.spool_path, "r+", encoding="utf-8")  # noqa: SIM115 - locked below
        except FileNotFoundError:
            return 0
        with spool:
            try:
                fcntl.flock(spool, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another worker is replaying it
            rows = [json.loads(line) for line in spool if line.strip()]
            if rows:
                try:
                    self.db.write(lambda conn: _settle_all(conn, rows))
                except sqlite3.Error:
                    return 0
            # Truncate, never unlink: a writer may already hold the file open, waiting to lock it.
            spool.truncate(0)
        log.info("replayed %d spooled usage rows", len(rows))
        return len(rows)


def _settle_all(conn: sqlite3.Connection, rows: list[Row]) -> None:
    """Settle spooled rows in one transaction."""
    for row in rows:
        ledger.settle(conn, _complete(row))


def _complete(row: Row) -> Row:
    """A spooled row with the columns older spools lack."""
    row.setdefault("call_id", None)
    row.setdefault("units", 0.0)
    row.setdefault("unit", None)
    row.setdefault("charged_tokens", row.get("total_tokens") or 0)
    return row


def _nonempty(path: str) -> bool:
    """Whether a file exists and has content."""
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False
