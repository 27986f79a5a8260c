"""Taking a call's usage from what the upstream reported, checked, else from the estimate."""

import logging
from collections.abc import Callable
from typing import Any

from relay.call import Call
from relay.tokens import estimate_usage, read_usage

log = logging.getLogger("relay.usage")


def take_usage(
    call: Call,
    usage: Any,
    generated: bool,
    text: str | None = None,
    completion_tokens: Callable[[], int] | None = None,
) -> None:
    """Set the call's tokens from an upstream usage object, or estimate them.

    Numbers that are not believable (negative, not integers, absurd) are never taken:
    the estimate replaces them and the row says "replaced". Without usage, only calls
    that generate text are estimated (their prompt, and `text` or `completion_tokens`).
    """
    reading = read_usage(usage)
    if reading is not None and reading != "invalid":
        call.set_usage(reading, "upstream")
        return
    if reading is None and not generated:
        return
    completion = completion_tokens() if completion_tokens is not None else None
    estimate = estimate_usage(call.json, text, completion)
    if reading == "invalid":
        log.warning("upstream %s reported unbelievable usage; estimated", call.upstream_name)
        call.set_usage(estimate, "replaced")
    else:
        call.set_usage(estimate, "estimated")
