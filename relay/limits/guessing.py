"""Slowing down guessing: failed credentials are counted per address, then the address waits.

Every failed credential check (a bad relay key on either face or the key page, a wrong
admin token on /admin or /metrics) counts against the caller's address. Past
RELAY_UNAUTHENTICATED_RPM failures in a minute the address is blocked for
RELAY_AUTH_BLOCK_SECONDS: everything it sends meanwhile is refused before its body is
read, the right key or token included, so guessing costs the guesser, not the relay.
"""

import math
import time

from limits import RateLimitItemPerMinute
from limits.storage import Storage
from limits.strategies import FixedWindowRateLimiter

from relay.errors import RateLimited

PREFIX = "relay"
MAX_KNOWN = 10_000  # blocked (and recently clean) addresses a process remembers
# How long an address found unblocked is taken as such without asking the storage again
# (a read per request was ~2 % of a call's CPU). A block this process sets or meets is
# known at once; one set by another worker or machine reaches an address that keeps
# sending valid credentials within this time (its failures are still all counted).
CLEAN_FOR = 1.0


class GuessGuard:
    """Counts failures per address in the limits storage and blocks busy guessers."""

    def __init__(self, storage: Storage, per_minute: int, block_seconds: float) -> None:
        self.storage = storage
        self.failures = FixedWindowRateLimiter(storage)
        self.per_minute = per_minute  # 0: off
        self.block_seconds = block_seconds
        # Blocks this process has seen, and until when: a blocked address that keeps
        # sending is refused without a storage round trip each time.
        self.known: dict[str, float] = {}
        self.clean: dict[str, float] = {}  # address: until when it counts as unblocked

    def check(self, address: str) -> None:
        """Refuse an address that is blocked (RateLimited, with how long it still waits)."""
        if not self.per_minute:
            return
        until = self.known.get(address)
        if until is not None:
            if until > time.time():
                raise self._refusal(until)
            del self.known[address]
        now = time.monotonic()
        if self.clean.get(address, 0.0) > now:
            return
        key = self._blocked(address)
        if self.storage.get(key) > 0:
            until = self.storage.get_expiry(key)
            self._remember(address, until)
            raise self._refusal(until)
        if len(self.clean) >= MAX_KNOWN:
            self.clean = {a: u for a, u in self.clean.items() if u > now}
            if len(self.clean) >= MAX_KNOWN:
                self.clean.clear()
        self.clean[address] = now + CLEAN_FOR

    def _remember(self, address: str, until: float) -> None:
        """Note a block, in a table of bounded size (past it, old blocks are forgotten
        first: they are still in the storage)."""
        if len(self.known) >= MAX_KNOWN:
            now = time.time()
            self.known = {a: u for a, u in self.known.items() if u > now}
            while len(self.known) >= MAX_KNOWN:
                del self.known[next(iter(self.known))]
        self.known[address] = until
        self.clean.pop(address, None)

    def failed(self, address: str) -> None:
        """Count one failed credential; past the limit, block the address and refuse."""
        if not self.per_minute:
            return
        item = RateLimitItemPerMinute(self.per_minute)
        if self.failures.hit(item, PREFIX, "authfail", address):
            return
        key = self._blocked(address)
        self.storage.incr(key, math.ceil(self.block_seconds))
        until = self.storage.get_expiry(key)
        self._remember(address, until)
        raise self._refusal(until)

    @staticmethod
    def _blocked(address: str) -> str:
        """The storage key marking a blocked address (the address, never a credential)."""
        return f"{PREFIX}/blocked/{address}"

    def _refusal(self, until: float) -> RateLimited:
        """The 429 for a blocked address."""
        wait = max(1, math.ceil(until - time.time()))
        return RateLimited(
            "Too many failed keys or tokens from this address; it is blocked for "
            "%(wait)d more seconds.",
            wait=wait,
            headers={
                "Retry-After": str(wait),
                "X-RateLimit-Limit": str(self.per_minute),
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(int(until)),
            },
        )
