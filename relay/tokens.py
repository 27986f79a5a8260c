"""Counting tokens: the estimate rule, the text a call sends and gets, upstream usage objects."""

import math
import re
from typing import Any, Literal

# Han ideographs (with extensions and compatibility forms), kana and hangul each count as one.
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f"
CJK_CHAR = re.compile(f"[{CJK}]")
WORD = re.compile(f"[^\\W{CJK}]+")
# Anything else that is not white space: punctuation, symbols, emoji (one token each).
SYMBOL = re.compile(f"[^\\w\\s{CJK}]")
# A usage number above this (per call) is not believed: no context window is near it.
MAX_TOKENS = 100_000_000
# Paths whose replies are generated text: usage is estimated when the upstream sends none.
GENERATION_PATHS = ("chat/completions", "completions")

TokenCounts = tuple[int, int, int]  # prompt, completion, total
Reading = TokenCounts | None | Literal["invalid"]


def estimate_tokens(text: str) -> int:
    """The relay's estimate: the old service's rule, plus one token per other symbol.

    CJK characters count one each and words 1.3 each (the old service's published
    rule); punctuation, symbols and emoji, which that rule skips, count one each
    (what common tokenizers spend on them, roughly), so no text is free.
    """
    if not text:
        return 0
    symbols = len(SYMBOL.findall(text))
    return math.floor(_cjk_and_words(text) + symbols + 0.5)


def legacy_estimate_tokens(text: str) -> int:
    """The old service's published rule alone: CJK characters + words * 1.3, rounded half up.

    Only what legacy clients are shown when the upstream reports no usage; billing
    uses `estimate_tokens`.
    """
    return math.floor(_cjk_and_words(text) + 0.5) if text else 0


def _cjk_and_words(text: str) -> float:
    """CJK characters + words * 1.3."""
    return len(CJK_CHAR.findall(text)) + len(WORD.findall(text)) * 1.3


def prompt_text(body: object) -> str:
    """All the text a request sends for generation: messages, prompt, input, instructions."""
    if not isinstance(body, dict):
        return ""
    parts: list[str] = []
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict):
            _collect_text(message.get("content"), parts)
    for field in ("prompt", "input", "instructions", "system"):
        _collect_text(body.get(field), parts)
    return "\n".join(parts)


def _collect_text(value: object, parts: list[str]) -> None:
    """Append the strings inside a content value (string, list of parts, nested)."""
    if isinstance(value, str):
        parts.append(value)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                _collect_text(item.get("text") or item.get("content"), parts)
            else:
                _collect_text(item, parts)


def reply_text(body: object) -> str:
    """The generated text of a non-stream chat or completion reply."""
    parts: list[str] = []
    choices = body.get("choices") if isinstance(body, dict) else None
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        _collect_text(choice.get("text"), parts)
        if isinstance(message, dict):
            _collect_text(message.get("content"), parts)
            calls = message.get("tool_calls")
            for call in calls if isinstance(calls, list) else []:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    _collect_text(function.get("arguments"), parts)
    return "\n".join(parts)


def read_usage(usage: Any) -> Reading:
    """(prompt, completion, total) from an OpenAI usage object (chat or Responses API names).

    None when it holds no numbers; "invalid" when a number is not a believable count (not
    an integer, negative, absurdly large): the caller estimates instead. A total that
    disagrees with prompt + completion is recomputed (the larger of the two is kept).
    """
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    total = usage.get("total_tokens")
    given = [n for n in (prompt, completion, total) if n is not None]
    if not given:
        return None
    if not all(_believable(n) for n in given):
        return "invalid"
    if prompt is None and completion is None:
        prompt = total  # only a total: count it as prompt, so nothing is lost
    prompt = prompt if prompt is not None else max((total or 0) - (completion or 0), 0)
    completion = completion if completion is not None else max((total or 0) - prompt, 0)
    return prompt, completion, max(total or 0, prompt + completion)


def _believable(number: object) -> bool:
    """Whether a reported token count is a plain integer within reason."""
    return isinstance(number, int) and not isinstance(number, bool) and 0 <= number <= MAX_TOKENS


def estimate_usage(
    request_body: object, generated_text: str | None = None, completion_tokens: int | None = None
) -> TokenCounts:
    """(prompt, completion, total) by the estimate rule, from text or tokens counted already."""
    prompt = estimate_tokens(prompt_text(request_body))
    completion = (
        completion_tokens
        if completion_tokens is not None
        else estimate_tokens(generated_text or "")
    )
    return prompt, completion, prompt + completion
