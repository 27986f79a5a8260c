"""A second load generator on asyncio + aiohttp: same command line and JSON as bench.loadgen.

Modes `stream`, `nonstream` and `disconnect` (no soak). It runs in its own interpreter
(`--aiohttp-python`, a throwaway venv with aiohttp), so it imports neither gevent nor
the relay: only bench.loadcommon and bench.summary. The requests carry the same body and
headers as loadgen's; aiohttp's own Accept and Accept-Encoding are left out so that both
clients ask for the same thing and differ only in how they send and read.
"""

import asyncio
import sys
import time

import aiohttp

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

FAILURES = (aiohttp.ClientError, OSError, TimeoutError)
SKIPPED_HEADERS = ("Accept", "Accept-Encoding")


def session(args, limit, keep_alive):
    """A ClientSession with per-operation timeouts like loadgen's (no total timeout)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=args.timeout, sock_read=args.timeout)
    connector = aiohttp.TCPConnector(limit=limit, force_close=not keep_alive)
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, skip_auto_headers=SKIPPED_HEADERS
    )


def failure(exc):
    """An exception as a short error string (as loadgen writes them)."""
    return f"{type(exc).__name__}: {exc}"[:200]


async def one_stream(client, args, number, record):
    """Wait for the stream's start on the schedule, then run it, filling `record`."""
    start_at = args.t0 + args.ramp * number / max(args.n, 1)
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    tag = f"{args.tag_prefix}-{number}" if args.tag_prefix else None
    started = time.monotonic()
    record["t0"] = started
    clock = EventClock(args.times)
    try:
        body, headers = chat_body(True, tag), chat_headers(args.key, tag)
        async with client.post(args.url, data=body, headers=headers) as resp:
            record["status"] = resp.status
            async for data in resp.content.iter_any():  # as the bytes arrive
                clock.feed(time.monotonic(), data)
    except asyncio.CancelledError:
        record["error"] = "deadline"
        raise
    except FAILURES as exc:
        record["error"] = failure(exc)
    finally:
        close_stream_record(record, clock, started, args.times)


async def run_streams(args):
    """This process's share of the streams on the common schedule, each on a new connection."""
    records = []
    # force_close: a connection per stream and none kept; limit 0: no cap on open ones.
    async with session(args, limit=0, keep_alive=False) as client:
        tasks = []
        for number in range(args.index, args.n, args.step):
            record = new_stream_record(number)
            records.append(record)
            tasks.append(asyncio.create_task(one_stream(client, args, number, record)))
        remaining = max(0.0, args.t0 + args.deadline - time.monotonic())
        _done, pending = await asyncio.wait(tasks, timeout=remaining) if tasks else ((), ())
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
    mark_unstarted(records)
    return {"records": records}


class NonStream:
    """`concurrency` keep-alive clients calling back to back (see run_nonstream)."""

    def __init__(self, args, client):
        """The request and empty tallies."""
        self.args = args
        self.client = client
        self.body = chat_body(False)
        self.headers = chat_headers(args.key)
        self.latencies = []
        self.statuses = {}
        self.errors = []
        self.measuring = False
        self.calls = 0

    async def call(self):
        """One call: send, read the whole body, note the latency and status when measuring."""
        started = time.monotonic()
        async with self.client.post(self.args.url, data=self.body, headers=self.headers) as resp:
            await resp.read()
            status = resp.status
        if self.measuring:
            self.latencies.append(time.monotonic() - started)
            self.statuses[status] = self.statuses.get(status, 0) + 1

    async def caller(self, end_at, limit):
        """Call until end_at or until the shared count reaches limit."""
        while time.monotonic() < end_at and self.calls < limit:
            self.calls += 1
            try:
                await self.call()
            except FAILURES as exc:  # aiohttp drops a failed connection by itself
                if self.measuring:
                    self.errors.append(failure(exc))

    async def level(self, end_at, limit):
        """All the clients at once."""
        await asyncio.gather(*(self.caller(end_at, limit) for _ in range(self.args.concurrency)))

    def summary(self, elapsed):
        """The same keys as loadgen's nonstream result."""
        ok = self.statuses.get(200, 0)
        latencies = self.latencies
        return {
            "count": len(latencies),
            "ok": ok,
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "errors": len(self.errors),
            "error_samples": self.errors[:5],
            "elapsed": elapsed,
            "rps": ok / elapsed if elapsed else None,
            "p50_ms": ms(percentile(latencies, 0.5), None),
            "p90_ms": ms(percentile(latencies, 0.9), None),
            "p99_ms": ms(percentile(latencies, 0.99), None),
            "mean_ms": ms(sum(latencies) / len(latencies), None) if latencies else None,
        }


async def run_nonstream(args):
    """`concurrency` keep-alive clients calling back to back for `duration` seconds.

    One session whose pool holds `concurrency` keep-alive connections: that is how an
    aiohttp application calls a service (one session, a pooled connector). With as many
    clients as the limit, none ever waits for a connection, and each call goes out on a
    connection left open by an earlier one, so it is the same load as loadgen's one
    connection per client, sent the way aiohttp sends.
    """
    async with session(args, limit=args.concurrency, keep_alive=True) as client:
        load = NonStream(args, client)
        if args.warmup:
            await load.level(time.monotonic() + 30, args.warmup)
        load.measuring = True
        load.calls = 0
        started = time.monotonic()
        await load.level(started + args.duration, args.n or 1 << 62)
        return load.summary(time.monotonic() - started)


async def first_event_then_close(client, args, trial, tag):
    """One disconnect trial: read until a whole event has arrived, then close the socket."""
    clock = EventClock()
    started = time.monotonic()
    body, headers = chat_body(True, tag), chat_headers(args.key, tag)
    resp = await client.post(args.url, data=body, headers=headers)
    try:
        trial["status"] = resp.status
        async for data in resp.content.iter_any():
            clock.feed(time.monotonic(), data)
            if clock.events:
                break
        if clock.events:
            trial["ttfb"] = clock.first - started
        else:
            trial["error"] = "stream ended before the client hung up"
    finally:
        trial["t_close"] = time.monotonic()
        resp.close()  # closes the connection itself, not a release to the pool


async def run_disconnect(args):
    """Trials one after another: read the first SSE event, then close the connection."""
    trials = []
    async with session(args, limit=0, keep_alive=False) as client:
        for number in range(args.trials):
            tag = f"{args.tag_prefix or 'bench-dc'}-{number}"
            trial = {"tag": tag, "t_close": None, "status": None, "error": None}
            trials.append(trial)
            try:
                await first_event_then_close(client, args, trial, tag)
            except FAILURES as exc:
                trial["error"] = failure(exc)
            await asyncio.sleep(args.pause)
    return {"trials": trials}


def main(argv=None):
    """Parse options, run one mode on a fresh event loop, write the JSON result."""
    args = parse_args(__doc__.splitlines()[0], ["stream", "nonstream", "disconnect"], argv)
    run = {"stream": run_streams, "nonstream": run_nonstream, "disconnect": run_disconnect}
    return run_and_write(args, lambda: asyncio.run(run[args.mode](args)))


if __name__ == "__main__":
    sys.exit(main())
