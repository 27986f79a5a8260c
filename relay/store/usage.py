"""Usage rows and reservations: admitted calls, their progress, and one usage row per call.

Writes of calls that start or end together share a transaction (GroupCommit). When
the database cannot take a usage row even after retrying (read-only file, a lock held
for longer than RELAY_DB_WRITE_TIMEOUT), the row goes to a spool file beside the
database and is replayed by the next successful write: no row is lost.
"""

import logging

from relay.call import Call
from relay.store import ledger
from relay.store.db import BadRow, Connection, Database, StoreError, spoils_transaction
from relay.store.group_commit import GroupCommit
from relay.store.rows import Pricing, Row, draft_for, lost_row, row_for
from relay.store.spool import Spool

log = logging.getLogger("relay.usage")


class UsageLedger:
    """Reservations at admission, progress of streams, usage rows at the end, recovery."""

    def __init__(self, db: Database[Connection], pricing: Pricing) -> None:
        self.db = db
        self.pricing = pricing
        self.spool = Spool(db.spool_path)
        self.commits = GroupCommit(db)
        self.host = ledger.host_id()

    def admit(self, call: Call, need: ledger.Need) -> ledger.Refusal | None:
        """Reserve a call's likely cost against its key; a Refusal when it does not fit.

        Raises StoreError when the database does not take the write.
        """
        if call.key is None:
            return None
        draft = draft_for(call)
        key_id = call.key.id
        lock = self.db.dialect.lock_row
        metered = call.key.quota_tokens is not None or call.key.budget is not None
        # Not durable: a reservation lost to a database crash costs nothing (its call's
        # usage row, written durably, settles all the same), and it saves a disk flush.
        refusal = self.commits.run(
            lambda conn: ledger.admit(
                conn, call.call_id, key_id, need, draft, self.host, lock, metered
            ),
            durable=False,
        )
        call.reserved = refusal is None
        return refusal

    def progress(self, call: Call, completion_estimate: int) -> None:
        """Note a running stream's progress (best effort: a refusing database is skipped)."""
        if not call.reserved:
            return
        draft = draft_for(call, completion_estimate)
        try:
            self.commits.run(lambda conn: ledger.progress(conn, call.call_id, draft), durable=False)
        except StoreError as exc:
            log.warning("stream progress not noted: %s", exc)

    def record(self, call: Call) -> Row:
        """Write the call's row and charge its key; never raises to the client."""
        row = row_for(call, self.pricing)
        try:
            self.commits.run(lambda conn: ledger.settle(conn, row))
        except StoreError as exc:
            log.error("usage row spooled, database unavailable: %s", exc)
            self.spool.append(row)
            return row
        if self.spool.pending():
            self.spool.replay(self._settle_rows)
        return row

    @property
    def can_record(self) -> bool:
        """False while rows wait in memory: neither the database nor the spool takes them."""
        return not self.spool.failing

    def _settle_rows(self, rows: list[Row]) -> list[Row]:
        """Settle waiting rows in one transaction; return those that could not be."""
        left: list[Row] = []

        def settle_all(conn: Connection) -> None:
            left.clear()  # a retried transaction starts over
            for row in rows:
                conn.execute("SAVEPOINT row")
                try:
                    ledger.settle(conn, _complete(row))
                except BadRow as exc:
                    if spoils_transaction(exc):
                        raise  # the database's trouble, not the row's: all of it waits
                    conn.execute("ROLLBACK TO row")  # not a usage row: set aside
                    left.append(row)
                conn.execute("RELEASE row")

        try:
            self.db.write(settle_all)
        except StoreError as exc:
            log.warning("spooled usage rows wait: %s", exc)
            return rows
        return left

    def recover(self, alive: "ledger.Alive") -> int:
        """Turn in-flight rows of dead workers into `worker_lost` usage rows; how many."""

        def recover_all(conn: Connection) -> int:
            lost = ledger.lost_rows(conn, self.host, alive)
            for draft, last_seen in lost:
                ledger.settle(conn, lost_row(draft, last_seen, self.pricing))
            return len(lost)

        count = self.db.write(recover_all)
        if count:
            log.warning("recorded %d calls whose worker died as worker_lost", count)
        return count


def _complete(row: Row) -> Row:
    """A spooled row with the columns older spools lack."""
    row.setdefault("call_id", None)
    row.setdefault("units", 0.0)
    row.setdefault("unit", None)
    row.setdefault("charged_tokens", row.get("total_tokens") or 0)
    return row
