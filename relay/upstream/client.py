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
from relay.upstream.adapter import UpstreamAdapter, body_chunks, read_body, read_capped, shut_down
from relay.upstream.redact import redact_text

# Client headers that go up to the upstream: what OpenAI's API reads from a caller.
# Everything else stays here (an allow-list, not a deny-list: X-HTTP-Method-Override,
# X-Original-URL, True-Client-IP, cookies, the client's own key, where it came from...);
# the relay adds the upstream key, Accept-Encoding, and the framing requests computes.
CLIENT_HEADERS = frozenset(
    ["content-type", "accept", "user-agent", "openai-beta", "idempotency-key"]
)
CLIENT_PREFIXES = ("x-stainless-",)  # the OpenAI SDKs' own telemetry (language, retry count...)
# Upstream headers that come back to the client; nothing else does (X-Accel-Redirect,
# Location, Refresh, Access-Control-*, Set-Cookie, the account's rate limits...).
UPSTREAM_HEADERS = frozenset(
    [
        "content-type",
        "content-disposition",
        "x-request-id",
        "openai-processing-ms",
        "openai-version",
        "openai-model",
    ]
)
# What gunicorn sends as a header value (its own check, less the tab): anything else would
# make it answer with its HTML 500 page instead of the reply.
HEADER_VALUE = re.compile(r"[\x20-\x7e\x80-\xff]*")
HEADER_CONTROLS = re.compile(r"[^\x20-\x7e\x80-\xff]")
MAX_REQUEST_ID = 200  # characters of the upstream's x-request-id kept in a usage row
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

    def read_capped(self, cap: int) -> bytes | None:
        """The whole body decoded, or None as soon as it passes `cap` bytes."""
        return read_capped(self.response, cap)

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
    """Headers for the upstream: the client's allowed ones, plus the upstream key."""
    given = list(client_headers)
    # A header the client names in Connection is hop-by-hop: meant for us, not the upstream.
    hop = {
        item.strip().lower()
        for name, value in given
        if name.lower() == "connection"
        for item in value.split(",")
    }
    headers: dict[str, str] = {}
    for name, value in given:
        lower = name.lower()
        if (lower in CLIENT_HEADERS or lower.startswith(CLIENT_PREFIXES)) and lower not in hop:
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


def response_headers(
    upstream_headers: Mapping[str, str], secret: bytes = b""
) -> list[tuple[str, str]]:
    """The upstream's allowed headers for the client, each value one gunicorn can send.

    A value with a control byte is dropped (the Content-Type cleaned instead: the client
    needs one); the upstream key, should a value carry it, is redacted.
    """
    passed = []
    for name, value in upstream_headers.items():
        lower = name.lower()
        if lower not in UPSTREAM_HEADERS:
            continue
        if HEADER_VALUE.fullmatch(value):
            passed.append((name, redact_text(value, secret)))
        elif lower == "content-type":
            passed.append((name, redact_text(HEADER_CONTROLS.sub("", value), secret)))
    return passed


def request_id(upstream_headers: Mapping[str, str], secret: bytes = b"") -> str | None:
    """The upstream's x-request-id for the usage row: printable, short, never the key."""
    value = upstream_headers.get("x-request-id")
    if not value:
        return None
    return HEADER_CONTROLS.sub("", redact_text(value, secret))[:MAX_REQUEST_ID] or None


def encode_json(value: Any) -> bytes:
    """Encode a JSON body compactly as UTF-8; escape only when lone surrogates force it."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")
