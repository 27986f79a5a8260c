"""A `limits` storage in front of the real one that answers "nothing counted" when it fails.

flask-limiter builds its storage from a URI, so this one is registered under its own
scheme and handed the real storage and the breaker as storage options (see make_limiter).
Every limit of the relay (flask-limiter's request limits and their headers, token rates,
the guessing guard) goes through it, and so through the breaker.
"""

import time
from typing import Any, cast

from limits.errors import ConfigurationError
from limits.storage import MovingWindowSupport, Storage

from relay.limits.breaker import Breaker


class FailOpenStorage(Storage, MovingWindowSupport):
    """Delegates to `inner` through `breaker`; a skipped or failed operation admits."""

    STORAGE_SCHEME = ["relay-failopen"]  # noqa: RUF012 - limits reads this class attribute
    URI = "relay-failopen://"

    def __init__(
        self,
        uri: str = URI,
        wrap_exceptions: bool = False,
        *,
        inner: Storage | None = None,
        breaker: Breaker | None = None,
        **options: Any,
    ) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions)
        if inner is None or breaker is None:
            raise ConfigurationError(f"{self.URI} needs the `inner` and `breaker` options")
        self.inner = inner
        self.breaker = breaker

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        """The real storage's errors (caught here, so none reach limits' wrappers)."""
        return self.inner.base_exceptions

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Add to a counter; 0 (nothing counted) when the storage fails."""
        return self.breaker.run(
            lambda: self.inner.incr(key, expiry, amount), 0, self.inner.base_exceptions
        )

    def get(self, key: str) -> int:
        """A counter's value; 0 when the storage fails."""
        return self.breaker.run(lambda: self.inner.get(key), 0, self.inner.base_exceptions)

    def get_expiry(self, key: str) -> float:
        """When a counter's window ends; now when the storage fails."""
        return self.breaker.run(
            lambda: self.inner.get_expiry(key), time.time(), self.inner.base_exceptions
        )

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """Moving window: take room for `amount`; True (admitted) when the storage fails."""
        moving = cast(MovingWindowSupport, self.inner)
        return self.breaker.run(
            lambda: moving.acquire_entry(key, limit, expiry, amount),
            True,
            self.inner.base_exceptions,
        )

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """Moving window: (start, entries); an empty window when the storage fails."""
        moving = cast(MovingWindowSupport, self.inner)
        return self.breaker.run(
            lambda: moving.get_moving_window(key, limit, expiry),
            (time.time(), 0),
            self.inner.base_exceptions,
        )

    def check(self) -> bool:
        """Whether the storage answers now: a probe, unless it failed a moment ago."""
        if not self.breaker.should_try():
            return False
        try:
            answered = self.inner.check()  # limits' own checks answer False rather than raise
        except self.inner.base_exceptions:
            answered = False
        if answered:
            self.breaker.succeeded()
        else:
            self.breaker.failed("it did not answer a health check", counted=False)
        return answered

    def reset(self) -> int | None:
        """Remove every counter (an operator's action: errors are raised)."""
        return self.inner.reset()

    def clear(self, key: str) -> None:
        """Remove one counter (an operator's action: errors are raised)."""
        self.inner.clear(key)
