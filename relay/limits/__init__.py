"""The limits layer: request rates (flask-limiter), token rates and calls at once, per key.

`Limits` is the layer's one entry point. Its counters live in RELAY_RATELIMIT_STORAGE_URI:
a SQLite file shared by the workers of one machine (default), or Redis for several. They
are named by each key's limit id, the same on every instance. When the storage fails,
limits fail open (breaker.py): calls are served without them until it answers again.
"""

from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import Flask, current_app, g, has_request_context, request
from flask_limiter import Limiter

from relay.call import Call
from relay.errors import RateLimited
from relay.limits.breaker import Breaker
from relay.limits.failopen import FailOpenStorage
from relay.limits.guessing import GuessGuard
from relay.limits.inflight import make_inflight
from relay.limits.key_limits import KeyLimits
from relay.limits.leases import Leases
from relay.limits.ratelimit import (
    client_address,
    drop_stray_retry_after,
    make_limiter,
    per_key_rpm,
)
from relay.limits.storage import open_storage
from relay.runtime import abandon_body

EXTENSION = "relay_limits"
OPEN_ENDPOINTS = {"health.healthz", "static"}  # answered even to a blocked address
HTML_PAGES = {"admin", "keyholder"}  # call check_blocked() first thing, to answer in HTML
UNAVAILABLE_NOTED = "limits_unavailable_noted"  # flask.g: this request was counted already
View = TypeVar("View", bound=Callable[..., Any])


class Limits:
    """Every limit the relay applies, built once per app."""

    def __init__(self, app: Flask) -> None:
        # Registered before the limiter so it runs after the limiter's header hook.
        app.after_request(drop_stray_retry_after)
        self.breaker = Breaker()
        inner = open_storage(
            app.config["RATELIMIT_STORAGE_URI"], app.config["RATELIMIT_STORAGE_TIMEOUT"]
        )
        # The limiter's hooks run before the faces' hooks (the global limit first).
        self.limiter: Limiter = make_limiter(app, inner, self.breaker)
        # Every limit below goes through this storage, and so through the breaker.
        self.storage = cast(FailOpenStorage, self.limiter.storage)
        lifetime = app.config["LEASE_SECONDS"]
        self.leases = Leases(make_inflight(inner, lifetime), self.breaker, lifetime)
        self.keys = KeyLimits(self.storage, self.leases, app.config)
        self.per_key_rpm = per_key_rpm(self.limiter)
        self.guard = GuessGuard(
            self.storage,
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
            check_blocked()

    def admit(self, call: Call) -> None:
        """Refuse a call over its key's token rate or calls at once (RateLimited)."""
        self.keys.admit(call)

    def finish(self, call: Call) -> None:
        """Release the call's slot and count its tokens against its key's token rate."""
        self.keys.finish(call)

    def exempt(self, view: View) -> View:
        """Keep a view out of the relay-wide request limit (the relay's own endpoints)."""
        return cast(View, self.limiter.exempt(view))

    def available(self) -> bool:
        """Whether the limits storage answers now (/healthz); False while it is skipped."""
        return self.storage.check()

    def on_unavailable(self, hook: Callable[[], None]) -> None:
        """Call `hook()` once per request (or lease renewal) that went without some of its
        limits because the storage failed or was being skipped (the metrics counter)."""

        def once_per_request() -> None:
            # A call makes several limits operations (checks, headers, leases, updates).
            if has_request_context():
                if g.get(UNAVAILABLE_NOTED):
                    return
                setattr(g, UNAVAILABLE_NOTED, True)
            hook()

        self.breaker.on_unavailable(once_per_request)

    def close(self) -> None:
        """Stop renewing leases; close the storage's files and connections (tests)."""
        self.leases.close()
        inner = self.storage.inner
        db = getattr(inner, "db", None)
        if db is not None:
            db.close()
        if hasattr(inner, "get_connection"):
            inner.get_connection().close()


def check_blocked() -> None:
    """RateLimited when the caller's address is blocked for failed credentials; its body
    is left unread and its connection closed after the 429."""
    limits: Limits = current_app.extensions[EXTENSION]
    try:
        limits.guard.check(client_address())
    except RateLimited:
        abandon_body(request.environ)
        raise


def count_unauthenticated() -> None:
    """Count a failed credential against the caller's address; past the limit the address
    is blocked for a while and this (and everything it sends meanwhile) is a 429."""
    limits: Limits = current_app.extensions[EXTENSION]
    limits.guard.failed(client_address())
