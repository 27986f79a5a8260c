"""The soak: mixed calls at a fixed rate through a fresh relay, then its books and RSS checked."""

import os
import sqlite3
import time

import psycopg

from bench.summary import window_averages
from bench.targets import Upstream

SOAK = "soak"
KEYS = 4
QUOTA = 1_000_000_000  # large enough that no key runs out, so every call is answered
CHUNKS = 10
CHUNK_DELAY = 0.02  # short streams: many open at once without a long tail at the end
STREAM_EVERY = 3  # every third call is a stream
RSS_WINDOW = 10.0


def soak_upstream(procs, workdir, nprocs):
    """A fake upstream of its own: soak streams are short, whatever the other scenarios use."""
    return Upstream(procs, workdir, CHUNKS * CHUNK_DELAY, CHUNKS, nprocs, name="soak-upstream")


def run_soak(bench, relay):
    """Create the keys, start the relay, drive it, stop it (rows all written), read its books."""
    args = bench.args
    bench.say(f"{relay.name}: starting (soak)")
    keys = [relay.create_key(f"soak{n}", "--quota", str(QUOTA)) for n in range(1, KEYS + 1)]
    relay.start()
    try:
        bench.say(f"{relay.name}: soak, {args.soak_rate:g} calls/s for {args.soak_seconds:g} s")
        result = drive(bench, relay, keys)
    finally:
        bench.say(f"{relay.name}: stopping")
        relay.stop()
    try:
        result.update(books(relay))
    except (sqlite3.Error, psycopg.Error) as exc:
        result["books_error"] = str(exc)
    result["problems"] = problems(result)
    result["client"] = "gevent"  # whatever --client says: aioload has no soak mode
    return {"target": result}


def drive(bench, relay, keys):
    """The fixed-rate load, with the relay's RSS averaged over its first and last seconds."""
    args = bench.args
    t0 = time.monotonic() + 1.5  # the generator imports gevent meanwhile
    deadline = args.soak_seconds + 30

    def run():
        """One load generator process: 200 calls/s is well within what one can issue."""
        options = ["--rate", f"{args.soak_rate:g}", "--duration", f"{args.soak_seconds:g}"]
        options += ["--keys", ",".join(keys), "--stream-every", str(STREAM_EVERY)]
        options += ["--t0", repr(t0), "--deadline", f"{deadline:g}", "--timeout", "30"]
        return bench.loadgen(relay, "soak", options, timeout=deadline + 30)[0]

    result = bench.measured(relay, run, SOAK)
    window = soak_config(args)["rss_window_s"]
    result["rss"] = window_averages(bench.monitor.series, "target", t0, args.soak_seconds, window)
    return result


def soak_config(args):
    """The soak's shape, for the report and the JSON."""
    return {
        "rate": args.soak_rate,
        "seconds": args.soak_seconds,
        "keys": KEYS,
        "quota": QUOTA,
        "stream_every": STREAM_EVERY,
        "chunks": CHUNKS,
        "chunk_delay_ms": CHUNK_DELAY * 1000,
        # A soak shorter than two windows compares its halves.
        "rss_window_s": min(RSS_WINDOW, args.soak_seconds / 2),
    }


def books(relay):
    """What the relay's database holds: usage rows and tokens, by row and by key."""
    # Sums cast to BIGINT: PostgreSQL's SUM of a BIGINT is a NUMERIC (a Decimal in Python).
    [(rows, row_tokens)] = relay.query(
        "SELECT COUNT(*), CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT) FROM usage"
    )
    [(key_tokens,)] = relay.query("SELECT CAST(COALESCE(SUM(used_tokens), 0) AS BIGINT) FROM keys")
    per_key = relay.query(
        "SELECT k.name, k.used_tokens, COUNT(u.id), "
        "CAST(COALESCE(SUM(u.total_tokens), 0) AS BIGINT) "
        "FROM keys k LEFT JOIN usage u ON u.key_id = k.id GROUP BY k.id ORDER BY k.name"
    )
    spool = relay.env["RELAY_SPOOL_FILE"]
    spooled = 0
    if os.path.exists(spool):
        with open(spool, encoding="utf-8") as handle:
            spooled = sum(1 for line in handle if line.strip())
    return {
        "usage_rows": rows,
        "usage_rows_by_outcome": relay.usage_outcomes(),
        "tokens_rows": row_tokens,
        "tokens_keys": key_tokens,
        "keys": [
            {"name": name, "used_tokens": used, "rows": count, "row_tokens": tokens}
            for name, used, count, tokens in per_key
        ],
        "spooled_rows": spooled,
    }


def problems(result):
    """Functional failures of a soak (never timing): lost or extra rows, tokens, failed calls."""
    found = []
    if "books_error" in result:
        found.append(f"could not read the relay's database: {result['books_error']}")
        return found
    if result["usage_rows"] != result["sent"]:
        found.append(f"usage rows {result['usage_rows']} != calls {result['sent']}")
    if result["tokens_rows"] != result["tokens_keys"]:
        found.append(
            f"tokens in usage rows {result['tokens_rows']} != keys' used_tokens "
            f"{result['tokens_keys']}"
        )
    for key in result["keys"]:
        if key["row_tokens"] != key["used_tokens"]:
            found.append(
                f"key {key['name']}: used_tokens {key['used_tokens']} != its rows' "
                f"{key['row_tokens']}"
            )
    # A call cut at the deadline (30 s after the last arrival, for 0.2 s streams) hung.
    unfinished = result["failed"] + result["cut"]
    if unfinished:
        found.append(f"{unfinished} of {result['scheduled']} calls failed: {result['failures']}")
    return found


def soak_problems(res):
    """The soak's functional failures for one target's results, as report lines."""
    soak = res.get(SOAK)
    if not soak:
        return []
    if soak.get("error"):
        return [f"soak: {soak['error'].splitlines()[0]}"]
    return [f"soak: {problem}" for problem in soak["target"]["problems"]]
