"""End to end in headless Chromium: sign in, create a key, call with it, see it on the pages."""

# The Chinese pages are checked as shown, full-width punctuation and all.
# ruff: noqa: RUF001

import os
import re

import pytest
import requests
from conftest import SECRETS_SEEN, auth
from fake_upstream import FAKE_COMPLETION_TOKENS, FAKE_PROMPT_TOKENS
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")
ADMIN_TOKEN = "browser-admin-token-4d1c9e7f2b8a"
SECRETS_SEEN.add(ADMIN_TOKEN)
CALL_TOKENS = FAKE_PROMPT_TOKENS + FAKE_COMPLETION_TOKENS
# Debian's Chromium, driven by Playwright without its own browser download (closed network).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="needs Debian's chromium at /usr/bin/chromium (tests/install-system-deps.sh)",
)


@pytest.fixture
def browser():
    """Headless Chromium, closed at the end."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


def watch(page, problems):
    """Collect console errors (a CSP refusal, a broken script) and page errors."""
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))


def sign_in(page, base_url):
    """Open /admin, get sent to the sign-in form, and sign in with the token."""
    page.goto(base_url + "/admin")
    assert page.url == base_url + "/admin/login"
    page.fill("#token", ADMIN_TOKEN)
    page.click("form.stack button[type=submit]")
    page.wait_for_url(base_url + "/admin")


def test_dashboard_end_to_end(relay_server, browser):
    server = relay_server(workers=2, RELAY_ADMIN_TOKEN=ADMIN_TOKEN)
    base = server.base_url
    problems = []
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    watch(page, problems)

    sign_in(page, base)
    assert ADMIN_TOKEN not in page.url
    session = next(c for c in context.cookies() if c["name"] == "session")
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert ADMIN_TOKEN not in session["value"]

    # Create a key through the form; it is shown once, on the result page.
    page.fill("#create-key input[name=name]", "browser-key")
    page.fill("#create-key input[name=quota]", "100000")
    page.click("#create-key button[type=submit]")
    key = page.inner_text("#new-key").strip()
    SECRETS_SEEN.add(key)
    assert re.fullmatch(r"sk-relay-[\w-]+", key)

    reply = requests.post(
        base + "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "secret plans"}]},
        headers=auth(key),
        timeout=10,
    )
    assert reply.status_code == 200

    page.goto(base + "/admin")
    html = page.content()
    assert key not in html and "secret plans" not in html
    row = page.locator("#recent-calls tbody tr").first.inner_text()
    assert "browser-key" in row and "gpt-4o" in row and str(CALL_TOKENS) in row
    assert "200" in row and "ok" in row
    keys_row = page.locator("#key-table tbody tr", has_text="browser-key").inner_text()
    assert str(100000 - CALL_TOKENS) in keys_row.replace(",", "")

    chart = page.locator("#chart-key-tokens svg")
    assert chart.bounding_box()["height"] > 150  # drawn, not collapsed
    assert "browser-key" in chart.text_content()
    values = chart.locator("desc.value").all_text_contents()
    assert str(CALL_TOKENS) in values
    model_chart = page.locator("#chart-model-calls svg")
    assert "gpt-4o" in model_chart.text_content()
    assert "1" in model_chart.locator("desc.value").all_text_contents()

    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "dashboard.png"), full_page=True)
    assert problems == []

    # The same pages with JavaScript off: tables, forms and charts are all server-rendered.
    plain = browser.new_context(java_script_enabled=False, viewport={"width": 1280, "height": 900})
    nojs = plain.new_page()
    sign_in(nojs, base)
    assert "browser-key" in nojs.locator("#recent-calls tbody tr").first.inner_text()
    nojs.locator("#key-table tbody tr", has_text="browser-key").locator("text=Disable").click()
    nojs.wait_for_url(base + "/admin")
    assert "disabled" in nojs.locator(".note.ok").inner_text()
    assert requests.get(base + "/v1/models", headers=auth(key), timeout=10).status_code == 401
    nojs.locator("#key-table tbody tr", has_text="browser-key").locator("text=Enable").click()
    nojs.wait_for_url(base + "/admin")

    # The key holder's page, also without JavaScript: their numbers, their chart.
    nojs.goto(base + "/")
    nojs.fill("#key", key)
    nojs.click("form.stack button[type=submit]")
    assert nojs.inner_text("#used") == f"{CALL_TOKENS} tokens"
    assert "gpt-4o" in nojs.locator("#usage svg").first.text_content()
    assert key not in nojs.content() and key not in nojs.url
    nojs.screenshot(path=os.path.join(ARTIFACTS, "keyholder.png"), full_page=True)
    plain.close()
    context.close()


def test_a_chinese_browser_gets_chinese_pages_and_the_switch_brings_english(relay_server, browser):
    server = relay_server(workers=1, RELAY_ADMIN_TOKEN=ADMIN_TOKEN)
    base = server.base_url
    problems = []
    # A browser set to Chinese, with JavaScript off: the switch is two plain links.
    context = browser.new_context(
        locale="zh-CN", java_script_enabled=False, viewport={"width": 1440, "height": 1000}
    )
    page = context.new_page()
    watch(page, problems)

    sign_in(page, base)
    assert page.get_attribute("html", "lang") == "zh-CN"
    assert page.inner_text("header .where") == "管理后台"
    assert page.inner_text("#keys h2") == "密钥"
    page.fill("#create-key input[name=name]", "中文密钥")
    page.fill("#create-key input[name=quota]", "1234567")
    page.click("#create-key button[type=submit]")
    assert page.inner_text("h1") == "密钥“中文密钥”已创建"
    key = page.inner_text("#new-key").strip()
    SECRETS_SEEN.add(key)
    assert "1,234,567 个 token" in page.inner_text("dl.facts")
    reply = requests.post(
        base + "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "你好"}]},
        headers=auth(key),
        timeout=10,
    )
    assert reply.status_code == 200

    page.click("text=返回管理后台")
    page.wait_for_url(base + "/admin")
    assert "最近的调用" in page.inner_text("#calls h2")
    assert "每日 token 用量（按密钥）" in page.locator("#chart-key-tokens svg").text_content()
    row = page.locator("#recent-calls tbody tr").first.inner_text()
    assert "中文密钥" in row and "gpt-4o" in row and str(CALL_TOKENS) in row
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "dashboard-zh.png"), full_page=True)

    # The switch: English from now on, whatever the browser asks for, on every page.
    page.click("#languages a[hreflang=en]")
    page.wait_for_url(base + "/admin")
    assert page.get_attribute("html", "lang") == "en"
    assert "Recent calls" in page.inner_text("#calls h2")
    cookie = next(c for c in context.cookies() if c["name"] == "relay_language")
    assert cookie["value"] == "en" and cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    page.goto(base + "/")
    assert page.inner_text("h1") == "Check your key"
    page.click("#languages a[hreflang=zh]")
    page.wait_for_url(base + "/usage")
    assert page.inner_text("h1") == "查询密钥"
    assert problems == []
    context.close()
