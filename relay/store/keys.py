"""Relay keys: creation, hashing, lookup and changes. Only SHA-256 hashes are ever stored."""

import datetime as dt
import hashlib
import hmac
import secrets
import time
from typing import Any

from relay.call import KeyRecord
from relay.endpoints import parse_groups
from relay.store.db import Connection, Database

KEY_PREFIX = "sk-relay-"
# Columns an operator may change; `keys` rows carry usage counters too.
SETTABLE = (
    "quota_tokens", "budget", "rpm", "tpm", "max_concurrent", "models", "expires_at",
    "endpoints",
)  # fmt: skip
PERIODS = ("none", "monthly")
# Limits a setting can take: SQLite integers are 64-bit, and no quota is near a quadrillion.
MAX_SETTING = 10**15
LAST_EXPIRY = 253402300799.0  # 9999-12-31 23:59:59 UTC


def hash_key(key: str) -> str:
    """SHA-256 of the key: keys are high-entropy secrets, so a fast hash is enough."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    """A fresh random key: prefix plus 192 bits of randomness."""
    return KEY_PREFIX + secrets.token_urlsafe(24)


def key_hint(key: str) -> str:
    """A display hint that cannot reveal the key: its prefix shape and last four characters."""
    return f"{key[:3]}…{key[-4:]}" if len(key) >= 12 else "…"


def parse_expiry(value: object) -> float | None:
    """Parse an expiry date (YYYY-MM-DD, end of that day UTC) or ISO datetime into a timestamp."""
    if value in (None, ""):
        return None
    text = str(value).strip()
    try:
        if len(text) == 10:
            day = dt.date.fromisoformat(text)
            moment = dt.datetime.combine(day, dt.time.max, tzinfo=dt.UTC)
        else:
            moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=dt.UTC)
        stamp = moment.timestamp()
    except (ValueError, OverflowError):
        raise ValueError(f"expiry {text!r} is not a date like 2026-12-31") from None
    if not 0 <= stamp <= LAST_EXPIRY:
        raise ValueError(f"expiry {text!r} is not between 1970 and 9999")
    return stamp


def parse_models(value: object) -> str | None:
    """Normalise a comma-separated allow-list; empty means every model."""
    if value is None:
        return None
    models = [m.strip() for m in str(value).split(",") if m.strip()]
    return ",".join(models) or None


class KeyStore:
    """Reads and writes the `keys` table."""

    def __init__(self, db: Database[Connection]) -> None:
        self.db = db

    def create(self, name: str, key: str | None = None, **settings: Any) -> tuple[str, KeyRecord]:
        """Store a new key (random unless given) and return (plaintext key, record)."""
        name = (name or "").strip()
        if not name:
            raise ValueError("a key needs a name")
        plaintext = key if key is not None else new_key()
        if len(plaintext) < 8 or any(ch.isspace() for ch in plaintext):
            raise ValueError("an adopted key must be at least 8 characters with no spaces")
        row = {
            "name": name,
            "key_hash": hash_key(plaintext),
            "key_hint": key_hint(plaintext),
            "created_at": time.time(),
            "enabled": 1,
            "used_tokens": 0,
            "spent": 0.0,
            "quota_period": settings.pop("quota_period", None) or "none",
            "period_started_at": time.time(),
        }
        row.update(self._checked(settings))

        def insert(conn: Connection) -> int:
            if conn.execute(
                "SELECT 1 FROM keys WHERE name = ? AND deleted_at IS NULL", (name,)
            ).fetchone():
                raise ValueError(f"a key named {name!r} already exists")
            if conn.execute("SELECT 1 FROM keys WHERE key_hash = ?", (row["key_hash"],)).fetchone():
                raise ValueError("that key string is already in use")
            columns = ", ".join(row)
            marks = ", ".join("?" for _ in row)
            sql = f"INSERT INTO keys ({columns}) VALUES ({marks}) RETURNING id"  # noqa: S608
            return int(conn.execute(sql, tuple(row.values())).fetchone()[0])

        key_id = self.db.write(insert)
        record = self.get(key_id)
        if record is None:  # pragma: no cover - just inserted in the same transaction
            raise LookupError(f"key {name!r} vanished after it was created")
        return plaintext, record

    def _checked(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Validate settable columns, returning a dict ready for SQL."""
        return {column: _checked_value(column, value) for column, value in settings.items()}

    def get(self, key_id: int) -> KeyRecord | None:
        """The record for an id, or None."""
        row = self.db.query_one("SELECT * FROM keys WHERE id = ?", (key_id,))
        return KeyRecord.from_row(row) if row else None

    def by_name(self, name: str) -> KeyRecord | None:
        """The record for a name, or None."""
        row = self.db.query_one("SELECT * FROM keys WHERE name = ? AND deleted_at IS NULL", (name,))
        return KeyRecord.from_row(row) if row else None

    def authenticate(self, plaintext: str) -> KeyRecord | None:
        """The record whose hash matches, or None. One indexed read: always current.

        The lookup is by hash, so timing reveals nothing about the stored keys; the
        final compare_digest keeps the check constant-time even so.
        """
        digest = hash_key(plaintext)
        row = self.db.query_one("SELECT * FROM keys WHERE key_hash = ?", (digest,))
        if row is None or not hmac.compare_digest(row["key_hash"], digest):
            return None
        return KeyRecord.from_row(row)

    def all(self) -> list[KeyRecord]:
        """Every key, oldest first."""
        rows = self.db.query("SELECT * FROM keys WHERE deleted_at IS NULL ORDER BY id")
        return [KeyRecord.from_row(r) for r in rows]

    def update(self, name: str, **settings: Any) -> KeyRecord:
        """Change settings of a named key; return the new record."""
        values = self._checked(settings)
        if not values:
            return self._named(name)
        assignments = ", ".join(f"{column} = ?" for column in values)  # checked names only
        sql = f"UPDATE keys SET {assignments} WHERE name = ? AND deleted_at IS NULL"  # noqa: S608
        return self._change(name, sql, (*values.values(), name))

    def set_enabled(self, name: str, enabled: bool) -> KeyRecord:
        """Enable or disable a key; takes effect on the next request in every worker."""
        return self._change(
            name,
            "UPDATE keys SET enabled = ? WHERE name = ? AND deleted_at IS NULL",
            (int(enabled), name),
        )

    def top_up(self, name: str, tokens: int) -> KeyRecord:
        """Add tokens to a key's quota (a key without a quota gets one of `tokens` + used)."""
        tokens = int(tokens)
        if not 0 < tokens <= MAX_SETTING:
            raise ValueError(f"top-up must be a whole number of tokens from 1 to {MAX_SETTING}")
        return self._change(
            name,
            "UPDATE keys SET quota_tokens = COALESCE(quota_tokens, used_tokens) + ? "
            "WHERE name = ? AND deleted_at IS NULL",
            (tokens, name),
        )

    def delete(self, name: str) -> None:
        """Delete a key: it stops working at once; its row stays (no hash) to name its usage.

        Its id is never given to another key (AUTOINCREMENT, or PostgreSQL's identity), and
        its name is free again.
        """
        sql = (
            "UPDATE keys SET deleted_at = ?, key_hash = NULL, enabled = 0 "
            "WHERE name = ? AND deleted_at IS NULL"
        )
        if not self.db.write(lambda conn: conn.execute(sql, (time.time(), name)).rowcount):
            raise LookupError(f"no key named {name!r}")

    def _change(self, name: str, sql: str, params: tuple[Any, ...]) -> KeyRecord:
        """Run one UPDATE on a named key and return the fresh record."""
        changed = self.db.write(lambda conn: conn.execute(sql, params).rowcount)
        if not changed:
            raise LookupError(f"no key named {name!r}")
        return self._named(name)

    def _named(self, name: str) -> KeyRecord:
        """The record for a name; LookupError when there is none."""
        record = self.by_name(name)
        if record is None:
            raise LookupError(f"no key named {name!r}")
        return record

    def roll_periods(self, now: float | None = None) -> int:
        """Start a new month for monthly keys whose period has ended (used counters back to 0)."""
        now = now or time.time()
        month_start = month_start_ts(now)
        return self.db.write(
            lambda conn: (
                conn.execute(
                    "UPDATE keys SET used_tokens = 0, spent = 0, period_started_at = ? "
                    "WHERE quota_period = 'monthly' AND COALESCE(period_started_at, 0) < ?",
                    (month_start, month_start),
                ).rowcount
            )
        )


def _checked_value(column: str, value: Any) -> Any:
    """One settable column's value, converted and validated."""
    if column not in SETTABLE and column != "quota_period":
        raise ValueError(f"unknown key setting {column!r}")
    if column == "quota_period":
        if value not in PERIODS:
            raise ValueError(f"quota period must be one of {', '.join(PERIODS)}")
        return value
    if value is None:
        return None
    if column in TEXT_SETTINGS:
        return TEXT_SETTINGS[column](value)
    if column == "expires_at":
        return _checked_expiry(value)
    if column == "budget":
        money = float(value)
        if not 0 <= money <= MAX_SETTING:  # NaN and infinities fail too
            raise ValueError(f"budget must be a number from 0 to {MAX_SETTING}")
        return money
    number = int(value)
    if number < 0 or (number == 0 and column != "quota_tokens"):
        raise ValueError(f"{column} must be a positive number")
    if number > MAX_SETTING:
        raise ValueError(f"{column} must be at most {MAX_SETTING}")
    return number


def _checked_expiry(value: object) -> float | None:
    """An expiry as a timestamp between 1970 and 9999 (a float already, or a date)."""
    if isinstance(value, float):
        if not 0 <= value <= LAST_EXPIRY:
            raise ValueError("expiry is not between 1970 and 9999")
        return value
    return parse_expiry(value)


TEXT_SETTINGS = {
    "models": parse_models,
    "endpoints": lambda value: ",".join(parse_groups(value, "--endpoints")) or None,
}


def utc_minute(ts: float | None) -> str:
    """A timestamp as `YYYY-MM-DD HH:MM` UTC, or a dash when there is none."""
    if ts is None:
        return "-"
    try:
        return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M")
    except (ValueError, OverflowError, OSError):  # a value stored before it was checked
        return "?"


def month_start_ts(now: float) -> float:
    """Timestamp of the first instant of the current UTC month."""
    moment = dt.datetime.fromtimestamp(now, tz=dt.UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()
