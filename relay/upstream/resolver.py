"""Upstream addresses without a resolver trip each: IP literals as is, names cached briefly."""

import ipaddress
import socket
import time
from typing import Any

# How long a resolved upstream name is reused; aiohttp's connector caches for the same 10 s.
TTL = 10.0
TCP = socket.IPPROTO_TCP
AddrInfo = list[tuple[Any, ...]]
_cache: dict[tuple[str, int], tuple[float, AddrInfo]] = {}  # (host, port) -> (expiry, found)


def addresses(host: str, port: int) -> AddrInfo:
    """getaddrinfo results for an upstream, from the cache while they are fresh.

    Under gevent every getaddrinfo goes through a thread pool (~0.1 ms of CPU and a
    GIL hand-off), once per new upstream connection; a busy relay opens hundreds of
    those a second when streams pile up. IP literals need no resolver at all.
    The adapter's connections (adapter.py) connect to what this returns.
    """
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.version == 6:
            return [(socket.AF_INET6, socket.SOCK_STREAM, TCP, "", (host, port, 0, 0))]
        return [(socket.AF_INET, socket.SOCK_STREAM, TCP, "", (host, port))]
    now = time.monotonic()
    cached = _cache.get((host, port))
    if cached is not None and cached[0] > now:
        return cached[1]
    found = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    _cache[(host, port)] = (now + TTL, found)
    return found
