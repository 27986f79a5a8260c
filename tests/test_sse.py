"""The SSE tap: events never split by us, usage taken and stripped, text estimated in folds."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.tokens import estimate_tokens
from relay.upstream.sse import FOLD_EVERY, EventTap


def event(payload, end=b"\n\n"):
    """One SSE data event."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + end


def chunk(text, usage=None):
    """A chat.completion.chunk carrying text (and "usage": null like OpenAI with usage on)."""
    return {
        "object": "chat.completion.chunk",
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": text}}],
        "usage": usage,
    }


USAGE = {
    "object": "chat.completion.chunk",
    "model": "gpt-4o-2024",
    "choices": [],
    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
}


def test_whole_events_only_even_when_split_across_reads():
    tap = EventTap()
    data = event(chunk("Hello")) + event(chunk(" world"))
    out = b"".join(tap.feed(data[i : i + 7]) for i in range(0, len(data), 7))
    assert out == data
    assert tap.feed(b"data: partial") == b"" and tap.flush() == b"data: partial"


def test_usage_chunk_taken_and_stripped_only_when_ours():
    stream = event(chunk("a")) + event(USAGE) + b"data: [DONE]\n\n"
    ours = EventTap(strip_usage_chunk=True)
    assert ours.feed(stream) == event(chunk("a")) + b"data: [DONE]\n\n"
    assert ours.usage["total_tokens"] == 7 and ours.model == "gpt-4o-2024" and ours.saw_done
    theirs = EventTap(strip_usage_chunk=False)
    assert theirs.feed(stream) == stream and theirs.usage["total_tokens"] == 7


def test_crlf_events_and_usage_inside_a_content_chunk_is_kept():
    stream = event(chunk("a", usage=USAGE["usage"]), end=b"\r\n\r\n") + b"data: [DONE]\r\n\r\n"
    tap = EventTap(strip_usage_chunk=True)
    assert tap.feed(stream) == stream  # choices not empty: not ours to drop
    assert tap.usage["prompt_tokens"] == 3


def test_long_stream_text_is_folded_into_an_estimate():
    tap = EventTap()
    words = [f" word{n} 你" for n in range(FOLD_EVERY * 3 + 17)]
    for piece in words:
        tap.feed(event(chunk(piece)))
    assert len(tap.text_parts) < FOLD_EVERY  # memory stays small
    whole = estimate_tokens("".join(words))
    assert abs(tap.completion_estimate() - whole) <= 4  # each fold rounds on its own


# Text a client may get the model to write: the end marker, alone or framed as an event.
END_MARKERS = ["[DONE]", "data: [DONE]", "\n\ndata: [DONE]\n\n", "data:[DONE]\r\n\r\n"]


def _stream_with(text):
    """A stream whose generated text holds `text`, then the usage chunk and the real end."""
    return event(chunk("before ")) + event(chunk(text)) + event(USAGE) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("marker", END_MARKERS)
def test_the_end_marker_inside_generated_text_is_not_the_end(marker):
    tap = EventTap(strip_usage_chunk=True)
    out = tap.feed(_stream_with(f"say {marker} please"))
    assert tap.saw_done
    assert tap.usage["total_tokens"] == 7  # the usage chunk after the text was seen
    assert out.endswith(b"data: [DONE]\n\n") and json.dumps(marker)[1:-1].encode() in out


@given(
    marker=st.sampled_from(END_MARKERS),
    cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=12),
    compact=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_the_end_is_the_done_event_however_the_reads_split(marker, cuts, compact):
    separators = (",", ":") if compact else (", ", ": ")

    def spaced(payload):
        return b"data: " + json.dumps(payload, separators=separators).encode() + b"\n\n"

    stream = (
        spaced(chunk(f"a {marker} b"))
        + spaced(chunk("more text"))
        + spaced(USAGE)
        + b"data: [DONE]\n\n"
        + b"data: after the end\n\n"
    )
    tap = EventTap(strip_usage_chunk=True)
    out, position = b"", 0
    for size in [*cuts, len(stream)]:
        piece = stream[position : position + size]
        position += len(piece)
        out += tap.feed(piece)
        if not tap.saw_done:
            assert b"data: [DONE]\n\n" not in out  # not ended early
    out += tap.flush()
    assert tap.saw_done and tap.usage["total_tokens"] == 7
    assert out.endswith(b"data: [DONE]\n\n")  # nothing after the end goes out
    assert tap.completion_estimate() >= estimate_tokens("a b more text")


def test_text_is_captured_with_spaces_around_the_colon():
    tap = EventTap()
    tap.feed(b'data: {"choices": [{"delta": {"content": "hello there world"}}]}\n\n')
    assert tap.saw_text and tap.completion_estimate() == estimate_tokens("hello there world")
