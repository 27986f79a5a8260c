"""Opening the limits storage of RELAY_RATELIMIT_STORAGE_URI, with short timeouts for Redis."""

from typing import Any, cast
from urllib.parse import urlsplit

import redis
from limits.storage import Storage, storage_from_string
from redis.backoff import NoBackoff
from redis.retry import Retry

import relay.limits.sqlite_storage  # noqa: F401 - registers the sqlite:// storage scheme

# Schemes `limits` hands to redis-py's own client (Retry objects are redis-py's).
REDIS_PY_SCHEMES = ("redis", "rediss", "redis+unix")


def client_options(uri: str, timeout: float) -> dict[str, Any]:
    """Client settings for a Redis-like URI: every command answers or fails within `timeout`.

    redis-py waits 5 s by default and retries with backoff, which turned a hung Redis
    into 5 s waits and then 500s. Query-string options in the URI still win (redis-py's rule).
    """
    scheme = urlsplit(uri).scheme
    if not scheme.startswith(("redis", "valkey")):
        return {}
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if scheme in REDIS_PY_SCHEMES:
        # One reconnect for a connection the server closed (say, across a restart), and no
        # retry after a timeout: a hung server must cost one timeout, not several.
        options["retry"] = Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    return options


def open_storage(uri: str, timeout: float) -> Storage:
    """The storage a URI names (sqlite://, redis://, memory://…), not yet fail-open."""
    # limits types this as sync-or-async; the relay is sync (async+ URIs are not for it).
    return cast(Storage, storage_from_string(uri, **client_options(uri, timeout)))
