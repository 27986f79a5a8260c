"""Server-sent events passthrough: frame events, pick out usage and text, drop what is ours."""

import json
import re
from typing import Any

from relay.errors import error_body
from relay.tokens import estimate_tokens

EVENT_END = re.compile(rb"\r?\n\r?\n")
# Generated text inside chunks; only kept so usage can be estimated when none arrives.
# Upstreams write `"content":"…"` or `"content": "…"`: white space around the colon is fine.
TEXT_FIELD = re.compile(
    rb'"(?:content|text|arguments|reasoning_content|refusal|delta)"\s*:\s*"((?:[^"\\]|\\.)*)"'
)
USAGE_MARK = re.compile(rb'"usage"\s*:')
NULL_USAGE = re.compile(rb'"usage"\s*:\s*null')
# The stream's end is an event whose data is exactly [DONE]; these bytes inside generated
# text (JSON-escaped in a chunk's data) are not it.
DONE_MARK = b"[DONE]"
# Captured text is folded into a running token estimate this often, so a very long
# stream keeps a few kilobytes, not every piece it ever carried.
FOLD_EVERY = 256


class EventTap:
    """Watches an SSE byte stream as it passes through.

    feed() returns the bytes to send now: whole events only, so an event is never
    split by us (clients act on whole events anyway) and one event can be dropped:
    the usage chunk the relay asked for on the client's behalf. Only events that
    mention usage are parsed as JSON; the rest are scanned with one regex.
    """

    def __init__(self, strip_usage_chunk: bool = False) -> None:
        self.strip_usage_chunk = strip_usage_chunk
        self.pending = b""
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self.text_parts: list[bytes] = []
        self.folded_tokens = 0
        self.saw_text = False
        self.saw_done = False  # the [DONE] event went by: nothing after it is relayed

    def feed(self, data: bytes) -> bytes:
        """Take bytes from upstream; return the complete events among them (maybe b'')."""
        if self.saw_done:
            return b""
        buffer = self.pending + data if self.pending else data
        cut = _last_event_end(buffer)
        if not cut:
            self.pending = buffer
            return b""
        complete, self.pending = buffer[:cut], buffer[cut:]
        return self._inspect(complete)

    def flush(self) -> bytes:
        """Return whatever is left when the upstream closes (an unterminated last event)."""
        rest, self.pending = self.pending, b""
        return self._inspect(rest) if rest and not self.saw_done else b""

    def _inspect(self, complete: bytes) -> bytes:
        """Note usage, text and the end event in complete events; drop our usage chunk."""
        if DONE_MARK in complete:
            done_at = _done_event_end(complete)
            if done_at:
                complete, self.saw_done = complete[:done_at], True
        found = TEXT_FIELD.findall(complete)
        if found:
            self.saw_text = True
            self.text_parts.extend(found)
            if len(self.text_parts) >= FOLD_EVERY:
                self._fold()
        mentions = len(USAGE_MARK.findall(complete))
        if not mentions or mentions == len(NULL_USAGE.findall(complete)):
            return complete  # no usage here, or only the "usage":null of every chunk
        kept: list[bytes] = []
        position = 0
        for end in EVENT_END.finditer(complete):
            event = complete[position : end.end()]
            position = end.end()
            if self._take_usage(event):
                continue
            kept.append(event)
        if position < len(complete):
            kept.append(complete[position:])
        return b"".join(kept)

    def _take_usage(self, event: bytes) -> bool:
        """Record usage found in one event; True when the event should be dropped."""
        if not USAGE_MARK.search(event) or NULL_USAGE.search(event):
            return False
        payload = event_data(event)
        if payload is None:
            return False
        try:
            chunk = json.loads(payload)
        except ValueError:
            return False
        if not isinstance(chunk, dict):
            return False
        usage = chunk.get("usage")
        response = chunk.get("response")
        if not isinstance(usage, dict) and isinstance(response, dict):
            usage = response.get("usage")  # Responses API: usage rides on response.completed
        if not isinstance(usage, dict):
            return False
        self.usage = usage
        self.model = chunk.get("model") or self.model
        # Only the extra chat/completions chunk (choices == []) is ours to drop.
        return self.strip_usage_chunk and chunk.get("choices") == []

    def _fold(self) -> None:
        """Turn the captured pieces into tokens (estimate rule) and let them go."""
        pieces: list[str] = []
        for raw in self.text_parts:
            try:
                pieces.append(json.loads(b'"' + raw + b'"'))
            except ValueError:
                pieces.append(raw.decode("utf-8", "replace"))
        self.folded_tokens += estimate_tokens("".join(pieces))
        self.text_parts = []

    def completion_estimate(self) -> int:
        """Estimated tokens of everything the upstream generated so far."""
        self._fold()
        return self.folded_tokens


def _last_event_end(buffer: bytes) -> int:
    """Offset just past the last blank line (event end) in buffer, or 0 when there is none."""
    if b"\r" not in buffer:  # the common case: plain \n line ends, no regex needed
        end = buffer.rfind(b"\n\n")
        return end + 2 if end >= 0 else 0
    last = None
    for last in EVENT_END.finditer(buffer):  # noqa: B007 - only the last one matters
        pass
    return last.end() if last else 0


def _done_event_end(buffer: bytes) -> int:
    """Offset just past the first event whose data is exactly [DONE], or 0 when there is none."""
    position = 0
    for end in EVENT_END.finditer(buffer):
        if event_data(buffer[position : end.start()]) == DONE_MARK:
            return end.end()
        position = end.end()
    if position < len(buffer) and event_data(buffer[position:]) == DONE_MARK:
        return len(buffer)  # an unterminated last event (flush)
    return 0


def event_data(event: bytes) -> bytes | None:
    """The joined `data:` lines of one SSE event, or None."""
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def error_event(message: str, code: str, type_: str = "upstream_error") -> bytes:
    """A final SSE event carrying an OpenAI-shaped error, for streams the upstream broke."""
    body = error_body(message, type_, code)
    return b"data: " + json.dumps(body).encode() + b"\n\n"
