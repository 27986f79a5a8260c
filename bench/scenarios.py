"""The paired scenarios (each measured on direct, then on a target) and the load they drive."""

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time

from bench.processes import PYTHON, BenchError, Monitor, log_tail, process_table, tree_of
from bench.summary import ms, percentile, summarize_profile, summarize_streams
from bench.targets import Direct, EventLog

SCENARIOS = ("nonstream", "fidelity", "disconnect", "streams", "burst")
# What `all` (and so --smoke) runs: a burst is asked for by name, like the soak.
DEFAULT_SCENARIOS = ("nonstream", "fidelity", "disconnect", "streams")
# The load generators: client name -> module (each run by its own interpreter, see Bench).
CLIENTS = {"gevent": "bench.loadgen", "aiohttp": "bench.aioload"}
VENV_HINT = "python3 -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install aiohttp py-spy"


def result_key(scenario, client):
    """Where a target's results keep a scenario's pair when measured with a client."""
    # gevent's under the scenario's own name, as before clients could be chosen.
    return scenario if client == "gevent" else f"{scenario}@{client}"


def client_versions(args):
    """{client: version} of each client asked for; BenchError when one cannot be imported."""
    versions = {}
    for client in args.clients:
        python = PYTHON if client == "gevent" else args.aiohttp_python
        code = f"import sys, {client}; print({client}.__version__, sys.version.split()[0])"
        try:
            done = subprocess.run(
                [python, "-c", code], capture_output=True, text=True, timeout=60, check=False
            )
        except OSError as exc:
            raise BenchError(f"--client {client}: cannot run {python}: {exc}") from None
        if done.returncode:
            said = (done.stderr.strip().splitlines() or ["no message"])[-1]
            hint = f"; make one with `{VENV_HINT}`" if client == "aiohttp" else ""
            raise BenchError(f"--client {client}: {python} cannot import {client} ({said}){hint}")
        version, python_version = done.stdout.split()
        versions[client] = {"version": version, "python": python_version, "interpreter": python}
    return versions


class Bench:
    """One benchmark run: options, the shared upstream, and the scenario implementations."""

    def __init__(self, args, procs, workdir, upstream, interval=0.25, prefix="loadgen"):
        """Keep options, processes, upstream; sample every `interval` s; files named `prefix`."""
        self.args = args
        self.procs = procs
        self.workdir = workdir
        self.upstream = upstream
        self.events = EventLog(upstream.events)
        self.monitor = Monitor(interval)
        self.prefix = prefix
        self.runs = 0

    def say(self, text):
        """Progress on stderr."""
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        print(f"[{stamp}] {text}", file=sys.stderr, flush=True)

    def loadgen(self, target, mode, options, procs=1, timeout=600.0, client="gevent"):
        """Run a client's load generator (in `procs` processes sharing the work); its results."""
        self.runs += 1
        outputs, started = [], []
        # aiohttp runs from its own venv: the bench's has no aiohttp, that one has no gevent.
        python = PYTHON if client == "gevent" else self.args.aiohttp_python
        try:
            for index in range(procs):
                name = f"{self.prefix}-{client}-{self.runs}-{index}"
                out = os.path.join(self.workdir, f"{name}.json")
                argv = [python, "-m", CLIENTS[client], mode, "--url", target.url]
                argv += ["--key", target.key, "--out", out, *options]
                if procs > 1:
                    argv += ["--index", str(index), "--step", str(procs)]
                started.append(self.procs.start(name, argv))
                outputs.append(out)
            deadline = time.monotonic() + timeout
            for proc in started:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise BenchError(f"the load generator ran past {timeout:g} s") from None
        finally:
            for proc in started:
                self.procs.stop(proc, grace=2.0)
        results = []
        for proc, out in zip(started, outputs, strict=True):
            if proc.returncode != 0 or not os.path.exists(out):
                raise BenchError(f"the {client} load generator failed:\n{log_tail(proc)}")
            with open(out, encoding="utf-8") as handle:
                results.append(json.load(handle))
        return results

    def measured(self, target, fn, label=""):
        """Run fn() while monitoring the target's and the upstream's processes."""
        roots = {"upstream": self.upstream.proc.pid}
        relayed = target.root_pid() is not None and not isinstance(target, Direct)
        if relayed:
            roots["target"] = target.root_pid()
        self.monitor.begin(roots)
        load = os.getloadavg()[0]
        spies = self.start_profilers(target, label) if relayed and self.args.py_spy else []
        try:
            result = fn()
        finally:
            usage = self.monitor.end()
            profile = self.stop_profilers(spies)
        if profile:
            result["profile"] = profile
        result["load1_at_start"] = round(load, 2)
        result["processes"] = usage
        hangups = [e for e in self.events.read_new() if "tag" in e]
        result["upstream_hangups"] = len(hangups)
        return result

    def start_profilers(self, target, label):
        """py-spy record on every worker of the target (the children of its root process)."""
        table = process_table()
        workers = [p for p in tree_of(table, target.root_pid()) if p != target.root_pid()]
        spies = []
        for pid in workers or [target.root_pid()]:
            out = os.path.join(self.workdir, f"py-spy-{label}-{pid}.txt")
            argv = [self.args.py_spy, "record", "--pid", str(pid), "--rate", "100"]
            argv += ["--format", "raw", "--output", out, "--nonblocking"]
            spies.append((self.procs.start(f"py-spy-{label}-{pid}", argv), out))
        time.sleep(0.5)  # attaching takes a moment
        return spies

    def stop_profilers(self, spies):
        """Stop py-spy (SIGINT writes its output) and summarize the samples."""
        for proc, _out in spies:
            self.procs.stop(proc, signal.SIGINT, grace=15.0)
        stacks = {}
        for _proc, out in spies:
            with contextlib.suppress(OSError), open(out, encoding="utf-8") as handle:
                for line in handle:
                    stack, _, count = line.rstrip("\n").rpartition(" ")
                    if count.isdigit():
                        stacks[stack] = stacks.get(stack, 0) + int(count)
        return summarize_profile(stacks) if stacks else None

    # -- non-stream

    def nonstream(self, target, client="gevent"):
        """Throughput at concurrency 32 and latency at concurrency 1."""
        args = self.args

        warmups = (64, 32)  # untimed calls before c32 and before c1

        def run():
            """Both load levels."""
            c32 = ["--concurrency", "32", "--duration", str(args.nonstream_seconds)]
            c32 += ["--warmup", str(warmups[0])]
            c1 = ["--concurrency", "1", "--duration", str(args.c1_seconds)]
            c1 += ["--warmup", str(warmups[1])]
            if args.smoke:
                c32 += ["--n", "200"]
                c1 += ["--n", "50"]
            high = self.loadgen(target, "nonstream", c32, client=client)[0]
            one = self.loadgen(target, "nonstream", c1, client=client)[0]
            return {"client": client, "c32": high, "c1": one}

        result = self.measured(target, run, "nonstream")
        spent = result["processes"].get("target")
        calls = result["c32"]["count"] + result["c1"]["count"] + sum(warmups)
        if spent and calls:
            # Everything the target did during both load levels, per call made.
            result["cpu_us_per_call"] = round(spent["cpu_seconds"] / calls * 1e6, 1)
        return result

    # -- streams

    def streams(
        self, target, count, ramp, seconds, loadgen_procs, times=False, client="gevent", label=None
    ):
        """`count` streams started over `ramp` seconds, all through one schedule."""
        label = label or ("streams" if count > 20 else "fidelity")  # names py-spy's files
        deadline = ramp + seconds * 2 + 15

        def run():
            """Start the load generators on a common clock and gather every stream's record."""
            t0 = time.monotonic() + 1.5  # the generators import gevent or aiohttp meanwhile
            options = ["--n", str(count), "--ramp", f"{ramp:g}", "--t0", repr(t0)]
            options += ["--deadline", f"{deadline:g}", "--timeout", "60"]
            if times or count <= 500:
                options.append("--times")
            parts = self.loadgen(
                target, "stream", options, procs=loadgen_procs, timeout=deadline + 30, client=client
            )
            records = [r for part in parts for r in part["records"]]
            return {"client": client, **summarize_streams(records, parts)}

        result = self.measured(target, run, label)
        cpu = result["processes"].get("target", result["processes"]["upstream"])["cpu_seconds"]
        if result["events_total"]:
            result["cpu_us_per_event"] = round(cpu / result["events_total"] * 1e6, 1)
        return result

    # -- burst

    def burst(self, target, count, seconds, loadgen_procs, client="gevent"):
        """`count` streams opened all at once (no ramp): the streams path with ramp 0."""
        result = self.streams(
            target, count, 0.0, seconds, loadgen_procs, client=client, label="burst"
        )
        spent = result["processes"].get("target", result["processes"]["upstream"])
        if result["count"]:
            # Everything the target did for the burst, per stream asked for.
            result["cpu_ms_per_stream"] = round(spent["cpu_seconds"] / result["count"] * 1e3, 2)
        return result

    # -- disconnect

    def disconnect(self, target, trials, tag, client="gevent"):
        """Close after the first event; the upstream's record says when it noticed."""

        def run():
            """Trials, then match the upstream's hang-up records by tag."""
            options = ["--trials", str(trials), "--tag-prefix", tag, "--timeout", "30"]
            result = self.loadgen(target, "disconnect", options, client=client)[0]
            wait = max(1.0, 3 * self.upstream.chunk_delay) + 0.5
            time.sleep(wait)
            return {"client": client, "wait_s": wait, "trials": result["trials"]}

        result = self.measured(target, run)
        seen = {e["tag"]: e for e in self.events.entries if e.get("tag")}
        delays, hows, errors = [], {}, []
        for trial in result.pop("trials"):
            if trial["error"] or trial["status"] != 200:
                errors.append(trial["error"] or f"status {trial['status']}")
                continue
            event = seen.get(trial["tag"])
            if event is None:
                continue
            delays.append(event["t_gone"] - trial["t_close"])
            hows[event["how"]] = hows.get(event["how"], 0) + 1
        result.update(
            {
                "trials": trials,
                "errors": len(errors),
                "error_samples": errors[:3],
                "noticed": len(delays),
                "how": hows,
                "p50_ms": ms(percentile(delays, 0.5)),
                "max_ms": ms(max(delays)) if delays else None,
            }
        )
        return result
