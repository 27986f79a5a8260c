"""Sessions that cost nothing on API calls: the cookie is unsigned only when one was sent."""

from flask import Flask, Request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface


class LazySessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, minus the signer built for requests without a cookie.

    Flask builds an itsdangerous serializer (a key derivation) on every request to look
    for a session, ~2 % of an API call's CPU; API clients send no session cookie, so an
    empty session is all they need. Pages that sign in still get the usual signed cookie.
    """

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        """An empty session when no cookie came; else Flask's own checks."""
        if app.secret_key and not request.cookies.get(self.get_cookie_name(app)):
            return self.session_class()
        return super().open_session(app, request)


def init_app(app: Flask) -> None:
    """Use the lazy session interface."""
    app.session_interface = LazySessionInterface()
