"""Request limits with flask-limiter: per key, relay-wide, and per address without a key."""

import math
import time
from collections.abc import Callable
from typing import Any, cast

from flask import Flask, Response, current_app, g, request
from flask_limiter import Limiter
from limits.storage import Storage

from relay.limits.breaker import Breaker
from relay.limits.failopen import FailOpenStorage

KEY_RPM_SCOPE = "key-rpm"


def client_address() -> str:
    """The caller's address (ProxyFix has already applied RELAY_PROXY_COUNT)."""
    return request.remote_addr or "unknown"


def _key_scope() -> str:
    """Rate-limit identity of the calling key: its limit id (the same on every instance),
    never the key, its hash or its header, nor a row id that differs between databases."""
    call = g.get("call")
    return f"key:{call.key.limit_id}" if call is not None and call.key is not None else ""


def _key_rpm() -> str:
    """The calling key's requests-per-minute limit as a flask-limiter string."""
    # flask-limiter parses the string even for exempt calls, so never hand it "None".
    return f"{_rpm_value() or 1}/minute"


def _rpm_value() -> int | None:
    """The key's own rpm, else RELAY_DEFAULT_RPM, else None (no limit)."""
    call = g.get("call")
    if call is None or call.key is None:
        return None
    rpm: int | None = call.key.rpm or current_app.config["DEFAULT_RPM"]
    return rpm


def _no_key_rpm() -> bool:
    """Exempt keys that have no request limit."""
    return _rpm_value() is None


def per_key_rpm(limiter: Limiter) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The view decorator both faces share, so a key has one budget whichever face it calls."""
    return limiter.shared_limit(
        _key_rpm,
        scope=KEY_RPM_SCOPE,
        key_func=_key_scope,
        exempt_when=_no_key_rpm,
    )  # its 429 is worded by errors.handle_http_exception


def drop_stray_retry_after(response: Response) -> Response:
    """flask-limiter puts Retry-After on every limited reply; it belongs on 429 and 503 only."""
    if response.status_code not in (429, 503):
        response.headers.pop("Retry-After", None)
    return response


def _global_rpm() -> str:
    """RELAY_GLOBAL_RPM as a limit string."""
    return f"{current_app.config['GLOBAL_RPM']}/minute"


def _not_relayed() -> bool:
    """The global limit counts relayed calls only, not /healthz, /admin or /metrics."""
    return request.blueprint not in ("openai", "legacy")


def make_limiter(app: Flask, storage: Storage, breaker: Breaker) -> Limiter:
    """A flask-limiter for this app on `storage` (shared by all workers), failing open.

    Call it before registering hooks that must run after the limiter's own; the
    per-key check is a view decorator, so it runs after authentication.
    """
    limiter = Limiter(
        key_func=client_address,
        # flask-limiter builds its storage from a URI: this scheme wraps ours (failopen.py).
        storage_uri=FailOpenStorage.URI,
        storage_options=cast(Any, {"inner": storage, "breaker": breaker}),
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


def _nothing_to_limit() -> bool:
    """Skip flask-limiter's whole evaluation when no limit can apply to this request.

    Without a global limit and without an rpm for the calling key there is nothing to
    count, and the evaluation costs a noticeable share of a relayed call's CPU.
    """
    if current_app.config["GLOBAL_RPM"]:
        return False
    return g.get("call") is None or _rpm_value() is None


def retry_headers(limit: int, reset_at: float, remaining: int = 0) -> dict[str, str]:
    """Retry-After and X-RateLimit-* headers for a 429 we raise ourselves."""
    retry_after = max(1, math.ceil(reset_at - time.time()))
    return {
        "Retry-After": str(retry_after),
        "X-RateLimit-Limit": str(limit),
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": str(int(reset_at)),
    }
