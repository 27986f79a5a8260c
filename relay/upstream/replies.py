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
from relay.upstream.client import UpstreamReply, request_id, response_headers
from relay.upstream.disconnect import DisconnectWatch
from relay.upstream.failures import classify
from relay.upstream.redact import redact, secret_of
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
    secret = secret_of(target.api_key)
    call.upstream_request_id = request_id(reply.headers, secret)
    content_type = reply.headers.get("Content-Type", "")
    if reply.status_code >= 400:
        return error_reply(call, reply, target, secret)
    is_sse = content_type.startswith("text/event-stream")
    if "json" in content_type and not is_sse:
        return json_reply(upstreams, call, reply, secret, environ)
    tap = sse.EventTap(strip_usage_chunk=injected) if is_sse else None
    headers, body = streamed_reply(upstreams, call, reply, tap, environ, sink, secret)
    return Relayed(reply.status_code, headers, body, streamed=True)


def json_reply(
    upstreams: "Upstreams",
    call: Call,
    reply: UpstreamReply,
    secret: bytes,
    environ: dict[str, Any],
) -> Relayed:
    """Read a JSON reply whole (at most RELAY_MAX_REPLY_BYTES) and take its usage (or
    estimate it); a client that leaves meanwhile closes the upstream connection."""
    cap = upstreams.config["MAX_REPLY_BYTES"]
    watch = DisconnectWatch(environ, reply.shut_down)
    try:
        raw = reply.read_capped(cap)
    except (RequestException, OSError) as exc:
        if watch.fired:
            call.outcome = "client_disconnected"
        raise classify(exc, "body", upstreams.config["UPSTREAM_READ_TIMEOUT"]).error from None
    finally:
        watch.stop()
        reply.close()  # a reply read only in part closes its connection
    if raw is None:
        log.warning("upstream %s sent a reply over %d bytes; cut", call.upstream_name, cap)
        raise UpstreamError(
            f"The upstream's reply is larger than the relay accepts ({cap} bytes, "
            "RELAY_MAX_REPLY_BYTES); it was not passed on."
        )
    call.mark_first_byte()
    relayed = Relayed(
        reply.status_code, response_headers(reply.headers, secret), redact(raw, secret)
    )
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


def error_reply(call: Call, reply: UpstreamReply, target: Target, secret: bytes) -> Relayed:
    """Pass an upstream's OpenAI-shaped 4xx through; wrap anything else in a clean 502."""
    try:
        raw = reply.read(MAX_ERROR_BODY)
    except (RequestException, OSError):
        raw = b""
    finally:
        reply.close()
    call.mark_first_byte()
    relayed = Relayed(
        reply.status_code, response_headers(reply.headers, secret), redact(raw, secret)
    )
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
