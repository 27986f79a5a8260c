"""The limits layer: request rates (flask-limiter), token rates and calls at once, per key.

`Limits` is the layer's one entry point. Its counters live in RELAY_RATELIMIT_STORAGE_URI:
a SQLite file shared by the workers of one machine (default), or Redis for several.
"""

from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import Flask, current_app, request
from flask_limiter import Limiter

from relay.call import Call
from relay.limits.guessing import GuessGuard
from relay.limits.inflight import make_inflight
from relay.limits.key_limits import KeyLimits
from relay.limits.ratelimit import (
    client_address,
    drop_stray_retry_after,
    make_limiter,
    per_key_rpm,
)

EXTENSION = "relay_limits"
OPEN_ENDPOINTS = {"health.healthz", "static"}  # answered even to a blocked address
HTML_PAGES = {"admin", "keyholder"}  # call check_blocked() first thing, to answer in HTML
View = TypeVar("View", bound=Callable[..., Any])


class Limits:
    """Every limit the relay applies, built once per app."""

    def __init__(self, app: Flask) -> None:
        # Registered before the limiter so it runs after the limiter's header hook.
        app.after_request(drop_stray_retry_after)
        # The limiter's hooks run before the faces' hooks (the global limit first).
        self.limiter: Limiter = make_limiter(app)
        self.keys = KeyLimits(self.limiter, make_inflight(self.limiter.storage), app.config)
        self.per_key_rpm = per_key_rpm(self.limiter)
        self.guard = GuessGuard(
            self.limiter.storage,
            app.config["UNAUTHENTICATED_RPM"],
            app.config["AUTH_BLOCK_SECONDS"],
        )
        # Before anything else reads the request (after the relay-wide limit): a blocked
        # address is refused whatever it sends, its body unread.
        app.before_request(self.refuse_blocked)
        app.extensions[EXTENSION] = self

    def refuse_blocked(self) -> None:
        """before_request: a blocked guesser gets 429 before its body is read (not /healthz;
        the HTML pages check for themselves, to answer with a page)."""
        if request.endpoint not in OPEN_ENDPOINTS and request.blueprint not in HTML_PAGES:
            self.guard.check(client_address())

    def admit(self, call: Call) -> None:
        """Refuse a call over its key's token rate or calls at once (RateLimited)."""
        self.keys.admit(call)

    def finish(self, call: Call) -> None:
        """Release the call's slot and count its tokens against its key's token rate."""
        self.keys.finish(call)

    def exempt(self, view: View) -> View:
        """Keep a view out of the relay-wide request limit (the relay's own endpoints)."""
        return cast(View, self.limiter.exempt(view))

    def close(self) -> None:
        """Close the storage's files (tests)."""
        db = getattr(self.limiter.storage, "db", None)
        if db is not None:
            db.close()


def check_blocked() -> None:
    """RateLimited when the caller's address is blocked for failed credentials."""
    limits: Limits = current_app.extensions[EXTENSION]
    limits.guard.check(client_address())


def count_unauthenticated() -> None:
    """Count a failed credential against the caller's address; past the limit the address
    is blocked for a while and this (and everything it sends meanwhile) is a 429."""
    limits: Limits = current_app.extensions[EXTENSION]
    limits.guard.failed(client_address())
