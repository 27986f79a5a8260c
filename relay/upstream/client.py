"""Talking HTTP to upstreams through requests: prepared requests, replies, and which headers cross.

Every upstream call (forwarding, streams, the /models union, `upstreams check`) is a
PreparedRequest sent by the one UpstreamAdapter (adapter.py) with `stream=True`; the reply
is a requests Response whose body the relay reads itself, off `Response.raw`.
"""

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import quote, unquote

from requests import PreparedRequest, Response
from requests.structures import CaseInsensitiveDict

from relay.errors import InvalidRequest
from relay.upstream.adapter import UpstreamAdapter, body_chunks, read_body, shut_down

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
# and framing requests recomputes.
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
# Upstream headers that must not reach the client: framing of a body the relay already
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


def make_adapter(pool_size: int) -> UpstreamAdapter:
    """The adapter every upstream call goes through: a pooled connection per concurrent stream."""
    return UpstreamAdapter(pool_size)


class UpstreamReply:
    """An upstream's answer: status and headers now, the body when it is read."""

    __slots__ = ("headers", "response", "status_code")

    def __init__(self, response: Response) -> None:
        self.response = response  # sent with stream=True: the body is not read yet
        self.status_code = response.status_code
        self.headers = response.headers  # case-insensitive

    def read(self, limit: int | None = None) -> bytes:
        """The whole body (or its first `limit` bytes), decoded (gzip and the like)."""
        return read_body(self.response, limit)

    def chunks(self) -> Iterator[bytes]:
        """The body as it arrives, straight off the socket."""
        return body_chunks(self.response)

    def shut_down(self) -> None:
        """Wake a read blocked on the body at once (the client hung up)."""
        shut_down(self.response)

    def close(self) -> None:
        """Done with it: a fully read reply's connection is already back in the pool;
        one read only in part is closed, never reused mid-body."""
        self.response.close()


def prepare(
    method: str, url: str, headers: Mapping[str, str], body: bytes | None
) -> PreparedRequest:
    """A PreparedRequest carrying the call as it is: no cookies, auth or hooks to add.

    The URL is set as upstream_url built and quoted it, and the headers as
    request_headers checked them: requests' prepare_url and prepare_headers would parse,
    requote and validate both a second time, ~140 000 instructions a call (callgrind),
    half of all that requests adds to one. prepare_method and prepare_body do the rest
    (the method's case; Content-Length, 0 for an empty POST).
    """
    prepared = PreparedRequest()
    prepared.prepare_method(method)
    prepared.url = url
    prepared.headers = CaseInsensitiveDict(headers)
    prepared.prepare_body(body or None, None)
    return prepared


def send(
    adapter: UpstreamAdapter,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    timeout: tuple[float, float],
) -> UpstreamReply:
    """Send one request; return its UpstreamReply as soon as the status and headers are in.

    No retries or redirects here: forwarding decides what may be tried again. Errors are
    requests' own (ConnectionError, ConnectTimeout, ReadTimeout, ...).
    """
    response = adapter.send(prepare(method, url, headers, body), stream=True, timeout=timeout)
    return UpstreamReply(response)


def get(
    adapter: UpstreamAdapter,
    url: str,
    headers: Mapping[str, str],
    timeout: tuple[float, float],
) -> tuple[int, bytes]:
    """A small GET read whole (model lists, checks); returns (status, body bytes)."""
    reply = send(adapter, "GET", url, headers, None, timeout)
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
            if "\n" in value or "\r" in value:  # gunicorn never passes one; other servers might
                raise InvalidRequest("A request header has a line break; it cannot be forwarded.")
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
