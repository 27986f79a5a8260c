"""Run the relay benchmarks end to end: fake upstream, relay variants, load, figures table."""

import argparse
import contextlib
import datetime as dt
import http.client
import itertools
import json
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
PYTHON = os.path.join(VENV_BIN, "python") if os.path.isdir(VENV_BIN) else sys.executable
SCENARIOS = ("nonstream", "fidelity", "disconnect", "streams")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """Something the benchmark needs did not work (a server did not start, a tool failed)."""


# --------------------------------------------------------------------------- processes


class Processes:
    """Every process this run starts, each in its own session, so all can be stopped."""

    def __init__(self, workdir):
        """Start with no processes; logs go to workdir."""
        self.workdir = workdir
        self.running = []

    def start(self, name, argv, env=None, cwd=ROOT):
        """Start argv in a new session with its output in <workdir>/<name>.log."""
        log_path = os.path.join(self.workdir, f"{name}.log")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc.log_path = log_path
        self.running.append(proc)
        return proc

    def stop(self, proc, sig=signal.SIGTERM, grace=10.0):
        """Signal the process group proc leads; SIGKILL it if it outlives the grace period."""
        if proc not in self.running:
            return
        self.running.remove(proc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        # Whatever is left in the group (workers of a master that died first) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def stop_all(self):
        """Stop everything still running, newest first."""
        for proc in reversed(list(self.running)):
            self.stop(proc, grace=5.0)


def log_tail(proc, lines=15):
    """The last lines of a started process's log."""
    try:
        with open(proc.log_path, encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return ""


def free_port():
    """A free loopback TCP port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_status(port, path, timeout=1.0):
    """Status of GET http://127.0.0.1:port/path, or None when nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def wait_healthy(proc, port, path, timeout=30.0):
    """Wait for GET path == 200; BenchError if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"exited with {proc.returncode}:\n{log_tail(proc)}")
        if http_status(port, path) == 200:
            return
        time.sleep(0.1)
    raise BenchError(f"GET {path} was not 200 within {timeout:g} s:\n{log_tail(proc)}")


# --------------------------------------------------------------------------- measuring


def process_table():
    """{pid: (ppid, rss_kib, cpu_ticks)} for every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            rss = 0
            with open(f"/proc/{entry}/status", encoding="utf-8") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
                        break
        except (OSError, IndexError, ValueError):
            continue
        table[int(entry)] = (int(fields[1]), rss, int(fields[11]) + int(fields[12]))
    return table


def tree_of(table, root):
    """The pids of root and all its descendants."""
    children = {}
    for pid, (ppid, _rss, _cpu) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            found.append(pid)
            todo.extend(children.get(pid, ()))
    return found


def busy_ticks():
    """CPU ticks the whole machine spent busy (not idle or waiting), from /proc/stat."""
    with open("/proc/stat", encoding="utf-8") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq + steal


def own_ticks():
    """CPU ticks of this process, its live descendants and its reaped children."""
    table = process_table()
    live = sum(table[p][2] for p in tree_of(table, os.getpid()))
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return live + round((usage.ru_utime + usage.ru_stime) * CLOCK_TICKS)


class Monitor:
    """Samples summed RSS (VmRSS) and CPU time of process trees while a scenario runs.

    It also tells how much CPU went to processes this run did not start (another
    user's tests on a shared machine), since those make every figure worse.
    """

    def __init__(self, interval=0.25):
        """Set the sampling interval; nothing is sampled yet."""
        self.interval = interval
        self.roots = {}
        self._stop = threading.Event()
        self._thread = None
        self._peaks = {}
        self._first = {}
        self._last = {}

    def sample(self):
        """{group: (rss_kib, cpu_ticks, processes)} right now."""
        table = process_table()
        result = {}
        for name, root in self.roots.items():
            pids = tree_of(table, root)
            result[name] = (
                sum(table[p][1] for p in pids),
                sum(table[p][2] for p in pids),
                len(pids),
            )
        return result

    def begin(self, roots):
        """Start sampling the trees under roots ({group: pid})."""
        self.roots = dict(roots)
        self._first = self.sample()
        self._last = dict(self._first)
        self._peaks = {name: values[0] for name, values in self._first.items()}
        self._fds = {}
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._busy = busy_ticks()
        self._own = own_ticks()
        self._started = time.monotonic()
        self._thread.start()

    def _run(self):
        """The sampling loop."""
        while not self._stop.wait(self.interval):
            now = self.sample()
            self._last = now
            for name, values in now.items():
                self._peaks[name] = max(self._peaks.get(name, 0), values[0])
            self._count_fds()

    def _count_fds(self):
        """Open files per target process: shows how connections spread over the workers."""
        root = self.roots.get("target")
        if root is None:
            return
        for pid in tree_of(process_table(), root):
            with contextlib.suppress(OSError):
                count = len(os.listdir(f"/proc/{pid}/fd"))
                self._fds[pid] = max(self._fds.get(pid, 0), count)

    def end(self):
        """Stop; per group: RSS at start and peak (MiB), CPU seconds and cores used."""
        self._stop.set()
        self._thread.join()
        last = self.sample()
        wall = time.monotonic() - self._started
        busy = (busy_ticks() - self._busy) / CLOCK_TICKS
        own = (own_ticks() - self._own) / CLOCK_TICKS
        out = {
            "open_files_peak_per_process": {str(pid): n for pid, n in sorted(self._fds.items())},
            "machine": {
                "cores_busy": round(busy / wall, 2),
                "cores_other_users": round(max(0.0, busy - own) / wall, 2),
            },
        }
        for name, (rss, cpu, count) in self._first.items():
            end_cpu = max(cpu, last.get(name, self._last.get(name, (0, cpu, 0)))[1])
            seconds = (end_cpu - cpu) / CLOCK_TICKS
            out[name] = {
                "processes": count,
                "rss_start_mib": round(rss / 1024, 1),
                "rss_peak_mib": round(self._peaks.get(name, rss) / 1024, 1),
                "cpu_seconds": round(seconds, 2),
                "cores": round(seconds / wall, 2) if wall else None,
            }
        return out


def percentile(values, fraction):
    """Nearest-rank percentile (None for no values)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    index = min(len(values) - 1, max(0, round(fraction * len(values) + 0.5) - 1))
    return values[index]


def ms(seconds, digits=2):
    """Seconds as rounded milliseconds (None stays None)."""
    return None if seconds is None else round(seconds * 1000, digits)


def peak_concurrency(records):
    """The largest number of streams receiving at the same moment (first byte to end)."""
    marks = []
    for record in records:
        if record.get("t_first") is not None:
            marks.append((record["t_first"], 1))
            marks.append((record["t_end"], -1))
    marks.sort()
    current = best = 0
    for _, step in marks:
        current += step
        best = max(best, current)
    return best


class EventLog:
    """Reads the fake upstream's hang-up records as they are appended."""

    def __init__(self, path):
        """Read the file from its start."""
        self.path = path
        self.offset = 0
        self.entries = []

    def read_new(self):
        """Parse lines appended since the last read; return them."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        new = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        self.entries.extend(new)
        return new


# --------------------------------------------------------------------------- targets


class Target:
    """Something that answers POST /v1/chat/completions: the upstream itself or a proxy."""

    name = "direct"
    url = ""
    key = "x"
    proc = None

    def root_pid(self):
        """The pid whose process tree is this target (None: not monitored)."""
        return self.proc.pid if self.proc is not None else None

    def start(self):
        """Start the target and wait until it answers."""

    def stop(self):
        """Stop the target."""

    def usage_outcomes(self):
        """Relay usage rows by outcome (empty for other targets)."""
        return {}


class Direct(Target):
    """The fake upstream, called directly."""

    def __init__(self, upstream):
        """Call the upstream's own URL."""
        self.upstream = upstream
        self.url = f"http://127.0.0.1:{upstream.port}/v1/chat/completions"
        self.proc = upstream.proc


class Upstream:
    """The bench fake upstream (bench/fake_upstream.py), shared by every target of a run."""

    def __init__(self, procs, workdir, stream_seconds, chunks, nprocs):
        """Choose a port and the stream timing; start() runs it."""
        self.procs = procs
        self.port = free_port()
        self.events = os.path.join(workdir, "upstream-events.jsonl")
        self.chunks = chunks
        self.chunk_delay = stream_seconds / chunks
        self.nprocs = nprocs
        self.proc = None

    def start(self):
        """Start it and wait for /healthz."""
        argv = [PYTHON, "-m", "bench.fake_upstream", "--port", str(self.port)]
        argv += ["--chunks", str(self.chunks), "--chunk-delay", f"{self.chunk_delay:g}"]
        argv += ["--procs", str(self.nprocs), "--events", self.events]
        self.proc = self.procs.start("upstream", argv)
        wait_healthy(self.proc, self.port, "/healthz", timeout=15)


def procfile_command():
    """The Procfile's `web:` command."""
    with open(os.path.join(ROOT, "Procfile"), encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("web:"):
                return line[4:].strip()
    raise BenchError("the Procfile has no web: line")


def worker_command(model):
    """The Procfile command for a worker model: `gevent` as is, `gthread:N` with N threads."""
    command = procfile_command()
    if model == "gevent":
        return command
    kind, _, threads = model.partition(":")
    if kind != "gthread" or not threads.isdigit():
        raise BenchError(f"unknown worker model {model!r} (use gevent or gthread:N)")
    command, count = re.subn(r"--worker-class\s+\S+", "--worker-class gthread", command)
    if not count:
        raise BenchError("the Procfile command has no --worker-class to replace")
    return f"{command} --threads {threads}"


class Relay(Target):
    """The relay under gunicorn, started like the Procfile says (gthread: flags replaced)."""

    def __init__(self, procs, workdir, upstream, model):
        """Choose a port, a temporary directory and the environment; start() runs it."""
        self.procs = procs
        self.model = model
        self.name = f"relay {model}"
        self.dir = tempfile.mkdtemp(prefix=f"relay-{model.replace(':', '')}-", dir=workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        self.command = worker_command(model)
        self.env = {
            **os.environ,
            "RELAY_UPSTREAM_BASE_URL": f"http://127.0.0.1:{upstream.port}/v1",
            "RELAY_UPSTREAM_API_KEY": "x",
            "RELAY_DATABASE": os.path.join(self.dir, "relay.sqlite"),
            "RELAY_RATELIMIT_STORAGE_URI": f"sqlite:///{self.dir}/rl.sqlite",
            "PORT": str(self.port),
            "RELAY_BIND": "127.0.0.1",
            "WEB_CONCURRENCY": "2",
            "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
        }

    def start(self):
        """Create the bench key, start gunicorn, wait for /healthz."""
        made = subprocess.run(
            [os.path.join(VENV_BIN, "flask"), "--app", "app", "keys", "create", "bench"],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        lines = made.stdout.strip().splitlines()
        if made.returncode or not lines:
            raise BenchError(f"`flask keys create` failed: {made.stderr.strip()[-500:]}")
        self.key = lines[-1].strip()
        self.proc = self.procs.start(
            self.name.replace(" ", "-").replace(":", ""),
            ["/bin/sh", "-c", "exec " + self.command],
            env=self.env,
        )
        wait_healthy(self.proc, self.port, "/healthz", timeout=60)

    def stop(self):
        """SIGTERM the master (graceful), SIGKILL after 10 s."""
        if self.proc is not None:
            self.procs.stop(self.proc, signal.SIGTERM, grace=10.0)

    def usage_outcomes(self):
        """Usage rows by outcome, read from the relay's database."""
        try:
            conn = sqlite3.connect(f"file:{self.env['RELAY_DATABASE']}?mode=ro", uri=True)
            try:
                rows = conn.execute(
                    "SELECT stream, outcome, COUNT(*) FROM usage GROUP BY stream, outcome"
                ).fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            return {"error": str(exc)}
        return {f"{'stream' if s else 'json'}:{o}": n for s, o, n in rows}


class OpenAIForward(Target):
    """openai-forward (a peer relay) from its own venv, two uvicorn workers, same upstream."""

    name = "openai-forward"

    def __init__(self, procs, workdir, upstream, venv):
        """Choose a port and build the command; start() runs it."""
        self.procs = procs
        self.venv = os.path.abspath(venv)
        self.dir = tempfile.mkdtemp(prefix="openai-forward-", dir=workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        config = [{"base_url": f"http://127.0.0.1:{upstream.port}", "route": "/", "type": "openai"}]
        self.env = {**os.environ, "FORWARD_CONFIG": json.dumps(config)}
        self.argv = [
            os.path.join(self.venv, "bin", "uvicorn"),
            "openai_forward.app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "2",
            "--log-level",
            "warning",
        ]

    def command(self):
        """The exact command line, for the report."""
        return f"FORWARD_CONFIG='{self.env['FORWARD_CONFIG']}' " + " ".join(self.argv)

    def start(self):
        """Start uvicorn in an empty directory (openai-forward reads ./.env) and wait."""
        if not os.path.exists(self.argv[0]):
            raise BenchError(f"{self.argv[0]} not found: pip install openai-forward into it")
        self.proc = self.procs.start("openai-forward", self.argv, env=self.env, cwd=self.dir)
        wait_healthy(self.proc, self.port, "/healthz", timeout=60)

    def stop(self):
        """SIGINT (uvicorn's quick stop), then SIGKILL."""
        if self.proc is not None:
            self.procs.stop(self.proc, signal.SIGINT, grace=10.0)


# --------------------------------------------------------------------------- scenarios


class Bench:
    """One benchmark run: options, the shared upstream, and the scenario implementations."""

    def __init__(self, args, procs, workdir, upstream):
        """Keep the run's options, processes and upstream."""
        self.args = args
        self.procs = procs
        self.workdir = workdir
        self.upstream = upstream
        self.events = EventLog(upstream.events)
        self.monitor = Monitor()
        self.runs = 0

    def say(self, text):
        """Progress on stderr."""
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        print(f"[{stamp}] {text}", file=sys.stderr, flush=True)

    def loadgen(self, target, mode, options, procs=1, timeout=600.0):
        """Run bench.loadgen (in `procs` processes sharing the work) and return the results."""
        self.runs += 1
        outputs, started = [], []
        try:
            for index in range(procs):
                out = os.path.join(self.workdir, f"loadgen-{self.runs}-{index}.json")
                argv = [PYTHON, "-m", "bench.loadgen", mode, "--url", target.url]
                argv += ["--key", target.key, "--out", out, *options]
                if procs > 1:
                    argv += ["--index", str(index), "--step", str(procs)]
                started.append(self.procs.start(f"loadgen-{self.runs}-{index}", argv))
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
                raise BenchError(f"the load generator failed:\n{log_tail(proc)}")
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

    def nonstream(self, target):
        """Throughput at concurrency 32 and latency at concurrency 1."""
        args = self.args

        def run():
            """Both load levels."""
            c32 = ["--concurrency", "32", "--duration", str(args.nonstream_seconds)]
            c32 += ["--warmup", "64"]
            c1 = ["--concurrency", "1", "--duration", str(args.c1_seconds), "--warmup", "32"]
            if args.smoke:
                c32 += ["--n", "200"]
                c1 += ["--n", "50"]
            high = self.loadgen(target, "nonstream", c32)[0]
            one = self.loadgen(target, "nonstream", c1)[0]
            return {"c32": high, "c1": one}

        return self.measured(target, run, "nonstream")

    # -- streams

    def streams(self, target, count, ramp, seconds, loadgen_procs, times=False):
        """`count` streams started over `ramp` seconds, all through one schedule."""
        deadline = ramp + seconds * 2 + 15

        def run():
            """Start the load generators on a common clock and gather every stream's record."""
            t0 = time.monotonic() + 1.5  # the generators import gevent meanwhile
            options = ["--n", str(count), "--ramp", f"{ramp:g}", "--t0", repr(t0)]
            options += ["--deadline", f"{deadline:g}", "--timeout", "60"]
            if times or count <= 500:
                options.append("--times")
            parts = self.loadgen(
                target, "stream", options, procs=loadgen_procs, timeout=deadline + 30
            )
            records = [r for part in parts for r in part["records"]]
            return summarize_streams(records, parts)

        result = self.measured(target, run, "streams" if count > 20 else "fidelity")
        cpu = result["processes"].get("target", result["processes"]["upstream"])["cpu_seconds"]
        if result["events_total"]:
            result["cpu_us_per_event"] = round(cpu / result["events_total"] * 1e6, 1)
        return result

    # -- disconnect

    def disconnect(self, target, trials, tag):
        """Close after the first event; the upstream's record says when it noticed."""

        def run():
            """Trials, then match the upstream's hang-up records by tag."""
            options = ["--trials", str(trials), "--tag-prefix", tag, "--timeout", "30"]
            result = self.loadgen(target, "disconnect", options)[0]
            wait = max(1.0, 3 * self.upstream.chunk_delay) + 0.5
            time.sleep(wait)
            return {"wait_s": wait, "trials": result["trials"]}

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


def summarize_profile(stacks, top=12):
    """Where the samples were: top frames by own time and by inclusive time (percent)."""
    total = sum(stacks.values())
    own, inclusive = {}, {}
    for stack, count in stacks.items():
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    def best(table, keep):
        """The largest entries as [percent, frame]."""
        rows = sorted(table.items(), key=lambda item: -item[1])
        return [[round(100 * n / total, 1), f] for f, n in rows if keep(f)][:top]

    mine = ("relay/", "urllib3/", "requests/", "gunicorn/http", "sqlite", "flask_limiter", "sse")
    return {
        "samples": total,
        "own": best(own, lambda f: True),
        "inclusive_relay_side": best(inclusive, lambda f: any(m in f for m in mine)),
    }


def summarize_streams(records, parts):
    """Failures, TTFB, gaps and concurrency of a set of stream records."""
    ok = [r for r in records if r["status"] == 200 and r["done"] and not r["error"]]
    ok_ids = {id(r) for r in ok}
    failures = {}
    for record in records:
        if id(record) in ok_ids:
            continue
        if record["error"]:
            kind = record["error"].split(":")[0]
        elif record["status"] != 200:
            kind = f"status {record['status']}"
        else:
            kind = "no [DONE]"
        failures[kind] = failures.get(kind, 0) + 1
    ttfb = [r["ttfb"] for r in ok]
    gaps = [r["max_gap"] for r in ok]
    durations = [r["t_end"] - r["t0"] for r in ok]
    events = sorted({r["events"] for r in ok})
    body_gaps, end_gaps = [], []
    for record in ok:
        times = record.get("times")
        if times and len(times) >= 4:
            # Content events, then the finishing chunk, then [DONE] (sent together).
            body_gaps.append(max(b - a for a, b in itertools.pairwise(times[:-2])))
            end_gaps.append(times[-2] - times[-3])
    extra = {}
    if body_gaps:
        extra = {
            "body_gap_max_ms": ms(max(body_gaps)),
            "body_gap_p99_ms": ms(percentile(body_gaps, 0.99)),
            "end_gap_max_ms": ms(max(end_gaps)),
            "end_gap_p50_ms": ms(percentile(end_gaps, 0.5)),
        }
    return {
        **extra,
        "events_total": sum(r["events"] for r in records),
        "count": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "failures": failures,
        "peak_concurrent": peak_concurrency(records),
        "ttfb_p50_ms": ms(percentile(ttfb, 0.5)),
        "ttfb_p99_ms": ms(percentile(ttfb, 0.99)),
        "ttfb_max_ms": ms(max(ttfb)) if ttfb else None,
        "max_gap_max_ms": ms(max(gaps)) if gaps else None,
        "max_gap_p99_ms": ms(percentile(gaps, 0.99)),
        "max_gap_p50_ms": ms(percentile(gaps, 0.5)),
        "duration_p50_s": round(percentile(durations, 0.5), 3) if durations else None,
        "events_per_stream": events[:3],
        "loadgen": [
            {
                "cpu_seconds": round(p["cpu_seconds"], 2),
                "cores": round(p["cpu_seconds"] / p["wall_seconds"], 2),
            }
            for p in parts
        ],
    }


# --------------------------------------------------------------------------- report


def machine_info():
    """CPU model, cores, memory, date, versions."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    versions = subprocess.run(
        [
            PYTHON,
            "-c",
            "import gevent, gunicorn, sys; print(sys.version.split()[0], "
            "gevent.__version__, gunicorn.__version__)",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    commit = subprocess.run(
        ["git", "-C", ROOT, "log", "-1", "--format=%h %cI %s"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", ROOT, "status", "--porcelain", "--", "relay", "app.py", "Procfile"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "relay_commit": commit[:100] + (" (relay/ has uncommitted changes)" if dirty else ""),
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "python_gevent_gunicorn": versions,
    }


def fmt(value, digits=1):
    """A table cell."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def diff(a, b):
    """b - a, or None."""
    return None if a is None or b is None else b - a


def table(title, header, rows):
    """A Markdown table with a title line."""
    lines = [f"\n{title}", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows
    ]
    return "\n".join(lines)


def cores_of(result, group):
    """CPU cores a process group used during a measurement."""
    return ((result or {}).get("processes", {}).get(group) or {}).get("cores")


def pair(a, b, digits=1):
    """Two figures in one cell."""
    return f"{fmt(a, digits)} / {fmt(b, digits)}"


def other_load(*results):
    """The most CPU other users' processes took during the given measurements."""
    values = [
        ((r or {}).get("processes", {}).get("machine") or {}).get("cores_other_users")
        for r in results
    ]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def blocks(results, scenario):
    """(target name, direct result, target result) for every target that ran scenario."""
    for name, res in results["targets"].items():
        block = res.get(scenario)
        if block:
            yield name, block["direct"], block["target"]


def report(results):
    """All figures as Markdown tables."""
    out = []
    rows = [
        [
            name,
            pair(d["c32"]["rps"], t["c32"]["rps"], 0),
            pair(t["c32"]["p50_ms"], t["c32"]["p99_ms"]),
            f"{t['c32']['errors']}/{t['c32']['count']}",
            pair(d["c1"]["p50_ms"], t["c1"]["p50_ms"], 2),
            fmt(diff(d["c1"]["p50_ms"], t["c1"]["p50_ms"]), 2),
            cores_of(t, "target"),
            other_load(d, t),
        ]
        for name, d, t in blocks(results, "nonstream")
    ]
    if rows:
        header = ["target", "c32 req/s direct / target", "c32 p50 / p99 ms", "c32 errors"]
        header += ["c1 p50 ms direct / target", "c1 overhead ms", "target cores"]
        header += ["other users' cores"]
        out.append(table("Non-stream chat (keep-alive clients)", header, rows))
    rows = []
    for name, d, t in blocks(results, "streams"):
        tp = t.get("processes", {}).get("target", {})
        rows.append(
            [
                name,
                f"{t['ok']}/{t['count']}",
                t["peak_concurrent"],
                pair(d["ttfb_p50_ms"], d["ttfb_p99_ms"]),
                pair(t["ttfb_p50_ms"], t["ttfb_p99_ms"]),
                pair(
                    diff(d["ttfb_p50_ms"], t["ttfb_p50_ms"]),
                    diff(d["ttfb_p99_ms"], t["ttfb_p99_ms"]),
                ),
                pair(d["max_gap_max_ms"], t["max_gap_max_ms"], 0),
                pair(tp.get("rss_start_mib"), tp.get("rss_peak_mib")),
                tp.get("cores"),
                t.get("cpu_us_per_event"),
                " / ".join(
                    str(n)
                    for n in t.get("processes", {}).get("open_files_peak_per_process", {}).values()
                )
                or "-",
                cores_of(t, "upstream"),
                " ".join(fmt(p["cores"], 2) for p in t["loadgen"]),
                other_load(d, t),
                ", ".join(f"{k} {v}" for k, v in t["failures"].items()) or "-",
            ]
        )
    if rows:
        config = results["config"]
        title = (
            f"Streams ({config['streams']} x {config['stream_seconds']:g} s, "
            f"{config['chunks']} chunks, started over {config['ramp']:g} s)"
        )
        header = ["target", "ok", "peak open", "TTFB p50 / p99 ms direct", "TTFB p50 / p99 ms"]
        header += ["delta p50 / p99 ms", "max gap ms direct / target", "RSS idle / peak MiB"]
        header += ["target cores", "target CPU us/event", "open files per process (peak)"]
        header += ["upstream cores", "loadgen cores"]
        header += ["other users' cores", "failures"]
        out.append(table(title, header, rows))
    rows = [
        [
            name,
            f"{t['ok']}/{t['count']}",
            pair(d["max_gap_max_ms"], d["max_gap_p99_ms"]),
            pair(t["max_gap_max_ms"], t["max_gap_p99_ms"]),
            pair(
                diff(d["max_gap_max_ms"], t["max_gap_max_ms"]),
                diff(d["max_gap_p99_ms"], t["max_gap_p99_ms"]),
            ),
            pair(d.get("body_gap_max_ms"), t.get("body_gap_max_ms")),
            pair(d.get("end_gap_p50_ms"), t.get("end_gap_p50_ms")),
            pair(d.get("end_gap_max_ms"), t.get("end_gap_max_ms")),
            other_load(d, t),
        ]
        for name, d, t in blocks(results, "fidelity")
    ]
    if rows:
        gap = results["config"]["stream_seconds"] / results["config"]["chunks"] * 1000
        title = (
            f"Stream fidelity (20 streams, chunks {gap:g} ms apart; per stream its largest gap "
            "between events; 'end gap' = last content chunk to the finishing chunk)"
        )
        header = ["target", "ok", "direct max / p99 ms", "target max / p99 ms"]
        header += ["delta max / p99 ms", "content-only max ms direct / target"]
        header += ["end gap p50 ms direct / target", "end gap max ms direct / target"]
        header += ["other users' cores"]
        out.append(table(title, header, rows))
    rows = [
        [
            name,
            f"{t['noticed']}/{t['trials']}",
            pair(d["p50_ms"], d["max_ms"], 2),
            pair(t["p50_ms"], t["max_ms"], 2),
            ", ".join(f"{k} {v}" for k, v in t["how"].items()) or "-",
            other_load(d, t),
        ]
        for name, d, t in blocks(results, "disconnect")
    ]
    if rows:
        title = "Disconnect (client closes after the first event; until the upstream sees it)"
        header = ["target", "noticed", "direct p50 / max ms", "target p50 / max ms"]
        header += ["how the upstream saw it", "other users' cores"]
        out.append(table(title, header, rows))
    for name, res in results["targets"].items():
        for scenario in SCENARIOS:
            profile = ((res.get(scenario) or {}).get("target") or {}).get("profile")
            if not profile:
                continue
            out.append(
                f"\nProfile of {name} workers during {scenario} ({profile['samples']} samples)"
            )
            out.append("  own time:")
            out += [f"    {pct:5.1f}%  {frame}" for pct, frame in profile["own"][:10]]
            out.append("  inclusive (relay-side frames):")
            out += [f"    {pct:5.1f}%  {frame}" for pct, frame in profile["inclusive_relay_side"]]
    return "\n".join(out)


def functional_failures(results):
    """Human-readable functional failures (never timing)."""
    problems = []
    for name, res in results["targets"].items():
        if res.get("error"):
            problems.append(f"{name}: {res['error'].splitlines()[0]}")
        for scenario in ("streams", "fidelity"):
            for side in ("direct", "target"):
                block = (res.get(scenario) or {}).get(side)
                if block and block["failed"]:
                    problems.append(f"{name} {scenario} ({side}): {block['failures']}")
        for side in ("direct", "target"):
            block = (res.get("nonstream") or {}).get(side)
            for level in ("c32", "c1"):
                part = (block or {}).get(level)
                if part and (part["errors"] or part["ok"] != part["count"] or not part["count"]):
                    problems.append(
                        f"{name} nonstream {level} ({side}): {part['errors']} errors, "
                        f"{part['ok']}/{part['count']} ok"
                    )
            block = (res.get("disconnect") or {}).get(side)
            if block and block["errors"]:
                problems.append(f"{name} disconnect ({side}): {block['error_samples']}")
    return problems


# --------------------------------------------------------------------------- main


def run_target(bench, target, direct, scenarios):
    """Start a target, run the scenarios (each on direct first), stop it."""
    args = bench.args
    out = {}
    bench.say(f"{target.name}: starting")
    target.start()
    try:
        slug = re.sub(r"[^a-z0-9]+", "", target.name.lower())
        for scenario in scenarios:
            pair = {}
            for side, who in (("direct", direct), ("target", target)):
                bench.say(f"{target.name}: {scenario} via {who.name}")
                tag = f"bench-{slug}-{side}"
                if scenario == "nonstream":
                    pair[side] = bench.nonstream(who)
                elif scenario == "streams":
                    pair[side] = bench.streams(
                        who, args.streams, args.ramp, args.stream_seconds, args.loadgen_procs
                    )
                elif scenario == "fidelity":
                    pair[side] = bench.streams(who, 20, 0.0, args.stream_seconds, 1, times=True)
                elif scenario == "disconnect":
                    pair[side] = bench.disconnect(who, args.trials, f"{tag}-dc")
            out[scenario] = pair
    finally:
        bench.say(f"{target.name}: stopping")
        target.stop()
        out["usage_rows"] = target.usage_outcomes()
    return out


def parse_args(argv):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--scenario", default="all", help="all, or a comma list of " + ", ".join(SCENARIOS)
    )
    parser.add_argument("--streams", type=int, default=2000, help="concurrent streams")
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
    args = parser.parse_args(argv)
    if args.smoke:
        args.streams = min(args.streams, 50)
        args.stream_seconds = 1.0
        args.trials = 3
        args.nonstream_seconds = 10.0
        args.c1_seconds = 10.0
    if args.ramp is None:
        args.ramp = min(args.stream_seconds / 2, 5.0)
    if args.loadgen_procs is None:
        args.loadgen_procs = 2 if args.streams > 500 else 1
    chosen = SCENARIOS if args.scenario == "all" else tuple(args.scenario.split(","))
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}")
    args.scenarios = [s for s in SCENARIOS if s in chosen]
    models = [m.strip() for m in args.workers.split(",") if m.strip()]
    args.models = ["gthread:32" if m == "gthread" else m for m in models]
    return args


def main(argv=None):
    """Run everything, print the tables, write JSON; non-zero only on functional failure."""
    args = parse_args(argv)
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
            "scenarios": args.scenarios,
            "workers": args.models,
        },
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "targets": {},
    }
    started = time.monotonic()
    try:
        upstream = Upstream(procs, workdir, args.stream_seconds, args.chunks, args.upstream_procs)
        upstream.start()
        bench = Bench(args, procs, workdir, upstream)
        direct = Direct(upstream)
        targets = [Relay(procs, workdir, upstream, model) for model in args.models]
        if args.peer_openai_forward:
            peer = OpenAIForward(procs, workdir, upstream, args.peer_openai_forward)
            results["openai_forward_command"] = peer.command()
            targets.append(peer)
        for target in targets:
            if isinstance(target, Relay):
                results.setdefault("relay_commands", {})[target.model] = target.command
            try:
                results["targets"][target.name] = run_target(bench, target, direct, args.scenarios)
            except BenchError as exc:
                bench.say(f"{target.name}: FAILED: {exc}")
                results["targets"][target.name] = {"error": str(exc)}
            except Exception as exc:  # a bench bug: report it, go on with the next target
                bench.say(f"{target.name}: FAILED: {traceback.format_exc()}")
                results["targets"][target.name] = {"error": f"{type(exc).__name__}: {exc}"}
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
    return 1 if any(res.get("error") for res in results["targets"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
