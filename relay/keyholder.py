"""The key holder's page at / and /usage: paste a key, see its quota, limits and daily use."""

from flask import Blueprint, current_app, render_template, request

from relay import charts, csrf
from relay.auth import authenticate
from relay.balance import key_summary
from relay.errors import InvalidApiKey, RateLimited
from relay.ratelimit import check_unauthenticated
from relay.state import state

bp = Blueprint("keyholder", __name__)
CHART_DAYS = 30
TIME_FIELDS = ("created_at", "last_used_at", "expires_at")


def page(status=200, headers=None, **context):
    """Render the page (the form, plus the key's numbers when a key was accepted)."""
    return render_template("keyholder.html", **context), status, headers or {}


@bp.get("/")
@bp.get("/usage")
def form():
    """The form: the key is sent by POST, so it never lands in a URL, a log line or history."""
    return page()


@bp.post("/")
@bp.post("/usage")
def lookup():
    """Check the pasted key and show its own numbers; nothing about any other key."""
    key = request.form.get("key", "").strip()
    try:
        record = authenticate(state().keys, key or None)
    except InvalidApiKey as err:
        try:
            check_unauthenticated()  # the page must not become a fast way to guess keys
        except RateLimited as limited:
            return page(429, limited.headers, error=limited.message)
        reason = err.message if key else "Paste your relay key into the field first."
        return page(401, error=reason)
    summary = key_summary(record, current_app.config["DEFAULT_RPM"])
    for field in TIME_FIELDS:
        if summary[field]:
            summary[field] = summary[field][:16].replace("T", " ")
    usage = charts.daily_usage(state().db, "model", CHART_DAYS, key_id=record.id)
    return page(
        summary=summary,
        key_charts=charts.usage_charts(usage, "model"),
        totals={
            "tokens": sum(map(sum, usage.tokens.values())),
            "calls": sum(map(sum, usage.calls.values())),
        },
        days=CHART_DAYS,
    )


bp.after_request(csrf.secure_headers)


def init_app(app):
    """Register the page."""
    app.register_blueprint(bp)
