"""Does the relay keep serving others while strangers attack it? /healthz and running streams
timed while form bombs and slow sockets arrive (issue 18's availability figure).

    python -m bench.hostile_load [--seconds 30] [--bombers 4] [--slow 100] [--no-block]

The relay runs as the Procfile starts it (2 gevent workers, default settings) in front of
the bench fake upstream (10 s streams, an event every 100 ms). From 127.0.0.1 the attack:
`--bombers` threads post 60 KB legacy forms of `a[]=1&a[]=1…` with no key, back to back;
`--slow` sockets trickle request heads and as many trickle bodies, a byte a second, each
replaced by a new one when the relay answers it (408). From other loopback addresses the
victims: 4 clients keep streams open one after another (127.0.0.2), and a probe GETs
/healthz on a new connection 20 times a second (127.0.0.3). The figures are /healthz's
latency and how late each stream event comes (its gap minus the 100 ms the upstream
waits), before the attack and during it. `--no-block` sets RELAY_UNAUTHENTICATED_RPM=0:
every bomb is then read and parsed, the worst case for the form parser.
"""

import argparse
import contextlib
import http.client
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

from bench.processes import Monitor, Processes, raise_open_files
from bench.targets import Relay, Upstream

BOMB = b"&".join([b"a[]=1"] * 10_000)  # 60 KB: quadratic in the old parser
LEGACY_PATH = "/api/v1/chat/completions"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
SLOW_BODY = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\n\r\n"
)
# What each kind of slow connection trickles after its start, a byte a second.
TRICKLED = {SLOW_HEAD: b"X-Slow: " + b"a" * 10_000, SLOW_BODY: b" " * 1000}
STREAM_INTERVAL = 0.1  # the bench upstream: 100 chunks over 10 s


def percentile(samples, fraction):
    """The sample below which `fraction` of them lie (nearest rank)."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def figures(samples):
    """p50, p99 and max of latencies in seconds, as milliseconds."""
    if not samples:
        return {"n": 0}
    return {
        "n": len(samples),
        "p50_ms": round(statistics.median(samples) * 1000, 1),
        "p99_ms": round(percentile(samples, 0.99) * 1000, 1),
        "max_ms": round(max(samples) * 1000, 1),
    }


class Recorder:
    """Latencies noted by the victims, split by phase (`calm` or `attack`)."""

    def __init__(self):
        self.phase = "calm"
        self.lock = threading.Lock()
        self.samples = {}

    def note(self, kind, value):
        """Add one sample of `kind` to the current phase."""
        with self.lock:
            self.samples.setdefault((self.phase, kind), []).append(value)

    def report(self):
        """Every phase and kind's figures."""
        return {f"{phase} {kind}": figures(v) for (phase, kind), v in sorted(self.samples.items())}


def probe_healthz(port, recorder, stop):
    """GET /healthz on a new connection 20 times a second, from 127.0.0.3."""
    while not stop.is_set():
        started = time.monotonic()
        conn = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=10, source_address=("127.0.0.3", 0)
        )
        try:
            conn.request("GET", "/healthz")
            reply = conn.getresponse()
            reply.read()
            ok = reply.status == 200
        except OSError:
            ok = False
        finally:
            conn.close()
        recorder.note("healthz" if ok else "healthz failed", time.monotonic() - started)
        stop.wait(max(0.0, 0.05 - (time.monotonic() - started)))


def keep_streaming(port, key, recorder, stop):
    """Open streams one after another from 127.0.0.2, noting how late each event comes."""
    body = json.dumps(CHAT).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    while not stop.is_set():
        conn = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=30, source_address=("127.0.0.2", 0)
        )
        try:
            conn.request("POST", "/v1/chat/completions", body, headers)
            reply = conn.getresponse()
            if reply.status != 200:
                recorder.note("stream refused", 0.0)
                reply.read()
                continue
            last = None
            while reply.read1(65536):
                now = time.monotonic()
                if last is not None:
                    recorder.note("stream lateness", max(0.0, now - last - STREAM_INTERVAL))
                last = now
        except OSError:
            recorder.note("stream failed", 0.0)
        finally:
            conn.close()


def bomb(port, counts, stop):
    """Post legacy forms with no key from 127.0.0.1 as fast as the relay answers them
    (in a process of its own: the victims' timings must not wait for its GIL)."""
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    while not stop.is_set():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request("POST", LEGACY_PATH, BOMB, headers)
            reply = conn.getresponse()
            reply.read()
            counts[str(reply.status)] = counts.get(str(reply.status), 0) + 1
        except OSError:
            counts["error"] = counts.get("error", 0) + 1
        finally:
            conn.close()


class SlowSockets:
    """`count` connections trickling a head, and `count` trickling a body, a byte a second;
    one the relay answers or closes is replaced by a new one."""

    def __init__(self, port, count):
        self.port = port
        self.sockets = []  # (socket, what it trickles)
        self.answered = 0
        for _ in range(count):
            self._open(SLOW_HEAD)
            self._open(SLOW_BODY)

    def _open(self, start):
        """A new slow connection that has sent `start` and will trickle the rest."""
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.sendall(start)
        sock.setblocking(False)
        self.sockets.append([sock, start, TRICKLED[start]])

    def tick(self):
        """Send each connection its next byte; replace the ones the relay is done with."""
        for entry in list(self.sockets):
            sock, start, rest = entry
            try:
                if sock.recv(65536, socket.MSG_PEEK):
                    raise ConnectionResetError  # answered (a 408): start another
                if rest:
                    sock.send(rest[:1])
                    entry[2] = rest[1:]
            except BlockingIOError:
                with contextlib.suppress(OSError):
                    sock.send(rest[:1])
                entry[2] = rest[1:]
            except OSError:
                self.answered += 1
                self.sockets.remove(entry)
                sock.close()
                self._open(start)

    def close(self):
        """Close every connection."""
        for sock, _, _ in self.sockets:
            sock.close()


def run(args):
    """Start the upstream and the relay, measure calm, then attack; return the figures."""
    raise_open_files()
    workdir = tempfile.mkdtemp(prefix="relay-hostile-")
    procs = Processes(workdir)
    upstream = Upstream(procs, workdir, stream_seconds=10.0, chunks=100, nprocs=1)
    relay = Relay(procs, workdir, upstream, "gevent")
    if args.no_block:
        relay.env["RELAY_UNAUTHENTICATED_RPM"] = "0"
    recorder, stop = Recorder(), threading.Event()
    manager = multiprocessing.Manager()
    counts = manager.dict()
    threads = []
    try:
        upstream.start()
        relay.start()
        monitor = Monitor()
        threads.append(threading.Thread(target=probe_healthz, args=(relay.port, recorder, stop)))
        victim = (relay.port, relay.key, recorder, stop)
        threads += [threading.Thread(target=keep_streaming, args=victim) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(args.calm)
        recorder.phase = "attack"
        attack_stop = manager.Event()
        bombers = [
            multiprocessing.Process(target=bomb, args=(relay.port, counts, attack_stop))
            for _ in range(args.bombers)
        ]
        for process in bombers:
            process.start()
        slow = SlowSockets(relay.port, args.slow)
        monitor.begin({"target": relay.root_pid()})
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            slow.tick()
            time.sleep(0.2)
        usage = monitor.end()
        attack_stop.set()
        slow.close()
        stop.set()
        for worker in threads + bombers:
            worker.join(timeout=60)
        return {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "settings": {
                "seconds": args.seconds,
                "bombers": args.bombers,
                "slow_heads": args.slow,
                "slow_bodies": args.slow,
                "guessing_block": not args.no_block,
            },
            "bomb_answers": dict(counts),
            "slow_sockets_answered": slow.answered,
            "relay_during_attack": usage,
            "figures": recorder.report(),
            "loadavg": os.getloadavg(),
        }
    finally:
        stop.set()
        procs.stop_all()
        manager.shutdown()


def main(argv=None):
    """Parse the options, run once, print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the attack")
    parser.add_argument("--calm", type=float, default=10.0, help="seconds measured before it")
    parser.add_argument("--bombers", type=int, default=4)
    parser.add_argument("--slow", type=int, default=100)
    parser.add_argument("--no-block", action="store_true", help="RELAY_UNAUTHENTICATED_RPM=0")
    result = run(parser.parse_args(argv))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
