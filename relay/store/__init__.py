"""The store layer: keys, usage rows and the reports read from them, in one SQLite file or
one PostgreSQL database that several relay machines share.

`Store` is the layer's one entry point; nothing outside `store/` (and `limits/`, which
keeps its own counters) writes SQL.
"""

import time
from typing import Any

from relay.call import Call
from relay.config import is_postgres_url
from relay.metering import Need, PriceTable
from relay.store import queries
from relay.store.db import Connection, Database, SQLiteDatabase, StoreError
from relay.store.keys import KeyStore
from relay.store.ledger import Refusal, process_alive
from relay.store.postgres import PostgresDatabase
from relay.store.rows import Pricing, Row
from relay.store.sessions import SessionStore
from relay.store.usage import UsageLedger

__all__ = ["Need", "Pricing", "Refusal", "Store", "StoreError", "is_postgres_url"]


def open_database(
    target: str, write_timeout: float = 30.0, spool_path: str | None = None
) -> Database[Connection]:
    """The database RELAY_DATABASE names: a `postgresql://` URL, else a SQLite file path."""
    if is_postgres_url(target):
        return PostgresDatabase(target, write_timeout=write_timeout, spool_path=spool_path)
    database = SQLiteDatabase(target, write_timeout=write_timeout)
    if spool_path:
        database.spool_path = spool_path
    return database


class Store:
    """Keys, usage and reports on one database (RELAY_DATABASE: a SQLite file or PostgreSQL)."""

    def __init__(
        self,
        target: str,
        write_timeout: float = 30.0,
        pricing: Pricing | None = None,
        spool_path: str | None = None,
    ) -> None:
        self.db = open_database(target, write_timeout, spool_path)
        self.description = self.db.description  # for messages: never a password
        self.keys = KeyStore(self.db)
        self.sessions = SessionStore(self.db)
        self.usage = UsageLedger(self.db, pricing or Pricing(PriceTable(), 0.0))

    def migrate(self) -> None:
        """Create or upgrade the schema (every worker does it at start; it is idempotent)."""
        self.db.migrate()

    def pending_migrations(self) -> list[str]:
        """The names of the migrations `migrate` would apply, in order."""
        return self.db.pending_migrations()

    def admit(self, call: Call, need: Need) -> Refusal | None:
        """Reserve a call's likely cost against its key's quota and budget; a Refusal when
        it does not fit (StoreError when the database refuses the write)."""
        return self.usage.admit(call, need)

    def progress(self, call: Call, completion_estimate: int) -> None:
        """Note how far a running stream got (for the row left if its worker dies)."""
        self.usage.progress(call, completion_estimate)

    def record(self, call: Call) -> Row:
        """Write a finished call's usage row and charge its key (spooled if the file refuses)."""
        return self.usage.record(call)

    @property
    def can_record(self) -> bool:
        """False while usage rows wait in memory: neither the file nor the spool takes them."""
        return self.usage.can_record

    def recover(self) -> int:
        """Record calls whose worker died mid-way as `worker_lost`; how many there were."""
        return self.usage.recover(process_alive)

    def check_writable(self, timeout: float) -> None:
        """One tiny write proving the database takes writes; StoreError when it does not."""
        self.db.write(
            lambda conn: conn.execute(
                "INSERT INTO health (id, checked_at) VALUES (1, ?) "
                "ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
                (time.time(),),
            ),
            timeout=timeout,
        )

    def summarise(self, **filters: Any) -> tuple[list[str], list[list[Any]]]:
        """Usage summed by day, key and model (or one line per call), filtered."""
        return queries.summarise(self.db, **filters)

    def daily_totals(self, by: str, since_day: int, key_id: int | None = None) -> list[Row]:
        """Calls and tokens per UTC day by key or model name."""
        return queries.daily_totals(self.db, by, since_day, key_id)

    def billing_lines(self, key_id: int, start_ts: float, end_ts: float) -> list[Row]:
        """One key's tokens and cost per day and model."""
        return queries.billing_lines(self.db, key_id, start_ts, end_ts)

    def recent_calls(self, limit: int) -> list[Row]:
        """The newest calls with key and model names."""
        return queries.recent_calls(self.db, limit)

    @property
    def spool_path(self) -> str:
        """Where usage rows wait while the database refuses them."""
        return self.db.spool_path

    def close(self) -> None:
        """Close this process's connections (tests and CLI commands)."""
        self.db.close()
