"""The operator dashboard, the key holder's page and /metrics (Flask test client, then gunicorn)."""

import hashlib
import os
import re
import signal
import time

import pytest
import requests
from conftest import SECRETS_SEEN, auth, close_app, on_store, relay_settings
from fake_upstream import FAKE_COMPLETION_TOKENS, FAKE_PROMPT_TOKENS, json_reply, sse_reply
from prometheus_client.parser import text_string_to_metric_families

from relay.app import create_app

ADMIN_TOKEN = "admin-token-Zq8-5f0c1e9b7a2d4c6e"
SECRETS_SEEN.add(ADMIN_TOKEN)
PROMPT = "purple elephants dance at midnight"
CALL_TOKENS = FAKE_PROMPT_TOKENS + FAKE_COMPLETION_TOKENS


@pytest.fixture
def settings(settings):
    """The usual test settings, with an admin token."""
    settings["ADMIN_TOKEN"] = ADMIN_TOKEN
    return settings


@pytest.fixture
def build_app(tmp_path, fake, store_url):
    """Factory for apps with other settings (no token, metrics off…); all closed at the end."""
    apps = []

    def build(**overrides):
        settings = relay_settings(tmp_path, fake, **overrides)
        application = create_app(on_store(settings, store_url, tmp_path))
        apps.append(application)
        return application

    yield build
    for application in apps:
        close_app(application)


def csrf_of(html):
    """The CSRF token in a page's forms."""
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def login(client, token=ADMIN_TOKEN):
    """Sign in through the form, as a browser would."""
    form = client.get("/admin/login").get_data(as_text=True)
    return client.post("/admin/login", data={"csrf_token": csrf_of(form), "token": token})


def dashboard(client):
    """The dashboard's HTML (signed in)."""
    reply = client.get("/admin")
    assert reply.status_code == 200
    return reply.get_data(as_text=True)


def post_form(client, path, **fields):
    """POST a dashboard form with the session's CSRF token."""
    token = csrf_of(dashboard(client))
    return client.post(path, data={"csrf_token": token, **fields})


def chat(client, key, stream=False, content=PROMPT):
    """One chat call through the relay to the fake upstream."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
    return client.post("/v1/chat/completions", json=body, headers=auth(key))


def metric(text, name, **labels):
    """Sum of the samples called `name` whose labels include `labels`."""
    total, found = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
                found = True
    return total if found else None


# --- sign-in, sessions, CSRF ---------------------------------------------------------------


def test_dashboard_is_off_without_a_token(build_app):
    client = build_app(ADMIN_TOKEN=None).test_client()
    for path in ("/admin", "/admin/login"):
        reply = client.get(path)
        assert reply.status_code == 404
        assert "dashboard is off" in reply.get_data(as_text=True)
    reply = client.post("/admin/login", data={"token": "", "csrf_token": ""})
    assert reply.status_code == 404
    assert "Set-Cookie" not in reply.headers


def test_login_form_and_wrong_token(client, make_key):
    make_key("alice-visible-name")
    form = client.get("/admin/login")
    html = form.get_data(as_text=True)
    assert form.status_code == 200
    assert 'type="password"' in html and 'method="post"' in html
    assert "alice-visible-name" not in html
    wrong = client.post("/admin/login", data={"csrf_token": csrf_of(html), "token": "nope"})
    assert wrong.status_code == 401
    assert "not the admin token" in wrong.get_data(as_text=True)
    after = client.get("/admin")
    assert after.status_code == 302
    assert after.headers["Location"].endswith("/admin/login")


def test_no_session_sees_no_data_and_changes_nothing(client, make_key, app):
    make_key("alice-visible-name")
    reply = client.get("/admin", follow_redirects=True)
    assert reply.request.path == "/admin/login"
    assert "alice-visible-name" not in reply.get_data(as_text=True)
    # A forged POST: no session, so no CSRF token and no sign-in either.
    forged = client.post("/admin/keys/disable", data={"name": "alice-visible-name"})
    assert forged.status_code in (400, 401, 403)
    assert app.extensions["relay"].store.keys.by_name("alice-visible-name").enabled


def test_login_sets_a_strict_httponly_cookie_and_logout_ends_it(client, make_key):
    make_key("alice-visible-name")
    reply = login(client)
    assert reply.status_code == 302
    assert reply.headers["Location"].endswith("/admin")
    assert ADMIN_TOKEN not in reply.headers["Location"]
    cookie = reply.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert ADMIN_TOKEN not in cookie
    html = dashboard(client)
    assert "alice-visible-name" in html and ADMIN_TOKEN not in html
    assert client.get("/admin").headers["Cache-Control"] == "no-store"
    out = client.post("/admin/logout", data={"csrf_token": csrf_of(html)})
    assert out.status_code == 302
    assert client.get("/admin").status_code == 302


def test_session_from_an_old_token_is_refused(client, app):
    login(client)
    assert client.get("/admin").status_code == 200
    app.config["ADMIN_TOKEN"] = "a-rotated-admin-token-0000"
    assert client.get("/admin").status_code == 302


def test_posts_without_a_valid_csrf_token_change_nothing(client, make_key, app):
    make_key("alice-visible-name")
    login(client)
    keys = app.extensions["relay"].store.keys
    for data in ({"name": "alice-visible-name"}, {"name": "alice-visible-name", "csrf_token": "x"}):
        reply = client.post("/admin/keys/disable", data=data)
        assert reply.status_code == 400
        assert keys.by_name("alice-visible-name").enabled
    reply = client.post("/admin/keys", data={"name": "mallory"})
    assert reply.status_code == 400
    assert keys.by_name("mallory") is None


# --- keys ----------------------------------------------------------------------------------


def test_create_key_shows_it_once_and_stores_only_its_hash(client, app):
    login(client)
    reply = post_form(client, "/admin/keys", name="carol", quota="1000", rpm="5")
    assert reply.status_code == 200
    assert reply.headers["Cache-Control"] == "no-store"
    key = re.search(r'id="new-key">([^<]+)<', reply.get_data(as_text=True)).group(1)
    assert key.startswith("sk-relay-")
    rows = app.extensions["relay"].store.db.query("SELECT * FROM keys WHERE name = 'carol'")
    assert rows[0]["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert not any(key in str(value) for value in rows[0].values())
    assert rows[0]["quota_tokens"] == 1000 and rows[0]["rpm"] == 5
    html = dashboard(client)
    assert "carol" in html and key not in html
    assert chat(client, key).status_code == 200


def test_create_key_with_a_taken_name_says_why(client, make_key):
    make_key("alice")
    login(client)
    reply = post_form(client, "/admin/keys", name="alice")
    assert reply.status_code == 302
    assert "already exists" in dashboard(client)


def test_disable_enable_and_top_up(client, make_key, app):
    key = make_key("dave", quota_tokens=100)
    keys = app.extensions["relay"].store.keys
    login(client)
    assert post_form(client, "/admin/keys/disable", name="dave").status_code == 302
    assert not keys.by_name("dave").enabled
    assert chat(client, key).status_code == 401
    assert "disabled" in dashboard(client)
    post_form(client, "/admin/keys/enable", name="dave")
    assert keys.by_name("dave").enabled
    assert chat(client, key).status_code == 200
    post_form(client, "/admin/keys/topup", name="dave", tokens="50")
    assert keys.by_name("dave").quota_tokens == 150
    post_form(client, "/admin/keys/topup", name="dave", tokens="lots")
    assert keys.by_name("dave").quota_tokens == 150
    assert "whole number" in dashboard(client)
    post_form(client, "/admin/keys/disable", name="nobody")
    assert "no key named" in dashboard(client)


def test_recent_calls_and_charts_show_a_call_without_prompt_or_key(client, make_key):
    key = make_key("erin-the-caller")
    assert chat(client, key).status_code == 200
    login(client)
    html = dashboard(client)
    table = html.split('id="recent-calls"', 1)[1].split("</table>", 1)[0]
    row = table.split("<tbody>", 1)[1].split("</tr>", 1)[0]
    assert "erin-the-caller" in row and "gpt-4o" in row and "chat/completions" in row
    cells = re.findall(r"<td[^>]*>([^<]*)", row)
    assert str(CALL_TOKENS) in cells and "200" in cells and "ok" in cells
    assert PROMPT not in html and "purple" not in html
    assert key not in html
    assert html.count("<svg") == 4 and "<script" not in html
    chart = html.split('id="chart-key-tokens"', 1)[1].split("</figure>", 1)[0]
    assert "erin-the-caller" in chart
    assert f'<desc class="value">{CALL_TOKENS}</desc>' in chart


# --- the key holder's page -----------------------------------------------------------------


def test_key_holder_sees_own_numbers_and_nothing_of_others(client, make_key):
    alice = make_key("alice", quota_tokens=1000, rpm=30)
    bob = make_key("bob-the-other", quota_tokens=500)
    assert chat(client, alice).status_code == 200
    assert chat(client, bob).status_code == 200
    assert chat(client, bob).status_code == 200
    form = client.get("/usage")
    assert form.status_code == 200 and 'type="password"' in form.get_data(as_text=True)
    reply = client.post("/", data={"key": alice})
    html = reply.get_data(as_text=True)
    assert reply.status_code == 200
    assert "alice" in html and "bob-the-other" not in html
    used = re.search(r'id="used">([^<]+)<', html).group(1)
    remaining = re.search(r'id="remaining">([^<]+)<', html).group(1)
    assert used == f"{CALL_TOKENS} tokens" and remaining == f"{1000 - CALL_TOKENS} tokens"
    assert f'<desc class="value">{CALL_TOKENS}</desc>' in html
    assert f'<desc class="value">{2 * CALL_TOKENS}</desc>' not in html  # bob's day total
    assert alice not in html
    assert "Set-Cookie" not in reply.headers
    assert reply.headers["Cache-Control"] == "no-store"


def test_bad_key_is_a_friendly_401_and_counts_against_the_address(build_app):
    client = build_app(UNAUTHENTICATED_RPM=2).test_client()
    for _ in range(2):
        reply = client.post("/usage", data={"key": "sk-relay-not-a-real-key"})
        assert reply.status_code == 401
        html = reply.get_data(as_text=True)
        assert "Incorrect API key" in html and "sk-relay-not-a-real-key" not in html
    third = client.post("/usage", data={"key": "sk-relay-another-guess"})
    assert third.status_code == 429
    assert "Retry-After" in third.headers


# --- /metrics ------------------------------------------------------------------------------


def test_metrics_off_is_404(build_app):
    client = build_app(METRICS=False, ADMIN_TOKEN=ADMIN_TOKEN).test_client()
    reply = client.get("/metrics", headers=auth(ADMIN_TOKEN))
    assert reply.status_code == 404


def test_metrics_need_the_admin_token(client):
    for headers in ({}, auth("wrong-token"), {"Authorization": ADMIN_TOKEN}):
        reply = client.get("/metrics", headers=headers)
        assert reply.status_code == 401
        assert reply.get_json()["error"]["code"] == "admin_token_required"
    reply = client.get("/metrics", headers=auth(ADMIN_TOKEN))
    assert reply.status_code == 200
    assert reply.content_type.startswith("text/plain")


def test_metrics_are_open_without_a_token(build_app):
    client = build_app(ADMIN_TOKEN=None).test_client()
    assert client.get("/metrics").status_code == 200


def test_metrics_count_calls_tokens_streams_and_refusals(client, key, app, fake):
    assert chat(client, key).status_code == 200
    assert chat(client, key).status_code == 200
    # Chunks 50 ms apart: the relay passes on all a read brings, so a stream the upstream
    # sent at once could arrive whole, [DONE] and all, and end before the scrape.
    fake.stream_interval = 0.05
    streamed = client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        headers=auth(key),
        buffered=False,
    )
    scrape = client.get("/metrics", headers=auth(ADMIN_TOKEN)).get_data(as_text=True)
    assert metric(scrape, "relay_streams_open") == 1
    assert b"[DONE]" in streamed.get_data()
    streamed.close()
    assert chat(client, key + "x").status_code == 401
    text = client.get("/metrics", headers=auth(ADMIN_TOKEN)).get_data(as_text=True)
    ok = {"face": "openai", "route": "chat/completions", "status": "200"}
    assert metric(text, "relay_requests_total", **ok) == 3
    assert metric(text, "relay_requests_total", status="401") == 1
    assert metric(text, "relay_tokens_total", model="gpt-4o", kind="prompt") == 3 * 11
    assert metric(text, "relay_tokens_total", model="gpt-4o", kind="completion") == 3 * 7
    assert metric(text, "relay_request_duration_seconds_count", route="chat/completions") == 3
    assert metric(text, "relay_streams_open") == 0
    assert metric(text, "relay_upstream_errors_total") is None


def test_metrics_count_upstream_errors(client, key, fake):
    fake.queue(*(json_reply({"oops": True}, status=500) for _ in range(3)))  # retries too
    assert chat(client, key).status_code == 502
    text = client.get("/metrics", headers=auth(ADMIN_TOKEN)).get_data(as_text=True)
    assert metric(text, "relay_upstream_errors_total", code="upstream_error") == 1
    assert metric(text, "relay_requests_total", status="502") == 1


# --- /metrics under gunicorn: one total across workers ---------------------------------------


def scrape(server):
    """The /metrics text from whichever worker answers."""
    reply = requests.get(server.base_url + "/metrics", headers=auth(ADMIN_TOKEN), timeout=10)
    assert reply.status_code == 200
    return reply.text


def served_by_one_worker(server, paused, action):
    """Run action while one worker is stopped, so the other one serves it."""
    os.kill(paused, signal.SIGSTOP)
    try:
        return action()
    finally:
        os.kill(paused, signal.SIGCONT)


def test_metrics_add_up_every_gunicorn_worker(relay_server, fake):
    server = relay_server(workers=2, RELAY_ADMIN_TOKEN=ADMIN_TOKEN)
    key = server.create_key("metrics-key")
    workers = server.ready_workers()  # start() returns once both have loaded the app
    assert len(workers) == 2
    url = server.base_url + "/v1/chat/completions"
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}

    def calls(n):
        for _ in range(n):
            assert requests.post(url, json=body, headers=auth(key), timeout=10).status_code == 200

    # Each worker serves some calls: the other one is stopped while they are made.
    served_by_one_worker(server, workers[0], lambda: calls(3))
    served_by_one_worker(server, workers[1], lambda: calls(4))
    calls(3)
    for paused in workers:  # each worker answers a scrape: both see every worker's calls
        text = served_by_one_worker(server, paused, lambda: scrape(server))
        assert metric(text, "relay_requests_total") == 10
        assert metric(text, "relay_tokens_total", kind="prompt") == 10 * FAKE_PROMPT_TOKENS
        assert metric(text, "relay_streams_open") == 0

    # An open stream shows in the gauge, whichever worker holds it and whichever answers.
    event = {"object": "chat.completion.chunk", "model": "gpt-4o", "choices": []}
    fake.queue(sse_reply([event], hang_after=1))
    stream_body = {**body, "stream": True}
    with requests.post(url, json=stream_body, headers=auth(key), stream=True, timeout=10) as held:
        chunks = held.iter_content(chunk_size=None)  # kept: dropping it would hang up
        assert b"chat.completion.chunk" in next(chunks)
        for paused in workers:
            text = served_by_one_worker(server, paused, lambda: scrape(server))
            assert metric(text, "relay_streams_open") == 1
    deadline = time.monotonic() + 5
    while metric(scrape(server), "relay_streams_open") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    text = scrape(server)
    assert metric(text, "relay_streams_open") == 0
    assert metric(text, "relay_requests_total") == 11
