"""Legacy body decoding, chat rules and the estimate rule, checked piece by piece."""

import io
import time

import pytest
from conftest import auth, close_app

from relay.app import create_app
from relay.errors import InvalidRequest
from relay.faces.legacy import LegacyFace
from relay.faces.legacy_body import body_kind, coerce_types, nest
from relay.faces.legacy_chat import trim_history
from relay.tokens import estimate_tokens, legacy_estimate_tokens

# What PHP's http_build_query makes of the docs' example array (key, user 张三, one message).
PHP_FORM = (
    b"api_secret_key=%s&user=%%E5%%BC%%A0%%E4%%B8%%89"
    b"&messages%%5B0%%5D%%5Brole%%5D=user&messages%%5B0%%5D%%5Bcontent%%5D=1%%2B100%%3D"
)


def test_nest_builds_php_arrays():
    pairs = [
        ("messages[0][role]", "system"),
        ("messages[0][content]", "s"),
        ("messages[1][role]", "user"),
        ("messages[1][content]", "q"),
        ("stop[]", "a"),
        ("stop[]", "b"),
        ("logit_bias[50256]", "-100"),
        ("user", "u"),
    ]
    body = nest(pairs)
    assert body["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
    ]
    assert body["stop"] == ["a", "b"]
    assert body["logit_bias"] == {"50256": "-100"}  # not 0..n-1: stays an object, like PHP
    assert body["user"] == "u"


def test_coerce_types_and_rejects():
    body = coerce_types(
        {
            "temperature": "0.5",
            "max_tokens": "100",
            "stream": "0",
            "n": "1",
            "stream_options": {"include_usage": "1"},
            "user": "007",
        }
    )
    assert body == {
        "temperature": 0.5,
        "max_tokens": 100,
        "stream": False,
        "n": 1,
        "stream_options": {"include_usage": True},
        "user": "007",
    }
    for bad in (
        {"temperature": "warm"},
        {"stream": "maybe"},
        {"max_tokens": "1.5"},
        {"top_p": ["1"]},
        {"n": "nan"},
    ):
        with pytest.raises(InvalidRequest):
            coerce_types(bad)


@pytest.mark.parametrize(
    ("raw", "media", "kind"),
    [
        # PHP's http_build_query under the JSON header the docs tell users to add: a form.
        (PHP_FORM % b"k", "application/json", "form"),
        (b"messages[0][role]=user&messages[0][content]=hi\n", "application/json", "form"),
        (b"api_secret_key=k&content=a=b==&", "", "form"),
        (b"a=1&b=2", "text/plain", "form"),
        (b"hello world", "application/x-www-form-urlencoded", "form"),  # the type says so
        # Starts like JSON: JSON whatever the type, so broken JSON keeps its "not valid JSON".
        (b'{"api_secret_key": "k", "prompt": "otter",}', "application/json", "json"),
        (b'\xef\xbb\xbf {"a": 1}', "application/x-www-form-urlencoded", "json"),
        (b"[1, 2]", "multipart/form-data", "json"),
        # Neither JSON nor name=value pairs: read as JSON, so the 400 says what is wrong.
        (b"hello", "application/json", "json"),
        (b"hello world=1", "application/json", "json"),
        (b"a=1&&b=2", "application/json", "json"),
        (b"=1", "application/json", "json"),
        (b'"a=b"', "", "json"),
        (b"--xyz\r\nContent-Disposition: form-data", "multipart/form-data", "multipart"),
    ],
)
def test_body_kind(raw, media, kind):
    assert body_kind(raw, media) == kind


def test_user_ids():
    assert coerce_types({"user": 10086}) == {"user": "10086"}  # a PHP integer id
    assert coerce_types({"user": -7}) == {"user": "-7"}
    assert coerce_types({"user": 2**70}) == {"user": str(2**70)}
    long_id = "x" * 300
    assert coerce_types({"user": long_id}) == {"user": long_id}  # no limit on what is sent
    assert coerce_types({"user": None}) == {"user": None}
    for bad, shown in ((True, "true"), (1e20, "1e+20"), (3.0, "3.0"), ({}, "an object")):
        with pytest.raises(InvalidRequest, match="whole number") as caught:
            coerce_types({"user": bad})
        assert caught.value.param == "user" and shown in caught.value.message


def test_php_form_under_the_json_header(client, key, fake):
    reply = client.post(
        "/index.php/api/v1/chat/completions",
        data=PHP_FORM % key.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert reply.status_code == 200, reply.get_data(as_text=True)
    assert reply.get_json()["code"] == 0
    assert fake.requests[-1].json == {
        "user": "张三",
        "messages": [{"role": "user", "content": "1+100="}],
        "model": "gpt-3.5-turbo",
    }


def test_broken_json_under_the_json_header_stays_a_400(client, key, fake):
    # The docs' images example as printed there: a trailing comma.
    broken = f'{{"api_secret_key": "{key}", "prompt": "A cute baby sea otter",}}'
    reply = client.post(
        "/api/v1/images/generations", data=broken, headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 400
    assert "not valid JSON" in reply.get_json()["error"]["message"]
    assert reply.get_json()["msg"].startswith("请求体不是合法的 JSON：")  # noqa: RUF001
    assert fake.requests == []


def test_completions_default_model_is_a_setting(settings, fake):
    app = create_app({**settings, "DEFAULT_COMPLETION_MODEL": "davinci-002"})
    try:
        key, _ = app.extensions["relay"].store.keys.create("completions")
        reply = app.test_client().post(
            "/api/v1/completions", json={"api_secret_key": key, "prompt": "Say this is a test"}
        )
        assert reply.status_code == 200
        assert fake.requests[-1].json["model"] == "davinci-002"
        chat = app.test_client().post(
            "/api/v1/chat/completions", json={"api_secret_key": key, "messages": [msg("user", 3)]}
        )
        assert chat.status_code == 200
        assert fake.requests[-1].json["model"] == "gpt-3.5-turbo"  # chat keeps its own default
    finally:
        close_app(app)


@pytest.mark.parametrize(
    ("path", "meant"),
    [
        ("/index.php/v1/chat/completions", "/index.php/api/v1/chat/completions"),
        ("/index.php/index.php/api/v1/models", "/index.php/api/v1/models"),
        ("/api/chat/completions", "/api/v1/chat/completions"),
        ("/api//v1//embeddings/", "/api/v1/embeddings"),
        ("/index.php", None),
        ("/api/v1", None),
    ],
)
def test_not_found_hint_names_the_base_url(path, meant):
    face = LegacyFace("gpt-3.5", "gpt-3.5-turbo-instruct", 2000, "en")
    assert face.owns(path)
    hint = face.explain_not_found(path).english()
    root = "/index.php/" if path.startswith("/index.php") else "/api/"
    assert f"base URL is http://<relay>{root} " in hint
    if meant is None:
        assert "Did you mean" not in hint
    else:
        assert hint.endswith(f"Did you mean {meant}?")
    for other in ("/v1/chat/completions", "/apix/v1/x", "/index.phpx", "/"):
        assert not face.owns(other) and face.explain_not_found(other) is None


def msg(role, size):
    """A message whose content has `size` characters."""
    return {"role": role, "content": "字" * size}


def test_trim_at_the_boundary():
    history = [
        msg("system", 100),
        msg("user", 500),
        msg("assistant", 400),
        msg("user", 300),
        msg("assistant", 200),
        msg("user", 500),
    ]
    assert trim_history(history, 2000) == (history, 0)  # exactly 2000: nothing dropped
    over = [*history[:-1], msg("user", 501)]
    kept, dropped = trim_history(over, 2000)
    assert dropped == 2
    assert kept == [history[0], history[3], history[4], over[-1]]  # oldest pair gone, system kept
    assert trim_history(over, 0) == (over, 0)


def test_trim_keeps_system_and_question_even_when_over():
    messages = [msg("system", 1900), msg("user", 50), msg("assistant", 50), msg("user", 200)]
    kept, dropped = trim_history(messages, 2000)
    assert (kept, dropped) == ([messages[0], messages[3]], 2)


def test_last_message_limit():
    assert trim_history([msg("user", 2000)], 2000)[1] == 0
    with pytest.raises(InvalidRequest, match="2001 characters"):
        trim_history([msg("user", 2001)], 2000)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        ("hello", 1),
        ("hello world", 3),
        ("1+100=", 3),
        ("你好", 2),
        ("你好 world", 3),
        ("上海是一个城市, Shanghai is a city.", 12),
        ("こんにちは", 5),
    ],
)
def test_the_old_services_estimate_rule(text, tokens):
    assert legacy_estimate_tokens(text) == tokens


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        ("hello world", 3),
        ("1+100=", 5),  # two words and two symbols
        ("你好\uff0c世界\uff01", 6),  # full-width punctuation counts too
        ("😀" * 20000, 20000),  # emoji: one each, never free
        ("👍🏽 ok", 3),  # a skin-tone modifier is its own symbol
        ("   \n\t ", 0),
    ],
)
def test_the_relays_estimate_counts_symbols_and_emoji(text, tokens):
    assert estimate_tokens(text) == tokens


def test_legacy_form_post_through_test_client(client, key, fake):
    reply = client.post(
        "/api/v1/chat/completions",
        data={
            "api_secret_key": key,
            "messages[0][role]": "user",
            "messages[0][content]": "你好",
            "temperature": "0.2",
            "max_tokens": "50",
            "stream": "0",
        },
    )
    assert reply.status_code == 200
    assert reply.get_json()["code"] == 0
    sent = fake.requests[-1].json
    assert sent == {
        "messages": [{"role": "user", "content": "你好"}],
        "temperature": 0.2,
        "max_tokens": 50,
        "stream": False,
        "model": "gpt-3.5-turbo",
    }


def test_legacy_invalid_utf8_form_is_400(client, key, fake):
    reply = client.post(
        "/api/v1/chat/completions",
        data=b"messages[0][content]=%FF%FE&x=1",
        headers={**auth(key), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert reply.status_code == 400
    assert reply.get_json()["code"] == 400 and "UTF-8" in reply.get_json()["msg"]
    assert fake.requests == []


def test_legacy_upload_keeps_multipart_and_drops_key(client, key, fake):
    audio = bytes(range(256)) * 8
    reply = client.post(
        "/api/v1/audio/transcriptions",
        content_type="multipart/form-data",
        data={"api_secret_key": key, "model": "whisper-1", "file": (io.BytesIO(audio), "a.mp3")},
    )
    assert reply.status_code == 200
    received = fake.requests[-1]
    assert audio in received.body and key.encode() not in received.body
    assert b'name="model"' in received.body
    assert reply.get_json()["code"] == 0


def test_a_form_of_many_appended_fields_is_read_in_linear_time():
    pairs = [("a[]", "1")] * 9000 + [("b[5]", "x"), ("b[]", "y")]
    started = time.perf_counter()
    body = nest(pairs)
    assert time.perf_counter() - started < 0.5  # quadratic took seconds here
    assert len(body["a"]) == 9000 and body["b"] == {"5": "x", "6": "y"}


@pytest.mark.parametrize("depth", [33, 600])
def test_deeply_nested_form_names_are_a_400(depth):
    name = "a" + "[x]" * depth
    with pytest.raises(InvalidRequest, match="nested"):
        nest([(name, "1")])


def test_long_digit_runs_are_names_not_indexes():
    body = nest([("a[" + "9" * 5000 + "]", "1"), ("a[]", "2")])
    assert body["a"] == {"9" * 5000: "1", "0": "2"}


def test_the_form_bomb_is_cheap_and_deep_multipart_names_a_400(client, fake):
    # PHP's max_input_vars (1000) fields at most: the bomb is refused before it is parsed.
    bomb = "&".join(["a[]=1"] * 9000).encode()
    started = time.perf_counter()
    reply = client.post(
        "/api/v1/chat/completions",
        data=bomb,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert reply.status_code == 400 and time.perf_counter() - started < 1.0
    assert "1000 fields at most" in reply.get_json()["error"]["message"]
    many = "&".join(["a[]=1"] * 1000).encode()  # as many as PHP takes: parsed, then no key
    reply = client.post(
        "/api/v1/chat/completions",
        data=many,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert reply.status_code == 401
    name = "a" + "[x]" * 600
    deep = f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n1\r\n--b--\r\n'
    reply = client.post(
        "/api/v1/chat/completions",
        data=deep.encode(),
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert reply.status_code == 400 and "nested" in reply.get_json()["error"]["message"]
    assert "最多嵌套 32 层" in reply.get_json()["msg"]
    assert fake.requests == []
