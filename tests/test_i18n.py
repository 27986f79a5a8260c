"""English and 简体中文: the catalogs, every page in each language, the switch, the legacy msg."""

# The Chinese expected here keeps its full-width punctuation (，：（）): that is the point of it.
# ruff: noqa: RUF001, RUF003

import io
import pathlib
import re
import subprocess
import sys
from html import unescape
from html.parser import HTMLParser

import pytest
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from conftest import SECRETS_SEEN, auth, close_app, relay_settings
from fake_upstream import FAKE_COMPLETION_TOKENS, FAKE_PROMPT_TOKENS, json_reply

from relay.app import create_app
from relay.config import DEFAULTS, ConfigError
from relay.faces.legacy_msg import UPSTREAM_MESSAGES
from relay.i18n import TRANSLATIONS

ROOT = pathlib.Path(__file__).resolve().parent.parent
PO = pathlib.Path(TRANSLATIONS) / "zh" / "LC_MESSAGES" / "messages.po"
MO = PO.with_suffix(".mo")
ADMIN_TOKEN = "i18n-admin-token-7d2f0c9e4b1a"
SECRETS_SEEN.add(ADMIN_TOKEN)
PYBABEL = [sys.executable, "-m", "babel.messages.frontend"]  # .venv/bin/pybabel
ZH = {"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.8"}
CALL_TOKENS = FAKE_PROMPT_TOKENS + FAKE_COMPLETION_TOKENS
HAN = re.compile(r"[\u4e00-\u9fff]")
# What may stay in Latin letters on a Chinese page: the product's name, names of settings,
# files and protocols, and the data shown (model names, API paths, faces, outcomes).
KEPT_WORDS = {
    "relay",
    "UTC",
    "token",
    "RELAY_ADMIN_TOKEN",
    "env",
    "gpt",
    "o",
    "openai",
    "legacy",
    "chat",
    "completions",
    "ok",
}


@pytest.fixture
def build_app(tmp_path, fake):
    """Factory for apps with other settings; all closed at the end."""
    apps = []

    def build(**overrides):
        application = create_app(relay_settings(tmp_path, fake, **overrides))
        apps.append(application)
        return application

    yield build
    for application in apps:
        close_app(application)


class Visible(HTMLParser):
    """The text a reader sees (text nodes and the attributes shown), by language."""

    SKIPPED = frozenset({"style", "script", "code", "desc"})
    SHOWN_ATTRIBUTES = ("placeholder", "aria-label", "title", "alt")
    VOID = frozenset({"input", "meta", "link", "br", "img", "hr"})

    def __init__(self, other_language):
        super().__init__()
        self.other = other_language  # elements marked as in this language are not counted
        self.stack = []  # (tag, skipped) of open elements
        self.texts = []

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        inherited = bool(self.stack) and self.stack[-1][1]
        lang = values.get("lang") or ""
        skipped = (
            inherited or tag in self.SKIPPED or (tag != "html" and lang.startswith(self.other))
        )
        if not skipped:
            self.texts += [values[name] for name in self.SHOWN_ATTRIBUTES if values.get(name)]
        if tag not in self.VOID:
            self.stack.append((tag, skipped))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if data.strip() and not (self.stack and self.stack[-1][1]):
            self.texts.append(data.strip())


def visible(html, other_language):
    """Every piece of text a reader sees on a page (not counting what is marked as in the
    other language: the switch's link to it)."""
    parser = Visible(other_language)
    parser.feed(html)
    return parser.texts


def english_left(html):
    """Latin words on a Chinese page other than the ones it keeps."""
    words = re.findall(r"[A-Za-z][A-Za-z_]*", " ".join(visible(html, "en")))
    return sorted({word for word in words if word not in KEPT_WORDS})


def csrf_of(html):
    """The CSRF token in a page's forms."""
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def sign_in(client, **headers):
    """Sign in through the form; returns the dashboard's CSRF token."""
    form = client.get("/admin/login", headers=headers).get_data(as_text=True)
    reply = client.post(
        "/admin/login", data={"csrf_token": csrf_of(form), "token": ADMIN_TOKEN}, headers=headers
    )
    assert reply.status_code == 302
    return csrf_of(client.get("/admin", headers=headers).get_data(as_text=True))


def every_page(build, tmp_path, fake, headers):
    """Every template, rendered with each of its branches at least once: {name: html}."""
    database = str(tmp_path / f"pages-{len(headers)}.sqlite")
    app = build(ADMIN_TOKEN=ADMIN_TOKEN, DATABASE=database)
    keys = app.extensions["relay"].store.keys
    alice, _ = keys.create("阿丽斯", quota_tokens=1234567, rpm=5, models="gpt-4o")
    monthly, _ = keys.create("按月", quota_tokens=1000, quota_period="monthly", tpm=100)
    budget, _ = keys.create("钱包", budget="12.5", expires_at="2031-05-06")
    SECRETS_SEEN.update((alice, monthly, budget))
    keys.create("停用的", budget="10", expires_at="2031-05-06")
    keys.set_enabled("停用的", False)
    client = app.test_client()
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "你好"}]}
    assert client.post("/v1/chat/completions", json=chat, headers=auth(alice)).status_code == 200
    streamed = client.post(
        "/v1/chat/completions", json={**chat, "stream": True}, headers=auth(alice)
    )
    assert b"[DONE]" in streamed.get_data()
    fake.queue(json_reply({"error": {"message": "nope", "type": "x", "code": None}}, status=400))
    assert client.post("/v1/chat/completions", json=chat, headers=auth(alice)).status_code == 400
    pages = {}
    pages["keyholder form"] = client.get("/", headers=headers).get_data(as_text=True)
    pages["keyholder no key"] = client.post("/", data={"key": ""}, headers=headers)
    pages["keyholder bad key"] = client.post("/usage", data={"key": "sk-no"}, headers=headers)
    pages["keyholder summary"] = client.post("/", data={"key": alice}, headers=headers)
    pages["keyholder monthly"] = client.post("/", data={"key": monthly}, headers=headers)
    pages["keyholder budget"] = client.post("/", data={"key": budget}, headers=headers)
    pages["login"] = client.get("/admin/login", headers=headers).get_data(as_text=True)
    wrong = {"csrf_token": csrf_of(pages["login"]), "token": "wrong"}
    pages["login wrong token"] = client.post("/admin/login", data=wrong, headers=headers)
    pages["form refused"] = client.post("/admin/keys", data={"name": "x"}, headers=headers)
    token = sign_in(client, **headers)
    for path, form in (
        ("/admin/keys/disable", {"name": "阿丽斯"}),
        ("/admin/keys/enable", {"name": "阿丽斯"}),
        ("/admin/keys/topup", {"name": "阿丽斯", "tokens": "1000"}),
        ("/admin/keys/topup", {"name": "阿丽斯", "tokens": "lots"}),
    ):
        client.post(path, data={"csrf_token": token, **form}, headers=headers)
    pages["dashboard"] = client.get("/admin", headers=headers)
    created = {"csrf_token": token, "name": "新的", "quota": "5000", "expires": "2030-01-02"}
    pages["key created"] = client.post("/admin/keys", data=created, headers=headers)
    unlimited = {"csrf_token": token, "name": "不限"}
    pages["key created, no limits"] = client.post("/admin/keys", data=unlimited, headers=headers)
    off = build(ADMIN_TOKEN=None, DATABASE=database)
    pages["dashboard off"] = off.test_client().get("/admin", headers=headers)
    return {
        name: page if isinstance(page, str) else page.get_data(as_text=True)
        for name, page in pages.items()
    }


# --- the catalogs ----------------------------------------------------------------------------


def test_pybabel_extract_finds_no_message_missing_from_the_zh_catalog(tmp_path):
    pot = tmp_path / "messages.pot"
    # The command README.md documents, run as it is.
    done = subprocess.run(
        [*PYBABEL, "extract", "-F", "babel.cfg", "--add-location=file", "-o", str(pot), "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # An f-string with values in an error's message cannot be translated: Babel skips it.
    assert "Skipping f-string" not in done.stderr
    with open(pot, "rb") as handle:
        extracted = {message.id for message in read_po(handle) if message.id}
    with open(PO, "rb") as handle:
        catalog = read_po(handle)
    assert len(extracted) > 150  # the templates and the error messages both
    translated = {
        message.id
        for message in catalog
        if message.id
        and "fuzzy" not in message.flags
        and all(message.string if isinstance(message.string, tuple) else [message.string])
    }
    assert sorted(map(str, extracted - translated)) == []
    assert sorted(map(str, {m.id for m in catalog if m.id} - extracted)) == []  # none stale
    assert [(message.id, errors) for message, errors in catalog.check()] == []


def test_the_committed_mo_is_the_po_compiled():
    with open(PO, "rb") as handle:
        catalog = read_po(handle)
    compiled = io.BytesIO()
    write_mo(compiled, catalog)
    assert compiled.getvalue() == MO.read_bytes(), "run: pybabel compile -d relay/translations"


def test_the_upstream_messages_marked_for_translation_are_still_worded_there():
    sources = "".join(path.read_text() for path in (ROOT / "relay" / "upstream").glob("*.py"))
    assert [message for message in UPSTREAM_MESSAGES if f'"{message}"' not in sources] == []


# --- every page, in each language --------------------------------------------------------------


def test_every_page_in_chinese_leaves_no_english_and_in_english_no_chinese(
    build_app, tmp_path, fake
):
    chinese = every_page(build_app, tmp_path, fake, ZH)
    english = every_page(build_app, tmp_path, fake, {})
    assert set(chinese) == set(english)
    for name, html in chinese.items():
        assert '<html lang="zh-CN">' in html, name
        assert english_left(html) == [], name
    for name, html in english.items():
        assert '<html lang="en">' in html, name
        shown = [text for text in visible(html, "zh") if HAN.search(text)]
        data = {"阿丽斯", "按月", "钱包", "停用的", "新的", "不限"}  # key names: data, not words
        assert [text for text in shown if not any(n in text for n in data)] == [], name
    # Errors and notes are said in the page's language too.
    assert "密钥传的不对：请向中转服务的管理员索取有效的密钥。" in chinese["keyholder bad key"]
    assert "请先在输入框中粘贴你的中转服务密钥。" in chinese["keyholder no key"]
    assert "管理员令牌不正确。" in chinese["login wrong token"]
    assert "表单被拒绝" in chinese["form refused"]
    for note in ("密钥 '阿丽斯' 已停用。", "密钥 '阿丽斯' 已充值 1,000 个 token。", "整数个 token"):
        assert note in unescape(chinese["dashboard"])
    assert "Key '阿丽斯' topped up by 1,000 tokens." in unescape(english["dashboard"])
    assert "每日 token 用量（按密钥）" in chinese["dashboard"]  # chart titles
    assert "Tokens per day, by key" in english["dashboard"]


def test_numbers_and_dates_are_written_for_the_locale(build_app, fake):
    app = build_app(ADMIN_TOKEN=ADMIN_TOKEN)
    keys = app.extensions["relay"].store.keys
    big, _ = keys.create("big", quota_tokens=1234567, expires_at="2031-05-06")
    SECRETS_SEEN.add(big)
    client = app.test_client()
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=chat, headers=auth(big)).status_code == 200
    for headers, date in (
        (ZH, r"\d{4}年\d{1,2}月\d{1,2}日 \d{2}:\d{2}"),
        ({}, r"[A-Z][a-z]{2} \d{1,2}, \d{4}, \d{2}:\d{2}"),
    ):
        sign_in(client, **headers)
        html = client.get("/admin", headers=headers).get_data(as_text=True)
        row = html.split('<td class="name">big</td>', 1)[1].split("</tr>", 1)[0]
        assert f"{1234567 - CALL_TOKENS:,}" in row
        assert re.search(date, row), row  # created, in the locale's words, 24-hour UTC
        chart = html.split('id="chart-key-tokens"', 1)[1].split("</figure>", 1)[0]
        day = r"\d{1,2}月\d{1,2}日" if headers else r"[A-Z][a-z]{2} \d{1,2}"
        assert re.search(rf">{day}<", chart)  # the days under the bars
        client.post("/admin/logout", data={"csrf_token": csrf_of(html)})


# --- which language a page speaks --------------------------------------------------------------


def lang_of(reply):
    """The `lang` of a page."""
    return re.search(r'<html lang="([^"]+)">', reply.get_data(as_text=True)).group(1)


def test_the_language_is_the_pin_else_the_cookie_else_the_browser_else_english(build_app):
    client = build_app().test_client()
    assert lang_of(client.get("/")) == "en"
    assert lang_of(client.get("/", headers={"Accept-Language": "fr-FR, fr;q=0.9"})) == "en"
    assert lang_of(client.get("/", headers=ZH)) == "zh-CN"
    assert lang_of(client.get("/", headers={"Accept-Language": "en-US, zh-CN;q=0.5"})) == "en"
    client.set_cookie("relay_language", "en")
    assert lang_of(client.get("/", headers=ZH)) == "en"  # the switch beats the browser
    client.set_cookie("relay_language", "klingon")
    assert lang_of(client.get("/", headers=ZH)) == "zh-CN"  # a cookie naming nothing: ignored
    pinned = build_app(LANGUAGE="zh-CN").test_client()
    pinned.set_cookie("relay_language", "en")
    reply = pinned.get("/", headers={"Accept-Language": "en"})
    assert lang_of(reply) == "zh-CN" and "查询密钥" in reply.get_data(as_text=True)
    assert 'id="languages"' not in reply.get_data(as_text=True)  # no switch when pinned


def test_the_switch_sets_a_cookie_and_goes_back_only_to_the_relays_own_pages(build_app):
    client = build_app(ADMIN_TOKEN=ADMIN_TOKEN).test_client()
    page = client.get("/admin/login", headers=ZH).get_data(as_text=True)
    link = re.search(r'<a href="([^"]+)" lang="en" hreflang="en">English</a>', page).group(1)
    assert link == "/language/en?back=admin.login"
    reply = client.get(link)
    assert reply.status_code == 302 and reply.headers["Location"] == "/admin/login"
    cookie = reply.headers["Set-Cookie"]
    assert cookie.startswith("relay_language=en;") and "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie and "Max-Age=31536000" in cookie
    assert lang_of(client.get("/admin/login", headers=ZH)) == "en"
    # Anything but a page's name goes to the key page (/usage): never to a URL from the link.
    for back in ("https://evil.example/", "//evil.example", "/admin", "admin.logout", ""):
        reply = client.get("/language/zh", query_string={"back": back})
        assert reply.status_code == 302 and reply.headers["Location"] == "/usage", back
    refused = client.get("/language/fr")
    assert refused.status_code == 404 and "Set-Cookie" not in refused.headers
    assert refused.get_json()["error"]["code"] == "not_found"


def test_language_settings_are_checked():
    with pytest.raises(ConfigError, match="RELAY_LANGUAGE must be en or zh"):
        create_app(
            {"UPSTREAM_BASE_URL": "http://127.0.0.1:9", "UPSTREAM_API_KEY": "k", "LANGUAGE": "fr"}
        )
    with pytest.raises(ConfigError, match="RELAY_LEGACY_LANGUAGE must be en or zh"):
        create_app(
            {
                "UPSTREAM_BASE_URL": "http://127.0.0.1:9",
                "UPSTREAM_API_KEY": "k",
                "LEGACY_LANGUAGE": "",
            }
        )


# --- the legacy face's msg -----------------------------------------------------------------------


def legacy_failures(client, key, fake):
    """(error code, msg, error.message) of the legacy face's failures, in order."""
    url = "/index.php/api/v1/chat/completions"
    asks = [{"role": "user", "content": "1+100="}]
    replies = [
        client.post(url, json={"api_secret_key": "sk-wrong-key-123", "messages": asks}),
        client.post(url, json={"api_secret_key": key, "messages": []}),
        client.post(url, json={"api_secret_key": key, "messages": [{"role": "user"}]}),
        client.post(
            url,
            json={"api_secret_key": key, "messages": [{"role": "user", "content": "字" * 2001}]},
        ),
        client.post(url, json={"api_secret_key": key, "model": "dall-e", "messages": asks}),
        client.post(url, json={"api_secret_key": key, "messages": asks, "max_tokens": 10**6}),
        client.post("/index.php/v1/chat/completions", json={"api_secret_key": key}),
    ]
    fake.queue(
        json_reply({"error": {"message": "Bad model.", "type": "x", "code": "m"}}, status=404)
    )
    replies.append(client.post(url, json={"api_secret_key": key, "messages": asks}))
    fake.queue(json_reply({"oops": True}, status=500))
    replies.append(client.post(url, json={"api_secret_key": key, "messages": asks}))
    found = []
    for reply in replies:
        body = reply.get_json()
        assert body["code"] == reply.status_code >= 400
        found.append((body["error"]["code"], body["msg"], body["error"]["message"]))
    ok = client.post(url, json={"api_secret_key": key, "messages": asks}).get_json()
    assert (ok["code"], ok["msg"]) == (0, "")
    return found


def test_legacy_msg_is_chinese_by_default_and_english_with_the_setting(build_app, tmp_path, fake):
    found = {}
    for language in ("zh", "en"):
        settings = {} if language == "zh" else {"LEGACY_LANGUAGE": "en"}
        app = build_app(DATABASE=str(tmp_path / f"{language}.sqlite"), **settings)
        keys = app.extensions["relay"].store.keys
        key, _ = keys.create(f"php-{language}", quota_tokens=5000, models="gpt-3.5*")
        SECRETS_SEEN.add(key)
        # Accept-Language is a browser's: API clients get RELAY_LEGACY_LANGUAGE whatever it says.
        client = app.test_client()
        client.environ_base["HTTP_ACCEPT_LANGUAGE"] = "en" if language == "zh" else "zh-CN"
        found[language] = legacy_failures(client, key, fake)
        # The OpenAI face has no msg: its errors are OpenAI's, in English, whatever is set.
        reply = client.post("/v1/chat/completions", json={}, headers={**auth("sk-bad-1"), **ZH})
        assert set(reply.get_json()) == {"error"} and not HAN.search(reply.get_data(as_text=True))
        assert reply.get_json()["error"]["message"].startswith("Incorrect API key provided")
    english = [message for _, _, message in found["zh"]]
    assert english == [message for _, _, message in found["en"]]  # error.message: the same
    assert english[0].startswith("Incorrect API key provided")
    assert [msg for _, msg, _ in found["en"]] == [*english[:-2], "Bad model.", english[-1]]
    zh = [msg for _, msg, _ in found["zh"]]
    needed = re.search(r"needs at least (\d+) ", english[5]).group(1)
    assert int(needed) > 10**6
    assert zh[:7] == [
        "密钥传的不对：请向中转服务的管理员索取有效的密钥。",
        "对话信息没传或者传的不对：messages 必须是由 {role, content} 对象组成的非空数组。",
        "messages[0] 的 content（对话内容）不能为空。",
        "最后一个 message 的 content 长度（即此轮对话的问题）不能超过 2000 个字符，"
        "当前为 2001 个字符。",
        "模型不对：该密钥不能使用模型 'dall-e'。",
        "余额不足：该密钥的 token 额度共 5000，已用 0，进行中的调用占用 0，剩余 5000；"
        f"本次调用至少需要 {needed}（提示词，以及设置了的 max_tokens）。"
        "请调小 max_tokens，或联系中转服务的管理员充值。",
        "接口地址 /index.php/v1/chat/completions 不存在。旧版接口的 base_url 是 "
        "http://<relay>/index.php/（调用地址为 /index.php/api/v1/…）。"
        "你要调用的是不是 /index.php/api/v1/chat/completions？",
    ]
    assert zh[7] == "上游服务返回错误（HTTP 404）：Bad model."
    # Worded by relay/upstream/ with values: its code's sentence, then the English.
    assert zh[8] == "上游服务出错：" + english[8] and "HTTP 500" in zh[8]


# --- the Chinese README --------------------------------------------------------------------------


def test_the_readmes_link_each_other_and_the_chinese_one_names_real_settings():
    english = (ROOT / "README.md").read_text()
    chinese = (ROOT / "README.zh-CN.md").read_text()
    assert "[README.zh-CN.md](README.zh-CN.md)" in english.split("\n## ", 1)[0]
    assert "[README.md](README.md)" in chinese.split("\n## ", 1)[0]
    assert "make run" in chinese and "make test" in chinese  # the same two commands
    named = set(re.findall(r"(?<![$\w])RELAY_([A-Z_]+[A-Z])\b", chinese))  # not $RELAY_KEY
    assert named and sorted(named - set(DEFAULTS)) == []
    # Every setting it names is one the English README's table documents too.
    assert [n for n in sorted(named) if f"| `RELAY_{n}` |" not in english] == []


def test_rate_limit_msgs_name_the_limit_that_was_hit(build_app, tmp_path):
    url = "/api/v1/models"
    for settings, said, english in (
        (
            {"GLOBAL_RPM": 1},
            "整个中转服务每分钟最多处理 1 次请求",
            "for the whole relay: 1 requests",
        ),
        ({"DEFAULT_RPM": 1}, "该密钥每分钟最多 1 次请求", "for this key: 1 requests/minute"),
    ):
        name = next(iter(settings))
        app = build_app(
            DATABASE=str(tmp_path / f"{name}.sqlite"),
            RATELIMIT_STORAGE_URI=f"sqlite:///{tmp_path / f'{name}-limits.sqlite'}",
            **settings,
        )
        key, _ = app.extensions["relay"].store.keys.create("limited")
        SECRETS_SEEN.add(key)
        client = app.test_client()
        assert client.get(url, headers=auth(key)).status_code == 200
        refused = client.get(url, headers=auth(key))
        body = refused.get_json()
        assert refused.status_code == 429 and body["error"]["code"] == "rate_limit_exceeded"
        assert english in body["error"]["message"]
        assert body["msg"].startswith(f"请求过于频繁：{said}，请在当前时间窗口结束后重试。")
