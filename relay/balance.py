"""What key holders may ask about their own key: /v1/relay/key and the old billing endpoints."""

import datetime as dt
import json

from flask import Blueprint, current_app, g, request

from relay.auth import authenticate, find_client_key
from relay.errors import InvalidApiKey, InvalidRequest
from relay.ratelimit import check_unauthenticated
from relay.request_body import read_body
from relay.state import state

bp = Blueprint("balance", __name__)
LEGACY_PREFIXES = ("/api/v1", "/index.php/api/v1")
PREFIXES = ("/v1", *LEGACY_PREFIXES)
MAX_USAGE_DAYS = 100


def _route(rule, **options):
    """Register a view under the OpenAI prefix and both legacy prefixes."""

    def register(view):
        for prefix in PREFIXES:
            bp.add_url_rule(prefix + rule, view_func=view, **options)
        return view

    return register


@bp.before_request
def identify_key():
    """Find and check the caller's key (header, or api_secret_key in a JSON/form body)."""
    g.face = "legacy" if request.path.startswith(LEGACY_PREFIXES) else "openai"
    body = None
    raw = read_body(request.environ, current_app.config["MAX_BODY_BYTES"])
    if raw:
        from relay.legacy_body import parse_legacy_body

        body = parse_legacy_body(raw, request)
    try:
        g.key_record = authenticate(state().keys, find_client_key(request.headers, body))
    except InvalidApiKey:
        check_unauthenticated()
        raise


def _reply(payload):
    """JSON reply, with the legacy envelope on the legacy face."""
    if g.face == "legacy":
        payload = {"code": 0, "msg": "", **payload}
    return current_app.response_class(
        json.dumps(payload, ensure_ascii=False), mimetype="application/json"
    )


def _iso(ts):
    """A timestamp as ISO 8601 UTC, or None."""
    return None if ts is None else dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat()


def key_summary(record, default_rpm=None):
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
        "expires_at": _iso(record.expires_at),
        "created_at": _iso(record.created_at),
        "last_used_at": _iso(record.last_used_at),
    }


@_route("/relay/key", methods=["GET", "POST"])
def relay_key():
    """The caller's key: quota, used, remaining, limits, expiry."""
    return _reply(key_summary(g.key_record, current_app.config["DEFAULT_RPM"]))


def _limit_units(record):
    """(limit, used) in the units front-ends read as dollars: money with a budget, else tokens."""
    if record.budget is not None:
        return record.budget, record.spent
    limit = record.quota_tokens if record.quota_tokens is not None else 100_000_000
    return float(limit), float(record.used_tokens)


@_route("/dashboard/billing/subscription", methods=["GET"])
def billing_subscription():
    """OpenAI's old subscription object; the hard limit is the key's quota."""
    record = g.key_record
    limit, _ = _limit_units(record)
    return _reply(
        {
            "object": "billing_subscription",
            "has_payment_method": False,
            "soft_limit_usd": limit,
            "hard_limit_usd": limit,
            "system_hard_limit_usd": limit,
            "access_until": int(record.expires_at or 0),
            "plan": {"title": "relay", "id": "relay"},
            "unit": "usd" if record.budget is not None else "tokens",
        }
    )


def _parse_day(name, default):
    """A YYYY-MM-DD query argument as a date."""
    text = request.args.get(name)
    if not text:
        return default
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"{name} must be a date like 2026-01-31.", param=name) from None


@_route("/dashboard/billing/usage", methods=["GET"])
def billing_usage():
    """OpenAI's old usage object: daily costs per model and total_usage (in hundredths)."""
    record = g.key_record
    today = dt.datetime.now(dt.UTC).date()
    try:
        end = _parse_day("end_date", today + dt.timedelta(days=1))
        start = _parse_day("start_date", end - dt.timedelta(days=30))
        start_ts = dt.datetime.combine(start, dt.time.min, tzinfo=dt.UTC).timestamp()
        end_ts = dt.datetime.combine(end, dt.time.min, tzinfo=dt.UTC).timestamp()
    except (OverflowError, ValueError):  # dates near year 1 or 9999
        raise InvalidRequest("start_date and end_date are out of range.") from None
    if not start < end or (end - start).days > MAX_USAGE_DAYS:
        raise InvalidRequest(f"start_date must be before end_date, at most {MAX_USAGE_DAYS} days.")
    rows = state().db.query(
        "SELECT CAST(ts / 86400 AS INTEGER) * 86400 AS day, "
        "COALESCE(model_served, model_requested, '-') AS model, "
        "SUM(total_tokens) AS tokens, SUM(cost) AS cost FROM usage "
        "WHERE key_id = ? AND ts >= ? AND ts < ? GROUP BY day, model ORDER BY day, model",
        (record.id, start_ts, end_ts),
    )
    money = record.budget is not None
    days = {}
    total = 0.0
    for row in rows:
        amount = (row["cost"] if money else row["tokens"]) * 100
        total += amount
        days.setdefault(row["day"], []).append({"name": row["model"], "cost": amount})
    daily = [{"timestamp": day, "line_items": items} for day, items in days.items()]
    return _reply({"object": "list", "daily_costs": daily, "total_usage": total})
