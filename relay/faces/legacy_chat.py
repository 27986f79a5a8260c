"""The old service's chat rules: non-empty messages, a capped last message, oldest history out."""

from typing import Any

from relay.errors import InvalidRequest


def content_length(content: object) -> int:
    """Characters of a message's content: the string, or the text parts of a parts list."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part.get("text") or "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def check_messages(messages: object) -> None:
    """Reject what the old service rejected: no messages, or a message with empty content."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(
            "messages must be a non-empty array of {role, content} objects.", param="messages"
        )
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                "messages[%(number)d] must be an object with a role and a content.",
                param="messages",
                number=number,
            )
        content = message.get("content")
        if content is None and message.get("tool_calls"):
            continue  # an assistant turn that only calls tools
        if content_length(content) == 0 and not (isinstance(content, list) and content):
            raise InvalidRequest(
                "messages[%(number)d].content must not be empty.", param="messages", number=number
            )


def trim_history(messages: list[dict[str, Any]], limit: int) -> tuple[list[dict[str, Any]], int]:
    """Apply the character limit; return (messages to send, number of messages dropped).

    The last message (this turn's question) must fit on its own. When all contents
    together are longer than the limit, the oldest history goes first: a user turn
    with the assistant reply after it, as a pair. System messages are always kept.
    """
    if not limit:
        return messages, 0
    last = content_length(messages[-1].get("content"))
    if last > limit:
        raise InvalidRequest(
            "The last message is %(last)d characters long; at most %(limit)d are allowed.",
            param="messages",
            last=last,
            limit=limit,
        )
    kept = list(messages)
    total = sum(content_length(m.get("content")) for m in kept)
    dropped = 0
    while total > limit:
        oldest = next(
            (i for i, m in enumerate(kept[:-1]) if m.get("role") != "system"),
            None,
        )
        if oldest is None:
            break  # only system messages and the question are left: keep them
        span = 1
        follower = kept[oldest + 1] if oldest + 1 < len(kept) - 1 else None
        if kept[oldest].get("role") == "user" and follower and follower.get("role") == "assistant":
            span = 2
        for message in kept[oldest : oldest + span]:
            total -= content_length(message.get("content"))
        del kept[oldest : oldest + span]
        dropped += span
    return kept, dropped
