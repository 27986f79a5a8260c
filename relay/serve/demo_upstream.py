"""A local DEMO upstream (no model): canned OpenAI-style answers for trying the relay, benchmarks.

Run: python -m relay.serve.demo_upstream [--port 9100] [--chunks 8] [--chunk-delay 0.05]
"""

import argparse
import json
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from relay.tokens import estimate_tokens, prompt_text

DEMO_MODELS = ["gpt-3.5-turbo", "gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]
DEMO_NOTICE = "[demo upstream] "
StartResponse = Callable[..., Any]


class DemoUpstream:
    """A WSGI app answering chat, completions (both streaming), embeddings and models."""

    def __init__(
        self,
        chunks: int = 8,
        chunk_delay: float = 0.05,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.chunks = max(1, chunks)
        self.chunk_delay = chunk_delay
        self.sleep = sleep

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """Route one request."""
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if not environ.get("HTTP_AUTHORIZATION", "").startswith("Bearer "):
            return self._json(start_response, 401, _error("No API key sent.", "invalid_api_key"))
        if method == "GET" and path == "/v1/models":
            data = [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "demo"}
                for m in DEMO_MODELS
            ]
            return self._json(start_response, 200, {"object": "list", "data": data})
        if method != "POST":
            return self._json(start_response, 404, _error(f"Unknown path {path}.", "not_found"))
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = json.loads(environ["wsgi.input"].read(length) or b"{}")
        except ValueError:
            return self._json(start_response, 400, _error("Body is not JSON.", "invalid_json"))
        if not isinstance(body, dict):
            return self._json(start_response, 400, _error("Body must be an object.", "invalid"))
        if path == "/v1/chat/completions":
            return self._generate(start_response, body, chat=True)
        if path == "/v1/completions":
            return self._generate(start_response, body, chat=False)
        if path == "/v1/embeddings":
            return self._embeddings(start_response, body)
        return self._json(start_response, 404, _error(f"Unknown path {path}.", "not_found"))

    @staticmethod
    def _json(start_response: StartResponse, status: int, payload: object) -> list[bytes]:
        """Send a JSON reply."""
        data = json.dumps(payload, ensure_ascii=False).encode()
        start_response(
            f"{status} X",
            [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
        )
        return [data]

    def _answer(self, body: dict[str, Any]) -> str:
        """The canned answer: says it is a demo and echoes the start of the prompt."""
        asked = prompt_text(body).strip().replace("\n", " ")
        return (
            f"{DEMO_NOTICE}This is the relay's local demo upstream, not a language model. "
            f"You said: {asked[:80]}"
        )

    def _generate(
        self, start_response: StartResponse, body: dict[str, Any], chat: bool
    ) -> Iterable[bytes]:
        """Chat or text completion, whole or streamed in `chunks` pieces."""
        model = body.get("model") or DEMO_MODELS[0]
        text = self._answer(body)
        prompt = estimate_tokens(prompt_text(body))
        completion = estimate_tokens(text)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if not body.get("stream"):
            choice = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
                if chat
                else {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
            )
            kind = "chat.completion" if chat else "text_completion"
            payload = {
                "id": ident,
                "object": kind,
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
            return self._json(start_response, 200, payload)
        options = body.get("stream_options")
        with_usage = isinstance(options, dict) and options.get("include_usage") is True
        start_response(
            "200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
        )
        return self._stream(ident, created, model, text, usage if with_usage else None, chat)

    def _stream(
        self,
        ident: str,
        created: int,
        model: str,
        text: str,
        usage: dict[str, int] | None,
        chat: bool,
    ) -> Iterator[bytes]:
        """Yield SSE events with `chunk_delay` between them."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        step = -(-len(text) // self.chunks)
        pieces = [text[i : i + step] for i in range(0, len(text), step)]
        for number, piece in enumerate(pieces):
            if number:
                self.sleep(self.chunk_delay)
            choice = (
                {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                if chat
                else {"index": 0, "text": piece, "finish_reason": None}
            )
            yield _event(
                {
                    "id": ident,
                    "object": kind,
                    "created": created,
                    "model": model,
                    "choices": [choice],
                }
            )
        end = (
            {"index": 0, "delta": {}, "finish_reason": "stop"}
            if chat
            else {"index": 0, "text": "", "finish_reason": "stop"}
        )
        yield _event(
            {"id": ident, "object": kind, "created": created, "model": model, "choices": [end]}
        )
        if usage is not None:
            yield _event(
                {
                    "id": ident,
                    "object": kind,
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        yield b"data: [DONE]\n\n"

    def _embeddings(self, start_response: StartResponse, body: dict[str, Any]) -> list[bytes]:
        """Deterministic little vectors, one per input."""
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": [round((zlib.crc32(str(x).encode()) % 1000) / 1000, 3), 0.5, -0.25],
            }
            for i, x in enumerate(items)
        ]
        tokens = sum(estimate_tokens(str(x)) for x in items)
        payload = {
            "object": "list",
            "data": data,
            "model": body.get("model") or DEMO_MODELS[-1],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return self._json(start_response, 200, payload)


def _event(payload: object) -> bytes:
    """One SSE data event."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def _error(message: str, code: str) -> dict[str, Any]:
    """An OpenAI-shaped error body."""
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }


def main(argv: list[str] | None = None) -> None:
    """Serve the demo upstream with gevent (thousands of concurrent streams are fine)."""
    # Patched only when run as the demo server, never when tests import DemoUpstream.
    from gevent import monkey  # noqa: PLC0415

    monkey.patch_all()
    from gevent.pool import Pool  # noqa: PLC0415
    from gevent.pywsgi import WSGIServer  # noqa: PLC0415

    parser = argparse.ArgumentParser(description="The relay's local demo upstream (no model).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--chunks", type=int, default=8, help="SSE chunks per streamed answer")
    parser.add_argument("--chunk-delay", type=float, default=0.05, help="seconds between chunks")
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args(argv)
    app = DemoUpstream(chunks=args.chunks, chunk_delay=args.chunk_delay)
    server = WSGIServer(
        (args.host, args.port), app, log=None, spawn=Pool(20000), backlog=args.backlog
    )
    print(f"demo upstream listening on http://{args.host}:{args.port}/v1", flush=True)  # noqa: T201
    server.serve_forever()


if __name__ == "__main__":
    main()
