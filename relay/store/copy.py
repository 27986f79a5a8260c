"""Moving over: a SQLite store's keys and usage rows copied into an empty PostgreSQL database.

Keys keep their ids, hashes and counters (deleted keys their tombstones), usage rows their
ids; the target's id sequences continue past every id the source ever gave. Calls in flight
are refused rather than copied (their relay would still settle them into the SQLite file),
and admin sessions are not copied (operators sign in again).
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from relay.store.db import SQLiteDatabase
from relay.store.postgres import PgConnection, PostgresDatabase

BATCH = 5000  # usage rows read from SQLite at a time
# The relay's own tables: the target may have them (a relay started on it once) but no rows.
RELAY_TABLES = ("_migrations", "keys", "usage", "health", "inflight", "admin_sessions")


class CopyRefused(Exception):
    """The copy cannot start: calls in flight in the source, or a target that is not empty."""


@dataclass(frozen=True)
class CopyReport:
    """What was read from the source and what the target holds afterwards."""

    keys: tuple[int, int]  # (rows in the source, rows in the target)
    usage: tuple[int, int]
    next_key_id: int  # the id the target's next new key gets

    @property
    def matches(self) -> bool:
        """Whether the target holds exactly what the source did."""
        return self.keys[0] == self.keys[1] and self.usage[0] == self.usage[1]


def copy_store(source: SQLiteDatabase, target: PostgresDatabase) -> CopyReport:
    """Copy keys and usage rows in one target transaction; CopyRefused before anything is
    written when the source has calls in flight or the target is not empty."""
    in_flight = _count(source, "inflight")
    if in_flight:
        raise CopyRefused(
            f"{in_flight} calls are in flight in {source.description}: stop every relay using "
            "it first (rows left by a crashed worker are recorded when a relay starts on it)."
        )
    target.migrate()
    _check_empty(target)
    key_columns = _columns(source, "keys")
    usage_columns = _columns(source, "usage")
    top_key = _top_key_id(source)

    def copy(conn: PgConnection) -> None:
        _copy_rows(conn, "keys", key_columns, _batches(source, "keys", key_columns))
        _copy_rows(conn, "usage", usage_columns, _batches(source, "usage", usage_columns))
        _continue_after(conn, "keys", top_key)
        _continue_after(conn, "usage", 0)

    target.write(copy, timeout=3600.0, pipelined=False)  # COPY needs the plain protocol
    return CopyReport(
        keys=(_count(source, "keys"), _count(target, "keys")),
        usage=(_count(source, "usage"), _count(target, "usage")),
        next_key_id=_next_id(target),
    )


def _count(db: SQLiteDatabase | PostgresDatabase, table: str) -> int:
    """Rows in one of the relay's tables."""
    row = db.query_one(f"SELECT COUNT(*) AS n FROM {table}")  # noqa: S608 - our table names
    return int(row["n"]) if row else 0


def _columns(source: SQLiteDatabase, table: str) -> list[str]:
    """A source table's columns, in order (the target has the same after its migrations)."""
    return [row["name"] for row in source.query("SELECT name FROM pragma_table_info(?)", (table,))]


def _check_empty(target: PostgresDatabase) -> None:
    """CopyRefused unless the target holds no table but the relay's, and those no rows."""
    tables = [
        row["tablename"]
        for row in target.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    ]
    foreign = sorted(set(tables) - set(RELAY_TABLES))
    if foreign:
        raise CopyRefused(
            f"{target.description} is not empty (it has tables {', '.join(foreign)}): "
            "copy into a new, empty database."
        )
    filled = [table for table in RELAY_TABLES[1:] if _count(target, table)]
    if filled:
        raise CopyRefused(
            f"{target.description} is not empty (its {', '.join(filled)} hold rows): "
            "copy into a new, empty database."
        )


def _batches(source: SQLiteDatabase, table: str, columns: list[str]) -> Iterator[list[Any]]:
    """Every row of a source table in id order, as value lists, read BATCH at a time."""
    names = ", ".join(columns)
    last = None
    while True:
        after = "" if last is None else "WHERE id > ? "
        rows = source.query(
            f"SELECT {names} FROM {table} {after}ORDER BY id LIMIT {BATCH}",  # noqa: S608
            () if last is None else (last,),
        )
        for row in rows:
            yield [row[column] for column in columns]
        if len(rows) < BATCH:
            return
        last = rows[-1]["id"]


def _copy_rows(
    conn: PgConnection, table: str, columns: list[str], rows: Iterator[list[Any]]
) -> None:
    """COPY rows into a target table (ids included), far faster than one INSERT each."""
    statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN".encode()
    with conn.conn.cursor().copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def _top_key_id(source: SQLiteDatabase) -> int:
    """The largest key id the source ever gave or a usage row names (AUTOINCREMENT's counter
    included: a key created and deleted before tombstones existed left nothing else)."""
    row = source.query_one(
        "SELECT MAX(COALESCE((SELECT MAX(id) FROM keys), 0), "
        "COALESCE((SELECT MAX(key_id) FROM usage), 0), "
        "COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'keys'), 0)) AS top"
    )
    return int(row["top"]) if row else 0


def _continue_after(conn: PgConnection, table: str, at_least: int) -> None:
    """Set a table's id sequence past its largest id (and `at_least`): ids are never reused."""
    conn.execute(
        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "  # noqa: S608 - our tables
        f"GREATEST(COALESCE((SELECT MAX(id) FROM {table}), 0), ?, 1), "
        f"COALESCE((SELECT MAX(id) FROM {table}), 0) > 0 OR ? > 0)",
        (at_least, at_least),
    )


def _next_id(target: PostgresDatabase) -> int:
    """The id the target's next new key will get (read without taking it)."""
    row = target.query_one(
        "SELECT COALESCE(last_value, 0) + 1 AS next FROM pg_sequences "
        "WHERE schemaname || '.' || sequencename = pg_get_serial_sequence('keys', 'id')"
    )
    return int(row["next"]) if row else 1
