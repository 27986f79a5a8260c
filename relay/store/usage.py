"""Usage rows: one per finished call, settled into its key, spooled when the database refuses."""

import fcntl
import json
import logging
import os
import sqlite3
import time
from typing import Any

from relay.call import Call
from relay.store.db import Database
from relay.store.group_commit import GroupCommit

log = logging.getLogger("relay.usage")

USAGE_COLUMNS = (
    "ts",
    "key_id",
    "face",
    "method",
    "path",
    "model_requested",
    "model_served",
    "upstream",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "usage_source",
    "cost",
    "status",
    "outcome",
    "latency_ms",
    "ttfb_ms",
    "end_user",
    "upstream_request_id",
    "bytes_out",
    "attempts",
)
INSERT_USAGE = (
    f"INSERT INTO usage ({', '.join(USAGE_COLUMNS)}) "  # noqa: S608 - constant column list
    f"VALUES ({', '.join('?' for _ in USAGE_COLUMNS)})"
)
SETTLE_KEY = (
    "UPDATE keys SET used_tokens = used_tokens + ?, spent = spent + ?, last_used_at = ? "
    "WHERE id = ?"
)


Prices = dict[str, tuple[float, float]]  # model -> (prompt, completion) per 1000 tokens
Row = dict[str, Any]


def cost_of(prices: Prices, model: str | None, prompt: int, completion: int) -> float:
    """Money spent by a call under the price table (per 1000 tokens), 0 when unpriced."""
    rates = prices.get(model) if model else None
    if rates is None:
        return 0.0
    return (prompt * rates[0] + completion * rates[1]) / 1000.0


class UsageRecorder:
    """Writes usage rows and settles key counters: one short transaction per call, or per
    burst of calls ending together (GroupCommit).

    When the database cannot take the row even after retrying (read-only file, a
    lock held for longer than RELAY_DB_WRITE_TIMEOUT), the row goes to a spool file
    beside the database and is replayed by the next successful write: no row is lost.
    """

    def __init__(self, db: Database, prices: Prices | None = None) -> None:
        self.db = db
        self.prices = prices or {}
        self.spool_path = db.path + ".spool.jsonl"
        self.commits = GroupCommit(self._insert_rows)

    def row_for(self, call: Call) -> Row:
        """The usage row of a finished call."""
        usage = call.usage
        prompt, completion, total = usage.prompt, usage.completion, usage.total
        return {
            "ts": call.started_wall,
            "key_id": call.key.id if call.key else None,
            "face": call.face,
            "method": call.method,
            "path": call.path,
            "model_requested": call.model_requested,
            "model_served": call.model_served or call.model,
            "upstream": call.upstream_name,
            "stream": int(call.stream_requested),
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": total,
            "usage_source": usage.source,
            "cost": cost_of(self.prices, call.model_served or call.model, prompt, completion),
            "status": call.status,
            "outcome": call.outcome,
            "latency_ms": round((time.perf_counter() - call.started) * 1000, 3),
            "ttfb_ms": round(call.ttfb * 1000, 3) if call.ttfb is not None else None,
            "end_user": call.end_user,
            "upstream_request_id": call.upstream_request_id,
            "bytes_out": call.bytes_out,
            "attempts": call.attempts,
        }

    def record(self, call: Call) -> Row:
        """Write the call's row and add its tokens to the key; never raises to the client."""
        row = self.row_for(call)
        try:
            self.commits.write(row)
        except sqlite3.Error as exc:
            log.error("usage row spooled, database unavailable: %s", exc)
            self._spool(row)
            return row
        if _nonempty(self.spool_path):
            self.replay_spool()
        return row

    def _insert_rows(self, rows: list[Row]) -> None:
        """Insert rows and settle their keys in one transaction."""
        self.db.write(lambda conn: self._insert(conn, rows))

    def _insert(self, conn: sqlite3.Connection, rows: list[Row]) -> None:
        """Insert rows and settle their keys, inside the caller's transaction."""
        for row in rows:
            conn.execute(INSERT_USAGE, tuple(row[c] for c in USAGE_COLUMNS))
            if row["key_id"] is not None:
                settle = (row["total_tokens"], row["cost"], row["ts"], row["key_id"])
                conn.execute(SETTLE_KEY, settle)

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
                    self._insert_rows(rows)
                except sqlite3.Error:
                    return 0
            # Truncate, never unlink: a writer may already hold the file open, waiting to lock it.
            spool.truncate(0)
        log.info("replayed %d spooled usage rows", len(rows))
        return len(rows)


def _nonempty(path: str) -> bool:
    """Whether a file exists and has content."""
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False
