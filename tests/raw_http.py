"""Raw HTTP/1.1 on loopback sockets: exact bytes out, whole replies back."""

import json
import socket
from dataclasses import dataclass, field


@dataclass
class Reply:
    """One HTTP reply as it came off the wire (status 0: the connection closed unanswered)."""

    raw: bytes
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @classmethod
    def parse(cls, raw: bytes) -> "Reply":
        """Split status line, headers and body (as framed by Content-Length); skip a 100."""
        final = raw
        while final.startswith(b"HTTP/1.1 100 ") and b"\r\n\r\n" in final:
            final = final.partition(b"\r\n\r\n")[2]
        head, sep, rest = final.partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"HTTP/1."):
            return cls(raw)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length")
        body = rest[: int(length)] if length is not None else rest
        return cls(raw, int(lines[0].split()[1]), headers, body)

    def json(self):
        """The body as JSON."""
        return json.loads(self.body)

    def complete(self):
        """Whether the whole reply is here (its body is as long as Content-Length says)."""
        length = self.headers.get("content-length")
        return length is not None and len(self.body) == int(length)


def exchange(port, data, timeout=10.0, shut=False, until_close=False):
    """Send data on a fresh connection; read one whole reply, or until the relay closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while data := sock.recv(65536):
                received += data
                if not until_close and Reply.parse(received).complete():
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        return Reply.parse(received)


def request(line, headers=(), body=b"", host=b"x"):
    """A request's bytes: request line, Host first, the other header lines, the body."""
    head = [line, b"Host: " + host, *headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body
