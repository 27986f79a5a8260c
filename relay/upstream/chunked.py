"""Decoding a chunked upstream body off its buffered socket file: all that arrived, per read."""

from typing import IO

from requests.exceptions import ChunkedEncodingError

MAX_SIZE_LINE = 4096  # a chunk-size line (with extensions) or trailer line longer than this is junk
READ_SIZE = 65536


class ChunkedBody:
    """Decodes HTTP/1.1 chunked framing from a buffered socket file.

    urllib3's read_chunked returns one HTTP chunk per call (two buffered reads each);
    this returns all body bytes one socket read brought, so when a relay falls behind
    the events that piled up meanwhile go out in one write instead of one write each.
    Broken framing, or a connection closed inside the body, is requests'
    ChunkedEncodingError, as when requests reads a body itself.
    """

    def __init__(self, fp: IO[bytes]) -> None:
        self.fp = fp  # the BufferedReader http.client parsed the status and headers from
        self.pending = b""  # bytes read but not decoded yet (a partial size line, say)
        self.left = 0  # data bytes still to come in the current chunk
        self.crlf = False  # the CRLF that ends a chunk's data is still to come
        self.trailers = False  # the last (zero-size) chunk came; trailer lines follow
        self.done = False
        self.extra = False  # bytes came after the body's end: the connection is not reusable

    def read(self) -> bytes:
        """Body bytes from the next socket read(s); b'' once the body has ended."""
        while not self.done:
            data = self.fp.read1(READ_SIZE)  # type: ignore[attr-defined]
            if not data:
                raise ChunkedEncodingError(
                    "The upstream closed the connection inside a chunked body."
                )
            body = self.feed(data)
            if body:
                return body
        return b""

    def feed(self, data: bytes) -> bytes:
        """Body bytes in the framing read so far; an incomplete framing line waits for more."""
        buffer = self.pending + data if self.pending else data
        out: list[bytes] = []
        pos = 0
        end = len(buffer)
        while pos < end and not self.done:
            if self.left:
                take = min(self.left, end - pos)
                out.append(buffer[pos : pos + take])
                pos += take
                self.left -= take
                if self.left:
                    break
                self.crlf = True
            line_end = buffer.find(b"\r\n", pos)
            if line_end < 0:
                if end - pos > MAX_SIZE_LINE:
                    raise ChunkedEncodingError("The upstream sent an overlong chunk framing line.")
                break
            line = buffer[pos:line_end]
            pos = line_end + 2
            if self.crlf:
                if line:
                    raise ChunkedEncodingError(
                        "The upstream's chunk was longer than its size said."
                    )
                self.crlf = False
            elif self.trailers:
                self.done = not line  # the empty line after the trailers ends the body
            else:
                self._start_chunk(line)
        self.pending = buffer[pos:]
        if self.done and self.pending:
            self.extra = True
        return out[0] if len(out) == 1 else b"".join(out)

    def _start_chunk(self, line: bytes) -> None:
        """Take a chunk-size line (extensions ignored)."""
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ChunkedEncodingError("The upstream sent an invalid chunk size.") from None
        if size < 0:
            raise ChunkedEncodingError("The upstream sent an invalid chunk size.")
        if size:
            self.left = size
        else:
            self.trailers = True
