"""This process's calls-at-once leases: taken through the breaker, renewed while calls live.

Leases are taken and given back through the breaker (a failing store admits the call
with no lease), and one loop per process renews those of its live calls, so that only
the leases of a holder that died (or hung) expire.
"""

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Final

from relay.limits.breaker import Breaker
from relay.limits.inflight import Inflight

log = logging.getLogger("relay.limits")
# Renewed every 20 s of the default 60 s lifetime (RELAY_LEASE_SECONDS): a renewal may
# fail, or come late, without a live call losing its slot.
RENEWALS_PER_LIFETIME = 3

# The lease of a call admitted while the lease store failed: counted nowhere, so there
# is nothing to renew or give back.
UNCOUNTED: Final = object()


@dataclass(eq=False)
class Lease:
    """One call's slot: the store's token for it (compared by identity, one per call)."""

    token: Any


class Leases:
    """Calls-at-once slots of keys, in a lease store that may fail."""

    def __init__(self, store: Inflight, breaker: Breaker, lifetime: float) -> None:
        """`lifetime`: how long a lease outlives its last renewal (RELAY_LEASE_SECONDS)."""
        self.store = store
        self.breaker = breaker
        self.renew_every = lifetime / RENEWALS_PER_LIFETIME
        self.live: set[Lease] = set()  # leases of this process's calls in flight
        self._lock = threading.Lock()  # renewal copies `live` while calls change it
        self._renewer_pid: int | None = None  # the process whose renewer runs
        self._closed = threading.Event()

    def acquire(self, limit_id: str, limit: int) -> Any:
        """A Lease for the key; None when `limit` calls hold one; UNCOUNTED on failure."""
        token = self.breaker.run(
            lambda: self.store.acquire(limit_id, limit), UNCOUNTED, self.store.errors
        )
        if token is None or token is UNCOUNTED:
            return token
        lease = Lease(token)
        with self._lock:
            self.live.add(lease)
        self._start_renewer()
        return lease

    def release(self, lease: Any) -> None:
        """Give a lease back (one that cannot be given back expires by itself)."""
        if not isinstance(lease, Lease):
            return
        with self._lock:
            self.live.discard(lease)
        self.breaker.run(lambda: self.store.release(lease.token), None, self.store.errors)

    def renew(self) -> None:
        """Push the expiry of every live lease of this process a full lifetime ahead."""
        with self._lock:
            tokens = [lease.token for lease in self.live]
        if tokens:
            self.breaker.run(lambda: self.store.renew(tokens), None, self.store.errors)

    def close(self) -> None:
        """Stop renewing (the app is closing)."""
        self._closed.set()

    def _start_renewer(self) -> None:
        """Start this process's renewal loop once (after a fork, the child starts its own)."""
        with self._lock:
            if self._renewer_pid == os.getpid():
                return
            self._renewer_pid = os.getpid()
        # A greenlet under gunicorn's gevent workers (threading is patched), else a thread.
        threading.Thread(target=self._renew_loop, name="relay-lease-renewal", daemon=True).start()

    def _renew_loop(self) -> None:
        """Renew the live leases every renew_every seconds until closed."""
        while not self._closed.wait(self.renew_every):
            try:
                self.renew()
            except Exception:
                # The loop must outlive any surprise, or every live lease would expire.
                log.exception("renewing calls-at-once leases failed")
