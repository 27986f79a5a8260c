"""One gevent worker's guard over its clients: JSON in place of gunicorn's refusals.

The worker imports this module once it has loaded the app (it imports Flask, which
gunicorn's master, importing the worker class, has no use for).
"""

import json
from typing import Any

from relay.errors import SHAPER, ErrorShaper, error_body
from relay.serve.refusals import Refusal


class ClientGuard:
    """The refusals of one worker, in the shape of its app's faces."""

    def __init__(self, app: Any) -> None:
        # Anything but the relay's app (gunicorn's own error app, say) has no faces.
        extensions = getattr(app, "extensions", None) or {}
        self.shape: ErrorShaper | None = extensions.get(SHAPER)

    def reply(self, refusal: Refusal, path: str | None) -> bytes:
        """The whole HTTP reply to a refused request, in the shape of its face when known."""
        body = error_body(refusal.message, refusal.type, refusal.code)
        if path is not None and self.shape is not None:
            body = self.shape(path, refusal.status, body)
        data = json.dumps(body, ensure_ascii=False).encode()
        head = (
            f"HTTP/1.1 {refusal.status} {refusal.reason}\r\n"
            "Connection: close\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        return head.encode("latin-1") + data
