"""Talking HTTP to upstreams: the connection pool, URLs, and which headers cross the relay."""

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, cast
from urllib.parse import quote, unquote

import certifi
import urllib3
from urllib3.response import BaseHTTPResponse, HTTPResponse

from relay.errors import InvalidRequest
from relay.upstream.resolver import POOL_CLASSES

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
}
# Client headers that must not reach the upstream: its key, cookies, where it came from,
# and framing urllib3 recomputes.
DROP_REQUEST = HOP_BY_HOP | {
    "host",
    "content-length",
    "authorization",
    "api-key",
    "x-api-key",
    "cookie",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "forwarded",
    "x-real-ip",
    "accept-encoding",
    "openai-organization",
    "openai-project",
    "expect",
}
# Upstream headers that must not reach the client: framing of a body urllib3 already
# decoded, the operator's account identifiers and cookies.
DROP_RESPONSE = HOP_BY_HOP | {
    "content-encoding",
    "content-length",
    "set-cookie",
    "openai-organization",
    "openai-project",
    "server",
    "date",
    "alt-svc",
    "strict-transport-security",
    "cf-ray",
    "cf-cache-status",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "retry-after",
}
CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


def make_pool(pool_size: int) -> urllib3.PoolManager:
    """The urllib3 pool every upstream call goes through: a connection per concurrent stream.

    urllib3 directly, not requests: a relay needs none of a Session's merging,
    cookies or environment proxies, and they cost about a tenth of a call's CPU.
    Nothing here reads the host's proxy settings or .netrc, and no cookies are kept,
    so one client's call never carries anything from another's.
    """
    pool = urllib3.PoolManager(
        num_pools=16,
        maxsize=pool_size,
        block=False,
        retries=False,
        ca_certs=certifi.where(),  # the CA bundle requests would use, for https upstreams
    )
    pool.pool_classes_by_scheme = POOL_CLASSES  # connections that skip needless resolving
    return pool


class UpstreamReply:
    """An upstream's answer: status and headers now, the body when it is read."""

    __slots__ = ("headers", "raw", "status_code")

    def __init__(self, raw: BaseHTTPResponse) -> None:
        # The urllib3 response, body not read yet (urlopen without preloading gives an
        # HTTPResponse: the reads below rely on it).
        self.raw = cast(HTTPResponse, raw)
        self.status_code = raw.status
        self.headers = raw.headers  # case-insensitive

    def read(self) -> bytes:
        """The whole body, decoded (gzip and the like)."""
        return self.raw.read(decode_content=True)

    def close(self) -> None:
        """Done with it: a fully read reply's connection is already back in the pool;
        one read only in part is closed, never reused mid-body."""
        self.raw.close()
        self.raw.release_conn()


def send(
    pool: urllib3.PoolManager,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    timeout: tuple[float, float],
) -> UpstreamReply:
    """Send one request; return its UpstreamReply as soon as the status and headers are in.

    No retries or redirects here: forwarding decides what may be tried again.
    Errors are urllib3's own (NewConnectionError, ConnectTimeoutError, ...).
    """
    reply = pool.urlopen(
        method,
        url,
        body=body or None,
        headers=headers,
        redirect=False,
        retries=False,
        preload_content=False,
        timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
    )
    return UpstreamReply(reply)


def get(
    pool: urllib3.PoolManager, url: str, headers: Mapping[str, str], timeout: tuple[float, float]
) -> tuple[int, bytes]:
    """A small GET read whole (model lists, checks); returns (status, body bytes)."""
    reply = send(pool, "GET", url, headers, None, timeout)
    try:
        return reply.status_code, reply.read()
    finally:
        reply.close()


def upstream_url(base_url: str, path: str, query: bytes = b"") -> str:
    """`<base>/<path>?<query>`, refusing paths that could climb out of the base."""
    decoded = unquote(path)
    segments = decoded.split("/")
    if any(s in (".", "..") for s in segments) or CONTROL.search(decoded):
        raise InvalidRequest(f"Path /v1/{quote(path)} is not allowed.")
    url = f"{base_url}/{quote(decoded, safe='/:@!$&()*+,;=-._~')}"
    if query:
        # Re-quote what must be (spaces, raw non-ASCII) and keep existing %-escapes.
        url += "?" + quote(query, safe="=&+%/:@!$'()*,;?-._~[]")
    return url


def request_headers(
    client_headers: Iterable[tuple[str, str]],
    api_key: str,
    content_type: str | None = None,
    stream: bool = False,
) -> dict[str, str]:
    """Headers for the upstream: the client's minus secrets and framing, plus the upstream key."""
    headers: dict[str, str] = {}
    for name, value in client_headers:
        if name.lower() not in DROP_REQUEST:
            headers[name] = value
    if content_type is not None:
        for name in [n for n in headers if n.lower() == "content-type"]:
            del headers[name]
        headers["Content-Type"] = content_type
    headers["Authorization"] = f"Bearer {api_key}"
    # Compressed event streams are buffered by the compressor; ask for them plain.
    headers["Accept-Encoding"] = "identity" if stream else "gzip, deflate"
    return headers


def response_headers(upstream_headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """Headers to pass back to the client."""
    return [(n, v) for n, v in upstream_headers.items() if n.lower() not in DROP_RESPONSE]


def encode_json(value: Any) -> bytes:
    """Encode a JSON body compactly as UTF-8; escape only when lone surrogates force it."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")
