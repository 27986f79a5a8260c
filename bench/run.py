"""Run the relay benchmarks end to end: fake upstream, relay variants, load, figures table."""

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback

from bench.processes import ROOT, BenchError, Processes
from bench.report import checkout_info, functional_failures, machine_info, report
from bench.scenarios import (
    CLIENTS,
    DEFAULT_SCENARIOS,
    SCENARIOS,
    Bench,
    client_versions,
    result_key,
)
from bench.soak import SOAK, run_soak, soak_config, soak_problems, soak_upstream
from bench.targets import Direct, OpenAIForward, Relay, Upstream


def run_target(bench, target, direct, scenarios):
    """Start a target, run the scenarios (each with each client, on direct first), stop it."""
    args = bench.args
    out = {}
    bench.say(f"{target.name}: starting")
    target.start()
    try:
        slug = re.sub(r"[^a-z0-9]+", "", target.name.lower())
        for scenario in scenarios:
            for client in args.clients:
                pair = {}
                for side, who in (("direct", direct), ("target", target)):
                    bench.say(f"{target.name}: {scenario} via {who.name} ({client} client)")
                    tag = f"bench-{slug}-{side}-{client}"
                    pair[side] = run_scenario(bench, scenario, who, client, tag)
                out[result_key(scenario, client)] = pair
    finally:
        bench.say(f"{target.name}: stopping")
        target.stop()
        out["usage_rows"] = target.usage_outcomes()
        if isinstance(target, Relay):
            target.drop()
    return out


def run_scenario(bench, scenario, who, client, tag):
    """One side (direct or a target) of one paired scenario, driven by one client."""
    args = bench.args
    if scenario == "nonstream":
        return bench.nonstream(who, client)
    if scenario == "streams":
        return bench.streams(
            who, args.streams, args.ramp, args.stream_seconds, args.loadgen_procs, client=client
        )
    if scenario == "fidelity":
        return bench.streams(who, 20, 0.0, args.stream_seconds, 1, times=True, client=client)
    if scenario == "burst":
        return bench.burst(who, args.burst, args.stream_seconds, args.burst_procs, client)
    return bench.disconnect(who, args.trials, f"{tag}-dc", client)


def run_paired(args, procs, workdir, results, scenarios):
    """The paired scenarios: one fake upstream, every target measured right after direct."""
    upstream = Upstream(procs, workdir, args.stream_seconds, args.chunks, args.upstream_procs)
    upstream.start()
    bench = Bench(args, procs, workdir, upstream)
    direct = Direct(upstream)
    targets = []
    for number in range(args.rounds):  # rounds interleave the checkouts: A B A B ...
        suffix = f" #{number + 1}" if args.rounds > 1 else ""
        for model in args.models:
            for store in args.postgres_stores:
                for label, root in args.checkouts:
                    relay = Relay(procs, workdir, upstream, model, store, root, label)
                    relay.name += suffix
                    relay.log_name += suffix.replace(" #", "-")
                    targets.append(relay)
        if args.peer_openai_forward:  # the peer in every round too, measured under the same load
            peer = OpenAIForward(procs, workdir, upstream, args.peer_openai_forward)
            peer.name += suffix
            results["openai_forward_command"] = peer.command()
            targets.append(peer)
    for target in targets:
        if isinstance(target, Relay):
            results.setdefault("relay_commands", {})[target.name] = target.command
        results["targets"][target.name] = guarded(
            bench, target.name, run_target, bench, target, direct, scenarios
        )


def run_soaks(args, procs, workdir, results):
    """The soak, on a fresh relay per worker model (its database then holds only soak calls)."""
    upstream = soak_upstream(procs, workdir, args.upstream_procs)
    upstream.start()
    # One RSS sample a second: the soak compares averages over time, not a peak.
    bench = Bench(args, procs, workdir, upstream, interval=1.0, prefix="soak-loadgen")
    relays = [
        Relay(procs, workdir, upstream, model, store)
        for model in args.models
        for store in args.postgres_stores
    ]
    for relay in relays:
        relay.log_name = f"soak-{relay.log_name}"
        results.setdefault("relay_commands", {})[relay.name] = relay.command
        entry = results["targets"].setdefault(relay.name, {})
        entry[SOAK] = guarded(bench, relay.name, run_soak, bench, relay)
        relay.drop()


def guarded(bench, name, fn, *args):
    """fn(*args), or {"error": ...} when it fails: one target's failure does not end the run."""
    try:
        return fn(*args)
    except BenchError as exc:
        bench.say(f"{name}: FAILED: {exc}")
        return {"error": str(exc)}
    except Exception as exc:  # a bench bug: report it, go on with the next target
        bench.say(f"{name}: FAILED: {traceback.format_exc()}")
        return {"error": f"{type(exc).__name__}: {exc}"}


def parse_args(argv):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--scenario",
        default="all",
        help=f"all (= {', '.join(DEFAULT_SCENARIOS)}), or a comma list of those, burst and {SOAK}",
    )
    parser.add_argument(
        "--client",
        default="gevent",
        help="load generator: gevent, aiohttp, or gevent,aiohttp (each paired scenario with each)",
    )
    parser.add_argument(
        "--aiohttp-python",
        metavar="PATH",
        default="/tmp/bench-venv/bin/python",  # noqa: S108 - the README's throwaway venv
        help="the interpreter (with aiohttp) that runs the aiohttp client",
    )
    parser.add_argument("--streams", type=int, default=2000, help="concurrent streams")
    parser.add_argument("--burst", type=int, default=2000, help="burst: streams opened at once")
    parser.add_argument("--stream-seconds", type=float, default=10.0, help="length of a stream")
    parser.add_argument("--chunks", type=int, default=100, help="content chunks per stream")
    parser.add_argument("--ramp", type=float, help="seconds over which streams start")
    parser.add_argument("--workers", default="gevent,gthread", help="gevent, gthread[:N], ...")
    parser.add_argument("--peer-openai-forward", metavar="VENV", help="venv with openai-forward")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--smoke", action="store_true", help="short functional run for CI")
    parser.add_argument("--trials", type=int, default=20, help="disconnect trials")
    parser.add_argument("--nonstream-seconds", type=float, default=8.0)
    parser.add_argument("--c1-seconds", type=float, default=4.0)
    parser.add_argument("--upstream-procs", type=int, default=1)
    parser.add_argument("--loadgen-procs", type=int, help="load generator processes (streams)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--py-spy", metavar="PATH", help="profile relay workers with this py-spy")
    parser.add_argument("--soak-rate", type=float, default=200.0, help="soak: calls per second")
    parser.add_argument("--soak-seconds", type=float, default=60.0, help="soak: length")
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="a PostgreSQL server (postgresql://user:pass@host:port/db) on which each relay "
        "target gets a fresh database of its own",
    )
    parser.add_argument(
        "--stores",
        default="sqlite",
        help="sqlite, postgresql or both (sqlite,postgresql: each worker model on each store)",
    )
    parser.add_argument(
        "--relay-checkout",
        action="append",
        metavar="LABEL=DIR",
        help="run the relay from this checkout too (repeatable; default: this one only)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure every relay this many times, interleaved"
    )
    args = parser.parse_args(argv)
    args.checkouts = [("", ROOT)]
    if args.relay_checkout:
        args.checkouts = []
        for item in args.relay_checkout:
            label, sep, root = item.partition("=")
            if not sep or not label or not os.path.isfile(os.path.join(root, "app.py")):
                parser.error(f"--relay-checkout {item!r}: want LABEL=DIR of a relay checkout")
            args.checkouts.append((label, os.path.abspath(root)))
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.smoke:
        args.streams = min(args.streams, 50)
        args.burst = min(args.burst, 50)
        args.stream_seconds = 1.0
        args.trials = 3
        args.nonstream_seconds = 10.0
        args.c1_seconds = 10.0
    if args.ramp is None:
        args.ramp = min(args.stream_seconds / 2, 5.0)
    # Given: every stream scenario uses it; else 2 processes above 500 streams, as ever.
    args.burst_procs = args.loadgen_procs or (2 if args.burst > 500 else 1)
    if args.loadgen_procs is None:
        args.loadgen_procs = 2 if args.streams > 500 else 1
    args.clients = list(dict.fromkeys(c.strip() for c in args.client.split(",") if c.strip()))
    if os.sep in args.aiohttp_python:  # a path, not a name looked up in PATH
        args.aiohttp_python = os.path.abspath(args.aiohttp_python)
    if not args.clients or set(args.clients) - set(CLIENTS):
        parser.error(f"--client takes {', '.join(CLIENTS)} or a comma list of them")
    if args.burst < 1:
        parser.error("--burst must be at least 1")
    chosen = DEFAULT_SCENARIOS if args.scenario == "all" else tuple(args.scenario.split(","))
    unknown = [s for s in chosen if s not in (*SCENARIOS, SOAK)]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}")
    args.scenarios = [s for s in (*SCENARIOS, SOAK) if s in chosen]
    if args.soak_rate <= 0 or args.soak_seconds <= 0:
        parser.error("--soak-rate and --soak-seconds must be positive")
    models = [m.strip() for m in args.workers.split(",") if m.strip()]
    args.models = ["gthread:32" if m == "gthread" else m for m in models]
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if set(stores) - {"sqlite", "postgresql"} or not stores:
        parser.error("--stores takes sqlite, postgresql or both")
    if "postgresql" in stores and not args.postgres:
        parser.error("--stores postgresql needs --postgres URL")
    # Per target: None for a SQLite file, else the server to make its database on.
    args.postgres_stores = [None if s == "sqlite" else args.postgres for s in stores]
    return args


def main(argv=None):
    """Run everything, print the tables, write JSON; non-zero only on functional failure."""
    args = parse_args(argv)
    try:
        versions = client_versions(args)  # before anything starts: fail fast and clearly
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Ctrl-C must reach us even when started in the background (where SIGINT is ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = tempfile.mkdtemp(prefix="relay-bench-")
    procs = Processes(workdir)
    results = {
        "machine": machine_info(),
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {
            "streams": args.streams,
            "stream_seconds": args.stream_seconds,
            "ramp": args.ramp,
            "chunks": args.chunks,
            "upstream_procs": args.upstream_procs,
            "loadgen_procs": args.loadgen_procs,
            "burst": args.burst,
            "burst_procs": args.burst_procs,
            "clients": args.clients,
            "client_versions": versions,
            "scenarios": args.scenarios,
            "workers": args.models,
            "stores": ["sqlite" if s is None else "postgresql" for s in args.postgres_stores],
            "rounds": args.rounds,
            "checkouts": {label: checkout_info(root) for label, root in args.checkouts if label},
        },
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "targets": {},
    }
    if SOAK in args.scenarios:
        results["config"][SOAK] = soak_config(args)
    started = time.monotonic()
    try:
        paired = [s for s in args.scenarios if s != SOAK]
        if paired:
            run_paired(args, procs, workdir, results, paired)
        if SOAK in args.scenarios:
            run_soaks(args, procs, workdir, results)
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        procs.stop_all()
        return 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        procs.stop_all()
        return 1
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    machine = results["machine"]
    print(
        f"# relay bench — {machine['date_utc']}, {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['ram_gib']} GiB; load (1/5/15 min) before {results['load_before']}, "
        f"after {results['load_after']}; {results['elapsed_s']} s"
    )
    print(report(results))
    problems = functional_failures(results)
    for problem in problems:
        print(f"FAILED: {problem}")
    results["functional_failures"] = problems
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    if args.keep:
        print(f"work directory kept: {workdir}")
    if args.smoke:
        return 1 if problems else 0
    failed = any(res.get("error") or soak_problems(res) for res in results["targets"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
