"""The store's schema as named migrations, applied once each and recorded in `_migrations`."""

import time
from collections.abc import Callable

import sqlite_utils


def _keys_and_usage(db: sqlite_utils.Database) -> None:
    """Keys (hashes only) and one usage row per finished call."""
    db.table("keys").create(
        {
            "id": int,
            "name": str,
            "key_hash": str,
            "key_hint": str,
            "created_at": float,
            "last_used_at": float,
            "enabled": int,
            "quota_tokens": int,
            "used_tokens": int,
            "budget": float,
            "spent": float,
            "rpm": int,
            "tpm": int,
            "max_concurrent": int,
            "models": str,
            "expires_at": float,
            "quota_period": str,
            "period_started_at": float,
        },
        pk="id",
        not_null={"name", "key_hash", "created_at", "enabled", "used_tokens", "spent"},
        defaults={"enabled": 1, "used_tokens": 0, "spent": 0.0},
    )
    db.table("keys").create_index(["name"], unique=True)
    db.table("keys").create_index(["key_hash"], unique=True)
    db.table("usage").create(
        {
            "id": int,
            "ts": float,
            "key_id": int,
            "face": str,
            "method": str,
            "path": str,
            "model_requested": str,
            "model_served": str,
            "upstream": str,
            "stream": int,
            "prompt_tokens": int,
            "completion_tokens": int,
            "total_tokens": int,
            "usage_source": str,
            "cost": float,
            "status": int,
            "outcome": str,
            "latency_ms": float,
            "ttfb_ms": float,
            "end_user": str,
            "upstream_request_id": str,
            "bytes_out": int,
            "attempts": int,
        },
        pk="id",
    )
    db.table("usage").create_index(["ts"])
    db.table("usage").create_index(["key_id", "ts"])


def _health(db: sqlite_utils.Database) -> None:
    """A one-row table /healthz writes to, proving the file takes writes."""
    db.table("health").create({"id": int, "checked_at": float}, pk="id")


KEY_COLUMNS = (
    "id, name, key_hash, key_hint, created_at, last_used_at, enabled, quota_tokens, "
    "used_tokens, budget, spent, rpm, tpm, max_concurrent, models, expires_at, quota_period, "
    "period_started_at"
)


def _keys_never_reused(db: sqlite_utils.Database) -> None:
    """Key ids from AUTOINCREMENT, never a deleted key's; deleted keys stay as tombstones.

    SQLite reuses the largest rowid once its row is deleted, so a new key could inherit
    a deleted key's usage rows. The table is rebuilt with AUTOINCREMENT, its counter
    starts past every id a usage row names, and deleting a key now keeps its row (name,
    `deleted_at`, no hash) so reports still name whose calls those were.
    """
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
    top = db.execute(
        "SELECT MAX(COALESCE((SELECT MAX(id) FROM keys), 0), "
        "COALESCE((SELECT MAX(key_id) FROM usage), 0))"
    ).fetchone()[0]
    db.execute("DELETE FROM sqlite_sequence WHERE name = 'keys'")
    db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('keys', ?)", [top])


def _calls_in_flight(db: sqlite_utils.Database) -> None:
    """Reservations of calls in flight, and what a usage row needs to name and price a call."""
    db.execute(
        "CREATE TABLE inflight (call_id TEXT PRIMARY KEY, key_id INTEGER, "
        "reserved_tokens INTEGER NOT NULL DEFAULT 0, reserved_cost REAL NOT NULL DEFAULT 0, "
        "host TEXT NOT NULL, pid INTEGER NOT NULL, started_at REAL NOT NULL, "
        "updated_at REAL NOT NULL, draft TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX inflight_key ON inflight (key_id)")
    for column, kind in (
        ("call_id", "TEXT"),
        ("units", "REAL"),
        ("unit", "TEXT"),
        ("charged_tokens", "INTEGER"),
    ):
        db.execute(f"ALTER TABLE usage ADD COLUMN {column} {kind}")
    db.execute("UPDATE usage SET charged_tokens = total_tokens, units = 0")
    db.execute("CREATE UNIQUE INDEX usage_call_id ON usage (call_id)")


def _admin_sessions(db: sqlite_utils.Database) -> None:
    """Operator sessions on the server: signing out ends a session wherever its cookie is."""
    db.execute(
        "CREATE TABLE admin_sessions (id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, "
        "created_at REAL NOT NULL, expires_at REAL NOT NULL)"
    )


def _key_endpoints(db: sqlite_utils.Database) -> None:
    """Account-wide endpoint groups (files, batches…) the operator opened for a key."""
    db.execute("ALTER TABLE keys ADD COLUMN endpoints TEXT")


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("0001_keys_and_usage", _keys_and_usage),
    ("0002_health", _health),
    ("0003_keys_never_reused", _keys_never_reused),
    ("0004_calls_in_flight", _calls_in_flight),
    ("0005_admin_sessions", _admin_sessions),
    ("0006_key_endpoints", _key_endpoints),
]


def pending(db: sqlite_utils.Database) -> list[str]:
    """The names of the migrations a database has not had yet, in the order they would run."""
    if "_migrations" not in db.table_names():
        return [name for name, _ in MIGRATIONS]
    done = {row[0] for row in db.execute("SELECT name FROM _migrations").fetchall()}
    return [name for name, _ in MIGRATIONS if name not in done]


def migrate(db: sqlite_utils.Database) -> None:
    """Apply every migration not yet recorded, each in its own transaction."""
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
