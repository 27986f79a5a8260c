"""The store's schema as named migrations, applied once each and recorded in `_migrations`."""

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import sqlite_utils

from relay.store.dialect import SQLITE, Dialect


class Migrator(Protocol):
    """What a migration runs its statements on: a sqlite_utils.Database (SQLite, as every
    release has passed it), or the PostgreSQL store's migrator, which names its dialect."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any:
        """Run one statement (`?` placeholders)."""


def dialect_of(db: Migrator) -> Dialect:
    """The dialect a migration writes for (SQLite unless the migrator says otherwise)."""
    dialect: Dialect = getattr(db, "dialect", SQLITE)
    return dialect


def _keys_and_usage(db: Migrator) -> None:
    """Keys (hashes only) and one usage row per finished call."""
    d = dialect_of(db)
    i, r = d.integer, d.real
    db.execute(
        f"CREATE TABLE keys (id {d.row_id}, name TEXT NOT NULL, key_hash TEXT NOT NULL, "
        f"key_hint TEXT, created_at {r} NOT NULL, last_used_at {r}, "
        f"enabled {i} NOT NULL DEFAULT 1, quota_tokens {i}, used_tokens {i} NOT NULL DEFAULT 0, "
        f"budget {r}, spent {r} NOT NULL DEFAULT 0.0, rpm {i}, tpm {i}, max_concurrent {i}, "
        f"models TEXT, expires_at {r}, quota_period TEXT, period_started_at {r})"
    )
    db.execute("CREATE UNIQUE INDEX idx_keys_name ON keys (name)")
    db.execute("CREATE UNIQUE INDEX idx_keys_key_hash ON keys (key_hash)")
    db.execute(
        f"CREATE TABLE usage (id {d.row_id}, ts {r}, key_id {i}, face TEXT, method TEXT, "
        "path TEXT, model_requested TEXT, model_served TEXT, upstream TEXT, "
        f"stream {i}, prompt_tokens {i}, completion_tokens {i}, total_tokens {i}, "
        f"usage_source TEXT, cost {r}, status {i}, outcome TEXT, latency_ms {r}, ttfb_ms {r}, "
        f"end_user TEXT, upstream_request_id TEXT, bytes_out {i}, attempts {i})"
    )
    db.execute("CREATE INDEX idx_usage_ts ON usage (ts)")
    db.execute("CREATE INDEX idx_usage_key_id_ts ON usage (key_id, ts)")


def _health(db: Migrator) -> None:
    """A one-row table /healthz writes to, proving the database takes writes."""
    d = dialect_of(db)
    db.execute(f"CREATE TABLE health (id {d.integer} PRIMARY KEY, checked_at {d.real})")


KEY_COLUMNS = (
    "id, name, key_hash, key_hint, created_at, last_used_at, enabled, quota_tokens, "
    "used_tokens, budget, spent, rpm, tpm, max_concurrent, models, expires_at, quota_period, "
    "period_started_at"
)


def _keys_never_reused(db: Migrator) -> None:
    """Key ids that are never a deleted key's; deleted keys stay as tombstones.

    SQLite reuses the largest rowid once its row is deleted, so a new key could inherit
    a deleted key's usage rows. The table is rebuilt with AUTOINCREMENT, its counter
    starts past every id a usage row names, and deleting a key now keeps its row (name,
    `deleted_at`, no hash) so reports still name whose calls those were. PostgreSQL's
    identity sequence never gives an id twice: there the table only gains `deleted_at`.
    """
    if dialect_of(db).name == "postgresql":
        db.execute("ALTER TABLE keys ALTER COLUMN key_hash DROP NOT NULL")
        db.execute("ALTER TABLE keys ADD COLUMN deleted_at DOUBLE PRECISION")
        db.execute("DROP INDEX idx_keys_name")
        db.execute("DROP INDEX idx_keys_key_hash")
    else:
        db.execute(
            "CREATE TABLE keys_new (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, "
            "key_hash TEXT, key_hint TEXT, created_at REAL NOT NULL, last_used_at REAL, "
            "enabled INTEGER NOT NULL DEFAULT 1, quota_tokens INTEGER, "
            "used_tokens INTEGER NOT NULL DEFAULT 0, budget REAL, spent REAL NOT NULL DEFAULT 0, "
            "rpm INTEGER, tpm INTEGER, max_concurrent INTEGER, models TEXT, expires_at REAL, "
            "quota_period TEXT, period_started_at REAL, deleted_at REAL)"
        )
        db.execute(f"INSERT INTO keys_new ({KEY_COLUMNS}) SELECT {KEY_COLUMNS} FROM keys")  # noqa: S608
        db.execute("DROP TABLE keys")
        db.execute("ALTER TABLE keys_new RENAME TO keys")
    db.execute("CREATE UNIQUE INDEX keys_live_name ON keys (name) WHERE deleted_at IS NULL")
    db.execute("CREATE UNIQUE INDEX keys_hash ON keys (key_hash)")
    if dialect_of(db).name == "sqlite":
        top = db.execute(
            "SELECT MAX(COALESCE((SELECT MAX(id) FROM keys), 0), "
            "COALESCE((SELECT MAX(key_id) FROM usage), 0))"
        ).fetchone()[0]
        db.execute("DELETE FROM sqlite_sequence WHERE name = 'keys'")
        db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('keys', ?)", [top])


def _calls_in_flight(db: Migrator) -> None:
    """Reservations of calls in flight, and what a usage row needs to name and price a call."""
    d = dialect_of(db)
    i, r = d.integer, d.real
    db.execute(
        f"CREATE TABLE inflight (call_id TEXT PRIMARY KEY, key_id {i}, "
        f"reserved_tokens {i} NOT NULL DEFAULT 0, reserved_cost {r} NOT NULL DEFAULT 0, "
        f"host TEXT NOT NULL, pid {i} NOT NULL, started_at {r} NOT NULL, "
        f"updated_at {r} NOT NULL, draft TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX inflight_key ON inflight (key_id)")
    added = (("call_id", "TEXT"), ("units", r), ("unit", "TEXT"), ("charged_tokens", i))
    for column, kind in added:
        db.execute(f"ALTER TABLE usage ADD COLUMN {column} {kind}")
    db.execute("UPDATE usage SET charged_tokens = total_tokens, units = 0")
    db.execute("CREATE UNIQUE INDEX usage_call_id ON usage (call_id)")


def _admin_sessions(db: Migrator) -> None:
    """Operator sessions on the server: signing out ends a session wherever its cookie is."""
    r = dialect_of(db).real
    db.execute(
        "CREATE TABLE admin_sessions (id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, "
        f"created_at {r} NOT NULL, expires_at {r} NOT NULL)"
    )


def _key_endpoints(db: Migrator) -> None:
    """Account-wide endpoint groups (files, batches…) the operator opened for a key."""
    db.execute("ALTER TABLE keys ADD COLUMN endpoints TEXT")


MIGRATIONS: list[tuple[str, Callable[[Migrator], None]]] = [
    ("0001_keys_and_usage", _keys_and_usage),
    ("0002_health", _health),
    ("0003_keys_never_reused", _keys_never_reused),
    ("0004_calls_in_flight", _calls_in_flight),
    ("0005_admin_sessions", _admin_sessions),
    ("0006_key_endpoints", _key_endpoints),
]


def pending(done: set[str]) -> list[str]:
    """The names of the migrations not among `done`, in the order they would run."""
    return [name for name, _ in MIGRATIONS if name not in done]


def migrate(db: sqlite_utils.Database) -> None:
    """Apply every migration not yet recorded to a SQLite file, each in its own transaction.

    (PostgreSQL runs the same list under an advisory lock: `postgres.PostgresDatabase`.)
    """
    db.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    for name, step in MIGRATIONS:
        # BEGIN IMMEDIATE takes the write lock before the check: several workers migrate at once.
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            if not db.execute("SELECT 1 FROM _migrations WHERE name = ?", [name]).fetchone():
                step(db)
                db.execute("INSERT INTO _migrations VALUES (?, ?)", [name, time.time()])
            db.conn.execute("COMMIT")
        except BaseException:
            db.conn.execute("ROLLBACK")
            raise
