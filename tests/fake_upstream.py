"""Socket-level fake OpenAI-compatible upstream that can also misbehave on purpose."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import select
import socket
import socketserver
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus

FAKE_PROMPT_TOKENS = 11
FAKE_COMPLETION_TOKENS = 7
FAKE_EMBEDDING_TOKENS = 5
FAKE_EMBEDDING = [0.1, 0.2, 0.3]
FAKE_CREATED = 1700000000
SPEECH_BYTES = bytes(range(256)) * 4
_POLL_SLICE = 0.05  # waits re-check stop() this often; a peer close wakes them at once
_MAX_LINE = 65536
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL | _POLLRDHUP
_JSON_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}


@dataclass
class RecordedRequest:
    """One HTTP request exactly as the fake upstream received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: object | None
    received_at: float
    upstream_key: str | None


class _BadRequest(Exception):
    """The peer sent something that is not a parseable HTTP/1.1 request."""


def _merge(defaults: dict[str, str], extra: dict[str, str] | None) -> dict[str, str]:
    """Return defaults overridden case-insensitively by extra."""
    extra = extra or {}
    names = {k.lower() for k in extra}
    return {**{k: v for k, v in defaults.items() if k.lower() not in names}, **extra}


def _head(status: int, headers: dict[str, str], lines: Iterable[bytes] = ()) -> bytes:
    """Encode a status line plus headers, ending with the blank line.

    `lines` are raw header lines sent verbatim after the others (invalid ones included); a
    name they carry replaces the same name in `headers`.
    """
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = list(lines)
    names = {line.partition(b":")[0].strip().lower().decode("latin-1") for line in lines}
    kept = [f"{k}: {v}" for k, v in headers.items() if k.lower() not in names]
    head = "\r\n".join([f"HTTP/1.1 {status} {reason}", *kept]).encode("latin-1")
    return b"\r\n".join([head, *lines]) + b"\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    """Frame data as one HTTP/1.1 chunk."""
    return f"{len(data):X}\r\n".encode() + data + b"\r\n"


def _event(event: object) -> bytes:
    """Encode one SSE event: bytes verbatim, str or JSON as a data line."""
    if isinstance(event, bytes):
        return event
    text = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def _error_body(message: str, code: str | None, param: str | None = None) -> dict:
    """Build an OpenAI-style error object."""
    err = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return {"error": err}


class _Peer:
    """One accepted connection: buffered reads, writes and peer-close detection."""

    def __init__(self, sock: socket.socket, fake: FakeUpstream):
        self.sock = sock
        self.fake = fake
        self.buf = bytearray()
        self.client_close = False
        self.behaviour: Behaviour | None = None  # the one answering now, told when the peer leaves

    def _fill(self) -> bool:
        """Receive more bytes into the buffer; False on EOF or error."""
        try:
            data = self.sock.recv(65536)
        except OSError:
            return False
        self.buf += data
        return bool(data)

    def readline(self) -> bytes | None:
        """Return the next line without its CRLF, or None on EOF."""
        while (end := self.buf.find(b"\n")) < 0:
            if len(self.buf) > _MAX_LINE or not self._fill():
                return None
        line = bytes(self.buf[:end]).rstrip(b"\r")
        del self.buf[: end + 1]
        return line

    def read(self, n: int) -> bytes | None:
        """Return exactly n bytes, or None on EOF."""
        while len(self.buf) < n:
            if not self._fill():
                return None
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def _read_body(self, headers: dict[str, str]) -> bytes | None:
        """Read a Content-Length or chunked request body."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size_line = self.readline()
                if size_line is None:
                    return None
                try:
                    size = int(size_line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise _BadRequest("bad chunk size") from None
                if size == 0:
                    break
                data = self.read(size + 2)
                if data is None:
                    return None
                parts.append(data[:-2])
            trailer = self.readline()
            while trailer:
                trailer = self.readline()
            return b"".join(parts)
        try:
            return self.read(int(headers.get("content-length") or 0))
        except ValueError:
            raise _BadRequest("bad content-length") from None

    def read_request(self) -> RecordedRequest | None:
        """Parse the next request on the connection, or return None when the peer is done."""
        line = self.readline()
        while line == b"":  # tolerate stray CRLFs between keep-alive requests
            line = self.readline()
        if line is None:
            return None
        parts = line.decode("latin-1").split()
        if len(parts) != 3:
            raise _BadRequest("bad request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        while (raw := self.readline()) != b"":
            if raw is None:
                return None
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep:
                raise _BadRequest("bad header line")
            key, value = name.strip().lower(), value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if headers.get("expect", "").lower() == "100-continue":
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self._read_body(headers)
        if body is None:
            return None
        conn = headers.get("connection", "").lower()
        self.client_close = "close" in conn or (version == "HTTP/1.0" and "keep-alive" not in conn)
        path, _, query = target.partition("?")
        try:
            parsed = json.loads(body) if body else None
        except (ValueError, RecursionError):
            parsed = None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        return RecordedRequest(method, path, query, headers, body, parsed, time.monotonic(), key)

    def send(self, data: bytes) -> None:
        """Write all of data to the socket."""
        self.sock.sendall(data)

    def respond(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        delay=0.0,
        lines: Iterable[bytes] = (),
    ) -> bool:
        """Send a Content-Length framed response after delay; True if it was sent."""
        if delay and self.wait(delay) != "timeout":
            return False
        final = _merge({"Content-Length": str(len(body))}, headers)
        if self.client_close:
            final["Connection"] = "close"
        self.send(_head(status, final, lines) + body)
        return True

    def respond_json(self, status: int, obj: object, headers: dict[str, str] | None = None) -> bool:
        """Send obj as a JSON response; True."""
        body = json.dumps(obj).encode()
        return self.respond(status, body, _merge({"Content-Type": "application/json"}, headers))

    def _gone(self) -> bool:
        """Peek at the socket: True when the peer has closed or reset it."""
        try:
            return not self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True

    def wait(self, seconds: float | None) -> str:
        """Idle up to seconds (None: forever) watching the peer; 'timeout', 'closed' or 'stop'."""
        deadline = None if seconds is None else time.monotonic() + seconds
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | _POLLRDHUP)
        stopping = self.fake._stopping
        while not stopping.is_set():
            left = _POLL_SLICE if deadline is None else deadline - time.monotonic()
            ready = poller.poll(max(0.0, min(left, _POLL_SLICE)) * 1000)
            if ready and (ready[0][1] & _GONE or self._gone()):
                return "stop" if stopping.is_set() else "closed"
            if deadline is not None and time.monotonic() >= deadline:
                return "timeout"
            if ready:  # unread data from a live peer: avoid spinning on it
                time.sleep(0.005)
        return "stop"

    def stream(
        self,
        events: list,
        *,
        interval=0.05,
        status=200,
        headers=None,
        chunked=True,
        drop_after=None,
        hang_after=None,
        first_delay=0.0,
        lines: Iterable[bytes] = (),
    ) -> bool:
        """Send SSE events one per chunk, then finish, drop (close early) or hang."""
        framing = {"Transfer-Encoding": "chunked"} if chunked else {}
        if self.client_close or not chunked:
            framing["Connection"] = "close"
        base = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **framing}
        count = min([len(events), *(n for n in (drop_after, hang_after) if n is not None)])
        try:
            self.send(_head(status, _merge(base, headers), lines))
            if first_delay and not self._pause(first_delay):
                return False
            for i, event in enumerate(events[:count]):
                if i and not self._pause(interval):
                    return False
                if data := _event(event):
                    self.send(_chunk(data) if chunked else data)
            if hang_after is not None and hang_after <= count:
                self._pause(None)
                return False
            if drop_after is not None and drop_after <= count:
                return False
            if chunked:
                self.send(b"0\r\n\r\n")
        except OSError:
            self.peer_left()
            return False
        return chunked

    def _pause(self, seconds: float | None) -> bool:
        """Wait mid-stream, logging a peer close in stream_closed; True to go on."""
        state = self.wait(seconds)
        if state == "closed":
            self.peer_left()
        return state == "timeout"

    def peer_left(self) -> None:
        """Note, in stream_closed and on the running behaviour, that the peer left mid-reply."""
        when = time.monotonic()
        self.fake._log_stream_closed(when)
        if self.behaviour is not None:
            self.behaviour.note_closed(when)

    def pour(self, data: bytes) -> bool:
        """Send data mid-reply; False (the peer noted as gone) when it has left or stop()."""
        try:
            self.send(data)
        except OSError:
            if not self.fake._stopping.is_set():
                self.peer_left()
            return False
        return True

    def endless(self, head: bytes, start: bytes, piece: bytes, burst: int, every: float) -> bool:
        """Send a chunked body that never ends: `burst` bytes at once, then a piece every
        `every` seconds, until the peer leaves or stop()."""
        if not self.pour(head) or not self.pour(_chunk(start)):
            return False
        sent = 0
        while sent < burst:
            if not self.pour(_chunk(piece)):
                return False
            sent += len(piece)
        while self._pause(every):
            if not self.pour(_chunk(piece)):
                return False
        return False

    def scripted(self, head: bytes, steps: list, chunked: bool) -> bool:
        """Send head, then each step: bytes as one write (one chunk when chunked), a number
        as a pause of that many seconds; True when the whole body went out."""
        if not self.pour(head):
            return False
        for step in steps:
            if isinstance(step, bytes):
                if not self.pour(_chunk(step) if chunked else step):
                    return False
            elif not self._pause(step):
                return False
        return self.pour(b"0\r\n\r\n") if chunked else True

    def send_then_hold(self, head: bytes, body: bytes, piece: int = 65536) -> bool:
        """Send a whole reply, then keep the connection until the peer closes it (noted in
        stream_closed) or stop(): what a relay that read it only in part must do."""
        if not self.pour(head):
            return False
        for at in range(0, len(body), piece):
            if not self.pour(body[at : at + piece]):
                return False
        self._pause(None)
        return False

    def hold(self, seconds: float) -> bool:
        """Send nothing until seconds pass, the peer leaves or stop(); then close."""
        self.wait(seconds)
        return False

    def write(self, data: bytes, close: bool) -> bool:
        """Send raw bytes; keep the connection only if close is False."""
        self.send(data)
        return not close

    def reset(self) -> bool:
        """Close the socket with SO_LINGER (1, 0) so the peer gets a TCP RST."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.fake._forget(self.sock)
        self.sock.close()
        return False


@dataclass(eq=False)
class Behaviour:
    """A scripted answer: run(peer, req) returns True to keep the connection for more."""

    run: Callable[[_Peer, RecordedRequest], bool]
    match: Callable[[RecordedRequest], bool] | None = None
    closed_at: float | None = None  # when the peer was seen leaving mid-reply (monotonic)
    _closed: threading.Event = field(default_factory=threading.Event, repr=False)

    def note_closed(self, when: float) -> None:
        """The peer left while this behaviour was answering."""
        if self.closed_at is None:
            self.closed_at = when
        self._closed.set()

    def wait_closed(self, timeout=5.0) -> float | None:
        """When the peer left while this behaviour answered; None if not within timeout."""
        self._closed.wait(timeout)
        return self.closed_at


def json_reply(body, status=200, headers=None, delay=0.0, match=None, header_lines=()) -> Behaviour:
    """Answer with a JSON body (bytes are sent as is) after delay seconds; `header_lines`
    are raw header lines sent verbatim (see _head)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    final = _merge({"Content-Type": "application/json"}, headers)
    lines = list(header_lines)
    return Behaviour(lambda peer, req: peer.respond(status, data, final, delay, lines), match)


def sse_reply(
    events,
    interval=0.05,
    status=200,
    headers=None,
    chunked=True,
    drop_after=None,
    hang_after=None,
    first_delay=0.0,
    match=None,
    header_lines=(),
) -> Behaviour:
    """Stream events as SSE; first_delay is waited after the headers, before the first event;
    `header_lines` are raw header lines sent verbatim (see _head)."""
    options = {
        "interval": interval,
        "status": status,
        "headers": headers,
        "chunked": chunked,
        "drop_after": drop_after,
        "hang_after": hang_after,
        "first_delay": first_delay,
        "lines": list(header_lines),
    }
    return Behaviour(lambda peer, req: peer.stream(list(events), **options), match)


def hang(seconds=30, match=None) -> Behaviour:
    """Read the request, answer nothing, hold the connection for seconds."""
    return Behaviour(lambda peer, req: peer.hold(seconds), match)


def reset(match=None) -> Behaviour:
    """Read the request and answer with a TCP RST."""
    return Behaviour(lambda peer, req: peer.reset(), match)


def raw(data: bytes, close=True, match=None) -> Behaviour:
    """Write data verbatim, then close the connection unless close is False."""
    return Behaviour(lambda peer, req: peer.write(data, close), match)


def binary_reply(
    data: bytes, content_type="audio/mpeg", status=200, headers=None, match=None
) -> Behaviour:
    """Answer with a binary body."""
    final = _merge({"Content-Type": content_type}, headers)
    return Behaviour(lambda peer, req: peer.respond(status, data, final), match)


def _framed_head(
    status: int, headers: dict[str, str], framing: dict[str, str], lines: Iterable[bytes]
) -> bytes:
    """A head with the framing headers, a test's headers over them, and raw lines last."""
    return _head(status, _merge(framing, headers), lines)


def endless_body(
    content_type="application/json",
    start=b'{"id":"chatcmpl-endless","object":"chat.completion","padding":"',
    piece=b"a" * 65536,
    burst=8 * 1024 * 1024,
    every=0.05,
    headers=None,
    match=None,
) -> Behaviour:
    """A chunked reply whose body never ends: `start`, then `burst` bytes as fast as the peer
    takes them, then a piece every `every` seconds (bytes keep coming, the memory a relay
    that buffers it all grows by, stays bounded), until the peer closes (noted on the
    behaviour and in stream_closed)."""
    framing = {"Content-Type": content_type, "Transfer-Encoding": "chunked"}
    head = _framed_head(200, headers or {}, framing, ())
    return Behaviour(lambda peer, req: peer.endless(head, start, piece, burst, every), match)


GZIP_BOMB_PREFIX = b'{"id":"chatcmpl-bomb","object":"chat.completion","padding":"'


@functools.cache
def gzip_bomb_body(inflated: int = 300 * 1024 * 1024) -> bytes:
    """One gzip member (about 300 KB) inflating to GZIP_BOMB_PREFIX and then `inflated`
    bytes of "a": the start of a JSON object that never ends. Built once (about a second)."""
    block = b"a" * (1024 * 1024)
    packer = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(GZIP_BOMB_PREFIX)]
    parts += [packer.compress(block) for _ in range(inflated // len(block))]
    parts.append(packer.flush())
    return b"".join(parts)


def gzip_bomb(
    content_type="application/json", inflated=300 * 1024 * 1024, headers=None, match=None
) -> Behaviour:
    """A Content-Length framed `Content-Encoding: gzip` reply of gzip_bomb_body(inflated),
    then the connection held until the peer closes it (noted on the behaviour)."""
    body = gzip_bomb_body(inflated)
    framing = {
        "Content-Type": content_type,
        "Content-Encoding": "gzip",
        "Content-Length": str(len(body)),
    }
    head = _framed_head(200, headers or {}, framing, ())
    return Behaviour(lambda peer, req: peer.send_then_hold(head, body), match)


def trickle(
    body: bytes, every=0.1, content_type="application/json", headers=None, match=None
) -> Behaviour:
    """A Content-Length framed reply: the head at once, then the body one byte every
    `every` seconds; a peer that leaves is noted on the behaviour and in stream_closed."""
    framing = {"Content-Type": content_type, "Content-Length": str(len(body))}
    head = _framed_head(200, headers or {}, framing, ())
    steps: list = []
    for n in range(len(body)):
        steps += [every, body[n : n + 1]] if n else [body[:1]]
    return Behaviour(lambda peer, req: peer.scripted(head, steps, chunked=False), match)


def writes(
    steps,
    content_type="text/event-stream",
    chunked=True,
    status=200,
    headers=None,
    header_lines=(),
    match=None,
) -> Behaviour:
    """A reply written exactly as scripted: each bytes step is one write (one chunk when
    chunked), each number a pause of that many seconds, e.g. [b"data: {...sk-up", 0.05,
    b'stream..."}\n\n"]. Not chunked: framed by the total Content-Length."""
    steps = list(steps)
    framing = {"Content-Type": content_type}
    if chunked:
        framing["Transfer-Encoding"] = "chunked"
    else:
        framing["Content-Length"] = str(sum(len(s) for s in steps if isinstance(s, bytes)))
    head = _framed_head(status, headers or {}, framing, header_lines)
    return Behaviour(lambda peer, req: peer.scripted(head, steps, chunked), match)


class _Handler(socketserver.BaseRequestHandler):
    """Serves requests on one connection until it closes or a behaviour ends it."""

    def handle(self):
        """Run the request loop, recording unexpected exceptions in fake.errors."""
        fake = self.server.fake
        try:
            with contextlib.suppress(OSError):
                self._serve(fake, _Peer(self.request, fake))
        except Exception as exc:
            fake.errors.append(exc)
        finally:
            fake._forget(self.request)

    def _serve(self, fake: FakeUpstream, peer: _Peer) -> None:
        """Read requests and answer each with a queued or the default behaviour."""
        while not fake._stopping.is_set():
            try:
                req = peer.read_request()
            except _BadRequest as exc:
                peer.client_close = True
                peer.respond_json(400, _error_body(str(exc), None))
                return
            if req is None:
                return
            fake._record(req)
            behaviour = fake._take(req)
            peer.behaviour = behaviour
            keep = behaviour.run(peer, req) if behaviour else fake._default(peer, req)
            if not keep or peer.client_close:
                return


class _Server(socketserver.ThreadingTCPServer):
    """Threading TCP server that tracks its connections and handler threads."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 512  # bursts of 50+ connections must not overflow the backlog

    def __init__(self, address, fake: FakeUpstream):
        self.fake = fake
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        """Register the connection, then serve it in a daemon thread."""
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True
        )
        self.fake._accepted(request, thread)
        thread.start()


class FakeUpstream:
    """An OpenAI-like HTTP/1.1 server on a loopback port, scriptable per request."""

    def __init__(self, host="127.0.0.1", port=0):
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._server = _Server((host, port), self)
        self.port: int = self._server.server_address[1]
        self.base_url = f"http://{host}:{self.port}/v1"
        self.requests: list[RecordedRequest] = []
        self.stream_closed: list[float] = []
        self.errors: list[BaseException] = []
        self.connections_accepted = 0
        self.rejected_keys: set[str] = set()
        self.models = ["gpt-3.5-turbo", "gpt-4o", "text-embedding-3-small"]
        self.reply_text = "Hello from the fake upstream."
        self.stream_chunks = 5
        self.stream_interval = 0.0
        self.send_usage = True
        self.extra_headers: dict[str, str] = {}  # added to every default answer (Set-Cookie...)
        self._queue: list[Behaviour] = []
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._serve_thread: threading.Thread | None = None
        self._ids = itertools.count(1)

    def __enter__(self) -> FakeUpstream:
        """Start serving."""
        return self.start()

    def __exit__(self, *exc_info) -> None:
        """Stop serving."""
        self.stop()

    def start(self) -> FakeUpstream:
        """Serve in a daemon thread; returns self."""
        if self._serve_thread is None:
            self._serve_thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._serve_thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection, joining threads within about a second."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._serve_thread is not None:
            self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 0.9
        for thread in [self._serve_thread, *threads]:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))

    def queue(self, *behaviours: Behaviour) -> None:
        """Script the next requests, in FIFO order."""
        with self._lock:
            self._queue.extend(behaviours)

    def reset(self) -> None:
        """Forget recorded requests, queued behaviours and the closed-stream log."""
        with self._lock:
            self.requests.clear()
            self._queue.clear()
            self.stream_closed.clear()

    def wait_for_requests(self, n: int, timeout=5.0) -> bool:
        """Block until at least n requests were recorded; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.requests) >= n, timeout)

    def wait_stream_closed(self, timeout=5.0) -> float | None:
        """Return when the first stream was found closed by the peer, or None on timeout."""
        with self._cond:
            if self._cond.wait_for(lambda: self.stream_closed, timeout):
                return self.stream_closed[0]
        return None

    def _accepted(self, conn: socket.socket, thread: threading.Thread) -> None:
        """Track a newly accepted connection and its handler thread."""
        with self._lock:
            self.connections_accepted += 1
            self._conns.add(conn)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _forget(self, conn: socket.socket) -> None:
        """Stop tracking a connection."""
        with self._lock:
            self._conns.discard(conn)

    def _record(self, req: RecordedRequest) -> None:
        """Append a received request and wake waiters."""
        with self._cond:
            self.requests.append(req)
            self._cond.notify_all()

    def _log_stream_closed(self, when: float) -> None:
        """Note that the peer closed a stream mid-way."""
        with self._cond:
            self.stream_closed.append(when)
            self._cond.notify_all()

    def _take(self, req: RecordedRequest) -> Behaviour | None:
        """Pop the first queued behaviour matching req, else the first one without a match."""
        with self._lock:
            pick = next((b for b in self._queue if b.match is not None and b.match(req)), None)
            if pick is None:
                pick = next((b for b in self._queue if b.match is None), None)
            if pick is not None:
                self._queue.remove(pick)
            return pick

    def _default(self, peer: _Peer, req: RecordedRequest) -> bool:
        """Answer like OpenAI would."""
        if req.upstream_key is None:
            body = _error_body("You didn't provide an API key.", None)
            return peer.respond_json(401, body)
        if req.upstream_key in self.rejected_keys:
            body = _error_body("Incorrect API key provided.", "invalid_api_key")
            return peer.respond_json(401, body)
        if req.path in _JSON_ROUTES and req.method == "POST" and not isinstance(req.json, dict):
            body = _error_body("We could not parse the JSON body of your request.", None)
            return peer.respond_json(400, body)
        routes = {
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("POST", "/v1/audio/speech"): self._speech,
            ("POST", "/v1/audio/transcriptions"): self._transcription,
            ("POST", "/v1/images/generations"): self._images,
        }
        route = routes.get((req.method, req.path))
        if route is None:
            body = _error_body(f"Unknown path {req.path}", "not_found")
            return peer.respond_json(404, body)
        return route(peer, req)

    def _usage(self, prompt=FAKE_PROMPT_TOKENS, completion=FAKE_COMPLETION_TOKENS) -> dict:
        """Build a usage object."""
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _pieces(self) -> list[str]:
        """Split reply_text into stream_chunks non-empty pieces."""
        text, n = self.reply_text, max(1, self.stream_chunks)
        cuts = [len(text) * i // n for i in range(n + 1)]
        return [text[a:b] for a, b in itertools.pairwise(cuts) if b > a]

    def _answer(self, peer, req, base: dict, choices: list[dict], final: dict) -> bool:
        """Send base+final as one JSON object, or base+choices as a stream when asked."""
        n = next(self._ids)
        base = {**base, "id": base["id"] + str(n), "created": int(time.time())}
        headers = {"x-request-id": f"req_fake{n}", **self.extra_headers}
        if not req.json.get("stream"):
            body = {**base, **final}
            if self.send_usage:
                body["usage"] = self._usage()
            return peer.respond_json(200, body, headers)
        options = req.json.get("stream_options")
        usage = self.send_usage and isinstance(options, dict) and bool(options.get("include_usage"))
        extra = {"usage": None} if usage else {}
        events: list[object] = [{**base, "choices": [c], **extra} for c in choices]
        if usage:
            events.append({**base, "choices": [], "usage": self._usage()})
        events.append("[DONE]")
        return peer.stream(events, interval=self.stream_interval, headers=headers)

    def _models(self, peer, req) -> bool:
        """List self.models."""
        data = [
            {"id": m, "object": "model", "created": FAKE_CREATED, "owned_by": "fake"}
            for m in self.models
        ]
        return peer.respond_json(200, {"object": "list", "data": data}, self.extra_headers)

    def _chat(self, peer, req) -> bool:
        """Answer a chat completion."""
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": req.json.get("model") or "gpt-3.5-turbo",
        }
        message = {"role": "assistant", "content": self.reply_text}
        final = {
            "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}]
        }
        deltas = [{"role": "assistant", "content": ""}] + [{"content": p} for p in self._pieces()]
        choices = [
            {"index": 0, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas
        ]
        choices.append({"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"})
        if req.json.get("stream"):
            base["object"] = "chat.completion.chunk"
        return self._answer(peer, req, base, choices, final)

    def _completions(self, peer, req) -> bool:
        """Answer a legacy text completion."""
        base = {
            "id": "cmpl-fake",
            "object": "text_completion",
            "model": req.json.get("model") or "gpt-3.5-turbo-instruct",
        }
        final = {
            "choices": [
                {"text": self.reply_text, "index": 0, "logprobs": None, "finish_reason": "stop"}
            ]
        }
        choices = [
            {"text": p, "index": 0, "logprobs": None, "finish_reason": None} for p in self._pieces()
        ]
        choices.append({"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"})
        return self._answer(peer, req, base, choices, final)

    def _embeddings(self, peer, req) -> bool:
        """Return one fixed embedding per input."""
        inputs = req.json.get("input")
        many = isinstance(inputs, list) and not all(isinstance(i, int) for i in inputs)
        count = len(inputs) if many else 1
        body = {
            "object": "list",
            "model": req.json.get("model") or "text-embedding-3-small",
            "data": [
                {"object": "embedding", "index": i, "embedding": list(FAKE_EMBEDDING)}
                for i in range(count)
            ],
        }
        if self.send_usage:
            body["usage"] = {
                "prompt_tokens": FAKE_EMBEDDING_TOKENS,
                "total_tokens": FAKE_EMBEDDING_TOKENS,
            }
        return peer.respond_json(200, body)

    def _speech(self, peer, req) -> bool:
        """Return SPEECH_BYTES as audio/mpeg."""
        return peer.respond(200, SPEECH_BYTES, {"Content-Type": "audio/mpeg"})

    def _transcription(self, peer, req) -> bool:
        """Acknowledge an uploaded file."""
        body = {"text": "transcribed", "received_bytes": len(req.body)}
        return peer.respond_json(200, body)

    def _images(self, peer, req) -> bool:
        """Return one fake image URL."""
        body = {"created": int(time.time()), "data": [{"url": "https://example.invalid/img.png"}]}
        return peer.respond_json(200, body)
