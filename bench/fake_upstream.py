"""A cheap gevent fake OpenAI upstream that also records when a stream's peer hangs up."""

import argparse
import ctypes
import json
import os
import signal
import socket
import sys
import time

import gevent
from gevent import sleep
from gevent.pool import Pool
from gevent.server import StreamServer
from gevent.socket import wait_read

from bench.processes import raise_open_files

MODEL = "gpt-4o"
CREATED = 1700000000
MAX_HEAD = 65536
PR_SET_PDEATHSIG = 1
USAGE = {"prompt_tokens": 9, "completion_tokens": 100, "total_tokens": 109}


class _Tick(Exception):
    """Raised by the wait for readability when the pause before the next chunk is over."""


_TICK = _Tick()


def _chunk(data):
    """Frame bytes as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(payload):
    """One SSE `data:` event, framed as an HTTP chunk."""
    return _chunk(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


def build_stream(chunks, include_usage):
    """(content chunk frames, closing bytes) of a streamed chat completion, like OpenAI's."""
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": None,
    }
    extra = {"usage": None} if include_usage else {}
    frames = []
    for number in range(chunks):
        delta = {"content": f"tok{number} "}
        if number == 0:
            delta = {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        frames.append(_event({**base, "choices": [choice], **extra}))
    end = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    closing = _event({**base, "choices": [end], **extra})
    if include_usage:
        closing += _event({**base, "choices": [], "usage": USAGE})
    closing += _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    return frames, closing


def build_completion():
    """The body of a non-stream chat completion."""
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        },
        separators=(",", ":"),
    ).encode()


def _head(status, content_type, length=None):
    """Status line and headers; chunked when no length is given."""
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return b"HTTP/1.1 %d X\r\nContent-Type: %s\r\n%s\r\nx-request-id: req-bench\r\n\r\n" % (
        status,
        content_type,
        framing,
    )


def _reply(status, payload):
    """A whole JSON reply."""
    body = json.dumps(payload).encode()
    return _head(status, b"application/json", len(body)) + body


class FakeUpstream:
    """Serves POST …/chat/completions (JSON or SSE), GET /healthz and GET /stats."""

    def __init__(self, chunks, chunk_delay, events_path=None):
        """Prebuild the replies and open the events file."""
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.streams = {flag: build_stream(chunks, flag) for flag in (False, True)}
        self.completion = _head(200, b"application/json", len(build_completion()))
        self.completion += build_completion()
        self.events_fd = None
        if events_path:
            self.events_fd = os.open(events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.counts = {"requests": 0, "streams": 0, "streams_done": 0, "hangups": 0, "active": 0}
        self.peak_active = 0

    def record(self, entry):
        """Append one JSON line to the events file (one write: whole lines, any process)."""
        if self.events_fd is not None:
            os.write(self.events_fd, (json.dumps(entry) + "\n").encode())

    def summary(self):
        """This process's counters."""
        return {"pid": os.getpid(), **self.counts, "peak_active": self.peak_active}

    def handle(self, sock, _address):
        """Serve one connection (keep-alive) until the peer closes it."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = b""
        try:
            while True:
                request, buffer = _read_request(sock, buffer)
                if request is None or not self.respond(sock, *request):
                    return
        except (OSError, ValueError):
            return
        finally:
            sock.close()

    def respond(self, sock, method, path, headers, body):
        """Answer one request; False when the connection must close."""
        self.counts["requests"] += 1
        if method == "GET" and path == "/healthz":
            sock.sendall(_reply(200, {"status": "ok"}))
            return True
        if method == "GET" and path == "/stats":
            sock.sendall(_reply(200, self.summary()))
            return True
        if not headers.get("authorization", "").startswith("Bearer "):
            sock.sendall(_reply(401, {"error": {"message": "No key", "code": "invalid_api_key"}}))
            return True
        if method != "POST" or not path.split("?")[0].endswith("/chat/completions"):
            sock.sendall(_reply(404, {"error": {"message": "Unknown path", "code": "not_found"}}))
            return True
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            sock.sendall(_reply(400, {"error": {"message": "Bad JSON", "code": "invalid"}}))
            return True
        if not payload.get("stream"):
            sock.sendall(self.completion)
            return True
        options = payload.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        user = payload.get("user")
        tag = headers.get("x-bench-id") or (
            user if isinstance(user, str) and user.startswith("bench-") else None
        )
        return self.stream(sock, usage, tag)

    def stream(self, sock, usage, tag):
        """Send the chunks `chunk_delay` apart; stop and record when the peer hangs up."""
        frames, closing = self.streams[usage]
        counts = self.counts
        counts["streams"] += 1
        counts["active"] += 1
        self.peak_active = max(self.peak_active, counts["active"])
        started = time.monotonic()
        sent = 0
        how = None
        try:
            sock.sendall(_head(200, b"text/event-stream") + frames[0])
            sent = 1
            for number in range(1, len(frames)):
                if not _pause(sock, started + number * self.chunk_delay):
                    how = "eof"
                    break
                try:
                    sock.sendall(frames[number])
                except OSError:
                    how = "send"
                    break
                sent += 1
            else:
                if not _pause(sock, started + len(frames) * self.chunk_delay):
                    how = "eof"
                else:
                    try:
                        sock.sendall(closing)
                    except OSError:
                        how = "send"
        finally:
            counts["active"] -= 1
        if how is None:
            counts["streams_done"] += 1
            return True
        counts["hangups"] += 1
        self.record(
            {"tag": tag, "t_req": started, "t_gone": time.monotonic(), "how": how, "sent": sent}
        )
        return False


def _pause(sock, until):
    """Wait until `until` (monotonic) unless the peer hangs up first; False when it did."""
    while True:
        remaining = until - time.monotonic()
        if remaining <= 0:
            return True
        try:
            wait_read(sock.fileno(), remaining, _TICK)
        except _Tick:
            return True
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except OSError:
            return False
        if not data:
            return False
        # Bytes of a pipelined request wait there: the socket can no longer be watched.
        sleep(max(0.0, until - time.monotonic()))
        return True


def _read_request(sock, buffer):
    """Read one request: ((method, path, headers, body), rest) or (None, b'') at EOF."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HEAD:
            raise ValueError("request head too large")
        data = sock.recv(65536)
        if not data:
            return None, b""
        buffer += data
    lines = buffer[:end].decode("latin-1").split("\r\n")
    buffer = buffer[end + 4 :]
    method, path, _version = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise ValueError("chunked request bodies are not supported")
    length = int(headers.get("content-length") or 0)
    while len(buffer) < length:
        data = sock.recv(65536)
        if not data:
            return None, b""
        buffer += data
    return (method, path, headers, buffer[:length]), buffer[length:]


def _listener(host, port, backlog):
    """A listening socket with SO_REUSEPORT, so several processes can share the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _die_with_parent():
    """Ask Linux to SIGTERM this process when its parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def serve(listener, app):
    """Serve on one listener in this process until SIGTERM or SIGINT."""
    server = StreamServer(listener, app.handle, spawn=Pool(50000))

    def stop():
        """Write this process's counters, then stop serving."""
        app.record({"summary": app.summary()})
        server.close()

    gevent.signal_handler(signal.SIGTERM, stop)
    gevent.signal_handler(signal.SIGINT, stop)
    server.serve_forever()


def main(argv=None):
    """Parse options, fork the extra processes, and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=100, help="content chunks per stream")
    parser.add_argument("--chunk-delay", type=float, default=0.1, help="seconds between chunks")
    parser.add_argument("--procs", type=int, default=1, help="processes sharing the port")
    parser.add_argument("--backlog", type=int, default=4096)
    parser.add_argument("--events", help="append hang-up records and counters here (JSON lines)")
    args = parser.parse_args(argv)
    raise_open_files()
    # Bind every listener before forking: once /healthz answers, all processes take connections.
    listeners = [_listener(args.host, args.port, args.backlog) for _ in range(args.procs)]
    children = []
    for index in range(1, args.procs):
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            for other, sock in enumerate(listeners):
                if other != index:
                    sock.close()
            app = FakeUpstream(args.chunks, args.chunk_delay, args.events)
            serve(listeners[index], app)
            os._exit(0)
        children.append(pid)
    for sock in listeners[1:]:
        sock.close()
    app = FakeUpstream(args.chunks, args.chunk_delay, args.events)
    print(f"fake upstream on http://{args.host}:{args.port}/v1 ({args.procs} procs)", flush=True)
    try:
        serve(listeners[0], app)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    sys.exit(0)


if __name__ == "__main__":
    main()
