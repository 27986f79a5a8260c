"""The store's read-only reports: usage summaries, daily series, billing lines and recent calls.

Operator pages, the key holder's page, the billing endpoints and `flask usage` all read
usage through here, so a model or key is named the same way everywhere.
"""

import datetime as dt
from collections.abc import Sequence
from typing import Any

from relay.store.db import Connection, Database
from relay.store.rows import USAGE_COLUMNS

DAY = 86400
SOURCE = " FROM usage u LEFT JOIN keys k ON k.id = u.key_id"
# Per-call export: every usage column, with time and key name instead of ts and key_id.
RAW_COLUMNS = ["time", "key", *(c for c in USAGE_COLUMNS if c not in ("ts", "key_id"))]
# The tokens a row charged its key's quota (rows older than the column: all of their tokens).
CHARGED = "COALESCE(u.charged_tokens, u.total_tokens)"
ESTIMATED = "CASE WHEN u.usage_source = 'estimated' THEN 1 ELSE 0 END"
FAILED = "CASE WHEN u.status >= 400 THEN 1 ELSE 0 END"
SUMMARY_COLUMNS = [
    "calls", "prompt", "completion", "total", "charged", "cost", "estimated", "errors",
]  # fmt: skip


def _sum(expr: str) -> str:
    """SQL summing integers as an integer (PostgreSQL's SUM of BIGINT is a NUMERIC, which
    psycopg hands back as a Decimal that JSON and the charts cannot take)."""
    return f"CAST(SUM({expr}) AS BIGINT)"


def model_name(missing: str = "-") -> str:
    """SQL naming a usage row's model: the one served, else the one asked for, else `missing`."""
    return f"COALESCE(u.model_served, u.model_requested, '{missing}')"


def key_name(missing: str = "-") -> str:
    """SQL naming a usage row's key: its name (`name (deleted)` for a deleted key), `#id` for
    a row whose key is gone from older stores, `missing` for keyless calls."""
    return (
        "COALESCE(k.name || CASE WHEN k.deleted_at IS NULL THEN '' ELSE ' (deleted)' END, "
        f"CASE WHEN u.key_id IS NULL THEN '{missing}' ELSE '#' || u.key_id END)"
    )


def _by_position(clause: str, names: Sequence[str]) -> str:
    """GROUP BY / ORDER BY the first len(names) columns by position: PostgreSQL reads a bare
    name as a table's column before a column alias (`name` would mean `k.name`)."""
    return clause + ", ".join(str(n) for n in range(1, len(names) + 1))


def _group(db: Database[Connection], name: str) -> str:
    """SQL of one `usage` grouping column: day, key or model."""
    if name == "day":
        return f"{db.dialect.day('u.ts')} AS day"
    return f"{key_name()} AS key" if name == "key" else f"{model_name()} AS model"


def day_start(text: str, name: str) -> float:
    """Parse YYYY-MM-DD as the first second of that UTC day."""
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--{name} must be a date like 2026-01-31, not {text!r}") from None
    return dt.datetime.combine(day, dt.time.min, tzinfo=dt.UTC).timestamp()


def _filters(
    key: str | None, model: str | None, since: str | None, until: str | None
) -> tuple[str, list[Any]]:
    """WHERE clause and parameters for the usual filters."""
    clauses: list[str] = []
    params: list[Any] = []
    if key:
        clauses.append(f"{key_name()} = ?")  # `alice`, or `alice (deleted)` for her old key
        params.append(key)
    if model:
        clauses.append("(u.model_served = ? OR u.model_requested = ?)")
        params.extend([model, model])
    if since:
        clauses.append("u.ts >= ?")
        params.append(day_start(since, "since"))
    if until:
        clauses.append("u.ts < ?")
        params.append(day_start(until, "until") + DAY)
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    return where, params


def summarise(
    db: Database[Connection],
    key: str | None = None,
    model: str | None = None,
    since: str | None = None,
    until: str | None = None,
    group_by: tuple[str, ...] = ("day", "key", "model"),
    raw: bool = False,
) -> tuple[list[str], list[list[Any]]]:
    """Return (header, rows) of usage: per-call rows, or sums per group (`flask usage`)."""
    where, params = _filters(key, model, since, until)
    if raw:
        sql = (
            f"SELECT {db.dialect.moment('u.ts')} AS time, {key_name()} AS key, "
            + ", ".join(f"u.{c}" for c in RAW_COLUMNS[2:])
            + SOURCE
            + where
            + " ORDER BY u.ts"
        )
        return RAW_COLUMNS, [list(r.values()) for r in db.query(sql, params)]
    names = [g for g in ("day", "key", "model") if g in group_by]
    sql = (
        "SELECT " + ", ".join(_group(db, g) for g in names) + ", COUNT(*) AS calls, "
        f"{_sum('u.prompt_tokens')} AS prompt, {_sum('u.completion_tokens')} AS completion, "
        f"{_sum('u.total_tokens')} AS total, {_sum(CHARGED)} AS charged, "
        f"{db.dialect.round('SUM(u.cost)', 6)} AS cost, "
        f"{_sum(ESTIMATED)} AS estimated, {_sum(FAILED)} AS errors"
        + SOURCE
        + where
        + _by_position(" GROUP BY ", names)
        + _by_position(" ORDER BY ", names)
    )
    return [*names, *SUMMARY_COLUMNS], [list(r.values()) for r in db.query(sql, params)]


def daily_totals(
    db: Database[Connection], by: str, since_day: int, key_id: int | None = None
) -> list[dict[str, Any]]:
    """Calls and tokens per UTC day number and key or model name, from day `since_day` on."""
    names = {"key": key_name("(no key)"), "model": model_name("(none)")}
    where, params = "u.ts >= ?", [since_day * DAY]
    if key_id is not None:
        where += " AND u.key_id = ?"
        params.append(key_id)
    sql = (
        f"SELECT {db.dialect.day_number('u.ts')} AS day, {names[by]} AS name, "
        f"COUNT(*) AS calls, COALESCE({_sum(CHARGED)}, 0) AS tokens"
        f"{SOURCE} WHERE {where} GROUP BY 1, 2"
    )
    return db.query(sql, params)


def billing_lines(
    db: Database[Connection], key_id: int, start_ts: float, end_ts: float
) -> list[dict[str, Any]]:
    """One key's tokens and cost per UTC day and model, for the billing usage endpoint."""
    return db.query(
        f"SELECT {db.dialect.day_number('u.ts')} * {DAY} AS day, {model_name()} AS model, "  # noqa: S608
        f"{_sum(CHARGED)} AS tokens, SUM(u.cost) AS cost "
        "FROM usage u "
        "WHERE u.key_id = ? AND u.ts >= ? AND u.ts < ? GROUP BY 1, 2 ORDER BY 1, 2",
        (key_id, start_ts, end_ts),
    )


def recent_calls(db: Database[Connection], limit: int) -> list[dict[str, Any]]:
    """The newest calls, newest first, with key and model names (never prompts, never keys)."""
    return db.query(
        "SELECT u.ts, u.face, u.path, u.stream, u.prompt_tokens, u.completion_tokens, "
        "u.total_tokens, u.usage_source, u.status, u.outcome, u.latency_ms, "
        f"{model_name()} AS model, {key_name()} AS key_name"
        f"{SOURCE} ORDER BY u.id DESC LIMIT ?",
        (limit,),
    )
