"""The operator dashboard at /admin: sign-in with RELAY_ADMIN_TOKEN, usage charts, keys, calls."""

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

from flask import (
    Blueprint,
    Flask,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_babel import gettext
from werkzeug.wrappers import Response

from relay.auth import check_admin_token, verify
from relay.errors import AdminAuthRequired, RateLimited
from relay.i18n import N_, Text
from relay.limits import check_blocked
from relay.state import state
from relay.store.keys import KeyStore
from relay.web import charts, csrf
from relay.web.language import number, say

bp = Blueprint("admin", __name__, url_prefix="/admin")
SESSION_SECONDS = 12 * 3600  # sessions also end on their own after this
RECENT_CALLS = 50
CHART_DAYS = 30
# Form fields of the create form and the key columns they set.
CREATE_FIELDS = (
    ("quota", "quota_tokens"),
    ("rpm", "rpm"),
    ("models", "models"),
    ("expires", "expires_at"),
)


Page = tuple[str, int, dict[str, str]]


def page(
    template: str, status: int = 200, headers: dict[str, str] | None = None, **context: Any
) -> Page:
    """Render one of the dashboard's pages."""
    return render_template(template, **context), status, headers or {}


def _fingerprint(token: str) -> str:
    """What the session holds instead of the token: changing the token signs everyone out."""
    secret = str(current_app.secret_key).encode()
    return hmac.new(secret, b"admin:" + token.encode(), hashlib.sha256).hexdigest()


def signed_in() -> bool:
    """Whether this browser holds an open session (on the server) made with the current token.

    The cookie only names the session: signing out, the session's age or a changed
    token end it on the server, whoever kept a copy of the cookie.
    """
    token = current_app.config["ADMIN_TOKEN"]
    sid = session.get("sid")
    if not token or not isinstance(sid, str):
        return False
    return state().store.sessions.valid(sid, _fingerprint(token))


@bp.before_request
def guard() -> Page | Response | None:
    """Off without a token; every POST needs the CSRF token; every page but login a session."""
    if not current_app.config["ADMIN_TOKEN"]:
        return page("admin_off.html", 404)
    try:
        check_blocked()  # a guesser's address waits, before its form is even read
    except RateLimited as err:
        return page("admin_login.html", 429, err.headers, error=say(err.text))
    if request.method == "POST" and not csrf.valid():
        message = gettext(
            "The form was not sent from this dashboard, or it expired. Reload and try again."
        )
        return page("message.html", 400, title=gettext("Form refused"), message=message)
    if request.endpoint == "admin.login" or signed_in():
        return None
    if request.method == "GET":
        return redirect(url_for("admin.login"))
    return page("admin_login.html", 401, error=gettext("Sign in first."))


bp.after_request(csrf.secure_headers)


@bp.route("/login", methods=["GET", "POST"])
def login() -> Page | Response:
    """The sign-in form; the token travels only in the POST body, never in a URL."""
    if request.method == "GET":
        return redirect(url_for("admin.dashboard")) if signed_in() else page("admin_login.html")
    token = current_app.config["ADMIN_TOKEN"]
    sent = request.form.get("token", "")
    try:
        verify(lambda: check_admin_token(sent, token, "That is not the admin token."))
    except RateLimited as err:
        return page("admin_login.html", 429, err.headers, error=say(err.text))
    except AdminAuthRequired as err:
        return page("admin_login.html", 401, error=say(err.text))
    session.clear()
    session["sid"] = state().store.sessions.start(_fingerprint(token), SESSION_SECONDS)
    csrf.renew()
    return redirect(url_for("admin.dashboard"))


@bp.post("/logout")
def logout() -> Response:
    """End the session on the server (its cookie opens nothing any more) and forget it."""
    sid = session.get("sid")
    if isinstance(sid, str):
        state().store.sessions.end(sid)
    session.clear()
    return redirect(url_for("admin.login"))


@bp.get("/")
@bp.get("")
def dashboard() -> Page:
    """Charts of the last 30 days, the key table with its forms, and the most recent calls."""
    store = state().store
    by_key = charts.daily_usage(store, "key", CHART_DAYS)
    by_model = charts.daily_usage(store, "model", CHART_DAYS)
    return page(
        "admin_dashboard.html",
        keys=store.keys.all(),
        key_charts=charts.usage_charts(by_key, "key"),
        model_charts=charts.usage_charts(by_model, "model"),
        calls=store.recent_calls(RECENT_CALLS),
        days=CHART_DAYS,
        default_rpm=current_app.config["DEFAULT_RPM"],
    )


@bp.post("/keys")
def create_key() -> Page | Response:
    """Create a key and show it on this one result page: it is never shown again."""
    form = request.form
    settings = {
        column: form[field].strip()
        for field, column in CREATE_FIELDS
        if form.get(field, "").strip()
    }
    try:
        plaintext, record = state().store.keys.create(form.get("name", ""), **settings)
    except ValueError as exc:
        # The store's reason is its own English (the CLI says the same): quoted as it is.
        flash(gettext("No key created: %(reason)s", reason=str(exc)), "error")
        return redirect(url_for("admin.dashboard"))
    return page("admin_key_created.html", key=plaintext, record=record)


@bp.post("/keys/enable")
def enable_key() -> Response:
    """Enable a key by name."""
    return _change(lambda keys, name: keys.set_enabled(name, True), N_("Key %(name)r enabled."))


@bp.post("/keys/disable")
def disable_key() -> Response:
    """Disable a key by name: its next call is refused in every worker."""
    return _change(lambda keys, name: keys.set_enabled(name, False), N_("Key %(name)r disabled."))


@bp.post("/keys/topup")
def top_up_key() -> Response:
    """Add tokens to a key's quota."""
    tokens = request.form.get("tokens", "").strip()
    if not tokens.isdecimal():
        flash(gettext("A top-up is a whole number of tokens."), "error")
        return redirect(url_for("admin.dashboard"))
    return _change(
        lambda keys, name: keys.top_up(name, int(tokens)),
        N_("Key %(name)r topped up by %(tokens)s tokens."),
        tokens=number(int(tokens)),
    )


def _change(apply: Callable[[KeyStore, str], object], done: str, **values: str) -> Response:
    """Apply one change to the key named in the form, then back to the dashboard with a note
    (`done`, an English template, said in the page's language)."""
    name = request.form.get("name", "")
    try:
        apply(state().store.keys, name)
    except (ValueError, LookupError) as exc:
        # The store's reason is its own English (the CLI says the same): quoted as it is.
        flash(gettext("Key %(name)r not changed: %(reason)s", name=name, reason=str(exc)), "error")
    else:
        flash(say(Text(done, {"name": name, **values})), "ok")
    return redirect(url_for("admin.dashboard"))


def init_app(app: Flask) -> None:
    """Register the pages; the session cookie stays HttpOnly and same-site only."""
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    if not app.config.get("SESSION_COOKIE_SAMESITE"):
        app.config["SESSION_COOKIE_SAMESITE"] = "Strict"
    csrf.init_app(app)
    app.register_blueprint(bp)
