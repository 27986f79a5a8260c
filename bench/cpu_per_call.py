"""CPU per non-stream call of one relay worker pinned to a core of its own: A/B of checkouts.

    python -m bench.cpu_per_call [--relay-checkout LABEL=DIR ...] [--rounds 5] \
        [--calls 20000] [--concurrency 32,1] [--client gevent]

The full bench (`bench.run`) shares both cores between the relay, the fake upstream and
the load generator, so its CPU per call moves by 10-20 % between rounds of the same code
(contention, batch sizes): too much to see a cut of a few per cent. Here the relay runs
one gevent worker pinned with `taskset` to core 0, while the fake upstream and the load
generator share core 1 (both need far less than the worker), and each figure is the
worker's CPU time (/proc, utime + stime) over a fixed number of calls, after a warm-up,
divided by the calls that got a 200. Checkouts alternate within each round; the report
gives each one's median and every round's figure.

Even so the figure moves by ~5-10 % between rounds of the same code on this VM (its
clock is shared with other guests). `--callgrind` counts instructions instead, which do
not move: the worker runs under valgrind's callgrind (~60x slower, so use --calls 1000),
once with the warm-up only and once with the warm-up and the calls; the difference in the
worker's instructions, divided by the calls, is the figure (user-space instructions only:
time in the kernel, such as a send, is not in it).
"""

import argparse
import json
import os
import re
import statistics
import sys
import tempfile

from bench.processes import (
    PYTHON,
    ROOT,
    VENV_BIN,
    Processes,
    free_port,
    process_table,
    tree_of,
    wait_healthy,
)
from bench.scenarios import CLIENTS, Bench
from bench.targets import Relay, Target, Upstream

RELAY_CORE, LOAD_CORE = 0, 1
TICKS = os.sysconf("SC_CLK_TCK")
# --floor adds these labels: bench/floor_app.py in each FLOOR_MODE.
FLOORS = {
    "floor-canned": "canned",
    "floor-adapter": "adapter",
    "floor-forward": "forward",
    "floor-metered": "metered",
}


def worker_ticks(master_pid):
    """CPU ticks (user + system) of the relay master's workers so far."""
    table = process_table()
    return sum(table[pid][2] for pid in tree_of(table, master_pid) if pid != master_pid)


class Floor(Target):
    """bench/floor_app.py under gunicorn's own gevent worker: the frameworks without the relay."""

    def __init__(self, workdir, upstream, mode):
        """Choose a port, the environment and (used by `metered` only) a database file."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        self.key = "floor-key"
        self.command = (
            f"gunicorn bench.floor_app:app --worker-class gevent --workers 1"
            f" --worker-connections 10000 --bind 127.0.0.1:{self.port}"
        )
        self.env = {
            **os.environ,
            "FLOOR_UPSTREAM": f"http://127.0.0.1:{upstream.port}/v1",
            "FLOOR_MODE": mode,
            "FLOOR_DATABASE": os.path.join(tempfile.mkdtemp(prefix="floor-", dir=workdir), "db"),
            "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
        }
        self.root = ROOT
        self.log_name = f"floor-{mode}"


def start_pinned(procs, target, callgrind=None):
    """Start a target's gunicorn pinned to RELAY_CORE and wait for /healthz;
    `callgrind`: a directory for its counts when it runs under valgrind's callgrind."""
    command = target.command
    if callgrind:
        # valgrind runs the interpreter (not gunicorn's #! line); everything is ~60x slower.
        target.env["GUNICORN_CMD_ARGS"] = "--timeout 900 --graceful-timeout 300"
        gunicorn = os.path.join(os.path.dirname(PYTHON), "gunicorn")
        tool = f"valgrind --tool=callgrind --callgrind-out-file={callgrind}/callgrind.%p"
        command = command.replace("gunicorn", f"{tool} {PYTHON} {gunicorn}", 1)
    argv = ["/bin/sh", "-c", f"exec taskset -c {RELAY_CORE} {command}"]
    target.proc = procs.start(target.log_name, argv, env=target.env, cwd=target.root)
    wait_healthy(target.proc, target.port, "/healthz", timeout=600 if callgrind else 60)
    return target


def start_target(procs, workdir, upstream, label, root, callgrind=None):
    """One gevent worker of a checkout (with the bench key), or of a floor app, pinned."""
    if label in FLOORS:
        return start_pinned(procs, Floor(workdir, upstream, FLOORS[label]), callgrind)
    relay = Relay(procs, workdir, upstream, "gevent", root=root, label=label)
    relay.env["WEB_CONCURRENCY"] = "1"
    relay.key = relay.create_key("bench")
    return start_pinned(procs, relay, callgrind)


def worker_instructions(procs, relay, callgrind):
    """Stop a relay run under callgrind; the instructions its worker ran."""
    table = process_table()
    (worker,) = [pid for pid in tree_of(table, relay.proc.pid) if pid != relay.proc.pid]
    procs.stop(relay.proc, grace=600)
    with open(os.path.join(callgrind, f"callgrind.{worker}"), encoding="utf-8") as handle:
        found = re.search(r"^(?:summary|totals): (\d+)", handle.read(), re.MULTILINE)
    if found is None:
        raise SystemExit(f"no instruction count in {callgrind}/callgrind.{worker}")
    return int(found.group(1))


def drive(bench, relay, concurrency, calls):
    """Make `calls` calls at `concurrency` with the bench's load generator; the 200s."""
    options = ["--concurrency", str(concurrency), "--n", str(calls), "--duration", "600"]
    (result,) = bench.loadgen(relay, "nonstream", options, timeout=900, client=bench.args.client)
    return result["ok"]


def calls_at(args, concurrency):
    """How many calls make a figure: --calls, a quarter of them for one client at a time."""
    return args.calls if concurrency > 1 else max(args.calls // 4, 1)


def count(bench, label, root, concurrency, calls):
    """Instructions the worker ran for the warm-up and `calls` calls; the calls that got a 200."""
    callgrind = tempfile.mkdtemp(prefix="callgrind-", dir=bench.workdir)
    procs = bench.procs
    relay = start_target(procs, bench.workdir, bench.upstream, label, root, callgrind)
    try:
        drive(bench, relay, 8, bench.args.warmup)
        ok = drive(bench, relay, concurrency, calls) if calls else 0
    finally:
        instructions = worker_instructions(procs, relay, callgrind)
    return instructions, ok


def measure_instructions(bench, label, root):
    """{concurrency: thousands of worker instructions per call} for one checkout."""
    figures = {}
    for concurrency in bench.args.concurrency:
        alone, _ = count(bench, label, root, concurrency, 0)
        total, ok = count(bench, label, root, concurrency, calls_at(bench.args, concurrency))
        figures[concurrency] = round((total - alone) / max(ok, 1) / 1000)
    return figures


def measure(bench, label, root):
    """{concurrency: µs of worker CPU per call} for one checkout, warm."""
    if bench.args.callgrind:
        return measure_instructions(bench, label, root)
    relay = start_target(bench.procs, bench.workdir, bench.upstream, label, root)
    figures = {}
    try:
        drive(bench, relay, 8, bench.args.warmup)
        for concurrency in bench.args.concurrency:
            before = worker_ticks(relay.proc.pid)
            ok = drive(bench, relay, concurrency, calls_at(bench.args, concurrency))
            spent = (worker_ticks(relay.proc.pid) - before) / TICKS
            figures[concurrency] = round(spent / max(ok, 1) * 1e6, 1)
    finally:
        bench.procs.stop(relay.proc)
    return figures


def main(argv=None):
    """Run the rounds and print the table (and --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relay-checkout", action="append", default=[], metavar="LABEL=DIR")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20000, help="calls per figure at c>1")
    parser.add_argument("--warmup", type=int, default=None, help="2000 (callgrind: 300)")
    parser.add_argument("--concurrency", default="32,1")
    parser.add_argument("--client", choices=sorted(CLIENTS), default="gevent")
    parser.add_argument(
        "--aiohttp-python",
        default="/tmp/bench-venv/bin/python",  # noqa: S108 - the README's throwaway venv
    )
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead")
    parser.add_argument(
        "--floor", action="store_true", help="also measure bench/floor_app.py in each of its modes"
    )
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.warmup is None:
        args.warmup = 300 if args.callgrind else 2000
    checkouts = [tuple(item.split("=", 1)) for item in args.relay_checkout] or [("this", ROOT)]
    if args.floor:
        checkouts += [(label, ROOT) for label in FLOORS]
    os.sched_setaffinity(0, {LOAD_CORE})  # the upstream and load generators inherit it
    workdir = tempfile.mkdtemp(prefix="relay-cpu-")
    procs = Processes(workdir)
    results: dict[str, list[dict[int, float]]] = {label: [] for label, _ in checkouts}
    try:
        upstream = Upstream(procs, workdir, 1.0, 10, 1)
        upstream.start()
        bench = Bench(args, procs, workdir, upstream, prefix="load")
        for round_number in range(args.rounds):
            for label, root in checkouts:
                figures = measure(bench, label, os.path.abspath(root))
                results[label].append(figures)
                print(f"round {round_number + 1} {label}: {figures}", file=sys.stderr, flush=True)
    finally:
        procs.stop_all()
    unit = "thousand instructions" if args.callgrind else "CPU µs"
    print(f"\n{unit} per non-stream call, one pinned worker, {args.client} client")
    print("| checkout | " + " | ".join(f"c{c}" for c in args.concurrency) + " |")
    print("|---|" + "---|" * len(args.concurrency))
    for label, rounds in results.items():
        cells = []
        for c in args.concurrency:
            values = [r[c] for r in rounds]
            each = ", ".join(f"{v:g}" for v in values)
            cells.append(f"**{statistics.median(values):g}** ({each})")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
