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


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("0001_keys_and_usage", _keys_and_usage),
    ("0002_health", _health),
]


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
