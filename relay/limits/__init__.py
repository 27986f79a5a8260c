"""The limits layer: request rates (flask-limiter), token rates and calls at once, per key.

`Limits` is the layer's one entry point. Its counters live in RELAY_RATELIMIT_STORAGE_URI:
a SQLite file shared by the workers of one machine (default), or Redis for several.
"""

from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import Flask, current_app
from flask_limiter import Limiter

from relay.call import Call
from relay.limits.inflight import make_inflight
from relay.limits.key_limits import KeyLimits
from relay.limits.ratelimit import (
    check_unauthenticated,
    drop_stray_retry_after,
    make_limiter,
    per_key_rpm,
)

EXTENSION = "relay_limits"
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
        app.extensions[EXTENSION] = self

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


def count_unauthenticated() -> None:
    """Count a request without valid credentials against its address; 429 past the limit."""
    check_unauthenticated(current_app.extensions[EXTENSION].limiter)
