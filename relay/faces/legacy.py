"""The legacy face: the old PHP-era service's body-key dialect on /index.php/api/v1 and /api/v1."""

import json
from typing import Any

from relay.call import Call
from relay.face import Face
from relay.faces.legacy_body import multipart_has_files, parse_legacy_body
from relay.faces.legacy_chat import check_messages, trim_history
from relay.faces.legacy_msg import LegacyMessages
from relay.i18n import Text
from relay.tokens import GENERATION_PATHS, legacy_estimate_tokens, prompt_text, reply_text
from relay.upstream import Relayed

TRIMMED_HEADER = "X-Relay-Trimmed-Messages"


def shown_usage(request: object, reply: dict[str, Any]) -> dict[str, int]:
    """The usage a legacy client is shown when the upstream sent none: the old service's
    published rule (CJK characters + words x 1.3); the usage row bills the relay's rule."""
    prompt = legacy_estimate_tokens(prompt_text(request))
    completion = legacy_estimate_tokens(reply_text(reply))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class LegacyFace(Face):
    """Forms or JSON in, the old service's chat rules, and `code`/`msg` beside every reply."""

    name = "legacy"
    prefixes = ("/index.php/api/v1", "/api/v1")

    def __init__(
        self, default_model: str, default_completion_model: str, max_chars: int, language: str
    ) -> None:
        self.default_model = default_model  # RELAY_DEFAULT_MODEL, for chat
        self.default_completion_model = default_completion_model  # RELAY_DEFAULT_COMPLETION_MODEL
        self.max_chars = max_chars  # RELAY_LEGACY_MAX_CHARS
        self.messages = LegacyMessages(language)  # RELAY_LEGACY_LANGUAGE

    def parse_body(
        self, raw: bytes, method: str, path: str, content_type: str | None
    ) -> dict[str, Any] | None:
        """JSON whatever the Content-Type, or PHP forms; generations get the default model."""
        body = parse_legacy_body(raw, content_type)
        if method == "POST" and path in GENERATION_PATHS:
            body = body if body is not None else {}
            if not body.get("model"):
                # `completions` takes a text-completion model: a chat model would be refused.
                completion = path == "completions"
                body["model"] = self.default_completion_model if completion else self.default_model
        return body

    def prepare(self, call: Call) -> None:
        """The old service's rules: non-empty messages and the character limit."""
        body = call.json
        if body is None:
            return
        if multipart_has_files(call.body, call.content_type):
            # An upload: pass the multipart body on (its key field was taken out on arrival).
            call.json = None
            return
        if call.path == "chat/completions":
            check_messages(body.get("messages"))
            kept, dropped = trim_history(body["messages"], self.max_chars)
            if dropped:
                body["messages"] = kept
                call.reply_headers.append((TRIMMED_HEADER, str(dropped)))
        # Forms and wrongly typed JSON are re-sent as JSON, always.
        call.body_changed = True

    def wrap_reply(self, call: Call, reply: Relayed) -> bytes:
        """The reply with the old service's `code`/`msg` beside the OpenAI fields."""
        parsed = reply.json()
        if parsed is None:
            return super().wrap_reply(call, reply)
        error = parsed.get("error")
        if call.status and call.status >= 400 and error is not None:
            message = error.get("message") if isinstance(error, dict) else str(error)
            said = self.messages.upstream(
                call.status, message if isinstance(message, str) else None
            )
            wrapped = {"code": call.status, "msg": said, "error": error}
        else:
            if call.usage.source == "estimated" and not isinstance(parsed.get("usage"), dict):
                parsed["usage"] = shown_usage(call.json, parsed)
            wrapped = self.wrap_own({k: v for k, v in parsed.items() if k not in ("code", "msg")})
        return json.dumps(wrapped, ensure_ascii=False).encode("utf-8")

    def wrap_own(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Success: `"code": 0, "msg": ""` first, then the OpenAI fields."""
        return {"code": 0, "msg": "", **payload}

    def shape_error(
        self, url_path: str, status: int, body: dict[str, Any], text: Text
    ) -> dict[str, Any]:
        """Failure: the HTTP status as `code`, the message as `msg` (in RELAY_LEGACY_LANGUAGE),
        and the OpenAI error; a 404 names the base URL the client meant."""
        hint = self.explain_not_found(url_path) if status == 404 else None
        if hint is not None:
            body["error"]["message"] += " " + hint.english()
            text = Text("%(message)s %(hint)s", {"message": text, "hint": hint})
        msg = self.messages.error(text, body["error"]["code"], status)
        return {"code": status, "msg": msg, **body}

    def owns(self, url_path: str) -> bool:
        """Everything under the prefixes' roots (/index.php, /api): old clients read code/msg."""
        return self._root_of(url_path) is not None

    def explain_not_found(self, url_path: str) -> Text | None:
        """Name the base URL and the path a client that got its base URL wrong meant."""
        prefix = self._root_of(url_path)
        if prefix is None:
            return None
        root = _root(prefix)
        # Drop what the client wrote of the prefix itself (index.php/, api/, v1/), keep the rest.
        words = {word for p in self.prefixes for word in p.split("/") if word}
        rest = [part for part in url_path[len(root) :].split("/") if part]
        while rest and rest[0] in words:
            rest.pop(0)
        meant = f"{prefix}/{'/'.join(rest)}"
        if not rest:
            return Text(
                "The legacy API's base URL is http://<relay>%(root)s/ (calls go to %(prefix)s/).",
                {"root": root, "prefix": prefix},
            )
        return Text(
            "The legacy API's base URL is http://<relay>%(root)s/ (calls go to %(prefix)s/). "
            "Did you mean %(meant)s?",
            {"root": root, "prefix": prefix, "meant": meant},
        )

    def _root_of(self, url_path: str) -> str | None:
        """The prefix whose root (its first path segment) a URL is under, or None."""
        for prefix in self.prefixes:
            root = _root(prefix)
            if url_path == root or url_path.startswith(root + "/"):
                return prefix
        return None


def _root(prefix: str) -> str:
    """A prefix's first path segment: /index.php of /index.php/api/v1, /api of /api/v1."""
    return "/" + prefix.strip("/").split("/")[0]
