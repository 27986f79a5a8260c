"""Usage accounting: the token estimate rule, reading upstream usage, one row per call."""

import fcntl
import json
import logging
import math
import os
import re
import sqlite3
import time

from relay.group_commit import GroupCommit

log = logging.getLogger("relay.usage")

# Han ideographs (with extensions and compatibility forms), kana and hangul each count as one.
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f"
CJK_CHAR = re.compile(f"[{CJK}]")
WORD = re.compile(f"[^\\W{CJK}]+")
# Paths whose replies are generated text: usage is estimated when the upstream sends none.
GENERATION_PATHS = ("chat/completions", "completions")
USAGE_COLUMNS = (
    "ts",
    "key_id",
    "face",
    "method",
    "path",
    "model_requested",
    "model_served",
    "upstream",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "usage_source",
    "cost",
    "status",
    "outcome",
    "latency_ms",
    "ttfb_ms",
    "end_user",
    "upstream_request_id",
    "bytes_out",
    "attempts",
)
INSERT_USAGE = (
    f"INSERT INTO usage ({', '.join(USAGE_COLUMNS)}) "  # noqa: S608 - constant column list
    f"VALUES ({', '.join('?' for _ in USAGE_COLUMNS)})"
)
SETTLE_KEY = (
    "UPDATE keys SET used_tokens = used_tokens + ?, spent = spent + ?, last_used_at = ? "
    "WHERE id = ?"
)


def estimate_tokens(text):
    """The old service's published rule: CJK characters + words * 1.3, rounded half up."""
    if not text:
        return 0
    cjk = len(CJK_CHAR.findall(text))
    words = len(WORD.findall(text))
    return math.floor(cjk + words * 1.3 + 0.5)


def prompt_text(body):
    """All the text a request sends for generation: messages, prompt, input, instructions."""
    if not isinstance(body, dict):
        return ""
    parts = []
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            _collect_text(message.get("content"), parts)
    for field in ("prompt", "input", "instructions", "system"):
        _collect_text(body.get(field), parts)
    return "\n".join(parts)


def _collect_text(value, parts):
    """Append the strings inside a content value (string, list of parts, nested)."""
    if isinstance(value, str):
        parts.append(value)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                _collect_text(item.get("text") or item.get("content"), parts)
            else:
                _collect_text(item, parts)


def reply_text(body):
    """The generated text of a non-stream chat or completion reply."""
    parts = []
    for choice in (body or {}).get("choices") or []:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message") or {}
        _collect_text(choice.get("text"), parts)
        if isinstance(message, dict):
            _collect_text(message.get("content"), parts)
            for call in message.get("tool_calls") or []:
                if isinstance(call, dict):
                    _collect_text((call.get("function") or {}).get("arguments"), parts)
    return "\n".join(parts)


def read_usage(usage):
    """(prompt, completion, total) from an OpenAI usage object (chat or Responses API names)."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    total = usage.get("total_tokens")
    numbers = [n for n in (prompt, completion, total) if isinstance(n, int)]
    if not numbers:
        return None
    prompt = prompt if isinstance(prompt, int) else 0
    completion = completion if isinstance(completion, int) else 0
    total = total if isinstance(total, int) else prompt + completion
    return prompt, completion, total


def estimated_usage(request_body, generated_text=None, completion_tokens=None):
    """An OpenAI-shaped usage object from the estimate rule (text, or tokens counted already)."""
    prompt = estimate_tokens(prompt_text(request_body))
    completion = (
        completion_tokens
        if completion_tokens is not None
        else estimate_tokens(generated_text or "")
    )
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def cost_of(prices, model, prompt, completion):
    """Money spent by a call under the price table (per 1000 tokens), 0 when unpriced."""
    rates = prices.get(model) if model else None
    if rates is None:
        return 0.0
    return (prompt * rates[0] + completion * rates[1]) / 1000.0


class UsageRecorder:
    """Writes usage rows and settles key counters: one short transaction per call, or per
    burst of calls ending together (GroupCommit).

    When the database cannot take the row even after retrying (read-only file, a
    lock held for longer than RELAY_DB_WRITE_TIMEOUT), the row goes to a spool file
    beside the database and is replayed by the next successful write: no row is lost.
    """

    def __init__(self, db, prices=None):
        self.db = db
        self.prices = prices or {}
        self.spool_path = db.path + ".spool.jsonl"
        self.commits = GroupCommit(self._insert_rows)

    def row_for(self, call):
        """The usage row of a finished call."""
        prompt, completion, total = call.tokens
        return {
            "ts": call.started_wall,
            "key_id": call.key.id if call.key else None,
            "face": call.face,
            "method": call.method,
            "path": call.path,
            "model_requested": call.model_requested,
            "model_served": call.model_served or call.model,
            "upstream": call.upstream_name,
            "stream": int(call.stream),
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": total,
            "usage_source": call.usage_source,
            "cost": cost_of(self.prices, call.model_served or call.model, prompt, completion),
            "status": call.status,
            "outcome": call.outcome,
            "latency_ms": round((time.perf_counter() - call.started) * 1000, 3),
            "ttfb_ms": round(call.ttfb * 1000, 3) if call.ttfb is not None else None,
            "end_user": call.end_user,
            "upstream_request_id": call.upstream_request_id,
            "bytes_out": call.bytes_out,
            "attempts": call.attempts,
        }

    def record(self, call):
        """Write the call's row and add its tokens to the key; never raises to the client."""
        row = self.row_for(call)
        try:
            self.commits.write(row)
        except sqlite3.Error as exc:
            log.error("usage row spooled, database unavailable: %s", exc)
            self._spool(row)
            return row
        if _nonempty(self.spool_path):
            self.replay_spool()
        return row

    def _insert_rows(self, rows):
        """Insert rows and settle their keys in one transaction."""
        self.db.write(lambda conn: [self._insert(conn, row) for row in rows])

    def _insert(self, conn, row):
        """Insert one row and settle its key, inside the caller's transaction."""
        conn.execute(INSERT_USAGE, tuple(row[c] for c in USAGE_COLUMNS))
        if row["key_id"] is not None:
            conn.execute(SETTLE_KEY, (row["total_tokens"], row["cost"], row["ts"], row["key_id"]))

    def _spool(self, row):
        """Append a row to the spool file under an exclusive lock."""
        with open(self.spool_path, "a", encoding="utf-8") as spool:
            fcntl.flock(spool, fcntl.LOCK_EX)
            spool.write(json.dumps(row) + "\n")

    def replay_spool(self):
        """Move spooled rows into the database; the file is locked so one process does it."""
        try:
            spool = open(self.spool_path, "r+", encoding="utf-8")  # noqa: SIM115 - locked below
        except FileNotFoundError:
            return 0
        with spool:
            try:
                fcntl.flock(spool, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another worker is replaying it
            rows = [json.loads(line) for line in spool if line.strip()]
            if rows:
                try:
                    self._insert_rows(rows)
                except sqlite3.Error:
                    return 0
            # Truncate, never unlink: a writer may already hold the file open, waiting to lock it.
            spool.truncate(0)
        log.info("replayed %d spooled usage rows", len(rows))
        return len(rows)


def _nonempty(path):
    """Whether a file exists and has content."""
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False
