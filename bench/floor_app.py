"""The floor: the least a relay on the fixed choices (Flask, requests, gunicorn) does per call.

    FLOOR_UPSTREAM=http://127.0.0.1:PORT/v1 FLOOR_MODE=forward \
        gunicorn bench.floor_app:app --worker-class gevent --workers 1

No relay code, one route for POST /v1/chat/completions. FLOOR_MODE picks what it does:
`canned` answers with a fixed chat completion and calls no upstream (what gunicorn and
Flask alone cost); `forward` (the default) forwards the call with a pooled requests
Session and gives the reply back (the frameworks of a relay, with nothing of one);
`adapter` forwards it with requests at its cheapest, as the relay does (a PreparedRequest
handed straight to an HTTPAdapter: no Session, no environment proxies, no URL or header
requoting); `metered` forwards as `forward` does and also does the rest of what the issue
calls the work a relay must do, in the plainest way: parse the request's JSON, one indexed
read of a key hash in SQLite (FLOOR_DATABASE), parse the reply's usage, one usage row
inserted (WAL, synchronous=NORMAL, one transaction a call: no group commit, no in-flight
row). `bench.cpu_per_call --floor` measures it beside the relay, so the relay's CPU per
call can be split into what the frameworks cost and what the relay adds.
"""

import hashlib
import json
import os
import sqlite3
import tempfile

import requests
from flask import Flask, Response, request
from requests.adapters import HTTPAdapter
from requests.models import PreparedRequest
from requests.structures import CaseInsensitiveDict

UPSTREAM = os.environ.get("FLOOR_UPSTREAM", "http://127.0.0.1:9/v1")
MODE = os.environ.get("FLOOR_MODE", "forward")
if MODE not in ("canned", "adapter", "forward", "metered"):
    raise SystemExit(f"FLOOR_MODE={MODE!r}: use canned, adapter, forward or metered")
METERED = MODE == "metered"
CANNED = (
    b'{"id":"chatcmpl-floor","object":"chat.completion","created":0,"model":"gpt-4o",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,'
    b'"total_tokens":2}}'
)

app = Flask(__name__)
session = requests.Session()
adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1000)
session.mount("http://", adapter)
_conn: list[sqlite3.Connection] = []  # the process's one connection, made on first use


def connection() -> sqlite3.Connection:
    """This process's SQLite connection, with the key table and the usage table."""
    if not _conn:
        database = os.environ.get("FLOOR_DATABASE") or os.path.join(
            tempfile.mkdtemp(prefix="floor-"), "floor.sqlite"
        )
        conn = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("CREATE TABLE IF NOT EXISTS keys (hash TEXT PRIMARY KEY, name TEXT)")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS usage (id INTEGER PRIMARY KEY, key TEXT, model TEXT,"
            " prompt INTEGER, completion INTEGER, status INTEGER)"
        )
        _conn.append(conn)
    return _conn[0]


@app.get("/healthz")
def healthz() -> Response:
    """Up."""
    return Response(b'{"ok":true}', 200, content_type="application/json")


@app.post("/v1/chat/completions")
def chat() -> Response:
    """Answer, or forward the call; metered: also read the key and write the usage row."""
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer "):
        return Response(b'{"error":{"message":"no key"}}', 401, content_type="application/json")
    body = request.get_data()
    if MODE == "canned":
        return Response(CANNED, 200, content_type="application/json")
    if METERED:
        model = json.loads(body).get("model")
        key_hash = hashlib.sha256(auth[7:].encode()).hexdigest()
        conn = connection()
        if conn.execute("SELECT name FROM keys WHERE hash = ?", (key_hash,)).fetchone() is None:
            conn.execute("INSERT OR IGNORE INTO keys VALUES (?, ?)", (key_hash, "bench"))
    headers = {"Content-Type": "application/json", "Authorization": "Bearer x"}
    url = f"{UPSTREAM}/chat/completions"
    if MODE == "adapter":
        prepared = PreparedRequest()
        prepared.method, prepared.url = "POST", url
        prepared.headers = CaseInsensitiveDict(headers)
        prepared.prepare_body(body, None)
        reply = adapter.send(prepared, timeout=(5, 60))
    else:
        reply = session.post(url, data=body, headers=headers, timeout=(5, 60))
    content = reply.content
    if METERED:
        usage = json.loads(content).get("usage") or {}
        conn.execute(
            "INSERT INTO usage (key, model, prompt, completion, status) VALUES (?, ?, ?, ?, ?)",
            (key_hash, model, usage.get("prompt_tokens"), usage.get("completion_tokens"), 200),
        )
    return Response(content, reply.status_code, content_type=reply.headers.get("Content-Type"))
