"""End to end, round 2: every dialect of the four reference docs lands on the right face.

The clients are driven as the docs tell their users to write them (curl | iconv, php-curl with
http_build_query or json_encode, the 快AI example's Bearer header), only the base URL changed,
against the relay under real gunicorn; each test checks the reply the client reads and what the
fake upstream received (or that it received nothing).
"""

# The docs' Chinese text keeps its full-width punctuation (，：？): that is the point of it.
# ruff: noqa: RUF001, RUF003

import json
import shlex
import subprocess

import pytest
from test_legacy_clients import (
    DOCS_ASKS,
    assert_failure,
    assert_no_client_key,
    assert_success,
    needs_php,
    php_status,
    post_json,
    run_php,
    start,
    url_for,
    usage_rows,
)

# The 快AI docs' curl example (002_*): Bearer header, no model, no body key.
KUAIAI_CONVERSATION = [
    {"role": "user", "content": "请介绍一下你自己"},
    {
        "role": "assistant",
        "content": "您好，我是快AI机器人。我能够与人对话互动，回答问题，协助创作，"
        "高效便捷地帮助人们获取信息、知识和灵感。",
    },
    {"role": "user", "content": "1+100="},
]


@pytest.fixture
def legacy(relay_server):
    """A relay with the default configuration and the docs' key, adopted: (server, key)."""
    return start(relay_server)


def curl(command):
    """Run a curl command line (`curl -i` prints the head); returns (status, headers, body)."""
    done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):  # an interim 100 Continue comes first
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, json.loads(body.decode("utf-8"))


def assert_fake_got_the_docs_chat(fake, key):
    """The fake's last request: the docs' question as JSON, the default model, no relay key."""
    sent = fake.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.headers["content-type"].startswith("application/json")
    assert sent.json["messages"] == DOCS_ASKS
    assert sent.json["user"] == "张三"
    assert sent.json["model"] == "gpt-3.5-turbo"
    assert_no_client_key(fake, key)


# --- 快AI-style clients: base URL http://relay/api/, Bearer header, no model ---------------------


@needs_php
@pytest.mark.parametrize("mode", ["bearer-json", "bearer-form"])
def test_kuaiai_php_example_on_the_api_base_url(legacy, fake, mode):
    server, key = legacy
    base_url = f"{server.base_url}/api/"  # was https://api.kuaiai.app/
    out, err = run_php(mode, base_url + "v1/chat/completions", key)
    assert php_status(err) == 200
    body = json.loads(out)
    assert (body["code"], body["msg"]) == (0, "")  # the reply table's code/msg
    assert body["choices"][0]["message"]["content"] == fake.reply_text
    assert body["model"] == "gpt-3.5-turbo"  # the example sends no model: the legacy default
    assert_fake_got_the_docs_chat(fake, key)
    [row] = usage_rows(server, 1)
    assert (row["face"], row["model_requested"], row["end_user"]) == ("legacy", "gpt-3.5", "张三")


def test_kuaiai_curl_example_and_the_plain_openai_face_at_the_root(legacy, fake):
    server, key = legacy
    data = json.dumps({"messages": KUAIAI_CONVERSATION}, ensure_ascii=False)
    head = f'-H "Content-Type: application/json" -H "Authorization: Bearer {key}"'
    command = "curl -sS -i {head} -XPOST {url} -d {data} | iconv -f utf-8 -t utf-8"
    api = f"{server.base_url}/api/v1/chat/completions"
    status, _, body = curl(command.format(head=head, url=api, data=shlex.quote(data)))
    assert status == 200
    assert (body["code"], body["msg"]) == (0, "")
    assert fake.requests[-1].json["model"] == "gpt-3.5-turbo"
    assert fake.requests[-1].json["messages"] == KUAIAI_CONVERSATION
    # The same client pointed at the root reaches the OpenAI face, which stays plain OpenAI:
    # no envelope and no model added (the README's table sends 快AI clients to /api/).
    root = f"{server.base_url}/v1/chat/completions"
    status, _, body = curl(command.format(head=head, url=root, data=shlex.quote(data)))
    assert status == 200
    assert "code" not in body and "msg" not in body
    assert "model" not in fake.requests[-1].json
    assert_no_client_key(fake, key)


# --- completions without a model get a completions model ----------------------------------------


def test_docs_completions_without_a_model(legacy, fake):
    server, key = legacy
    data = json.dumps({"api_secret_key": key, "prompt": "Say this is a test", "max_tokens": 7})
    url = url_for(server, "completions")
    command = f"curl -sS -i -H 'Content-Type: application/json' -XPOST {url} -d {shlex.quote(data)}"
    status, _, body = curl(command + " | iconv -f utf-8 -t utf-8")
    assert status == 200
    assert (body["code"], body["msg"], body["object"]) == (0, "", "text_completion")
    assert body["model"] == "gpt-3.5-turbo-instruct"  # a text-completion model, not a chat one
    sent = fake.requests[-1]
    assert (sent.path, sent.json["model"]) == ("/v1/completions", "gpt-3.5-turbo-instruct")
    assert_no_client_key(fake, key)
    [row] = usage_rows(server, 1)
    assert row["model_requested"] == "gpt-3.5-turbo-instruct"


# --- user ids as PHP clients send them ----------------------------------------------------------


@needs_php
def test_php_integer_user_id(legacy, fake):
    server, key = legacy
    out, err = run_php("int-user", url_for(server, "chat/completions"), key)
    assert php_status(err) == 200, out
    assert json.loads(out)["code"] == 0
    assert fake.requests[-1].json["user"] == "10086"  # OpenAI's `user` is a string
    [row] = usage_rows(server, 1)
    assert row["end_user"] == "10086"


def test_long_and_odd_user_ids(legacy, fake):
    server, key = legacy
    url = url_for(server, "chat/completions")
    long_id = "wx-openid-" + "o6_bmjrPTlm6_2sgVt7hMZOPfL2M" * 4  # 122: the docs set no limit
    reply = post_json(url, {"api_secret_key": key, "user": long_id, "messages": DOCS_ASKS})
    assert_success(reply)
    assert fake.requests[-1].json["user"] == long_id  # forwarded whole; the upstream decides
    [row] = usage_rows(server, 1)
    assert row["end_user"] == long_id[:64]  # the record keeps 64 characters
    for odd, shown, said in (
        (1e20, "1e+20", "1e+20"),
        (True, "true", "true"),
        (12.5, "12.5", "12.5"),
        (["a"], "an array", "数组"),
    ):
        reply = post_json(url, {"api_secret_key": key, "user": odd, "messages": DOCS_ASKS})
        body = assert_failure(reply, 400, "invalid_request")
        assert body["error"]["param"] == "user"
        message = body["error"]["message"]
        assert "whole number" in message and message.endswith(f"not {shown}.")
        assert "必须是字符串或整数" in body["msg"] and body["msg"].endswith(f"不能是 {said}。")
    assert len(fake.requests) == 1


# --- the relay's own paths are never forwarded, whatever the method ------------------------------


def test_own_paths_refuse_other_methods_and_forward_nothing(legacy, fake):
    server, key = legacy
    body_key = shlex.quote(json.dumps({"api_secret_key": key}))
    bearer = f'-H "Authorization: Bearer {key}"'
    base = server.base_url
    for method, path, auth, legacy_face in (
        ("POST", "/index.php/api/v1/dashboard/billing/subscription", f"-d {body_key}", True),
        ("POST", "/index.php/api/v1/dashboard/billing/usage", f"-d {body_key}", True),
        ("DELETE", "/api/v1/relay/key", bearer, True),
        ("PUT", "/api/v1/models", bearer, True),
        ("POST", "/v1/dashboard/billing/subscription", bearer, False),
        ("PATCH", "/v1/relay/key", bearer, False),
        ("POST", "/v1/models", bearer, False),
        ("POST", "/v1/dashboard/billing/usage", "", False),  # no key: the method comes first
    ):
        status, headers, body = curl(f"curl -sS -i -X{method} {auth} {base}{path}")
        assert status == 405, (method, path, body)
        assert "GET" in headers["allow"] and method not in headers["allow"]
        assert body["error"]["code"] == "method_not_allowed"
        assert f"Method {method} is not allowed on {path}; use GET" in body["error"]["message"]
        if legacy_face:
            assert body["code"] == 405 and f"{path} 不支持 {method} 请求，请使用 GET" in body["msg"]
        else:
            assert set(body) == {"error"}
    assert fake.requests == []  # nothing reached the upstream with the operator's key
    # The allowed methods still answer, from the relay itself.
    status, _, body = curl(f"curl -sS -i {bearer} {base}/index.php/api/v1/relay/key")
    assert (status, body["code"], body["name"]) == (200, 0, "old-php-client")
    assert fake.requests == []


# --- a wrong base URL under the legacy roots: the envelope and the right base URL ----------------


def test_base_url_typos_name_the_right_base_url(legacy, fake):
    server, key = legacy
    data = shlex.quote(json.dumps({"api_secret_key": key, "messages": DOCS_ASKS}))
    for typo, meant in (
        # The docs' curl example reads "-XPOST xxxxx/v1/chat/completions": xxxxx taken for the
        # base URL http://host/index.php gives /index.php/v1/…
        ("/index.php/v1/chat/completions", "/index.php/api/v1/chat/completions"),
        ("/index.php/chat/completions", "/index.php/api/v1/chat/completions"),
        ("/index.php/api/chat/completions", "/index.php/api/v1/chat/completions"),
        ("/api/chat/completions", "/api/v1/chat/completions"),
        ("/api/api/v1/embeddings", "/api/v1/embeddings"),
    ):
        command = f'curl -sS -i -H "Content-Type: application/json" -XPOST {server.base_url}{typo}'
        status, _, body = curl(f"{command} -d {data} | iconv -f utf-8 -t utf-8")
        assert status == 404
        assert body["code"] == 404 and body["error"]["code"] == "not_found"
        assert f"Did you mean {meant}?" in body["error"]["message"]
        root = "/index.php/" if typo.startswith("/index.php") else "/api/"
        assert f"base URL is http://<relay>{root}" in body["error"]["message"]
        # msg says the same to the old client's users in Chinese (RELAY_LEGACY_LANGUAGE=zh)
        assert body["msg"].startswith(f"接口地址 {typo} 不存在。旧版接口的 base_url 是")
        assert f"http://<relay>{root}" in body["msg"] and body["msg"].endswith(f"{meant}？")
    status, _, body = curl(f"curl -sS -i {server.base_url}/index.php")
    assert (status, body["code"]) == (404, 404)
    assert fake.requests == []


# --- a PHP form body sent with Content-Type: application/json ------------------------------------


@needs_php
def test_php_http_build_query_with_the_json_header(legacy, fake):
    server, key = legacy
    out, err = run_php("form-json-header", url_for(server, "chat/completions"), key)
    assert php_status(err) == 200, out
    body = json.loads(out)
    assert (body["code"], body["msg"]) == (0, "")
    assert body["choices"][0]["message"]["content"] == fake.reply_text
    assert_fake_got_the_docs_chat(fake, key)
