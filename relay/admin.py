"""The operator dashboard at /admin: sign-in with RELAY_ADMIN_TOKEN, usage charts, keys, calls."""

import hashlib
import hmac
import time

from flask import (
    Blueprint,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from relay import charts, csrf
from relay.errors import RateLimited
from relay.keys import utc_minute
from relay.ratelimit import check_unauthenticated
from relay.state import state

bp = Blueprint("admin", __name__, url_prefix="/admin")
SESSION_SECONDS = 12 * 3600  # a signed cookie cannot be revoked, so it must also grow old
RECENT_CALLS = 50
CHART_DAYS = 30
# Form fields of the create form and the key columns they set.
CREATE_FIELDS = (
    ("quota", "quota_tokens"),
    ("rpm", "rpm"),
    ("models", "models"),
    ("expires", "expires_at"),
)
RECENT_SQL = (
    "SELECT u.ts, u.face, u.path, u.stream, u.prompt_tokens, u.completion_tokens, "
    "u.total_tokens, u.usage_source, u.status, u.outcome, u.latency_ms, "
    "COALESCE(u.model_served, u.model_requested, '-') AS model, "
    "COALESCE(k.name, CASE WHEN u.key_id IS NULL THEN '-' ELSE '#' || u.key_id END) AS key_name "
    "FROM usage u LEFT JOIN keys k ON k.id = u.key_id ORDER BY u.id DESC LIMIT ?"
)


def page(template, status=200, headers=None, **context):
    """Render one of the dashboard's pages."""
    return render_template(template, **context), status, headers or {}


def _fingerprint(token):
    """What the session holds instead of the token: changing the token signs everyone out."""
    secret = str(current_app.secret_key).encode()
    return hmac.new(secret, b"admin:" + token.encode(), hashlib.sha256).hexdigest()


def signed_in():
    """Whether this session signed in with the current token, less than SESSION_SECONDS ago."""
    token = current_app.config["ADMIN_TOKEN"]
    held = session.get("admin")
    started = session.get("signed_in_at")
    if not token or not isinstance(held, str) or not isinstance(started, int | float):
        return False
    fresh = 0 <= time.time() - started < SESSION_SECONDS
    return fresh and hmac.compare_digest(held, _fingerprint(token))


@bp.before_request
def guard():
    """Off without a token; every POST needs the CSRF token; every page but login a session."""
    if not current_app.config["ADMIN_TOKEN"]:
        return page("admin_off.html", 404)
    if request.method == "POST" and not csrf.valid():
        message = "The form was not sent from this dashboard, or it expired. Reload and try again."
        return page("message.html", 400, title="Form refused", message=message)
    if request.endpoint == "admin.login" or signed_in():
        return None
    if request.method == "GET":
        return redirect(url_for("admin.login"))
    return page("admin_login.html", 401, error="Sign in first.")


bp.after_request(csrf.secure_headers)


@bp.route("/login", methods=["GET", "POST"])
def login():
    """The sign-in form; the token travels only in the POST body, never in a URL."""
    if request.method == "GET":
        return redirect(url_for("admin.dashboard")) if signed_in() else page("admin_login.html")
    token = current_app.config["ADMIN_TOKEN"]
    sent = request.form.get("token", "")
    if not hmac.compare_digest(sent.encode(), token.encode()):
        try:
            check_unauthenticated()  # wrong tokens count like bad keys: guessing stays slow
        except RateLimited as err:
            return page("admin_login.html", 429, err.headers, error=err.message)
        return page("admin_login.html", 401, error="That is not the admin token.")
    session.clear()
    session["admin"] = _fingerprint(token)
    session["signed_in_at"] = time.time()
    csrf.renew()
    return redirect(url_for("admin.dashboard"))


@bp.post("/logout")
def logout():
    """Forget the session."""
    session.clear()
    return redirect(url_for("admin.login"))


@bp.get("/")
@bp.get("")
def dashboard():
    """Charts of the last 30 days, the key table with its forms, and the most recent calls."""
    current = state()
    by_key = charts.daily_usage(current.db, "key", CHART_DAYS)
    by_model = charts.daily_usage(current.db, "model", CHART_DAYS)
    return page(
        "admin_dashboard.html",
        keys=current.keys.all(),
        key_charts=charts.usage_charts(by_key, "key"),
        model_charts=charts.usage_charts(by_model, "model"),
        calls=current.db.query(RECENT_SQL, (RECENT_CALLS,)),
        days=CHART_DAYS,
        default_rpm=current.config["DEFAULT_RPM"],
    )


@bp.post("/keys")
def create_key():
    """Create a key and show it on this one result page: it is never shown again."""
    form = request.form
    settings = {
        column: form[field].strip()
        for field, column in CREATE_FIELDS
        if form.get(field, "").strip()
    }
    try:
        plaintext, record = state().keys.create(form.get("name", ""), **settings)
    except ValueError as exc:
        flash(f"No key created: {exc}", "error")
        return redirect(url_for("admin.dashboard"))
    return page("admin_key_created.html", key=plaintext, record=record)


@bp.post("/keys/enable")
def enable_key():
    """Enable a key by name."""
    return _change(lambda keys, name: keys.set_enabled(name, True), "enabled")


@bp.post("/keys/disable")
def disable_key():
    """Disable a key by name: its next call is refused in every worker."""
    return _change(lambda keys, name: keys.set_enabled(name, False), "disabled")


@bp.post("/keys/topup")
def top_up_key():
    """Add tokens to a key's quota."""
    tokens = request.form.get("tokens", "").strip()
    if not tokens.isdecimal():
        flash("A top-up is a whole number of tokens.", "error")
        return redirect(url_for("admin.dashboard"))
    return _change(
        lambda keys, name: keys.top_up(name, int(tokens)), f"topped up by {tokens} tokens"
    )


def _change(apply, done):
    """Apply one change to the key named in the form, then back to the dashboard with a note."""
    name = request.form.get("name", "")
    try:
        apply(state().keys, name)
    except (ValueError, LookupError) as exc:
        flash(f"Key {name!r} not changed: {exc}", "error")
    else:
        flash(f"Key {name!r} {done}.", "ok")
    return redirect(url_for("admin.dashboard"))


def init_app(app):
    """Register the pages; the session cookie stays HttpOnly and same-site only."""
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    if not app.config.get("SESSION_COOKIE_SAMESITE"):
        app.config["SESSION_COOKIE_SAMESITE"] = "Strict"
    app.add_template_filter(utc_minute, "when")
    csrf.init_app(app)
    app.register_blueprint(bp)
