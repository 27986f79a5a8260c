"""The key holder's page at / and /usage: paste a key, see its quota, limits and daily use."""

from typing import Any

from flask import Blueprint, Flask, current_app, render_template, request
from flask_babel import gettext

from relay.auth import authenticate, verify
from relay.errors import InvalidApiKey, RateLimited
from relay.faces.balance import key_summary
from relay.limits import check_blocked
from relay.state import state
from relay.web import charts, csrf
from relay.web.language import say

bp = Blueprint("keyholder", __name__)
CHART_DAYS = 30


Page = tuple[str, int, dict[str, str]]


def page(status: int = 200, headers: dict[str, str] | None = None, **context: Any) -> Page:
    """Render the page (the form, plus the key's numbers when a key was accepted)."""
    return render_template("keyholder.html", **context), status, headers or {}


# Not strict: werkzeug would redirect the empty path (`GET http://host HTTP/1.1`) to `/`
# on the Host header's host (see app._no_redirects).
@bp.get("/", strict_slashes=False)
@bp.get("/usage")
def form() -> Page:
    """The form: the key is sent by POST, so it never lands in a URL, a log line or history."""
    return page()


@bp.post("/", strict_slashes=False)
@bp.post("/usage")
def lookup() -> Page:
    """Check the pasted key and show its own numbers; nothing about any other key."""
    try:
        check_blocked()  # a guesser's address waits, before its form is even read
    except RateLimited as limited:
        return page(429, limited.headers, error=say(limited.text))
    key = request.form.get("key", "").strip()
    store = state().store
    try:
        # The page must not become a fast way to guess keys: failures count like bad keys.
        record = verify(lambda: authenticate(store.keys, key or None))
    except RateLimited as limited:
        return page(429, limited.headers, error=say(limited.text))
    except InvalidApiKey as err:
        reason = say(err.text) if key else gettext("Paste your relay key into the field first.")
        return page(401, error=reason)
    config = current_app.config
    summary = key_summary(record, config["DEFAULT_RPM"], config["OPEN_ENDPOINTS"])
    usage = charts.daily_usage(store, "model", CHART_DAYS, key_id=record.id)
    return page(
        summary=summary,
        record=record,  # its timestamps, for the page's locale
        key_charts=charts.usage_charts(usage, "model"),
        totals={
            "tokens": sum(map(sum, usage.tokens.values())),
            "calls": sum(map(sum, usage.calls.values())),
        },
        days=CHART_DAYS,
    )


bp.after_request(csrf.secure_headers)


def init_app(app: Flask) -> None:
    """Register the page."""
    app.register_blueprint(bp)
