"""Browser safety for the HTML pages: one CSRF token per session, and strict response headers."""

import hmac
import secrets

from flask import Flask, Response, request, session

FIELD = "csrf_token"
# Nothing on these pages runs script; pygal's inline SVG needs only its own <style>.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def token() -> str:
    """This session's CSRF token, made on first use (forms put it in a hidden field)."""
    value = session.get("csrf")
    if not isinstance(value, str) or not value:
        value = session["csrf"] = secrets.token_urlsafe(32)
    return value


def renew() -> None:
    """A fresh token, after signing in, so one fixed before login is worthless after it."""
    session["csrf"] = secrets.token_urlsafe(32)


def valid() -> bool:
    """Whether the current POST carries this session's token."""
    expected = session.get("csrf")
    sent = request.form.get(FIELD, "")
    if not isinstance(expected, str) or not expected or not sent:
        return False
    return hmac.compare_digest(sent.encode(), expected.encode())


def secure_headers(response: Response) -> Response:
    """after_request for HTML pages: no caching, no framing, no scripts, no referrer."""
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def init_app(app: Flask) -> None:
    """Make `csrf_token()` available to every template."""
    app.jinja_env.globals["csrf_token"] = token
