"""Two relay instances on one PostgreSQL and one Redis against one instance: chat c32 req/s.

    python -m bench.pair_load --postgres postgresql://user:pass@host:port/postgres \
        --redis redis://host:port/0 [--seconds 10] [--concurrency 32]

The relay runs as the Procfile starts it (2 gevent workers) in front of the bench fake
upstream; both instances share one fresh database and the Redis limits storage, and each
is pinned with `taskset` to a core of its own (instance A to core 0, B to core 1; the one
instance alone gets both). The load generator calls each instance with `--concurrency`
keep-alive clients at the same time; the figure is the sum of their 200s a second.
"""

import argparse
import json
import os
import sys
import tempfile
import time

from bench.processes import PYTHON, Processes, wait_healthy
from bench.targets import Relay, Upstream


def relay_on(procs, workdir, upstream, postgres, redis, cores, database=None):
    """A relay target on the shared stores, its gunicorn pinned to `cores` (not started)."""
    relay = Relay(procs, workdir, upstream, "gevent", postgres)
    if database is not None:
        relay.database = database  # the first instance's: one database for both
    relay.env["RELAY_DATABASE"] = relay.database
    relay.env["RELAY_RATELIMIT_STORAGE_URI"] = redis
    relay.command = f"taskset -c {cores} {relay.command}"
    return relay


def start(relay, key=None):
    """Start a relay; make the bench key unless another instance made it already."""
    relay.key = key or relay.create_key("bench")
    argv = ["/bin/sh", "-c", "exec " + relay.command]
    relay.proc = relay.procs.start(relay.log_name, argv, env=relay.env, cwd=relay.root)
    wait_healthy(relay.proc, relay.port, "/healthz", timeout=60)


def load(procs, workdir, relays, args):
    """Call every relay at once for args.seconds; the calls a second each answered 200."""
    started = []
    for number, relay in enumerate(relays):
        out = os.path.join(workdir, f"pair-{len(relays)}-{number}.json")
        argv = [PYTHON, "-m", "bench.loadgen", "nonstream", "--url", relay.url]
        argv += ["--key", relay.key, "--out", out, "--concurrency", str(args.concurrency)]
        argv += ["--duration", str(args.seconds), "--warmup", "64"]
        started.append((procs.start(f"pair-loadgen-{len(relays)}-{number}", argv), out))
    figures = []
    for proc, out in started:
        proc.wait(timeout=args.seconds + 120)
        with open(out, encoding="utf-8") as handle:
            result = json.load(handle)
        figures.append({k: result[k] for k in ("rps", "ok", "errors", "p50_ms", "p99_ms")})
    return figures


def main(argv=None):
    """One instance, then two, on the same stores; print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--postgres", required=True, help="a PostgreSQL server URL")
    parser.add_argument("--redis", required=True, help="a Redis URL for the limits")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="relay-pair-")
    procs = Processes(workdir)
    upstream = Upstream(procs, workdir, 10.0, 100, 1)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        upstream.start()
        alone = relay_on(procs, workdir, upstream, args.postgres, args.redis, "0,1")
        start(alone)
        results["one instance"] = load(procs, workdir, [alone], args)
        alone.stop()
        first = relay_on(procs, workdir, upstream, args.postgres, args.redis, "0")
        second = relay_on(procs, workdir, upstream, args.postgres, args.redis, "1", first.database)
        start(first)
        start(second, first.key)
        results["two instances"] = load(procs, workdir, [first, second], args)
        for relay in (first, second):
            relay.stop()
        results["rows"] = first.query("SELECT COUNT(*) FROM usage")[0][0]
        for relay in (alone, first):
            relay.drop()
    finally:
        procs.stop_all()
    results["load"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
