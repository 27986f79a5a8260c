"""This process's calls-at-once leases, taken and given back through the breaker (fail open)."""

from typing import Any, Final

from relay.limits.breaker import Breaker
from relay.limits.inflight import Inflight

# The lease of a call admitted while the lease store failed: counted nowhere, so there
# is nothing to give back.
UNCOUNTED: Final = object()


class Leases:
    """Calls-at-once slots of keys, in a lease store that may fail."""

    def __init__(self, store: Inflight, breaker: Breaker) -> None:
        self.store = store
        self.breaker = breaker

    def acquire(self, limit_id: str, limit: int) -> Any:
        """A lease for the key; None when `limit` calls hold one; UNCOUNTED on failure."""
        return self.breaker.run(
            lambda: self.store.acquire(limit_id, limit), UNCOUNTED, self.store.errors
        )

    def release(self, lease: Any) -> None:
        """Give a lease back (one that cannot be is left to expire)."""
        if lease is UNCOUNTED:
            return
        self.breaker.run(lambda: self.store.release(lease), None, self.store.errors)
