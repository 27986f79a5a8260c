"""Usage queries for operators: summaries by day, key and model, with filters."""

import datetime as dt

from relay.usage import USAGE_COLUMNS

GROUPS = {
    "day": "date(u.ts, 'unixepoch') AS day",
    "key": "COALESCE(k.name, '#' || u.key_id) AS key",
    "model": "COALESCE(u.model_served, u.model_requested, '-') AS model",
}
# Per-call export: every usage column, with time and key name instead of ts and key_id.
RAW_COLUMNS = ["time", "key", *(c for c in USAGE_COLUMNS if c not in ("ts", "key_id"))]


def day_start(text, name):
    """Parse YYYY-MM-DD as the first second of that UTC day."""
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--{name} must be a date like 2026-01-31, not {text!r}") from None
    return dt.datetime.combine(day, dt.time.min, tzinfo=dt.UTC).timestamp()


def _filters(key_name, model, since, until, key_id=None):
    """WHERE clause and parameters for the usual filters."""
    clauses, params = [], []
    if key_name:
        clauses.append("k.name = ?")
        params.append(key_name)
    if key_id is not None:
        clauses.append("u.key_id = ?")
        params.append(key_id)
    if model:
        clauses.append("(u.model_served = ? OR u.model_requested = ?)")
        params.extend([model, model])
    if since:
        clauses.append("u.ts >= ?")
        params.append(day_start(since, "since"))
    if until:
        clauses.append("u.ts < ?")
        params.append(day_start(until, "until") + 86400)
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    return where, params


def summarise(
    db,
    key_name=None,
    model=None,
    since=None,
    until=None,
    group_by=("day", "key", "model"),
    raw=False,
    key_id=None,
):
    """Return (header, rows) of usage: per-call rows, or sums per group."""
    where, params = _filters(key_name, model, since, until, key_id)
    source = " FROM usage u LEFT JOIN keys k ON k.id = u.key_id"
    if raw:
        sql = (
            "SELECT datetime(u.ts, 'unixepoch') AS time, COALESCE(k.name, '#' || u.key_id) AS key, "
            + ", ".join(f"u.{c}" for c in RAW_COLUMNS[2:])
            + source
            + where
            + " ORDER BY u.ts"
        )
        return RAW_COLUMNS, [list(r.values()) for r in db.query(sql, params)]
    groups = [g for g in ("day", "key", "model") if g in group_by]
    names = [g for g in groups]
    sql = (
        "SELECT " + ", ".join(GROUPS[g] for g in groups) + ", COUNT(*) AS calls, "
        "SUM(u.prompt_tokens) AS prompt, SUM(u.completion_tokens) AS completion, "
        "SUM(u.total_tokens) AS total, ROUND(SUM(u.cost), 6) AS cost, "
        "SUM(u.usage_source = 'estimated') AS estimated, SUM(u.status >= 400) AS errors"
        + source
        + where
        + " GROUP BY "
        + ", ".join(names)
        + " ORDER BY "
        + ", ".join(names)
    )
    header = [*names, "calls", "prompt", "completion", "total", "cost", "estimated", "errors"]
    return header, [list(r.values()) for r in db.query(sql, params)]
