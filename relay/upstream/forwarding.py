"""Forwarding one call: choose the targets worth trying, then one attempt at a time."""

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from requests.exceptions import RequestException

from relay.call import Call
from relay.errors import RelayError, UpstreamError
from relay.tokens import GENERATION_PATHS
from relay.upstream.client import (
    UpstreamReply,
    encode_json,
    request_headers,
    send,
    upstream_url,
)
from relay.upstream.failures import classify
from relay.upstream.replies import Relayed, respond
from relay.upstream.routing import Target
from relay.upstreams_file import Upstream

if TYPE_CHECKING:  # the entry point imports this module; typing only
    from relay.upstream import Upstreams

log = logging.getLogger("relay.forward")

# Statuses that say "this key or this upstream, right now" rather than "this request".
RETRY_STATUSES = {401, 403, 408, 409, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529}


class CallSink(Protocol):
    """What a relayed stream reports to: its start, and its end (exactly once)."""

    def stream_opened(self, call: Call) -> None:
        """A streamed reply started."""

    def progress(self, call: Call, completion_estimate: int) -> None:
        """A stream got this far (noted for the row left if the worker dies)."""

    def complete(self, call: Call) -> None:
        """The call ended: record its usage row and release what it held."""


class AttemptFailed(Exception):
    """One attempt failed in a way another key or upstream might not: try the next target."""

    def __init__(self, error: RelayError | None, broken: bool) -> None:
        super().__init__(error.message if error else "retry")
        self.error = error  # what the client hears if no later target answers (None: keep)
        self.broken = broken  # no answer at all (a refused or dead connection)


def body_for(call: Call, upstream: Upstream) -> tuple[bytes, str | None, bool]:
    """(bytes, content type, usage injected) to send to one upstream, our additions applied."""
    payload = call.json
    inject = (
        call.stream_requested
        and upstream.stream_usage
        and call.path in GENERATION_PATHS
        and isinstance(payload, dict)
        and not call.client_wants_usage
    )
    if inject and payload is not None:
        options = payload.get("stream_options")
        options = dict(options) if isinstance(options, dict) else {}
        options["include_usage"] = True
        payload = {**payload, "stream_options": options}
    if payload is not None and (call.body_changed or inject):
        return encode_json(payload), "application/json", inject
    return call.body, None, False


def choose_targets(upstreams: "Upstreams", call: Call) -> list[Target]:
    """The targets to try for a call, best first, cut to RELAY_UPSTREAM_RETRIES + 1."""
    targets = upstreams.router.targets(call.model)
    if len(targets) == 1:
        # A lone key gets a second try, but only after a broken connection (a pooled
        # keep-alive connection the upstream had just closed), never after an answer.
        targets = targets * 2
    return targets[: upstreams.config["UPSTREAM_RETRIES"] + 1]


def forward(
    upstreams: "Upstreams",
    call: Call,
    client_headers: Iterable[tuple[str, str]],
    environ: dict[str, Any],
    sink: CallSink,
) -> Relayed:
    """Try the targets in turn until one answers; its reply (whole or streamed) is ours."""
    headers = list(client_headers)
    deadline = time.monotonic() + upstreams.config["UPSTREAM_RETRY_BUDGET"]
    targets = choose_targets(upstreams, call)
    failure: RelayError | None = None
    broken = False
    for number, target in enumerate(targets):
        repeat = target in targets[:number]
        if number and (time.monotonic() >= deadline or (repeat and not broken)):
            break
        later = [t for t in targets[number + 1 :] if t != target]
        try:
            reply, injected = attempt(upstreams, call, target, headers, retry_left=bool(later))
        except AttemptFailed as failed:
            failure, broken = failed.error or failure, failed.broken
            continue
        upstreams.router.restore(target)
        return respond(upstreams, call, reply, target, injected, environ, sink)
    raise failure or UpstreamError("No upstream could take the call.")


def attempt(
    upstreams: "Upstreams",
    call: Call,
    target: Target,
    client_headers: list[tuple[str, str]],
    retry_left: bool,
) -> tuple[UpstreamReply, bool]:
    """Send the call to one target: its reply, or AttemptFailed when another might do better."""
    config = upstreams.config
    call.attempts += 1
    call.upstream_name = target.upstream.name
    data, content_type, injected = body_for(call, target.upstream)
    timeout = (config["UPSTREAM_CONNECT_TIMEOUT"], config["UPSTREAM_READ_TIMEOUT"])
    try:
        reply = send(
            upstreams.http,
            call.method,
            upstream_url(target.upstream.base_url, call.path, call.query),
            request_headers(client_headers, target.api_key, content_type, call.stream_requested),
            data,
            timeout,
        )
    except (RequestException, OSError) as exc:
        failed = classify(exc, "send", config["UPSTREAM_READ_TIMEOUT"])
        if failed.rest:
            # Never the URL or the key in the log: the upstream's name and what failed.
            log.warning("upstream %s unreachable: %s", target.upstream.name, type(exc).__name__)
            upstreams.router.rest(target)
        if not failed.retry:
            raise failed.error from None
        raise AttemptFailed(failed.error, failed.broken) from None
    if reply.status_code in RETRY_STATUSES and retry_left:
        log.warning(
            "upstream %s key #%d answered %d; trying the next one",
            target.upstream.name,
            target.key_index,
            reply.status_code,
        )
        upstreams.router.rest(target)
        reply.close()
        raise AttemptFailed(None, False)
    return reply, injected
