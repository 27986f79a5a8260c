"""gunicorn's HTTP/1 response, sending its head and first body bytes in one write.

gunicorn writes a reply's status line and headers with one `send` and each body piece
with another. On loopback and behind nginx every `send` is a system call that also runs
the receiver's TCP processing: for a whole JSON reply that was two calls where one does.
"""

from typing import Any

from gunicorn import util
from gunicorn.http.wsgi import Response

COALESCE_LIMIT = 65536  # larger first pieces go in their own send (no copy of them)


class OneWriteResponse(Response):
    """Response whose head waits for the first body bytes written through write()."""

    headers_sent: bool  # gunicorn's, untyped there

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_write = False
        self._head = b""  # the head built but not sent yet

    def send_headers(self) -> None:
        """Build the head; from write(), keep it for the body bytes, else send it now."""
        if self.headers_sent:
            return
        if not self._in_write:
            super().send_headers()
            return
        lines = self.default_headers()
        lines.extend([f"{name}: {value}\r\n" for name, value in self.headers])
        self._head = util.to_bytestring("{}\r\n".format("".join(lines)), "latin-1")
        self.headers_sent = True

    def write(self, arg: bytes) -> None:
        """gunicorn's write; the head goes with the body bytes (or alone, if none go)."""
        self._in_write = True
        try:
            super().write(arg)
        finally:
            self._in_write = False
            self._flush_head()

    def _emit_body(self, data: bytes) -> None:
        """Put body bytes on the wire, after the waiting head in the same send."""
        head, self._head = self._head, b""
        if not head:
            super()._emit_body(data)
        elif len(data) > COALESCE_LIMIT:
            self.sock.sendall(head)
            super()._emit_body(data)
        elif self.chunked:
            self.sock.sendall(b"".join([head, b"%X\r\n" % len(data), data, b"\r\n"]))
        else:
            self.sock.sendall(head + data)

    def _flush_head(self) -> None:
        """Send a head that no body bytes took with them (an empty or dropped piece)."""
        if self._head:
            head, self._head = self._head, b""
            util.write(self.sock, head)
