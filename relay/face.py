"""The hooks an API face plugs into the pipeline: URL prefixes, body reading, reply wrapping."""

from typing import Any

from relay.call import Call, FaceName
from relay.i18n import Text
from relay.upstream import Relayed


class Face:
    """One dialect of the API. The pipeline is the same for every face; these hooks differ."""

    name: FaceName
    prefixes: tuple[str, ...]  # URL prefixes the face answers under, e.g. ("/v1",)

    def api_path(self, url_path: str) -> str | None:
        """The upstream path of a URL under one of this face's prefixes (None: not ours)."""
        for prefix in self.prefixes:
            if url_path.startswith(prefix + "/"):
                return url_path[len(prefix) + 1 :]
        return None

    def parse_body(
        self, raw: bytes, method: str, path: str, content_type: str | None
    ) -> dict[str, Any] | None:
        """The body as a JSON object when the relay must read it, else None (passed as is)."""
        raise NotImplementedError

    def prepare(self, call: Call) -> None:
        """The face's own rules and defaults, applied before the call is admitted."""

    def wrap_reply(self, call: Call, reply: Relayed) -> bytes:
        """A whole (non-stream) reply as this face sends it; bytes pass through by default."""
        if not isinstance(reply.body, bytes):
            raise TypeError("only whole replies are wrapped; streams pass through")
        return reply.body

    def wrap_own(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A reply of the relay's own endpoints (balance), in this face's shape."""
        return payload

    def shape_error(
        self, url_path: str, status: int, body: dict[str, Any], text: Text
    ) -> dict[str, Any]:
        """An error body in this face's shape (OpenAI's as it is); `text` is the message's
        template and values, for a face that says it in another language."""
        return body

    def owns(self, url_path: str) -> bool:
        """Whether the relay's own answers on this URL (errors too) take this face's shape."""
        return self.api_path(url_path) is not None
