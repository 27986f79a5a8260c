"""The upstream key is redacted from streams however they are cut, and nothing else changes."""

import itertools

from hypothesis import given
from hypothesis import strategies as st

from relay.upstream.redact import REDACTED, KeyRedactor, redact, redact_text, secret_of

KEY = b"sk-upstream-0123456789abcdef"


def pieces(data, cuts):
    """data cut at the given positions."""
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@given(
    before=st.binary(max_size=60),
    after=st.binary(max_size=60),
    copies=st.integers(0, 3),
    cuts=st.lists(st.integers(0, 400), max_size=8),
)
def test_a_stream_cut_anywhere_comes_out_as_the_whole_body_redacted(before, after, copies, cuts):
    body = before + (KEY + after) * copies
    redactor = KeyRedactor(KEY)
    out = [redactor.feed(piece) for piece in pieces(body, cuts)]
    out.append(redactor.flush())
    assert b"".join(out) == redact(body, KEY)
    assert KEY not in b"".join(out)
    for chunk in out:  # no piece the client gets carries a piece of the key of 6 bytes or more
        for n in range(len(KEY) - 5):
            if KEY[n : n + 6] in chunk:
                assert KEY[n : n + 6] in before + after


def test_only_a_tail_that_starts_the_key_is_held_back():
    redactor = KeyRedactor(KEY)
    assert redactor.feed(b"data: sk-up") == b"data: "
    assert redactor.feed(b"side") == b"sk-upside"  # it was not the key
    assert redactor.feed(b"plain text") == b"plain text"
    assert redactor.feed(b"x" + KEY[:-1]) == b"x"
    assert redactor.feed(KEY[-1:] + b"!") == REDACTED + b"!"


def test_placeholder_keys_are_not_searched_for():
    assert secret_of("x") == b""
    assert redact(b"xxx", secret_of("x")) == b"xxx"
    assert secret_of(KEY.decode()) == KEY


def test_header_values_are_redacted_as_their_wire_bytes():
    key = "sk-upstream-é-0123456789"  # a non-ASCII key: its UTF-8 bytes, read as latin-1
    secret = secret_of(key)
    wire = f"Bearer {key}".encode().decode("latin-1")
    assert redact_text(wire, secret) == "Bearer [redacted]"
    assert redact_text("req_42", secret) == "req_42"
    assert redact_text(wire, b"") == wire
