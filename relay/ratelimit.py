"""Per-key request limits with flask-limiter, and an address limit for calls without a valid key."""

import math
import time

from flask import current_app, g, request
from flask_limiter import Limiter
from limits import RateLimitItemPerMinute
from limits.strategies import FixedWindowRateLimiter

import relay.sqlite_limits  # noqa: F401 - registers the sqlite:// storage scheme with limits
from relay.errors import RateLimited

KEY_RPM_SCOPE = "key-rpm"


def _client_address():
    """The caller's address (ProxyFix has already applied RELAY_PROXY_COUNT)."""
    return request.remote_addr or "unknown"


def _key_scope():
    """Rate-limit identity of the calling key: its id, never the key or its header."""
    call = g.get("call")
    return f"key:{call.key.id}" if call is not None and call.key is not None else ""


def _key_rpm():
    """The calling key's requests-per-minute limit as a flask-limiter string."""
    # flask-limiter parses the string even for exempt calls, so never hand it "None".
    return f"{_rpm_value() or 1}/minute"


def _rpm_value():
    """The key's own rpm, else RELAY_DEFAULT_RPM, else None (no limit)."""
    call = g.get("call")
    if call is None or call.key is None:
        return None
    return call.key.rpm or current_app.config["DEFAULT_RPM"]


def _no_key_rpm():
    """Exempt keys that have no request limit."""
    return _rpm_value() is None


def per_key_rpm(limiter):
    """The view decorator both faces share, so a key has one budget whichever face it calls."""
    return limiter.shared_limit(
        _key_rpm,
        scope=KEY_RPM_SCOPE,
        key_func=_key_scope,
        exempt_when=_no_key_rpm,
        error_message=lambda: f"Rate limit reached for this key: {_rpm_value()} requests/minute.",
    )


def drop_stray_retry_after(response):
    """flask-limiter puts Retry-After on every limited reply; it belongs on 429 and 503 only."""
    if response.status_code not in (429, 503):
        response.headers.pop("Retry-After", None)
    return response


def _global_rpm():
    """RELAY_GLOBAL_RPM as a limit string."""
    return f"{current_app.config['GLOBAL_RPM']}/minute"


def _not_relayed():
    """The global limit counts relayed calls only, not /healthz, /admin or /metrics."""
    return request.blueprint not in ("openai", "legacy")


def make_limiter(app):
    """A flask-limiter for this app, its storage shared by all workers (RELAY_RATELIMIT_*).

    Call it before registering hooks that must run after the limiter's own; the
    per-key check is a view decorator, so it runs after authentication.
    """
    limiter = Limiter(
        key_func=_client_address,
        storage_uri=app.config["RATELIMIT_STORAGE_URI"],
        strategy=app.config["RATELIMIT_STRATEGY"],
        headers_enabled=True,
        retry_after="delta-seconds",
        key_prefix="relay",
        application_limits=[_global_rpm] if app.config["GLOBAL_RPM"] else None,
        application_limits_exempt_when=_not_relayed,
    )
    limiter.init_app(app)
    limiter.request_filter(_nothing_to_limit)
    return limiter


def _nothing_to_limit():
    """Skip flask-limiter's whole evaluation when no limit can apply to this request.

    Without a global limit and without an rpm for the calling key there is nothing to
    count, and the evaluation costs a noticeable share of a relayed call's CPU.
    """
    if current_app.config["GLOBAL_RPM"]:
        return False
    return g.get("call") is None or _rpm_value() is None


def current_limiter():
    """This app's limiter."""
    return current_app.extensions["relay"].limiter


def _retry_headers(limit, reset_at, remaining=0):
    """Retry-After and X-RateLimit-* headers for a 429 we raise ourselves."""
    retry_after = max(1, math.ceil(reset_at - time.time()))
    return {
        "Retry-After": str(retry_after),
        "X-RateLimit-Limit": str(limit),
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": str(int(reset_at)),
    }


class KeyLimits:
    """Token-per-minute and calls-at-once limits of keys, on the limiter's shared storage."""

    def __init__(self, limiter, inflight, config):
        # Tokens are counted after the fact, so always a fixed window: a moving window
        # would refuse to record a call that already happened.
        self.tokens = FixedWindowRateLimiter(limiter.storage)
        self.inflight = inflight
        self.config = config

    def _tpm(self, key):
        """The key's tokens-per-minute limit, or None."""
        return key.tpm or self.config["DEFAULT_TPM"]

    def _max_concurrent(self, key):
        """The key's calls-at-once limit, or None."""
        return key.max_concurrent or self.config["DEFAULT_MAX_CONCURRENT"]

    def admit(self, call):
        """Refuse a call over its key's token rate, else take a concurrency slot if capped."""
        key = call.key
        tpm = self._tpm(key)
        if tpm:
            item = RateLimitItemPerMinute(tpm)
            if not self.tokens.test(item, "relay", "tpm", str(key.id)):
                reset_at, _ = self.tokens.get_window_stats(item, "relay", "tpm", str(key.id))
                raise RateLimited(
                    f"Token rate limit reached for this key: {tpm} tokens per minute.",
                    headers=_retry_headers(tpm, reset_at),
                )
        cap = self._max_concurrent(key)
        if cap:
            lease = self.inflight.acquire(key.id, cap)
            if lease is None:
                raise RateLimited(
                    f"This key already has {cap} calls in flight, its limit; retry when one ends.",
                    headers={
                        "Retry-After": "1",
                        "X-RateLimit-Limit": str(cap),
                        "X-RateLimit-Remaining": "0",
                    },
                )
            call.lease = lease

    def finish(self, call):
        """Release the call's slot and count its tokens against the key's token rate."""
        if call.lease is not None:
            lease, call.lease = call.lease, None
            self.inflight.release(lease)
        if call.key is not None and self._tpm(call.key) and call.tokens[2] > 0:
            item = RateLimitItemPerMinute(self._tpm(call.key))
            self.tokens.hit(item, "relay", "tpm", str(call.key.id), cost=call.tokens[2])


def check_unauthenticated():
    """Count a call without a valid key against its address; 429 when there are too many.

    This slows down key guessing. The address is the socket peer unless the operator
    trusts RELAY_PROXY_COUNT proxies, so a forged X-Forwarded-For changes nothing.
    """
    per_minute = current_app.config["UNAUTHENTICATED_RPM"]
    if not per_minute:
        return
    item = RateLimitItemPerMinute(per_minute)
    address = _client_address()
    limiter = current_limiter()
    if limiter.limiter.hit(item, "relay", "unauthenticated", address):
        return
    reset_at, _ = limiter.limiter.get_window_stats(item, "relay", "unauthenticated", address)
    raise RateLimited(
        "Too many requests without a valid key from this address; retry later.",
        headers=_retry_headers(per_minute, reset_at),
    )
