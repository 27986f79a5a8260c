"""A short soak under gunicorn: mixed calls at a steady rate, then every row and token accounted."""

import concurrent.futures
import sqlite3
import time

import requests
from conftest import auth
from fake_upstream import FAKE_COMPLETION_TOKENS, FAKE_PROMPT_TOKENS

RATE = 80  # calls per second; bench/ has the long version (python -m bench.run --scenario soak)
SECONDS = 6
PER_CALL = FAKE_PROMPT_TOKENS + FAKE_COMPLETION_TOKENS


def rss_kib(pids):
    """Resident memory of processes, in KiB."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return total


def test_soak_rows_equal_calls_and_quota_exact(relay_server, fake):
    server = relay_server(workers=2)
    keys = [server.create_key(f"soak{n}", "--quota", "100000000") for n in range(4)]
    session = requests.Session()
    url = server.base_url + "/v1/chat/completions"

    def call(n):
        body = {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": f"call {n}"}],
            "stream": n % 3 == 0,
        }
        with session.post(
            url, json=body, headers=auth(keys[n % 4]), stream=True, timeout=30
        ) as reply:
            data = reply.content
        return reply.status_code == 200 and (b"[DONE]" in data or b'"usage"' in data)

    for n in range(40):  # warm up before the first memory reading
        call(n)
    before = rss_kib([server.process.pid, *server.worker_pids()])
    futures = []
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        started = time.monotonic()
        for n in range(RATE * SECONDS):
            time.sleep(max(0.0, started + n / RATE - time.monotonic()))
            futures.append(pool.submit(call, n))
        results = [f.result() for f in futures]
    after = rss_kib([server.process.pid, *server.worker_pids()])
    session.close()
    calls = 40 + len(results)
    assert all(results)
    with sqlite3.connect(server.db_path) as conn:
        rows = conn.execute("SELECT COUNT(*), SUM(total_tokens) FROM usage").fetchone()
        used = conn.execute("SELECT SUM(used_tokens) FROM keys").fetchone()[0]
        by_source = dict(conn.execute("SELECT usage_source, COUNT(*) FROM usage GROUP BY 1"))
    assert rows[0] == calls
    assert rows[1] == used == calls * PER_CALL
    assert by_source == {"upstream": calls}
    assert after - before < 30 * 1024, f"RSS grew by {(after - before) // 1024} MiB"
