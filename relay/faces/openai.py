"""The OpenAI face: every path under /v1 is forwarded as it came, but for the key fields."""

from typing import Any

from relay.face import Face
from relay.faces.request_body import looks_like_json, parse_json_object

# Endpoints whose bodies are always JSON objects: the relay reads them (model, stream,
# the prompt for estimates), so they must parse whatever Content-Type says.
JSON_ENDPOINTS = {
    "chat/completions", "completions", "embeddings", "moderations", "responses",
    "images/generations", "audio/speech",
}  # fmt: skip


class OpenAIFace(Face):
    """Bodies pass through byte for byte unless the relay must read them; replies as they came."""

    name = "openai"
    prefixes = ("/v1",)

    def parse_body(
        self, raw: bytes, method: str, path: str, content_type: str | None
    ) -> dict[str, Any] | None:
        """JSON bodies must be UTF-8 JSON objects; others (multipart, binary) pass untouched."""
        if method == "POST" and path in JSON_ENDPOINTS:
            return parse_json_object(raw)
        if raw and looks_like_json(content_type, raw):
            return parse_json_object(raw)
        return None
