"""Streaming replies: bytes go out as they arrive; the call completes however the stream ends."""

import time
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

from requests.exceptions import RequestException

from relay.call import Call, Outcome
from relay.tokens import GENERATION_PATHS, estimate_usage, read_usage
from relay.upstream import sse
from relay.upstream.client import UpstreamReply, response_headers
from relay.upstream.disconnect import DisconnectWatch
from relay.upstream.failures import classify

if TYPE_CHECKING:  # the modules below import this one; typing only
    from relay.upstream import Upstreams
    from relay.upstream.forwarding import CallSink

STREAM_HEADERS = [("X-Accel-Buffering", "no"), ("Cache-Control", "no-cache")]
BROKEN = (RequestException, OSError)  # RequestException is an OSError too: said for clarity


def streamed_reply(
    upstreams: "Upstreams",
    call: Call,
    reply: UpstreamReply,
    tap: sse.EventTap | None,
    environ: dict[str, Any],
    sink: "CallSink",
) -> tuple[list[tuple[str, str]], "StreamedBody"]:
    """Headers and body streaming an SSE (tap given) or binary upstream reply as it arrives."""
    call.reply_streamed = True
    upstreams.pacer.start()
    sink.stream_opened(call)  # e.g. the open-streams gauge; completing the call lowers it
    headers = response_headers(reply.headers)
    if tap is not None:
        headers = [h for h in headers if h[0].lower() != "cache-control"] + STREAM_HEADERS
    return headers, StreamedBody(upstreams, call, reply, tap, environ, sink)


class StreamedBody:
    """The WSGI body of a stream. Whatever ends it (the upstream, an error, the client
    hanging up, even before the first byte) completes the call exactly once."""

    def __init__(
        self,
        upstreams: "Upstreams",
        call: Call,
        reply: UpstreamReply,
        tap: sse.EventTap | None,
        environ: dict[str, Any],
        sink: "CallSink",
    ) -> None:
        self.upstreams = upstreams
        self.call = call
        self.reply = reply
        self.tap = tap
        self.environ = environ
        self.sink = sink
        self.client_gone = False
        self._generator: Generator[bytes, None, None] | None = None

    def __iter__(self) -> Iterator[bytes]:
        self._generator = self._generate()
        return self._generator

    def close(self) -> None:
        """Called by the WSGI server when the response ends, normally or not."""
        if self._generator is not None:
            self._generator.close()
        self.reply.close()
        self.finish("client_disconnected")

    def hang_up(self) -> None:
        """The client left: wake the read blocked on the upstream so the stream ends now."""
        self.client_gone = True
        self.reply.shut_down()

    def finish(self, outcome: Outcome) -> None:
        """Complete the call once: tokens from the stream, then the usage row."""
        call = self.call
        if call.completed:
            return
        call.outcome = outcome
        if self.tap is not None:
            settle_stream_usage(call, self.tap)
        self.sink.complete(call)

    def _generate(self) -> Generator[bytes, None, None]:
        """Pass bytes on; write the row before [DONE]; end a broken stream with an error event."""
        call, tap, pacer = self.call, self.tap, self.upstreams.pacer
        watch = DisconnectWatch(self.environ, self.hang_up)
        try:
            for data in self.reply.chunks():
                out = tap.feed(data) if tap is not None else data
                if not out:
                    continue
                if tap is not None and tap.saw_done:
                    self.finish("ok")  # the row exists before the client sees [DONE]
                call.mark_first_byte()
                call.bytes_out += len(out)
                yield out
                pause = pacer.pause()
                if pause and not (tap is not None and tap.saw_done):
                    time.sleep(pause)  # the loop is late: let the next events gather
            rest = tap.flush() if tap is not None else b""
            if rest:
                call.bytes_out += len(rest)
                yield rest
            self.finish("ok")
        except GeneratorExit:
            self.finish("client_disconnected")
            raise
        except BROKEN as exc:
            event = self._broken(exc)
            if event:
                yield event
        finally:
            watch.stop()
            self.reply.close()

    def _broken(self, exc: OSError) -> bytes | None:
        """Complete a stream the upstream (or the client) broke; return the error event to send."""
        if self.client_gone:
            self.finish("client_disconnected")
            return None
        failed = classify(exc, "stream", self.upstreams.config["UPSTREAM_READ_TIMEOUT"])
        event = None
        if self.tap is not None:
            event = sse.error_event(failed.error.message, failed.outcome)
            self.call.bytes_out += len(event)
        self.finish(failed.outcome)
        return event


def settle_stream_usage(call: Call, tap: sse.EventTap) -> None:
    """Tokens of a finished stream: the upstream's usage chunk, else the estimate rule."""
    if tap.model:
        call.model_served = tap.model
    usage = read_usage(tap.usage)
    if usage:
        call.set_usage(usage, "upstream")
    elif call.path in GENERATION_PATHS or tap.saw_text:
        estimate = estimate_usage(call.json, completion_tokens=tap.completion_estimate())
        call.set_usage(estimate, "estimated")
