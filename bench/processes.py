"""The processes a bench run starts, and CPU and memory sampling of their process trees."""

import contextlib
import http.client
import os
import resource
import signal
import subprocess
import sys
import threading
import time

from bench.loadcommon import raise_open_files  # noqa: F401 - re-exported for the servers
from relay.serve.launch import free_port  # noqa: F401 - the relay's own, re-exported here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
PYTHON = os.path.join(VENV_BIN, "python") if os.path.isdir(VENV_BIN) else sys.executable
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """Something the benchmark needs did not work (a server did not start, a tool failed)."""


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
        self.series = []
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
        # (monotonic time, {group: rss_kib}) per sample, for figures over time (the soak).
        self.series = [(time.monotonic(), self._rss_of(self._first))]
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._busy = busy_ticks()
        self._own = own_ticks()
        self._started = time.monotonic()
        self._thread.start()

    @staticmethod
    def _rss_of(sample):
        """{group: rss_kib} of one sample."""
        return {name: values[0] for name, values in sample.items()}

    def _run(self):
        """The sampling loop."""
        while not self._stop.wait(self.interval):
            now = self.sample()
            self._last = now
            self.series.append((time.monotonic(), self._rss_of(now)))
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
