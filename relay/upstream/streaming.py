"""Streaming replies: bytes go out as they arrive; the call completes however the stream ends."""

import time
import weakref
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

from requests.exceptions import RequestException

from relay.call import Call, Outcome
from relay.tokens import GENERATION_PATHS
from relay.upstream import sse
from relay.upstream.client import UpstreamReply, response_headers
from relay.upstream.disconnect import DisconnectWatch
from relay.upstream.failures import classify
from relay.upstream.redact import KeyRedactor
from relay.upstream.usage import take_usage

if TYPE_CHECKING:  # the modules below import this one; typing only
    from relay.upstream import Upstreams
    from relay.upstream.forwarding import CallSink

STREAM_HEADERS = [("X-Accel-Buffering", "no"), ("Cache-Control", "no-cache")]
PROGRESS_EVERY = 10.0  # seconds between notes of a running stream's progress
MAX_AFTER_DONE = 65536  # bytes read (and dropped) after [DONE] before the upstream is cut
# The streams this worker is relaying, so that a graceful stop can end the last ones cleanly.
LIVE: "weakref.WeakSet[StreamedBody]" = weakref.WeakSet()
BROKEN = (RequestException, OSError)  # RequestException is an OSError too: said for clarity


def streamed_reply(
    upstreams: "Upstreams",
    call: Call,
    reply: UpstreamReply,
    tap: sse.EventTap | None,
    environ: dict[str, Any],
    sink: "CallSink",
    secret: bytes = b"",
) -> tuple[list[tuple[str, str]], "StreamedBody"]:
    """Headers and body streaming an SSE (tap given) or binary upstream reply as it arrives;
    `secret` (the upstream key) is redacted from both."""
    call.reply_streamed = True
    upstreams.pacer.start()
    sink.stream_opened(call)  # e.g. the open-streams gauge; completing the call lowers it
    headers = response_headers(reply.headers, secret)
    if tap is not None:
        headers += STREAM_HEADERS
    redactor = KeyRedactor(secret) if secret else None
    return headers, StreamedBody(upstreams, call, reply, tap, environ, sink, redactor)


def cut_all() -> int:
    """End every stream this worker is relaying, each with an error event and a `shutdown`
    row (a graceful stop that is about to run out of time); how many there were."""
    streams = list(LIVE)
    for stream in streams:
        stream.cut()
    return len(streams)


class StreamedBody:
    """The WSGI body of a stream. Whatever ends it (the upstream, an error, the client
    hanging up, a shutdown, even before the first byte) completes the call exactly once."""

    def __init__(
        self,
        upstreams: "Upstreams",
        call: Call,
        reply: UpstreamReply,
        tap: sse.EventTap | None,
        environ: dict[str, Any],
        sink: "CallSink",
        redactor: KeyRedactor | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.call = call
        self.reply = reply
        self.tap = tap
        self.environ = environ
        self.sink = sink
        self.redactor = redactor
        self.client_gone = False
        self.cut_short = False  # ended by a shutdown that could not wait for it
        self.progress_at: float | None = None  # when progress was last noted
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

    def cut(self) -> None:
        """The worker must stop: wake the upstream read so the stream ends with an event."""
        self.cut_short = True
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
        passed = self._passed()
        watch = DisconnectWatch(self.environ, self.hang_up)
        after_done = 0
        LIVE.add(self)
        try:
            for data in self.reply.chunks():
                if tap is not None and tap.saw_done:
                    # Only the end of the body (its last chunk) should follow; read it so the
                    # connection can be reused, but relay nothing and read no more than a bit.
                    after_done += len(data)
                    if after_done > MAX_AFTER_DONE:
                        break
                    continue
                out = passed(data)
                if not out:
                    continue
                call.mark_first_byte()
                call.bytes_out += len(out)
                if tap is not None and tap.saw_done:
                    self.finish("ok")  # the row exists before the client sees [DONE]
                else:
                    self._note_progress()
                yield out
                pause = pacer.pause()
                if pause and not (tap is not None and tap.saw_done):
                    time.sleep(pause)  # the loop is late: let the next events gather
            rest = self._rest()
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
            LIVE.discard(self)
            watch.stop()
            self.reply.close()

    def _note_progress(self) -> None:
        """At the first byte and then now and then: how far the stream got, for its in-flight
        row (the row written if this worker dies before the stream ends)."""
        now = time.monotonic()
        if self.progress_at is not None and now - self.progress_at < PROGRESS_EVERY:
            return
        self.progress_at = now
        estimate = self.tap.completion_estimate() if self.tap is not None else 0
        self.sink.progress(self.call, estimate)

    def _passed(self) -> Callable[[bytes], bytes]:
        """What of each upstream read goes to the client: whole events (tap), the key
        redacted (redactor), or the bytes as they came."""
        tap, redactor = self.tap, self.redactor
        if tap is None:
            return redactor.feed if redactor is not None else _unchanged
        if redactor is None:
            return tap.feed
        feed = redactor.feed
        return lambda data: feed(tap.feed(data))

    def _rest(self) -> bytes:
        """What the tap and the redactor held back when the upstream ended its body."""
        rest = self.tap.flush() if self.tap is not None else b""
        if self.redactor is not None:
            rest = self.redactor.feed(rest) + self.redactor.flush()
        return rest

    def _broken(self, exc: OSError) -> bytes | None:
        """Complete a stream the upstream (or the client) broke; return the error event to send."""
        if self.client_gone:
            self.finish("client_disconnected")
            return None
        failed = classify(exc, "stream", self.upstreams.config["UPSTREAM_READ_TIMEOUT"])
        outcome, message = failed.outcome, failed.error.message
        if self.cut_short:
            outcome = "shutdown"
            message = "The relay is restarting and could not wait for this stream; retry."
        event = None
        if self.tap is not None:
            kind = "server_error" if self.cut_short else "upstream_error"
            event = sse.error_event(message, outcome, kind)
            self.call.bytes_out += len(event)
        self.finish(outcome)
        return event


def _unchanged(data: bytes) -> bytes:
    """The bytes as they came (a binary body with no key to look for)."""
    return data


def settle_stream_usage(call: Call, tap: sse.EventTap) -> None:
    """Tokens of a finished stream: the upstream's usage chunk, else the estimate rule."""
    if tap.model:
        call.model_served = tap.model
    generated = call.path in GENERATION_PATHS or tap.saw_text
    take_usage(call, tap.usage, generated, completion_tokens=tap.completion_estimate)
