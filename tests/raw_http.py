"""Raw HTTP/1.1 on loopback sockets: exact bytes out, whole replies back, and slow clients."""

import json
import socket
import threading
import time
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


def timed_get(port, path="/healthz", timeout=10.0):
    """(seconds, reply) of a GET on a fresh connection."""
    started = time.monotonic()
    line = b"GET " + path.encode() + b" HTTP/1.1"
    reply = exchange(port, request(line, [b"Connection: close"]), timeout=timeout)
    return time.monotonic() - started, reply


@dataclass
class SlowClient:
    """One connection of a SlowCrowd: what it has sent, got back, and when it was answered."""

    sock: socket.socket
    rest: bytes
    received: bytes = b""
    answered_at: float | None = None
    closed_at: float | None = None


class SlowCrowd:
    """Many connections sending their requests a byte at a time, all from one thread.

    Each connection sends `head` at once, then one byte of `rest` every `interval`
    seconds; whatever the relay answers is kept, with the time of its first byte and
    of the close.
    """

    def __init__(self, port, count, head, rest, interval=0.25):
        self.started = time.monotonic()
        self.clients = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(head)
            sock.setblocking(False)
            self.clients.append(SlowClient(sock, rest))
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        """Trickle and read until stopped or every connection is closed."""
        while not self._stop.is_set() and any(c.closed_at is None for c in self.clients):
            for client in self.clients:
                if client.closed_at is None:
                    self._serve(client)
            self._stop.wait(self.interval)

    def _serve(self, client):
        """Read what arrived; send one more byte while the relay has not answered."""
        now = time.monotonic()
        try:
            while data := client.sock.recv(65536):
                client.received += data
                client.answered_at = client.answered_at or now
            client.closed_at = now
        except BlockingIOError:
            pass
        except OSError:
            client.closed_at = now
        if client.closed_at is None and client.answered_at is None and client.rest:
            try:
                client.sock.send(client.rest[:1])
                client.rest = client.rest[1:]
            except BlockingIOError:
                pass
            except OSError:
                client.closed_at = now

    def wait_closed(self, timeout):
        """Wait until the relay has closed every connection; True if it did in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(c.closed_at is not None for c in self.clients):
                return True
            time.sleep(0.05)
        return False

    def close(self):
        """Stop trickling and close every socket."""
        self._stop.set()
        self._thread.join(timeout=5)
        for client in self.clients:
            client.sock.close()


def dechunk(body):
    """The payload of a chunked body (as much of it as arrived; extensions and trailers
    skipped)."""
    out, rest = b"", body
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2 :]
    return out


def header_lines(reply):
    """Every header line of a reply, in order, as (lower-case name, value) pairs (Reply's
    dict keeps only the last of a repeated name)."""
    head = reply.raw.partition(b"\r\n\r\n")[0].decode("latin-1")
    pairs = []
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        pairs.append((name.strip().lower(), value.strip()))
    return pairs
