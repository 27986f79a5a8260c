"""A cheap gevent HTTP/1.1 load generator: SSE streams, non-stream calls, disconnects, soaks."""

import socket
import sys
import time
from urllib.parse import urlsplit

import gevent
from gevent import socket as gsocket
from gevent.pool import Group

from bench.loadcommon import (
    EventClock,
    chat_body,
    chat_headers,
    close_stream_record,
    mark_unstarted,
    new_stream_record,
    parse_args,
    run_and_write,
)
from bench.summary import ms, percentile

RECV_SIZE = 65536


class HttpError(Exception):
    """The server broke HTTP framing or closed the connection early."""


class StopReading(Exception):
    """Raised by a body callback that has seen enough (disconnect trials)."""


class Target:
    """Where requests go and the bytes of each request."""

    def __init__(self, url, key):
        """Split the URL into host, port and path."""
        parts = urlsplit(url)
        self.host = parts.hostname
        self.port = parts.port or 80
        self.path = parts.path or "/"
        self.key = key

    def request(self, stream, tag=None):
        """The bytes of one chat completion request."""
        data = chat_body(stream, tag)
        head = f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        headers = chat_headers(self.key, tag)
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        head += f"Content-Length: {len(data)}\r\n\r\n"
        return head.encode() + data


class Connection:
    """One HTTP/1.1 client connection with its receive buffer and last receive time."""

    def __init__(self, target, timeout):
        """Connect (TCP_NODELAY) with a per-operation timeout."""
        self.sock = gsocket.create_connection((target.host, target.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.received_at = None

    def close(self):
        """Close the socket."""
        self.sock.close()

    def recv(self):
        """Receive some bytes, noting when; EOF is an error."""
        data = self.sock.recv(RECV_SIZE)
        self.received_at = time.monotonic()
        if not data:
            raise HttpError("connection closed by the server")
        return data

    def read_head(self):
        """Read the status line and headers: (status, {lower-case name: value})."""
        buffer = self.buffer
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            buffer += self.recv()
        lines = buffer[:end].decode("latin-1").split("\r\n")
        self.buffer = buffer[end + 4 :]
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise HttpError(f"bad status line {lines[0][:60]!r}") from None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def read_body(self, headers, on_data):
        """Read the body, calling on_data(received_at, bytes) as it comes; True if reusable."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._read_chunked(on_data)
        elif "content-length" in headers:
            self._read_length(int(headers["content-length"]), on_data)
        else:
            self._read_to_eof(on_data)
            return False
        return headers.get("connection", "").lower() != "close"

    def _read_length(self, length, on_data):
        """A Content-Length body."""
        self.buffer = self._pass_on(self.buffer, length, on_data)

    def _pass_on(self, buffer, size, on_data):
        """Hand the next `size` body bytes to on_data as they arrive; return what follows."""
        while size:
            if not buffer:
                buffer = self.recv()
            piece, buffer = buffer[:size], buffer[size:]
            size -= len(piece)
            on_data(self.received_at, piece)
        return buffer

    def _read_to_eof(self, on_data):
        """A body that ends when the server closes."""
        if self.buffer:
            on_data(self.received_at, self.buffer)
        self.buffer = b""
        while data := self.sock.recv(RECV_SIZE):
            self.received_at = time.monotonic()
            on_data(self.received_at, data)

    def _read_chunked(self, on_data):
        """A chunked body, handed on piece by piece as each receive brings it."""
        buffer = self.buffer
        while True:
            while (end := buffer.find(b"\r\n")) < 0:
                buffer += self.recv()
            try:
                size = int(buffer[:end].split(b";", 1)[0], 16)
            except ValueError:
                raise HttpError("bad chunk size line") from None
            buffer = buffer[end + 2 :]
            if size == 0:
                while True:  # trailers, then the empty line
                    while (end := buffer.find(b"\r\n")) < 0:
                        buffer += self.recv()
                    line, buffer = buffer[:end], buffer[end + 2 :]
                    if not line:
                        self.buffer = buffer
                        return
            buffer = self._pass_on(buffer, size, on_data)
            while len(buffer) < 2:
                buffer += self.recv()
            if buffer[:2] != b"\r\n":
                raise HttpError("chunk not followed by CRLF")
            buffer = buffer[2:]


def one_stream(target, request, timeout, record, keep_times=False):
    """Run one streamed call, filling `record` (times are time.monotonic())."""
    started = time.monotonic()
    record["t0"] = started
    conn = None
    clock = EventClock(keep_times)
    try:
        conn = Connection(target, timeout)
        conn.sock.sendall(request)
        status, headers = conn.read_head()
        record["status"] = status
        conn.read_body(headers, clock.feed)
    except gevent.GreenletExit:
        record["error"] = "deadline"
    except (OSError, HttpError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        if conn is not None:
            conn.close()
        close_stream_record(record, clock, started, keep_times)


def run_streams(args, target):
    """Start this process's share of the streams on the common schedule; wait for all."""
    records = []
    greenlets = []
    for number in range(args.index, args.n, args.step):
        record = new_stream_record(number)
        records.append(record)
        tag = f"{args.tag_prefix}-{number}" if args.tag_prefix else None
        request = target.request(True, tag)
        start_at = args.t0 + args.ramp * number / max(args.n, 1)
        delay = max(0.0, start_at - time.monotonic())
        greenlets.append(
            gevent.spawn_later(delay, one_stream, target, request, args.timeout, record, args.times)
        )
    remaining = max(0.0, args.t0 + args.deadline - time.monotonic())
    gevent.joinall(greenlets, timeout=remaining)
    gevent.killall([g for g in greenlets if not g.dead], block=True, timeout=5)
    mark_unstarted(records)
    return {"records": records}


def run_nonstream(args, target):
    """`concurrency` keep-alive clients calling back to back for `duration` seconds."""
    request = target.request(False)
    latencies = []
    statuses = {}
    errors = []
    state = {"measuring": False, "calls": 0}

    def call(conn):
        """One call on a connection; returns whether the connection can be reused."""
        started = time.monotonic()
        conn.sock.sendall(request)
        status, headers = conn.read_head()
        body = []
        reusable = conn.read_body(headers, lambda _now, data: body.append(data))
        if state["measuring"]:
            latencies.append(time.monotonic() - started)
            statuses[status] = statuses.get(status, 0) + 1
        return reusable

    def client(end_at, limit):
        """Call until end_at or until the shared count reaches limit."""
        conn = None
        while time.monotonic() < end_at and state["calls"] < limit:
            state["calls"] += 1
            try:
                if conn is None:
                    conn = Connection(target, args.timeout)
                if not call(conn):
                    conn.close()
                    conn = None
            except (OSError, HttpError) as exc:
                if state["measuring"]:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    if args.warmup:
        clients = [
            gevent.spawn(client, time.monotonic() + 30, args.warmup)
            for _ in range(args.concurrency)
        ]
        gevent.joinall(clients)
    state["measuring"] = True
    state["calls"] = 0
    started = time.monotonic()
    limit = args.n or 1 << 62
    clients = [
        gevent.spawn(client, started + args.duration, limit) for _ in range(args.concurrency)
    ]
    gevent.joinall(clients)
    elapsed = time.monotonic() - started
    ok = statuses.get(200, 0)
    return {
        "count": len(latencies),
        "ok": ok,
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": len(errors),
        "error_samples": errors[:5],
        "elapsed": elapsed,
        "rps": ok / elapsed if elapsed else None,
        "p50_ms": ms(percentile(latencies, 0.5), None),
        "p90_ms": ms(percentile(latencies, 0.9), None),
        "p99_ms": ms(percentile(latencies, 0.99), None),
        "mean_ms": ms(sum(latencies) / len(latencies), None) if latencies else None,
    }


class Soak:
    """Calls at a fixed rate, open loop: call i starts at t0 + i / rate, whatever is still open."""

    def __init__(self, args, target):
        """Prebuild each key's two requests (non-stream, stream) and zero the tallies."""
        self.args = args
        self.target = target
        keys = args.keys.split(",") if args.keys else [target.key]
        clients = [Target(args.url, key) for key in keys]
        self.requests = [(client.request(False), client.request(True)) for client in clients]
        self.total = round(args.rate * args.duration)
        self.counts = dict.fromkeys(("started", "sent", "completed", "ok", "cut", "failed"), 0)
        self.failures = {}
        self.samples = []
        self.statuses = {}
        self.latency = {"json": [], "stream": []}
        self.ttfb = []
        self.lags = []
        self.open = {"json": 0, "stream": 0}
        self.peak = {"calls": 0, "streams": 0}

    def run(self):
        """Start every call on schedule, wait for them until the deadline, cut what is left."""
        group = Group()
        for number in range(self.total):
            due = self.args.t0 + number / self.args.rate
            # Behind schedule the sleep is 0: it still lets the running calls go on.
            gevent.sleep(max(0.0, due - time.monotonic()))
            group.spawn(self.call, number, due)
        group.join(timeout=max(0.0, self.args.t0 + self.args.deadline - time.monotonic()))
        group.kill(block=True, timeout=5)
        missing = self.total - self.counts["started"]
        if missing:
            self.counts["failed"] += missing
            self.failures["deadline (not started)"] = missing
        return self.summary()

    def call(self, number, due):
        """One call, start to end of its body, then tallied."""
        stream = number % self.args.stream_every == 0
        kind = "stream" if stream else "json"
        started = time.monotonic()
        self.counts["started"] += 1
        self.lags.append(started - due)
        self.open[kind] += 1
        self.peak["calls"] = max(self.peak["calls"], self.open["json"] + self.open["stream"])
        self.peak["streams"] = max(self.peak["streams"], self.open["stream"])
        conn, sent, status, error = None, False, None, None
        clock = EventClock()
        try:
            # A connection per call: arrivals stand for independent clients.
            conn = Connection(self.target, self.args.timeout)
            conn.sock.sendall(self.requests[number % len(self.requests)][stream])
            sent = True
            status, headers = conn.read_head()
            conn.read_body(headers, clock.feed)
        except gevent.GreenletExit:
            error = "cut"
        except (OSError, HttpError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            ended = time.monotonic()
            if conn is not None:
                conn.close()
            self.open[kind] -= 1
        self.tally(number, kind, sent, status, error, clock, started, ended)

    def tally(self, number, kind, sent, status, error, clock, started, ended):
        """Count one finished call: ok, cut by the deadline after it was sent, or failed."""
        if status is not None:
            self.statuses[status] = self.statuses.get(status, 0) + 1
        self.counts["sent"] += sent
        if error is None:
            self.counts["completed"] += 1
            if status != 200:
                error = f"status {status}"
            elif kind == "stream" and not clock.done:
                error = "no [DONE]"
        if error is None:
            self.counts["ok"] += 1
            self.latency[kind].append(ended - started)
            if kind == "stream":
                self.ttfb.append(clock.first - started)
        elif error == "cut" and sent:
            self.counts["cut"] += 1
            self.failures["cut at the deadline"] = self.failures.get("cut at the deadline", 0) + 1
        else:
            self.counts["failed"] += 1
            what = "deadline (not sent)" if error == "cut" else error.split(":")[0]
            self.failures[what] = self.failures.get(what, 0) + 1
            self.samples.append(f"call {number} ({kind}): {error}")

    def summary(self):
        """Counts, failures, latencies by kind, lateness of the starts and peak calls open."""
        figures = {}
        for kind, values in self.latency.items():
            figures[kind] = {
                "ok": len(values),
                "p50_ms": ms(percentile(values, 0.5)),
                "p99_ms": ms(percentile(values, 0.99)),
                "max_ms": ms(max(values)) if values else None,
            }
        figures["stream"]["ttfb_p50_ms"] = ms(percentile(self.ttfb, 0.5))
        figures["stream"]["ttfb_p99_ms"] = ms(percentile(self.ttfb, 0.99))
        return {
            "scheduled": self.total,
            **self.counts,
            "failures": self.failures,
            "error_samples": self.samples[:5],
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "latency": figures,
            "lag_p50_ms": ms(percentile(self.lags, 0.5)),
            "lag_p99_ms": ms(percentile(self.lags, 0.99)),
            "lag_max_ms": ms(max(self.lags)) if self.lags else None,
            "peak_in_flight": self.peak["calls"],
            "peak_streams_open": self.peak["streams"],
        }


def run_soak(args, target):
    """Mixed calls at `rate` per second for `duration` seconds (see Soak)."""
    return Soak(args, target).run()


def run_disconnect(args, target):
    """Trials one after another: read the first SSE event, then close the socket."""
    trials = []
    for number in range(args.trials):
        tag = f"{args.tag_prefix or 'bench-dc'}-{number}"
        trial = {"tag": tag, "t_close": None, "status": None, "error": None}
        trials.append(trial)
        conn = None
        clock = EventClock()

        def first_event(now, data, clock=clock):
            """Stop reading once one whole event has arrived."""
            clock.feed(now, data)
            if clock.events:
                raise StopReading

        try:
            conn = Connection(target, args.timeout)
            started = time.monotonic()
            conn.sock.sendall(target.request(True, tag))
            trial["status"], headers = conn.read_head()
            conn.read_body(headers, first_event)
            trial["error"] = "stream ended before the client hung up"
        except StopReading:
            trial["ttfb"] = clock.first - started
        except (OSError, HttpError) as exc:
            trial["error"] = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            if conn is not None:
                trial["t_close"] = time.monotonic()
                conn.close()
        gevent.sleep(args.pause)
    return {"trials": trials}


def main(argv=None):
    """Parse options, run one mode, write the JSON result."""
    args = parse_args(__doc__, ["stream", "nonstream", "disconnect", "soak"], argv)
    target = Target(args.url, args.key)
    run = {
        "stream": run_streams,
        "nonstream": run_nonstream,
        "disconnect": run_disconnect,
        "soak": run_soak,
    }
    return run_and_write(args, lambda: run[args.mode](args, target))


if __name__ == "__main__":
    sys.exit(main())
