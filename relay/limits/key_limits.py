"""Per-key token rates and calls at once, counted on the rate limiter's shared storage."""

from flask import Config
from limits import RateLimitItemPerMinute
from limits.storage import Storage
from limits.strategies import FixedWindowRateLimiter

from relay.call import Call, KeyRecord
from relay.errors import RateLimited
from relay.limits.leases import Leases
from relay.limits.ratelimit import retry_headers


class KeyLimits:
    """Token-per-minute and calls-at-once limits of keys, on the limiter's shared storage."""

    def __init__(self, storage: Storage, leases: Leases, config: Config) -> None:
        # Tokens are counted after the fact, so always a fixed window: a moving window
        # would refuse to record a call that already happened.
        self.tokens = FixedWindowRateLimiter(storage)
        self.leases = leases
        self.config = config

    def _tpm(self, key: KeyRecord) -> int | None:
        """The key's tokens-per-minute limit, or None."""
        return key.tpm or self.config["DEFAULT_TPM"]

    def _max_concurrent(self, key: KeyRecord) -> int | None:
        """The key's calls-at-once limit, or None."""
        return key.max_concurrent or self.config["DEFAULT_MAX_CONCURRENT"]

    def admit(self, call: Call) -> None:
        """Refuse a call over its key's token rate, else take a concurrency slot if capped."""
        key = call.key
        if key is None:
            return
        tpm = self._tpm(key)
        if tpm:
            item = RateLimitItemPerMinute(tpm)
            if not self.tokens.test(item, "relay", "tpm", key.limit_id):
                reset_at, _ = self.tokens.get_window_stats(item, "relay", "tpm", key.limit_id)
                raise RateLimited(
                    "Token rate limit reached for this key: %(tpm)d tokens per minute.",
                    headers=retry_headers(tpm, reset_at),
                    tpm=tpm,
                )
        cap = self._max_concurrent(key)
        if cap:
            lease = self.leases.acquire(key.limit_id, cap)
            if lease is None:
                raise RateLimited(
                    "This key already has %(cap)d calls in flight, its limit; retry when one ends.",
                    cap=cap,
                    headers={
                        "Retry-After": "1",
                        "X-RateLimit-Limit": str(cap),
                        "X-RateLimit-Remaining": "0",
                    },
                )
            call.lease = lease

    def finish(self, call: Call) -> None:
        """Release the call's slot and count its tokens against the key's token rate."""
        if call.lease is not None:
            lease, call.lease = call.lease, None
            self.leases.release(lease)
        tpm = self._tpm(call.key) if call.key is not None else None
        if call.key is not None and tpm and call.usage.total > 0:
            item = RateLimitItemPerMinute(tpm)
            self.tokens.hit(item, "relay", "tpm", call.key.limit_id, cost=call.usage.total)
