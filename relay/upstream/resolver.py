"""Upstream connections without a resolver trip each: IP literals as is, names cached briefly."""

import ipaddress
import socket
import time
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

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


class CachedResolution:
    """Mixin for urllib3 connections: connect to addresses() instead of resolving each time."""

    def _new_conn(self) -> socket.socket:
        """Open the TCP connection, raising urllib3's own errors as its _new_conn does."""
        conn: Any = self  # a mixin: the attributes are urllib3's HTTPConnection's
        try:
            found = addresses(conn._dns_host, conn.port)
        except socket.gaierror as exc:
            raise NameResolutionError(conn.host, conn, exc) from exc
        failure = None
        for family, kind, proto, _, address in found:
            sock = socket.socket(family, kind, proto)
            try:
                for option in conn.socket_options or ():
                    sock.setsockopt(*option)
                if conn.timeout is None or isinstance(conn.timeout, int | float):
                    sock.settimeout(conn.timeout)
                if conn.source_address:
                    sock.bind(conn.source_address)
                sock.connect(address)
                return sock
            except TimeoutError as exc:
                sock.close()
                raise ConnectTimeoutError(
                    conn, f"Connection to {conn.host} timed out. (connect timeout={conn.timeout})"
                ) from exc
            except OSError as exc:
                sock.close()
                failure = exc  # try the next address, as socket.create_connection does
        raise NewConnectionError(conn, f"Failed to establish a new connection: {failure}")


class CachedHTTPConnection(CachedResolution, HTTPConnection):
    """Plain HTTP upstream connection."""


class CachedHTTPSConnection(CachedResolution, HTTPSConnection):
    """TLS upstream connection (the certificate is still checked against the host name)."""


class CachedHTTPPool(urllib3.HTTPConnectionPool):
    """Pool of CachedHTTPConnection."""

    ConnectionCls = CachedHTTPConnection


class CachedHTTPSPool(urllib3.HTTPSConnectionPool):
    """Pool of CachedHTTPSConnection."""

    ConnectionCls = CachedHTTPSConnection


POOL_CLASSES = {"http": CachedHTTPPool, "https": CachedHTTPSPool}
