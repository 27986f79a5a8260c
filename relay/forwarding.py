"""Forwarding one call upstream: retries before the first byte, then JSON, SSE or binary replies."""

import json
import logging
import time

import urllib3
from flask import Response
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ReadTimeoutError,
)

from relay import sse
from relay.errors import UpstreamError, UpstreamTimeout
from relay.request_body import encode_json
from relay.streaming import streamed_reply
from relay.upstream_http import request_headers, response_headers, send, upstream_url
from relay.usage import GENERATION_PATHS, estimated_usage, read_usage, reply_text

log = logging.getLogger("relay.forward")

# Statuses that say "this key or this upstream, right now" rather than "this request".
RETRY_STATUSES = {401, 403, 408, 409, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529}
MAX_ERROR_BODY = 1024 * 1024


def body_for(call, upstream):
    """The bytes and content type to send to one upstream, with our additions applied."""
    payload = call.json
    inject = (
        call.stream
        and upstream.stream_usage
        and call.path in GENERATION_PATHS
        and isinstance(payload, dict)
        and not call.client_wants_usage
    )
    if inject:
        options = payload.get("stream_options")
        options = dict(options) if isinstance(options, dict) else {}
        options["include_usage"] = True
        payload = {**payload, "stream_options": options}
    if payload is not None and (call.body_changed or inject):
        return encode_json(payload), "application/json", inject
    return call.body, None, False


def forward(state, call, client_headers, environ):
    """Send the call to the best target, retrying other keys/upstreams until a reply starts."""
    deadline = time.monotonic() + state.config["UPSTREAM_RETRY_BUDGET"]
    timeout = (state.config["UPSTREAM_CONNECT_TIMEOUT"], state.config["UPSTREAM_READ_TIMEOUT"])
    targets = state.router.targets(call.model)
    if len(targets) == 1:
        # A lone key gets a second try, but only after a broken connection (a pooled
        # keep-alive connection the upstream had just closed), never after an answer.
        targets = targets * 2
    targets = targets[: state.config["UPSTREAM_RETRIES"] + 1]
    failure = None
    broken = False
    for number, target in enumerate(targets):
        repeat = target in targets[:number]
        if number and (time.monotonic() >= deadline or (repeat and not broken)):
            break
        broken = False
        call.attempts += 1
        call.upstream_name = target.upstream.name
        data, content_type, injected = body_for(call, target.upstream)
        try:
            reply = send(
                state.http,
                call.method,
                upstream_url(target.upstream.base_url, call.path, call.query),
                request_headers(client_headers, target.api_key, content_type, call.stream),
                data,
                timeout,
            )
        except NewConnectionError as exc:  # refused, unreachable, unresolvable
            _unreachable(state, target, exc)
            failure = UpstreamError("The upstream could not be reached.")
            broken = True
            continue
        except ConnectTimeoutError:
            failure = UpstreamTimeout("The upstream did not accept a connection in time.")
            state.router.rest(target)
            continue
        except ReadTimeoutError:
            # The upstream took the request and went quiet: retrying could run it twice.
            raise UpstreamTimeout(
                "The upstream did not answer within "
                f"{state.config['UPSTREAM_READ_TIMEOUT']:g} s (RELAY_UPSTREAM_READ_TIMEOUT)."
            ) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:  # e.g. a pooled connection died
            _unreachable(state, target, exc)
            failure = UpstreamError("The upstream could not be reached.")
            broken = True
            continue
        later = [t for t in targets[number + 1 :] if t != target]
        if reply.status_code in RETRY_STATUSES and later:
            log.warning(
                "upstream %s key #%d answered %d; trying the next one",
                target.upstream.name,
                target.key_index,
                reply.status_code,
            )
            state.router.rest(target)
            reply.close()
            continue
        state.router.restore(target)
        return respond(state, call, reply, target, injected, environ)
    raise failure or UpstreamError("No upstream could take the call.")


def _unreachable(state, target, exc):
    """Log a failed attempt (never its URL or key) and let that key rest."""
    log.warning("upstream %s unreachable: %s", target.upstream.name, type(exc).__name__)
    state.router.rest(target)


def respond(state, call, reply, target, injected, environ):
    """Turn the upstream's reply into ours, choosing by status and content type."""
    call.status = reply.status_code
    call.upstream_request_id = reply.headers.get("x-request-id")
    content_type = reply.headers.get("Content-Type", "")
    if reply.status_code >= 400:
        return error_reply(call, reply, target)
    if content_type.startswith("text/event-stream"):
        tap = sse.EventTap(strip_usage_chunk=injected)
        return streamed_reply(state, call, reply, tap, environ)
    if "json" in content_type:
        return json_reply(call, reply, target)
    return streamed_reply(state, call, reply, None, environ)


def _redact(raw, target):
    """Remove the upstream key from bytes we pass on, should an upstream ever echo it."""
    secret = target.api_key.encode()
    return raw.replace(secret, b"[redacted]") if secret in raw else raw


def json_reply(call, reply, target):
    """Read a JSON reply whole, take its usage (or estimate it), and pass it on."""
    try:
        raw = reply.read()
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise _broken_reply(exc) from None
    finally:
        reply.close()
    call.mark_first_byte()
    generation = call.path in GENERATION_PATHS
    if generation or b'"usage"' in raw or call.reply_hook:
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            settle_json_usage(call, parsed, generation)
            if call.reply_hook:
                raw = call.reply_hook(call, parsed)
    raw = _redact(raw, target)
    call.bytes_out = len(raw)
    return Response(raw, reply.status_code, response_headers(reply.headers))


def settle_json_usage(call, parsed, generation):
    """Set the call's tokens from a parsed reply, estimating for generations without usage."""
    if isinstance(parsed.get("model"), str):
        call.model_served = parsed["model"]
    usage = read_usage(parsed.get("usage"))
    if usage:
        call.set_usage(usage, "upstream")
    elif generation:
        estimate = estimated_usage(call.json, reply_text(parsed))
        call.set_usage(read_usage(estimate), "estimated")
        call.estimated_usage = estimate


def error_reply(call, reply, target):
    """Pass an upstream's OpenAI-shaped 4xx through; wrap anything else in a clean 502."""
    try:
        raw = reply.raw.read(MAX_ERROR_BODY, decode_content=True) or b""
    except (urllib3.exceptions.HTTPError, OSError):
        raw = b""
    finally:
        reply.close()
    call.mark_first_byte()
    raw = _redact(raw, target)
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    shaped = isinstance(parsed, dict) and isinstance(parsed.get("error"), dict | str)
    if reply.status_code == 401:
        # The upstream refused the operator's key: not the client's business, and
        # its message may quote part of that key.
        log.error(
            "upstream %s rejected its API key #%d (401)", target.upstream.name, target.key_index
        )
        raise UpstreamError("The upstream rejected the relay's credentials; tell the operator.")
    if shaped and reply.status_code < 500:
        if call.reply_hook:
            raw = call.reply_hook(call, parsed)
        call.bytes_out = len(raw)
        return Response(raw, reply.status_code, response_headers(reply.headers))
    detail = ""
    if shaped:
        error = parsed["error"]
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str) and message:
            detail = f": {message[:300]}"
    raise UpstreamError(f"The upstream failed with HTTP {reply.status_code}{detail}")


def _broken_reply(exc):
    """The error for a reply that broke off before we had all of it."""
    if isinstance(exc, ReadTimeoutError | TimeoutError):
        return UpstreamTimeout("The upstream went silent in the middle of its reply.")
    return UpstreamError("The upstream broke off its reply.")
