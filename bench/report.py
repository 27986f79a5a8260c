"""The report: machine facts, Markdown tables of every figure, and functional failures."""

import contextlib
import datetime as dt
import os
import subprocess

from bench.processes import PYTHON, ROOT
from bench.scenarios import CLIENTS, SCENARIOS, result_key
from bench.soak import SOAK, soak_problems


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


def checkout_info(root):
    """Where a compared relay checkout is, and its commit when it is a git checkout."""
    commit = subprocess.run(
        ["git", "-C", root, "log", "-1", "--format=%h %s"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {"root": root, "commit": commit[:100] or "not a git checkout"}


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


def measured_with(res):
    """(scenario, client, pair) for every paired scenario a target's results hold."""
    for scenario in SCENARIOS:
        for client in CLIENTS:
            block = res.get(result_key(scenario, client))
            if block:
                yield scenario, client, block


def blocks(results, scenario):
    """(target name, client, direct result, target result) for each run of the scenario."""
    for name, res in results["targets"].items():
        for done, client, block in measured_with(res):
            if done == scenario:
                yield name, client, block["direct"], block["target"]


def report(results):
    """All figures as Markdown tables."""
    out = []
    renders = (nonstream_table, streams_table, burst_table, fidelity_table, disconnect_table)
    renders += (soak_table,)
    for render in (*renders, comparison_table):
        text = render(results)
        if text:
            out.append(text)
    out += profiles(results)
    return "\n".join(out)


def nonstream_table(results):
    """Non-stream throughput and c1 latency, direct and target (None: not measured)."""
    rows = [
        [
            name,
            client,
            pair(d["c32"]["rps"], t["c32"]["rps"], 0),
            pair(t["c32"]["p50_ms"], t["c32"]["p99_ms"]),
            f"{t['c32']['errors']}/{t['c32']['count']}",
            pair(d["c1"]["p50_ms"], t["c1"]["p50_ms"], 2),
            fmt(diff(d["c1"]["p50_ms"], t["c1"]["p50_ms"]), 2),
            cores_of(t, "target"),
            other_load(d, t),
        ]
        for name, client, d, t in blocks(results, "nonstream")
    ]
    if not rows:
        return None
    header = ["target", "client", "c32 req/s direct / target", "c32 p50 / p99 ms", "c32 errors"]
    header += ["c1 p50 ms direct / target", "c1 overhead ms", "target cores"]
    header += ["other users' cores"]
    return table("Non-stream chat (keep-alive clients)", header, rows)


def stream_start_columns(name, client, d, t):
    """The columns the streams and burst tables share: who, how many, and TTFB against direct."""
    return [
        name,
        client,
        f"{t['ok']}/{t['count']}",
        t["peak_concurrent"],
        pair(d["ttfb_p50_ms"], d["ttfb_p99_ms"]),
        pair(t["ttfb_p50_ms"], t["ttfb_p99_ms"]),
        pair(diff(d["ttfb_p50_ms"], t["ttfb_p50_ms"]), diff(d["ttfb_p99_ms"], t["ttfb_p99_ms"])),
    ]


def streams_table(results):
    """Many concurrent streams: completion, TTFB, gaps, memory and CPU."""
    rows = []
    for name, client, d, t in blocks(results, "streams"):
        tp = t.get("processes", {}).get("target", {})
        rows.append(
            [
                *stream_start_columns(name, client, d, t),
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
    if not rows:
        return None
    config = results["config"]
    title = (
        f"Streams ({config['streams']} x {config['stream_seconds']:g} s, "
        f"{config['chunks']} chunks, started over {config['ramp']:g} s)"
    )
    header = ["target", "client", "ok", "peak open", "TTFB p50 / p99 ms direct"]
    header += ["TTFB p50 / p99 ms", "delta p50 / p99 ms", "max gap ms direct / target"]
    header += ["RSS idle / peak MiB"]
    header += ["target cores", "target CPU us/event", "open files per process (peak)"]
    header += ["upstream cores", "loadgen cores"]
    header += ["other users' cores", "failures"]
    return table(title, header, rows)


def burst_table(results):
    """Streams opened all at once: how many completed, TTFB, the target's CPU per stream, RSS."""
    rows = []
    for name, client, d, t in blocks(results, "burst"):
        tp = t.get("processes", {}).get("target", {})
        rows.append(
            [
                *stream_start_columns(name, client, d, t),
                fmt(t.get("cpu_ms_per_stream"), 2),
                pair(tp.get("rss_start_mib"), tp.get("rss_peak_mib")),
                tp.get("cores"),
                " ".join(fmt(p["cores"], 2) for p in t["loadgen"]),
                other_load(d, t),
                ", ".join(f"{k} {v}" for k, v in t["failures"].items()) or "-",
            ]
        )
    if not rows:
        return None
    config = results["config"]
    title = (
        f"Burst ({config['burst']} streams of {config['stream_seconds']:g} s opened at once, "
        f"{config['chunks']} chunks; load generator processes: {config['burst_procs']})"
    )
    header = ["target", "client", "completed", "peak open", "TTFB p50 / p99 ms direct"]
    header += ["TTFB p50 / p99 ms", "delta p50 / p99 ms", "target CPU ms/stream"]
    header += ["RSS idle / peak MiB", "target cores", "loadgen cores", "other users' cores"]
    header += ["failures"]
    return table(title, header, rows)


def fidelity_table(results):
    """The largest gap between events per stream, direct and target."""
    rows = [
        [
            name,
            client,
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
        for name, client, d, t in blocks(results, "fidelity")
    ]
    if not rows:
        return None
    gap = results["config"]["stream_seconds"] / results["config"]["chunks"] * 1000
    title = (
        f"Stream fidelity (20 streams, chunks {gap:g} ms apart; per stream its largest gap "
        "between events; 'end gap' = last content chunk to the finishing chunk)"
    )
    header = ["target", "client", "ok", "direct max / p99 ms", "target max / p99 ms"]
    header += ["delta max / p99 ms", "content-only max ms direct / target"]
    header += ["end gap p50 ms direct / target", "end gap max ms direct / target"]
    header += ["other users' cores"]
    return table(title, header, rows)


def disconnect_table(results):
    """How soon the upstream saw a client's hang-up, direct and target."""
    rows = [
        [
            name,
            client,
            f"{t['noticed']}/{t['trials']}",
            pair(d["p50_ms"], d["max_ms"], 2),
            pair(t["p50_ms"], t["max_ms"], 2),
            ", ".join(f"{k} {v}" for k, v in t["how"].items()) or "-",
            other_load(d, t),
        ]
        for name, client, d, t in blocks(results, "disconnect")
    ]
    if not rows:
        return None
    title = "Disconnect (client closes after the first event; until the upstream sees it)"
    header = ["target", "client", "noticed", "direct p50 / max ms", "target p50 / max ms"]
    header += ["how the upstream saw it", "other users' cores"]
    return table(title, header, rows)


def soak_table(results):
    """The soak: calls against usage rows and key totals, failures, and the relay's RSS."""
    rows = []
    for name, res in results["targets"].items():
        t = (res.get(SOAK) or {}).get("target")
        if not t:
            continue
        rss, lat = t["rss"], t["latency"]
        rows.append(
            [
                name,
                f"{t['sent']}/{t['scheduled']}",
                f"{t['ok']} / {t['cut']} / {t['failed']}",
                pair(t.get("usage_rows"), t["sent"]),
                pair(t.get("tokens_rows"), t.get("tokens_keys")),
                pair(rss["first_mib"], rss["last_mib"]),
                rss["growth_mib"],
                pair(lat["json"]["p50_ms"], lat["json"]["p99_ms"]),
                pair(lat["stream"]["p50_ms"], lat["stream"]["p99_ms"]),
                pair(t["peak_in_flight"], t["peak_streams_open"]),
                pair(t["lag_p99_ms"], t["lag_max_ms"]),
                cores_of(t, "target"),
                other_load(t),
                "FAILED" if t["problems"] else "ok",
            ]
        )
    if not rows:
        return None
    shape = results["config"][SOAK]
    title = (
        f"Soak ({shape['rate']:g} calls/s for {shape['seconds']:g} s, one in "
        f"{shape['stream_every']} a stream of {shape['chunks']} chunks "
        f"{shape['chunk_delay_ms']:g} ms apart, {shape['keys']} keys; relay RSS averaged over "
        f"the first and the last {shape['rss_window_s']:g} s; gevent client)"
    )
    header = ["target", "calls sent", "ok / cut / failed", "usage rows / calls"]
    header += ["tokens rows / keys", "RSS first / last MiB", "RSS growth MiB"]
    header += ["non-stream p50 / p99 ms", "stream p50 / p99 ms", "peak open calls / streams"]
    header += ["start lag p99 / max ms", "target cores", "other users' cores", "checks"]
    return table(title, header, rows)


def _median(values):
    """The median of the values that are there (None: none are)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def _at(result, *path):
    """result[path[0]][path[1]]..., or None where a step is missing."""
    for step in path:
        if not isinstance(result, dict):
            return None
        result = result.get(step)
    return result


# The comparison's columns: (header, digits, the figure from one target's results).
COMPARED = [
    ("CPU us per non-stream call", 1, lambda r: _at(r, "nonstream", "target", "cpu_us_per_call")),
    ("CPU us per stream event", 1, lambda r: _at(r, "streams", "target", "cpu_us_per_event")),
    ("c32 req/s", 0, lambda r: _at(r, "nonstream", "target", "c32", "rps")),
    (
        "c1 overhead ms",
        2,
        lambda r: diff(
            _at(r, "nonstream", "direct", "c1", "p50_ms"),
            _at(r, "nonstream", "target", "c1", "p50_ms"),
        ),
    ),
    (
        "TTFB p99 over direct ms",
        0,
        lambda r: diff(
            _at(r, "streams", "direct", "ttfb_p99_ms"), _at(r, "streams", "target", "ttfb_p99_ms")
        ),
    ),
    (
        "RSS peak MiB (streams)",
        1,
        lambda r: _at(r, "streams", "target", "processes", "target", "rss_peak_mib"),
    ),
    ("disconnect p50 ms", 2, lambda r: _at(r, "disconnect", "target", "p50_ms")),
    ("CPU ms per burst stream", 2, lambda r: _at(r, "burst", "target", "cpu_ms_per_stream")),
]


def client_view(res, client):
    """A target's results as one client measured them: {scenario: pair} (COMPARED reads it)."""
    return {scenario: res.get(result_key(scenario, client)) for scenario in SCENARIOS}


def comparison_table(results):
    """Checkouts side by side: each figure's median over the rounds, then every round's value."""
    config = results["config"]
    if not config.get("checkouts") and config.get("rounds", 1) < 2:
        return None
    groups = {}
    for name, res in results["targets"].items():
        groups.setdefault(name.split(" #")[0], []).append(res)
    rows = []
    for name, runs in groups.items():
        for client in config.get("clients", ["gevent"]):
            views = [client_view(run, client) for run in runs if not run.get("error")]
            row = [name, client, str(len(runs))]
            for _header, digits, figure in COMPARED:
                values = [figure(view) for view in views]
                shown = ", ".join(fmt(v, digits) for v in values)
                middle = _median(values)
                row.append(f"**{fmt(middle, digits)}** ({shown})" if middle is not None else "-")
            rows.append(row)
    header = ["target", "client", "rounds", *(c[0] for c in COMPARED)]
    title = "Targets compared (median over the rounds, bold; then each round, in run order)"
    return table(title, header, rows)


def profiles(results):
    """py-spy summaries, when profiles were taken: lines of text."""
    out = []
    for name, res in results["targets"].items():
        runs = [(f"{s} ({c} client)", block) for s, c, block in measured_with(res)]
        runs.append((SOAK, res.get(SOAK)))
        for what, block in runs:
            profile = ((block or {}).get("target") or {}).get("profile")
            if not profile:
                continue
            out.append(f"\nProfile of {name} workers during {what} ({profile['samples']} samples)")
            out.append("  own time:")
            out += [f"    {pct:5.1f}%  {frame}" for pct, frame in profile["own"][:10]]
            out.append("  inclusive (relay-side frames):")
            out += [f"    {pct:5.1f}%  {frame}" for pct, frame in profile["inclusive_relay_side"]]
    return out


def functional_failures(results):
    """Human-readable functional failures (never timing)."""
    problems = []
    for name, res in results["targets"].items():
        if res.get("error"):
            problems.append(f"{name}: {res['error'].splitlines()[0]}")
        for scenario, client, pair_ in measured_with(res):
            for side in ("direct", "target"):
                what = f"{name} {scenario} ({side}, {client} client)"
                problems += side_failures(what, scenario, pair_[side])
        problems += [f"{name} {problem}" for problem in soak_problems(res)]
    return problems


def side_failures(what, scenario, block):
    """The functional failures of one side of one scenario, each named `what`."""
    if scenario in ("streams", "fidelity", "burst"):
        return [f"{what}: {block['failures']}"] if block["failed"] else []
    if scenario == "disconnect":
        return [f"{what}: {block['error_samples']}"] if block["errors"] else []
    problems = []
    for level in ("c32", "c1"):
        part = block.get(level)
        if part and (part["errors"] or part["ok"] != part["count"] or not part["count"]):
            problems.append(
                f"{what} {level}: {part['errors']} errors, {part['ok']}/{part['count']} ok"
            )
    return problems
