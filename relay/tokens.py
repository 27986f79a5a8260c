"""Counting tokens: the estimate rule, the text a call sends and gets, upstream usage objects."""

import math
import re
from typing import Any

# Han ideographs (with extensions and compatibility forms), kana and hangul each count as one.
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f"
CJK_CHAR = re.compile(f"[{CJK}]")
WORD = re.compile(f"[^\\W{CJK}]+")
# Paths whose replies are generated text: usage is estimated when the upstream sends none.
GENERATION_PATHS = ("chat/completions", "completions")

TokenCounts = tuple[int, int, int]  # prompt, completion, total


def estimate_tokens(text: str) -> int:
    """The old service's published rule: CJK characters + words * 1.3, rounded half up."""
    if not text:
        return 0
    cjk = len(CJK_CHAR.findall(text))
    words = len(WORD.findall(text))
    return math.floor(cjk + words * 1.3 + 0.5)


def prompt_text(body: object) -> str:
    """All the text a request sends for generation: messages, prompt, input, instructions."""
    if not isinstance(body, dict):
        return ""
    parts: list[str] = []
    for message in body.get("messages") or []:
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
        message = choice.get("message") or {}
        _collect_text(choice.get("text"), parts)
        if isinstance(message, dict):
            _collect_text(message.get("content"), parts)
            for call in message.get("tool_calls") or []:
                if isinstance(call, dict):
                    _collect_text((call.get("function") or {}).get("arguments"), parts)
    return "\n".join(parts)


def read_usage(usage: Any) -> TokenCounts | None:
    """(prompt, completion, total) from an OpenAI usage object (chat or Responses API names)."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    total = usage.get("total_tokens")
    numbers = [n for n in (prompt, completion, total) if isinstance(n, int)]
    if not numbers:
        return None
    prompt = prompt if isinstance(prompt, int) else 0
    completion = completion if isinstance(completion, int) else 0
    total = total if isinstance(total, int) else prompt + completion
    return prompt, completion, total


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
