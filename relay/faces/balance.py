"""What key holders may ask about their own key: /v1/relay/key and the old billing endpoints."""

import datetime as dt
from collections.abc import Mapping
from typing import Any

from relay.call import KeyRecord
from relay.errors import InvalidRequest
from relay.store import Store

MAX_USAGE_DAYS = 100
UNLIMITED_DOLLARS = 100_000_000  # what an unlimited key shows as its hard limit


def _iso(ts: float | None) -> str | None:
    """A timestamp as ISO 8601 UTC, or None."""
    return None if ts is None else dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat()


def key_summary(
    record: KeyRecord, default_rpm: int | None = None, open_groups: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The key's limits and use, as /v1/relay/key reports them."""
    return {
        "object": "relay.key",
        "name": record.name,
        "enabled": record.enabled,
        "quota": record.quota_tokens,
        "used": record.used_tokens,
        "remaining": record.remaining_tokens,
        "quota_period": record.quota_period,
        "budget": record.budget,
        "spent": round(record.spent, 6),
        "rpm": record.rpm or default_rpm,
        "tpm": record.tpm,
        "max_concurrent": record.max_concurrent,
        "models": list(record.models) if record.models else None,
        # Account-wide endpoint groups this key may call (endpoints.py), besides its own calls.
        "endpoints": sorted({*record.endpoints, *open_groups}),
        "expires_at": _iso(record.expires_at),
        "created_at": _iso(record.created_at),
        "last_used_at": _iso(record.last_used_at),
    }


def _limit_units(record: KeyRecord) -> tuple[float, float]:
    """(limit, used) in the units front-ends read as dollars: money with a budget, else tokens."""
    if record.budget is not None:
        return record.budget, record.spent
    limit = record.quota_tokens if record.quota_tokens is not None else UNLIMITED_DOLLARS
    return float(limit), float(record.used_tokens)


def subscription(record: KeyRecord) -> dict[str, Any]:
    """OpenAI's old subscription object; the hard limit is the key's quota."""
    limit, _ = _limit_units(record)
    return {
        "object": "billing_subscription",
        "has_payment_method": False,
        "soft_limit_usd": limit,
        "hard_limit_usd": limit,
        "system_hard_limit_usd": limit,
        "access_until": int(record.expires_at or 0),
        "plan": {"title": "relay", "id": "relay"},
        "unit": "usd" if record.budget is not None else "tokens",
    }


def _parse_day(args: Mapping[str, str], name: str, default: dt.date) -> dt.date:
    """A YYYY-MM-DD query argument as a date."""
    text = args.get(name)
    if not text:
        return default
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(
            "%(name)s must be a date like 2026-01-31.", param=name, name=name
        ) from None


def usage(store: Store, record: KeyRecord, args: Mapping[str, str]) -> dict[str, Any]:
    """OpenAI's old usage object: daily costs per model and total_usage (in hundredths)."""
    today = dt.datetime.now(dt.UTC).date()
    try:
        end = _parse_day(args, "end_date", today + dt.timedelta(days=1))
        start = _parse_day(args, "start_date", end - dt.timedelta(days=30))
        start_ts = dt.datetime.combine(start, dt.time.min, tzinfo=dt.UTC).timestamp()
        end_ts = dt.datetime.combine(end, dt.time.min, tzinfo=dt.UTC).timestamp()
    except (OverflowError, ValueError):  # dates near year 1 or 9999
        raise InvalidRequest("start_date and end_date are out of range.") from None
    if not start < end or (end - start).days > MAX_USAGE_DAYS:
        raise InvalidRequest(
            "start_date must be before end_date, at most %(days)d days.", days=MAX_USAGE_DAYS
        )
    money = record.budget is not None
    days: dict[int, list[dict[str, Any]]] = {}
    total = 0.0
    for row in store.billing_lines(record.id, start_ts, end_ts):
        amount = (row["cost"] if money else row["tokens"]) * 100
        total += amount
        days.setdefault(row["day"], []).append({"name": row["model"], "cost": amount})
    daily = [{"timestamp": day, "line_items": items} for day, items in days.items()]
    return {"object": "list", "daily_costs": daily, "total_usage": total}
