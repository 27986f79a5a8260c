"""Turn raw measurements (stream records, profiler stacks) into the figures the report shows."""

import itertools


def percentile(values, fraction):
    """Nearest-rank percentile (None for no values)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    index = min(len(values) - 1, max(0, round(fraction * len(values) + 0.5) - 1))
    return values[index]


def ms(seconds, digits=2):
    """Seconds as milliseconds rounded to `digits` (None: not rounded); None stays None."""
    if seconds is None:
        return None
    return seconds * 1000 if digits is None else round(seconds * 1000, digits)


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

    mine = ("relay/", "requests/", "urllib3/", "gunicorn/http", "sqlite", "flask_limiter", "sse")
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


def window_averages(series, group, start, seconds, window):
    """Mean RSS (MiB) of a group's first and last `window` s of a run, from Monitor.series."""
    points = [(t - start, rss[group] / 1024) for t, rss in series if group in rss]

    def average(low, high):
        """Mean MiB of the samples taken in [low, high) seconds after start."""
        values = [mib for at, mib in points if low <= at < high]
        return round(sum(values) / len(values), 1) if values else None

    first, last = average(0.0, window), average(seconds - window, seconds)
    return {
        "window_s": window,
        "first_mib": first,
        "last_mib": last,
        "growth_mib": round(last - first, 1) if first is not None and last is not None else None,
        "samples": [[round(at, 1), round(mib, 1)] for at, mib in points],
    }
