"""End to end: the old service's own clients (requests, curl | iconv, php-curl) on the legacy face.

Every test drives the relay under real gunicorn over real sockets, the way the reference docs
(reference/000_*, 001_*) tell their users to call the old service, and checks both the reply the
client gets and what the fake upstream received.
"""

# The docs' Chinese text keeps its full-width punctuation (，：？): that is the point of it.
# ruff: noqa: RUF001, RUF003

import json
import math
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import time

import pytest
import requests
from conftest import UPSTREAM_KEY
from fake_upstream import (
    FAKE_COMPLETION_TOKENS,
    FAKE_EMBEDDING,
    FAKE_PROMPT_TOKENS,
    json_reply,
)

HERE = os.path.dirname(os.path.abspath(__file__))
PHP_CLIENT = os.path.join(HERE, "php", "client.php")
NO_PHP = shutil.which("php") is None
needs_php = pytest.mark.skipif(
    NO_PHP, reason="php is not installed (tests/install-system-deps.sh installs php-cli php-curl)"
)

# The key string from the docs' PHP example, adopted with `keys create --key` as a migrating
# client would.
OLD_KEY = "dd61320fddde6c6568be8a0b0004a53a"
DOCS_BASE = "/index.php/"  # the docs' base_url: http://flag.smarttrot.com/index.php/
TRIM_HEADER = "X-Relay-Trimmed-Messages"
DOCS_ASKS = [{"role": "user", "content": "1+100="}]
# The multi-turn conversation of the docs' curl example (001_*), Chinese punctuation and all.
DOCS_CONVERSATION = [
    {"role": "user", "content": "请介绍一下你自己"},
    {
        "role": "assistant",
        "content": "您好，我是小一机器人。我能够与人对话互动，回答问题，协助创作，"
        "高效便捷地帮助人们获取信息、知识和灵感。",
    },
    {"role": "user", "content": "我在上海，周末可以去哪里玩？"},
    {
        "role": "assistant",
        "content": "上海是一个充满活力和文化氛围的城市，有很多适合周末游玩的地方。"
        "以下是几个值得推荐的地方：\n\n"
        "1. 上海科技馆：上海科技馆是中国大陆最大的科技馆之一，有许多互动展览和科学实验室，"
        "可以让您了解科技的发展历史和最新成果。\n"
        "2. 上海博物馆：上海博物馆是一座集艺术、历史和文化于一体的博物馆，"
        "有许多精美的艺术品和文物，可以让您深入了解中国和世界的文化历史。\n"
        "3. 外滩：外滩是上海的标志性景点之一，有许多高楼大厦和繁华的商业街区，"
        "是欣赏黄浦江美景和城市风貌的好去处。\n"
        "4. 上海迪士尼乐园：上海迪士尼乐园是世界上最大的迪士尼主题公园之一，"
        "有许多精彩的游乐项目和演出，可以让您尽情享受娱乐和欢乐。\n"
        "5. 上海野生动物园：上海野生动物园是一个以自然保护为主题的野生动物园，"
        "有许多珍稀动物和植物，可以让您近距离接触大自然。\n\n"
        "这些地方都是上海周末游玩的好去处，可以根据自己的兴趣和需求选择合适的行程。",
    },
    {"role": "user", "content": "周末这里的天气怎么样？"},
]


# --- helpers ----------------------------------------------------------------------------------


def start(relay_server, **env):
    """Start the relay under gunicorn with extra RELAY_* env and adopt the docs' key."""
    server = relay_server(workers=2, **env)
    return server, server.create_key("old-php-client", "--key", OLD_KEY)


@pytest.fixture
def legacy(relay_server):
    """A relay with the default configuration and the docs' key: (server, key)."""
    return start(relay_server)


def url_for(server, path, base=DOCS_BASE):
    """A legacy URL: base_url (index.php/ by default, or /) + api/v1/<path>."""
    return f"{server.base_url}{base}api/v1/{path}"


def post_json(url, params, **headers):
    """POST params the way the docs' Python example does: json.dumps with JSON headers."""
    sent = {"Content-Type": "application/json", "Accept": "application/json", **headers}
    return requests.post(url, json.dumps(params), headers=sent, timeout=15)


def chat(server, key, messages, **fields):
    """POST a legacy chat with the key in the body; returns the requests reply."""
    params = {"api_secret_key": key, "messages": messages, **fields}
    return post_json(url_for(server, "chat/completions"), params)


def assert_success(reply):
    """A 200 whose JSON body carries the old envelope code 0 / msg ''; returns the body."""
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["code"] == 0 and type(body["code"]) is int
    assert body["msg"] == ""
    assert "error" not in body
    return body


def assert_failure(reply, status, error_code=None):
    """A failure in the legacy shape: code == HTTP status, msg, full error object; the body."""
    assert reply.status_code == status, reply.text
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert type(body["code"]) is int and body["code"] == status
    assert isinstance(body["msg"], str) and body["msg"].strip()
    error = body["error"]
    assert isinstance(error, dict)
    assert {"message", "type", "param", "code"} <= set(error)
    assert isinstance(error["message"], str) and error["message"]
    if error_code is not None:
        assert error["code"] == error_code
    return body


def assert_no_client_key(fake, key):
    """The relay's key reached the fake nowhere; the operator's key went instead."""
    assert fake.requests, "nothing was forwarded"
    for sent in fake.requests:
        assert sent.upstream_key == UPSTREAM_KEY
        assert key.encode() not in sent.body
        assert key not in sent.path + "?" + sent.query
        assert not any(key in value for value in sent.headers.values())
        if isinstance(sent.json, dict):
            assert "api_secret_key" not in sent.json


def usage_rows(server, count, timeout=5.0):
    """Poll the server's SQLite file until it holds `count` usage rows; return them all."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(server.db_path) as conn:
            conn.row_factory = sqlite3.Row
            rows = [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY id")]
        if len(rows) >= count or time.monotonic() > deadline:
            assert len(rows) == count, rows
            return rows
        time.sleep(0.05)


def old_rule(cjk, words):
    """The docs' estimate: CJK characters + words x 1.3, rounded half up (not to even)."""
    return math.floor(cjk + words * 1.3 + 0.5)


def chars(role, size):
    """A message whose content is `size` characters (CJK: 3 bytes each, counted as 1)."""
    return {"role": role, "content": "字" * size}


def run_php(mode, url, key):
    """Run tests/php/client.php; returns (stdout text, stderr text)."""
    done = subprocess.run(
        ["php", PHP_CLIENT, mode, url, key],
        capture_output=True,
        timeout=60,
        check=False,
    )
    stderr = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 0, stderr
    return done.stdout.decode("utf-8"), stderr


def php_chat(server, key, mode, fake):
    """Run one PHP chat call; check the 200 and the envelope; return the reply body."""
    out, err = run_php(mode, url_for(server, "chat/completions"), key)
    assert php_status(err) == 200
    body = json.loads(out)
    assert body["code"] == 0 and body["msg"] == ""
    assert body["choices"][0]["message"]["content"] == fake.reply_text
    return body


def php_status(stderr):
    """The HTTP status the PHP client reported on stderr."""
    found = re.search(r"^HTTP (\d+)$", stderr, re.MULTILINE)
    assert found, stderr
    return int(found.group(1))


# --- 1. the docs' Python example ----------------------------------------------------------------


def test_docs_python_requests_example(legacy, fake):
    server, key = legacy
    params = {"api_secret_key": key, "user": "张三", "messages": DOCS_ASKS}
    reply = post_json(url_for(server, "chat/completions"), params)
    body = assert_success(reply)
    assert body["choices"][0]["message"]["content"] == fake.reply_text
    assert body["usage"] == {
        "prompt_tokens": FAKE_PROMPT_TOKENS,
        "completion_tokens": FAKE_COMPLETION_TOKENS,
        "total_tokens": FAKE_PROMPT_TOKENS + FAKE_COMPLETION_TOKENS,
    }
    assert body["model"] == "gpt-3.5-turbo"
    assert isinstance(body["id"], str) and isinstance(body["created"], int)
    sent = fake.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.json["model"] == "gpt-3.5-turbo"  # default gpt-3.5, through the default alias
    assert sent.json["user"] == "张三"
    assert sent.json["messages"] == DOCS_ASKS
    assert_no_client_key(fake, key)
    [row] = usage_rows(server, 1)
    assert (row["face"], row["end_user"], row["model_served"]) == (
        "legacy",
        "张三",
        "gpt-3.5-turbo",
    )
    assert row["usage_source"] == "upstream"


def test_both_prefixes_serve_the_legacy_face(legacy, fake):
    server, key = legacy
    for base in (DOCS_BASE, "/"):
        reply = post_json(
            url_for(server, "chat/completions", base),
            {"api_secret_key": key, "messages": DOCS_ASKS},
        )
        assert assert_success(reply)["choices"][0]["message"]["content"] == fake.reply_text
    assert [r.path for r in fake.requests] == ["/v1/chat/completions"] * 2
    assert_no_client_key(fake, key)


# --- 2. the docs' curl example, piped through iconv ---------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        pytest.param('-H "Content-Type: application/json" ', id="with-json-header"),
        pytest.param("", id="curl-d-form-type"),  # 001_*'s form: curl -d sends urlencoded
    ],
)
def test_docs_curl_example(legacy, fake, header):
    server, key = legacy
    data = json.dumps(
        {"api_secret_key": key, "messages": DOCS_CONVERSATION}, ensure_ascii=False, indent=2
    )
    url = url_for(server, "chat/completions")
    command = f"curl {header}-XPOST {url} -d {shlex.quote(data)} | iconv -f utf-8 -t utf-8"
    done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout.decode("utf-8"))
    assert body["code"] == 0 and body["msg"] == "", body
    assert body["choices"][0]["message"]["content"] == fake.reply_text
    sent = fake.requests[-1]
    assert sent.json["messages"][-1]["content"] == "周末这里的天气怎么样？"
    assert sent.json["messages"] == DOCS_CONVERSATION  # under 2000 characters: nothing dropped
    assert sent.json["model"] == "gpt-3.5-turbo"
    assert sent.headers["content-type"].startswith("application/json")
    assert_no_client_key(fake, key)


@pytest.mark.parametrize("bom", [False, True], ids=["utf8", "utf8-with-bom"])
def test_docs_curl_with_body_file(legacy, fake, tmp_path, bom):
    """curl -d @file, the file saved by a Windows editor (UTF-8, often with a BOM)."""
    server, key = legacy
    text = json.dumps({"api_secret_key": key, "messages": DOCS_CONVERSATION}, ensure_ascii=False)
    (tmp_path / "body.json").write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    url = url_for(server, "chat/completions")
    command = f"curl -XPOST {url} -d @body.json | iconv -f utf-8 -t utf-8"
    done = subprocess.run(
        ["/bin/sh", "-c", command], capture_output=True, timeout=60, check=False, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout.decode("utf-8"))
    # The same bytes are accepted with Content-Type application/json or none (a leading BOM is
    # tolerated there); curl -d's form type must not change that (DESIGN: JSON whatever the type).
    assert body["code"] == 0 and body["msg"] == "", body
    assert fake.requests[-1].json["messages"] == DOCS_CONVERSATION
    assert_no_client_key(fake, key)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/octet-stream",
        "application/x-www-form-urlencoded; charset=UTF-8",
        "multipart/form-data",  # set by hand in CURLOPT_HTTPHEADER, body still json_encode'd
    ],
)
def test_json_body_with_a_wrong_content_type(legacy, fake, content_type):
    server, key = legacy
    data = json.dumps({"api_secret_key": key, "user": "张三", "messages": DOCS_ASKS})
    reply = requests.post(
        url_for(server, "chat/completions"),
        data=data.encode(),
        headers={"Content-Type": content_type},
        timeout=15,
    )
    assert assert_success(reply)["choices"][0]["message"]["content"] == fake.reply_text
    assert fake.requests[-1].json["messages"] == DOCS_ASKS
    assert fake.requests[-1].json["user"] == "张三"
    assert_no_client_key(fake, key)


# --- 3. php-curl clients ------------------------------------------------------------------------


@needs_php
@pytest.mark.parametrize("mode", ["json", "json-no-header"])
def test_php_json_encode_client(legacy, fake, mode):
    server, key = legacy
    body = php_chat(server, key, mode, fake)
    assert body["usage"]["total_tokens"] == FAKE_PROMPT_TOKENS + FAKE_COMPLETION_TOKENS
    sent = fake.requests[-1]
    assert sent.json["messages"] == DOCS_ASKS
    assert sent.json["user"] == "张三"  # json_encode sent it as \u5f20\u4e09
    assert sent.json["model"] == "gpt-3.5-turbo"
    assert_no_client_key(fake, key)


@needs_php
def test_php_http_build_query_form(legacy, fake):
    server, key = legacy
    php_chat(server, key, "form", fake)
    sent = fake.requests[-1]
    assert sent.headers["content-type"].startswith("application/json")
    assert sent.json["messages"] == DOCS_ASKS
    assert sent.json["user"] == "张三"
    assert sent.json["temperature"] == 0.5 and type(sent.json["temperature"]) is float
    assert sent.json["max_tokens"] == 100 and type(sent.json["max_tokens"]) is int
    assert sent.json["stream"] is False  # PHP's http_build_query sent stream=0
    assert_no_client_key(fake, key)


@needs_php
def test_php_multipart_array_postfields(legacy, fake):
    server, key = legacy
    php_chat(server, key, "multipart", fake)
    sent = fake.requests[-1]
    assert sent.headers["content-type"].startswith("application/json")
    assert sent.json["messages"] == [{"role": "user", "content": "你好，世界"}]
    assert sent.json["messages"][0]["content"].encode() == "你好，世界".encode()
    assert sent.json["n"] == 1 and type(sent.json["n"]) is int
    assert sent.json["model"] == "gpt-3.5-turbo"
    assert_no_client_key(fake, key)


@needs_php
def test_php_stream_write_function(legacy, fake):
    server, key = legacy
    fake.stream_interval = 0.05
    out, err = run_php("stream", url_for(server, "chat/completions"), key)
    assert php_status(err) == 200
    writes = re.search(r"^writes (\d+)$", err, re.MULTILINE)
    assert writes and int(writes.group(1)) > 1, (
        err
    )  # chunks reached the WRITEFUNCTION as they came, not in one piece
    events = [line for line in out.split("\n") if line.strip()]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert all(line.startswith("data: ") for line in events)
    for chunk in chunks:
        assert "code" not in chunk and "msg" not in chunk  # no envelope on chunks
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["choices"]  # the usage chunk the relay asked for is stripped
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == fake.reply_text
    sent = fake.requests[-1]
    assert sent.json["stream"] is True
    assert sent.json["stream_options"] == {"include_usage": True}
    assert sent.json["user"] == "张三"
    assert_no_client_key(fake, key)
    [row] = usage_rows(server, 1)
    assert (row["stream"], row["usage_source"], row["face"]) == (1, "upstream", "legacy")


@needs_php
def test_php_bad_key_gets_envelope(legacy, fake):
    server, _ = legacy
    wrong = "dd61320f306e6c6568be8a0b0004a53d"  # the docs' Python example key: not issued here
    out, err = run_php("error", url_for(server, "chat/completions"), wrong)
    assert php_status(err) == 401
    body = json.loads(out)
    assert type(body["code"]) is int and body["code"] == 401
    assert body["msg"]
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["message"].startswith("Incorrect API key provided")
    # PHP's json_decode hands the old client's users msg in Chinese, the old service's language.
    assert body["msg"] == "密钥传的不对：请向中转服务的管理员索取有效的密钥。"
    assert wrong not in out
    assert fake.requests == []


# --- 4. the envelope on every kind of failure ---------------------------------------------------


def test_failures_before_forwarding(legacy, fake):
    server, key = legacy
    body = assert_failure(chat(server, "sk-not-a-relay-key", DOCS_ASKS), 401, "invalid_api_key")
    # error.message stays OpenAI's English (clients match it); msg is for the old client's
    # users, in the old service's language by default (RELAY_LEGACY_LANGUAGE=zh).
    assert body["error"]["message"].startswith("Incorrect API key provided")
    assert body["msg"].startswith("密钥传的不对")
    empty = assert_failure(chat(server, key, []), 400, "invalid_request")
    assert empty["msg"].startswith("对话信息没传或者传的不对")
    blank = assert_failure(
        chat(server, key, [{"role": "user", "content": ""}]), 400, "invalid_request"
    )
    assert blank["msg"] == "messages[0] 的 content（对话内容）不能为空。"
    too_long = assert_failure(chat(server, key, [chars("user", 2001)]), 400, "invalid_request")
    assert "2000" in too_long["error"]["message"] and "last message" in too_long["error"]["message"]
    assert too_long["msg"] == (
        "最后一个 message 的 content 长度（即此轮对话的问题）不能超过 2000 个字符，"
        "当前为 2001 个字符。"
    )
    form = {
        "api_secret_key": key,
        "messages[0][role]": "user",
        "messages[0][content]": "1+100=",
        "temperature": "warm",
    }
    reply = requests.post(url_for(server, "chat/completions"), data=form, timeout=15)
    assert reply.request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    warm = assert_failure(reply, 400, "invalid_request")
    assert warm["error"]["param"] == "temperature"
    # A GBK-encoded body (an old Windows PHP page): a 400, never replacement characters.
    gbk = b'{"api_secret_key": "%s", "messages": [{"role": "user", "content": "%s"}]}' % (
        key.encode(),
        "你好".encode("gbk"),
    )
    reply = requests.post(
        url_for(server, "chat/completions"),
        data=gbk,
        headers={"Content-Type": "application/json"},
        timeout=15,
    )
    assert_failure(reply, 400, "invalid_request")
    assert fake.requests == []


def test_legacy_language_en_gives_english_msg_and_leaves_the_pages_alone(relay_server, fake):
    server, key = start(relay_server, RELAY_LEGACY_LANGUAGE="en")
    # An API client's Accept-Language changes nothing: msg follows the setting only.
    zh = {"Accept-Language": "zh-CN,zh;q=0.9"}
    params = {"api_secret_key": "sk-not-a-relay-key", "messages": DOCS_ASKS}
    bad = assert_failure(post_json(url_for(server, "chat/completions"), params, **zh), 401)
    assert bad["msg"] == bad["error"]["message"]
    assert bad["msg"].startswith("Incorrect API key provided")
    too_long = assert_failure(chat(server, key, [chars("user", 2001)]), 400, "invalid_request")
    assert too_long["msg"] == too_long["error"]["message"]
    assert "2000" in too_long["msg"] and "last message" in too_long["msg"]
    error = {"message": "Unsupported model.", "type": "x", "param": None, "code": "m"}
    fake.queue(json_reply({"error": error}, status=404))
    assert assert_failure(chat(server, key, DOCS_ASKS), 404, "m")["msg"] == "Unsupported model."
    assert_success(chat(server, key, DOCS_ASKS))
    # The pages are the browser's business: a Chinese browser still gets a Chinese page.
    page = requests.get(server.base_url + "/", headers=zh, timeout=15)
    assert '<html lang="zh-CN">' in page.text and "查询密钥" in page.text


def test_upstream_4xx_error_keeps_its_message(legacy, fake):
    server, key = legacy
    error = {
        "message": "This model's maximum context length is 4097 tokens.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
    fake.queue(json_reply({"error": error}, status=400))
    body = assert_failure(chat(server, key, DOCS_ASKS), 400, "context_length_exceeded")
    assert body["msg"] == f"上游服务返回错误（HTTP 400）：{error['message']}"
    assert body["error"] == error


def test_upstream_5xx_is_a_502_with_envelope(legacy, fake):
    server, key = legacy
    error = {"message": "The server had an error.", "type": "server_error", "param": None}
    fake.queue(json_reply({"error": {**error, "code": None}}, status=500))
    body = assert_failure(chat(server, key, DOCS_ASKS), 502, "upstream_error")
    assert "500" in body["msg"] and body["msg"].startswith("上游服务出错：")
    assert len(fake.requests) == 1


def test_body_over_the_limit_is_a_413_with_envelope(relay_server, fake):
    server, key = start(relay_server, RELAY_MAX_BODY_BYTES="4096")
    reply = chat(server, key, [{"role": "user", "content": "x" * 5000}])
    assert_failure(reply, 413, "request_too_large")
    small = chat(server, key, DOCS_ASKS)
    assert assert_success(small)["choices"][0]["message"]["content"] == fake.reply_text
    assert len(fake.requests) == 1


# --- 5. history trimming at the 2000-character boundary -----------------------------------------


def history(last):
    """System 100 + pairs 500/400 and 300/200 + a last user message of `last` characters."""
    return [
        chars("system", 100),
        chars("user", 500),
        chars("assistant", 400),
        chars("user", 300),
        chars("assistant", 200),
        chars("user", last),
    ]


def test_history_trimming_boundary(legacy, fake):
    server, key = legacy
    exact = history(500)  # 2000 characters in all (6000 bytes of UTF-8)
    reply = chat(server, key, exact)
    assert_success(reply)
    assert TRIM_HEADER not in reply.headers
    assert fake.requests[-1].json["messages"] == exact

    over = history(501)  # 2001: the oldest user/assistant pair goes, the system message stays
    reply = chat(server, key, over)
    assert_success(reply)
    assert reply.headers[TRIM_HEADER] == "2"
    assert fake.requests[-1].json["messages"] == [over[0], over[3], over[4], over[5]]

    far_over = history(1401)  # 2901 -> 2001 -> 1501: both pairs go
    reply = chat(server, key, far_over)
    assert_success(reply)
    assert reply.headers[TRIM_HEADER] == "4"
    assert fake.requests[-1].json["messages"] == [far_over[0], far_over[5]]


def test_last_message_limit_boundary(legacy, fake):
    server, key = legacy
    reply = chat(server, key, [chars("user", 2000)])
    assert_success(reply)
    assert fake.requests[-1].json["messages"] == [chars("user", 2000)]
    assert_failure(chat(server, key, [chars("user", 2001)]), 400, "invalid_request")
    assert len(fake.requests) == 1


def test_zero_limit_turns_the_rule_off(relay_server, fake):
    server, key = start(relay_server, RELAY_LEGACY_MAX_CHARS="0")
    over = history(501)
    reply = chat(server, key, over)
    assert_success(reply)
    assert TRIM_HEADER not in reply.headers
    assert fake.requests[-1].json["messages"] == over
    reply = chat(server, key, [chars("user", 5000)])
    assert_success(reply)
    assert fake.requests[-1].json["messages"] == [chars("user", 5000)]


# --- 6. usage estimated with the docs' rule when the upstream sends none ------------------------


def test_usage_estimated_when_the_upstream_sends_none(legacy, fake):
    server, key = legacy
    fake.send_usage = False
    # "1+100=": words "1" and "100" -> round(2.6) = 3.
    # "Hello from the fake upstream.": 5 words -> 6.5, rounded half up = 7 (round() gives 6).
    reply = chat(server, key, DOCS_ASKS)
    prompt, completion = old_rule(0, 2), old_rule(0, 5)
    assert (prompt, completion) == (3, 7)
    expected = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    assert assert_success(reply)["usage"] == expected

    # "请介绍一下你自己": 8 CJK characters; "您好，我是小一机器人。": 9 (punctuation is not Han).
    fake.reply_text = "您好，我是小一机器人。"
    reply = chat(server, key, [{"role": "user", "content": "请介绍一下你自己"}])
    prompt_cn, completion_cn = old_rule(8, 0), old_rule(9, 0)
    assert assert_success(reply)["usage"] == {
        "prompt_tokens": prompt_cn,
        "completion_tokens": completion_cn,
        "total_tokens": prompt_cn + completion_cn,
    }
    # The rows bill the relay's rule, which also counts punctuation and symbols (one each):
    # "1+100=" 2.6 + 2 -> 5, the reply 6.5 + 1 -> 8; the Chinese reply 9 + 2 marks -> 11.
    rows = usage_rows(server, 2)
    assert [r["usage_source"] for r in rows] == ["estimated", "estimated"]
    assert [(r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) for r in rows] == [
        (5, 8, 13),
        (8, 11, 19),
    ]


# --- 7. model aliases ----------------------------------------------------------------------------


def test_default_aliases(legacy, fake):
    """Only the old service's non-model name gpt-3.5 is an alias: gpt-4 is gpt-4, on both faces."""
    server, key = legacy
    legacy_url = url_for(server, "chat/completions")
    openai_url = f"{server.base_url}/v1/chat/completions"
    bearer = {"Authorization": f"Bearer {key}"}
    for url, params, headers in (
        (legacy_url, {"api_secret_key": key, "messages": DOCS_ASKS}, {}),
        (openai_url, {"messages": DOCS_ASKS}, bearer),
    ):
        for asked, sent in (("gpt-4", "gpt-4"), ("gpt-3.5", "gpt-3.5-turbo")):
            reply = post_json(url, {**params, "model": asked}, **headers)
            assert reply.status_code == 200, reply.text
            assert fake.requests[-1].json["model"] == sent
            assert reply.json()["model"] == sent
    rows = usage_rows(server, 4)
    assert [(r["face"], r["model_requested"], r["model_served"]) for r in rows] == [
        ("legacy", "gpt-4", "gpt-4"),
        ("legacy", "gpt-3.5", "gpt-3.5-turbo"),
        ("openai", "gpt-4", "gpt-4"),
        ("openai", "gpt-3.5", "gpt-3.5-turbo"),
    ]


def test_operator_aliases(relay_server, fake):
    server, key = start(
        relay_server, RELAY_MODEL_ALIASES="gpt-3.5=my-cheap-model,gpt-4=my-big-model"
    )
    served = {
        "id": "chatcmpl-dated",
        "object": "chat.completion",
        "created": 1680167072,
        "model": "my-big-model-2024-05-13",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "101"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    fake.queue(json_reply(served))
    body = assert_success(chat(server, key, DOCS_ASKS, model="gpt-4"))
    assert fake.requests[-1].json["model"] == "my-big-model"
    assert body["model"] == "my-big-model-2024-05-13"  # the upstream's, not the alias
    assert body["choices"][0]["message"]["content"] == "101"
    body = assert_success(chat(server, key, DOCS_ASKS, model="gpt-3.5"))
    assert fake.requests[-1].json["model"] == "my-cheap-model"
    assert body["model"] == "my-cheap-model"
    assert_success(chat(server, key, DOCS_ASKS))  # no model: the default gpt-3.5, aliased
    assert fake.requests[-1].json["model"] == "my-cheap-model"


# --- 8. the other paths of the legacy face -------------------------------------------------------


def test_images_generations(legacy, fake):
    server, key = legacy
    params = {"api_secret_key": key, "prompt": "A cute baby sea otter", "n": 1}
    body = assert_success(post_json(url_for(server, "images/generations"), params))
    assert isinstance(body["created"], int)
    assert body["data"] == [{"url": "https://example.invalid/img.png"}]
    sent = fake.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/v1/images/generations")
    assert sent.json["prompt"] == "A cute baby sea otter"
    assert_no_client_key(fake, key)


def test_completions(legacy, fake):
    server, key = legacy
    params = {"api_secret_key": key, "prompt": "Say this is a test", "max_tokens": 7}
    body = assert_success(post_json(url_for(server, "completions", "/"), params))
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == fake.reply_text
    assert body["usage"]["total_tokens"] == FAKE_PROMPT_TOKENS + FAKE_COMPLETION_TOKENS
    assert fake.requests[-1].json["prompt"] == "Say this is a test"
    assert_no_client_key(fake, key)


def test_embeddings(legacy, fake):
    server, key = legacy
    params = {"api_secret_key": key, "model": "text-embedding-3-small", "input": ["你好", "世界"]}
    body = assert_success(post_json(url_for(server, "embeddings"), params))
    assert [d["embedding"] for d in body["data"]] == [FAKE_EMBEDDING, FAKE_EMBEDDING]
    assert body["model"] == "text-embedding-3-small"
    assert fake.requests[-1].json["input"] == ["你好", "世界"]
    assert_no_client_key(fake, key)


def test_models_with_bearer_header(legacy, fake):
    server, key = legacy
    reply = requests.get(
        url_for(server, "models"), headers={"Authorization": f"Bearer {key}"}, timeout=15
    )
    body = assert_success(reply)
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == fake.models
    assert (fake.requests[-1].method, fake.requests[-1].path) == ("GET", "/v1/models")
    assert_no_client_key(fake, key)
