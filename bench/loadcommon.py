"""What both load generators (gevent loadgen, aiohttp aioload) share: no gevent, stdlib only.

bench.aioload runs in another interpreter (a throwaway venv with aiohttp) that has neither
gevent nor the relay's dependencies, so nothing here may import them, directly or through
bench.processes (which imports the relay).
"""

import argparse
import json
import resource
import time

DONE_EVENT = b"data: [DONE]"
USER_AGENT = "relay-bench"


def chat_body(stream, tag=None):
    """The JSON body of one chat completion request, as bytes."""
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hello"}],
        "stream": stream,
    }
    if tag is not None:
        body["user"] = tag  # reaches the upstream through proxies that drop extra headers
    return json.dumps(body).encode()


def chat_headers(key, tag=None):
    """The headers both clients send with a chat completion (Host and Content-Length aside)."""
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }
    if tag is not None:
        headers["X-Bench-Id"] = tag
    return headers


class EventClock:
    """Counts SSE events as they complete and the largest gap between consecutive ones."""

    __slots__ = ("events", "first", "gap_at", "last", "last_event", "max_gap", "pending", "times")

    def __init__(self, keep_times=False):
        """Start empty; keep every event's time when asked."""
        self.times = [] if keep_times else None
        self.first = None
        self.last = None
        self.events = 0
        self.max_gap = 0.0
        self.gap_at = None
        self.pending = b""
        self.last_event = b""

    def feed(self, now, data):
        """Take body bytes received at `now`."""
        if self.first is None:
            self.first = now
        pending = self.pending + data if self.pending else data
        if b"\n\n" not in pending:
            self.pending = pending
            return
        parts = pending.split(b"\n\n")
        self.pending = parts.pop()
        if self.last is not None and now - self.last > self.max_gap:
            self.max_gap = now - self.last
            self.gap_at = self.events  # index of the first event after the gap
        self.events += len(parts)
        self.last_event = parts[-1]
        self.last = now
        if self.times is not None:
            self.times.extend([now] * len(parts))

    @property
    def done(self):
        """Whether the last complete event was `data: [DONE]`."""
        return self.last_event.strip() == DONE_EVENT


def new_stream_record(number):
    """A stream's record before it starts (the fields summarize_streams reads)."""
    record = {"i": number, "status": None, "error": None, "t_first": None, "done": False}
    record.update({"t0": None, "t_end": None, "ttfb": None, "events": 0, "max_gap": 0.0})
    return record


def close_stream_record(record, clock, started, keep_times):
    """Fill a finished (or failed) stream's record from its EventClock."""
    record["t_end"] = time.monotonic()
    record["t_first"] = clock.first
    record["ttfb"] = clock.first - started if clock.first is not None else None
    record["events"] = clock.events
    record["max_gap"] = clock.max_gap
    record["gap_at"] = clock.gap_at
    if keep_times:
        record["times"] = [round(t - started, 6) for t in clock.times]
    record["done"] = clock.done


def mark_unstarted(records):
    """Streams the deadline came before are failures of their own kind."""
    for record in records:
        if record["t0"] is None:
            record["error"] = "deadline (not started)"


def raise_open_files():
    """Lift this process's soft open-files limit to the hard one."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(description, modes, argv=None):
    """The load generators' common command line (`modes`: what this one can do)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("mode", choices=modes)
    parser.add_argument("--url", required=True, help="http://host:port/v1/chat/completions")
    parser.add_argument("--key", default="x")
    parser.add_argument("--out", required=True, help="write the JSON result here")
    parser.add_argument("--timeout", type=float, default=60.0, help="per socket operation")
    parser.add_argument("--n", type=int, default=0, help="streams, or a cap on non-stream calls")
    parser.add_argument("--ramp", type=float, default=0.0, help="seconds over which streams start")
    parser.add_argument("--t0", type=float, help="time.monotonic() of the first start")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds after t0")
    parser.add_argument("--index", type=int, default=0, help="this process's share: i %% step")
    parser.add_argument("--step", type=int, default=1, help="processes sharing the streams")
    parser.add_argument("--times", action="store_true", help="keep every event's arrival time")
    parser.add_argument("--tag-prefix", help="tag requests (X-Bench-Id and `user`)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=int, default=0, help="untimed calls first")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between trials")
    parser.add_argument("--rate", type=float, default=200.0, help="soak: calls started per second")
    parser.add_argument("--keys", help="soak: comma list of keys to take turns (default --key)")
    parser.add_argument("--stream-every", type=int, default=3, help="soak: every Nth call streams")
    args = parser.parse_args(argv)
    if args.t0 is None:
        args.t0 = time.monotonic() + 0.1
    return args


def run_and_write(args, run):
    """run() the mode, add this process's CPU and wall time, write the JSON to --out."""
    raise_open_files()
    wall = time.monotonic()
    result = run()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    result["wall_seconds"] = time.monotonic() - wall
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    return 0
