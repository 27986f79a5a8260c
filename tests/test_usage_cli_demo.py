"""The usage summary command and the demo upstream that `make run` falls back to."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests
from conftest import ROOT, auth, free_port

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def test_usage_summary_by_key_model_day(client, runner, make_key, fake):
    alice, bob = make_key("alice"), make_key("bob")
    for _ in range(3):
        client.post("/v1/chat/completions", json=CHAT, headers=auth(alice))
    client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-3.5"}, headers=auth(bob))
    result = runner.invoke(args=["usage"])
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert lines[0].split()[:4] == ["day", "key", "model", "calls"]
    alice_line = next(line for line in lines if " alice " in line)
    assert alice_line.split()[2:7] == ["gpt-4o", "3", "33", "21", "54"]
    assert "gpt-3.5-turbo" in next(line for line in lines if " bob " in line)
    only_bob = runner.invoke(args=["usage", "--key", "bob", "--csv"]).output.splitlines()
    assert only_bob[0].startswith("day,key,model,calls") and len(only_bob) == 2
    by_model = runner.invoke(args=["usage", "--by", "model"]).output
    assert re.search(r"gpt-4o\s+3\s", by_model)
    assert "must be a date" in runner.invoke(args=["usage", "--since", "yesterday"]).output
    per_call = runner.invoke(args=["usage", "--rows", "--csv"]).output.splitlines()
    assert per_call[0].startswith("time,key,face,method,path,model_requested")
    assert len(per_call) == 5 and "alice" in per_call[1]
    assert "hi" not in "".join(per_call[1:]).split(",")  # never prompt text
    assert alice not in result.output and alice not in "".join(per_call)


@pytest.mark.server
def test_make_run_demo_mode_answers_at_once(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        PORT=str(port),
        RELAY_BIND="127.0.0.1",
        RELAY_DATABASE=str(tmp_path / "demo.sqlite"),
        RELAY_RATELIMIT_STORAGE_URI=f"sqlite:///{tmp_path / 'rl.sqlite'}",
        WEB_CONCURRENCY="1",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "relay.serve.launch"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        banner = ""
        while "Demo key" not in banner:
            line = process.stdout.readline()
            assert line, banner
            banner += line
        assert "DEMO MODE" in banner
        key = re.search(r"Demo key .*: (\S+)", banner).group(1)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        deadline = time.monotonic() + 20
        while True:
            try:
                reply = requests.post(url, json=CHAT, headers=auth(key), timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert reply.status_code == 200
        assert "demo upstream" in reply.json()["choices"][0]["message"]["content"]
        streamed = requests.post(url, json={**CHAT, "stream": True}, headers=auth(key), timeout=10)
        assert streamed.text.rstrip().endswith("data: [DONE]")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
        process.stdout.close()
