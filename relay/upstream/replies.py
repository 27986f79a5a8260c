"""Turning an upstream's answer into the relay's: whole JSON, passed-through errors, or streams."""

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from requests.exceptions import RequestException

from relay.call import Call
from relay.errors import UpstreamError
from relay.metering import measure_units, unit_of
from relay.tokens import GENERATION_PATHS, reply_text
from relay.upstream import sse
from relay.upstream.client import UpstreamReply, response_headers
from relay.upstream.failures import classify
from relay.upstream.routing import Target
from relay.upstream.streaming import streamed_reply
from relay.upstream.usage import take_usage

if TYPE_CHECKING:  # the entry point imports this module; typing only
    from relay.upstream import Upstreams
    from relay.upstream.forwarding import CallSink

log = logging.getLogger("relay.forward")
MAX_ERROR_BODY = 1024 * 1024
_UNPARSED = object()


@dataclass
class Relayed:
    """What the upstream answered, ready to send: a whole body, or a stream of bytes."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes | Iterable[bytes]
    streamed: bool = False
    _parsed: Any = field(default=_UNPARSED, repr=False)

    def json(self) -> dict[str, Any] | None:
        """A whole body parsed as a JSON object (parsed once), or None."""
        if self._parsed is _UNPARSED:
            try:
                value = json.loads(self.body) if isinstance(self.body, bytes) else None
            except ValueError:
                value = None
            self._parsed = value if isinstance(value, dict) else None
        return self._parsed  # type: ignore[no-any-return]


def respond(
    upstreams: "Upstreams",
    call: Call,
    reply: UpstreamReply,
    target: Target,
    injected: bool,
    environ: dict[str, Any],
    sink: "CallSink",
) -> Relayed:
    """Turn the upstream's reply into ours, choosing by status and content type."""
    call.status = reply.status_code
    call.upstream_request_id = reply.headers.get("x-request-id")
    content_type = reply.headers.get("Content-Type", "")
    if reply.status_code >= 400:
        return error_reply(call, reply, target)
    is_sse = content_type.startswith("text/event-stream")
    if "json" in content_type and not is_sse:
        return json_reply(upstreams, call, reply, target)
    tap = sse.EventTap(strip_usage_chunk=injected) if is_sse else None
    headers, body = streamed_reply(upstreams, call, reply, tap, environ, sink)
    return Relayed(reply.status_code, headers, body, streamed=True)


def _redact(raw: bytes, target: Target) -> bytes:
    """Remove the upstream key from bytes we pass on, should an upstream ever echo it."""
    secret = target.api_key.encode()
    return raw.replace(secret, b"[redacted]") if secret in raw else raw


def json_reply(upstreams: "Upstreams", call: Call, reply: UpstreamReply, target: Target) -> Relayed:
    """Read a JSON reply whole and take its usage (or estimate it)."""
    try:
        raw = reply.read()
    except (RequestException, OSError) as exc:
        raise classify(exc, "body", upstreams.config["UPSTREAM_READ_TIMEOUT"]).error from None
    finally:
        reply.close()
    call.mark_first_byte()
    relayed = Relayed(reply.status_code, response_headers(reply.headers), _redact(raw, target))
    generation = call.path in GENERATION_PATHS
    if generation or b'"usage"' in raw or unit_of(call.path):
        parsed = relayed.json()
        if parsed is not None:
            settle_json_usage(call, parsed, generation)
    return relayed


def settle_json_usage(call: Call, parsed: dict[str, Any], generation: bool) -> None:
    """Set the call's tokens from a parsed reply, estimating for generations without usage."""
    if isinstance(parsed.get("model"), str):
        call.model_served = parsed["model"]
    take_usage(
        call, parsed.get("usage"), generation, text=reply_text(parsed) if generation else None
    )
    measure_units(call, parsed)


def error_reply(call: Call, reply: UpstreamReply, target: Target) -> Relayed:
    """Pass an upstream's OpenAI-shaped 4xx through; wrap anything else in a clean 502."""
    try:
        raw = reply.read(MAX_ERROR_BODY)
    except (RequestException, OSError):
        raw = b""
    finally:
        reply.close()
    call.mark_first_byte()
    relayed = Relayed(reply.status_code, response_headers(reply.headers), _redact(raw, target))
    parsed = relayed.json()
    shaped = parsed is not None and isinstance(parsed.get("error"), dict | str)
    if reply.status_code == 401:
        # The upstream refused the operator's key: not the client's business, and
        # its message may quote part of that key.
        log.error(
            "upstream %s rejected its API key #%d (401)", target.upstream.name, target.key_index
        )
        raise UpstreamError("The upstream rejected the relay's credentials; tell the operator.")
    if shaped and reply.status_code < 500:
        return relayed
    detail = ""
    if shaped and parsed is not None:
        error = parsed["error"]
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str) and message:
            detail = f": {message[:300]}"
    raise UpstreamError(f"The upstream failed with HTTP {reply.status_code}{detail}")
