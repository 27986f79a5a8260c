"""Guessing keys and tokens costs the guesser; sessions end on the server; operator input is
checked; names from clients never reach a terminal or a spreadsheet as commands."""

import os
import stat

import pytest
from conftest import SECRETS_SEEN, auth, relay_settings
from test_admin import csrf_of, dashboard, login

from relay.config import load_settings

ADMIN_TOKEN = "admin-token-guess-me-not-9f8e7d6c5b4a"
SECRETS_SEEN.add(ADMIN_TOKEN)
FAILURES = 5
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def settings(tmp_path, fake):
    """A low failure limit, a long block, and an admin token."""
    return relay_settings(
        tmp_path,
        fake,
        UNAUTHENTICATED_RPM=FAILURES,
        AUTH_BLOCK_SECONDS=300,
        ADMIN_TOKEN=ADMIN_TOKEN,
    )


def guess_keys(client, count):
    """Send `count` wrong keys; their statuses."""
    return [
        client.post("/v1/chat/completions", json=CHAT, headers=auth(f"sk-wrong-{n}")).status_code
        for n in range(count)
    ]


def test_a_guessing_address_is_blocked_whatever_it_sends_next(client, key, fake):
    assert guess_keys(client, FAILURES + 1) == [401] * FAILURES + [429]
    right = client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert right.status_code == 429 and int(right.headers["Retry-After"]) > 250
    broken = client.post(
        "/api/v1/chat/completions", data=b"{not json", headers={"Content-Type": "text/plain"}
    )
    assert broken.status_code == 429  # refused before its body was read, not a 400
    assert broken.get_json()["code"] == 429 and broken.get_json()["msg"]
    assert client.get("/healthz").status_code == 200
    assert fake.requests == []


def test_the_right_admin_token_does_not_sign_in_after_guessing(client):
    for n in range(FAILURES):
        assert login(client, token=f"wrong-{n}").status_code == 401
    assert login(client, token="wrong-again").status_code == 429
    blocked = login(client, ADMIN_TOKEN)
    assert blocked.status_code == 429 and "blocked" in blocked.get_data(as_text=True)
    assert client.get("/admin").status_code != 200


def test_metrics_and_the_key_page_count_and_block_too(client, key):
    for n in range(FAILURES):
        assert client.get("/metrics", headers=auth(f"wrong-{n}")).status_code == 401
    assert client.get("/metrics", headers=auth("wrong-again")).status_code == 429
    assert client.get("/metrics", headers=auth(ADMIN_TOKEN)).status_code == 429
    page = client.post("/", data={"key": key})
    assert page.status_code == 429 and "blocked" in page.get_data(as_text=True)


def test_a_session_ends_on_the_server_at_logout(app, client):
    login(client, ADMIN_TOKEN)
    html = dashboard(client)
    copied = client.get_cookie("session").value  # what an attacker might have kept
    assert client.post("/admin/logout", data={"csrf_token": csrf_of(html)}).status_code == 302
    other = app.test_client()
    other.set_cookie("session", copied)
    assert other.get("/admin").status_code == 302  # to the login form
    created = other.post("/admin/keys", data={"csrf_token": csrf_of(html), "name": "sneaky"})
    assert created.status_code == 401
    assert app.extensions["relay"].store.keys.by_name("sneaky") is None


def test_the_session_secret_is_random_kept_in_instance_and_private(tmp_path, fake):
    instance = tmp_path / "instance"
    settings = {"UPSTREAM_BASE_URL": fake.base_url, "UPSTREAM_API_KEY": "k", "SECRET_KEY": None}
    first = load_settings(str(instance), {**settings, "ADMIN_TOKEN": ADMIN_TOKEN})
    again = load_settings(str(instance), settings)
    other = load_settings(str(tmp_path / "elsewhere"), {**settings, "ADMIN_TOKEN": ADMIN_TOKEN})
    assert first["SECRET_KEY"] == again["SECRET_KEY"] != other["SECRET_KEY"]
    assert ADMIN_TOKEN not in first["SECRET_KEY"] and len(first["SECRET_KEY"]) == 64
    mode = os.stat(instance / "secret_key").st_mode
    assert stat.S_IMODE(mode) == 0o600


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("expires", "0001-01-01T00:00:00+14:00"),
        ("expires", "9999-12-31T23:59:59-14:00"),
        ("quota", "9" * 30),
        ("rpm", "9" * 30),
    ],
)
def test_out_of_range_settings_in_the_admin_form_are_refused_clearly(
    app, client, runner, field, value
):
    login(client, ADMIN_TOKEN)
    token = csrf_of(dashboard(client))
    reply = client.post("/admin/keys", data={"csrf_token": token, "name": "odd", field: value})
    assert reply.status_code == 302
    html = dashboard(client)
    assert "No key created" in html
    assert app.extensions["relay"].store.keys.by_name("odd") is None
    assert runner.invoke(args=["keys", "list"]).exit_code == 0


def test_out_of_range_numbers_on_the_command_line_are_one_line_errors(runner, make_key):
    make_key("counted")
    for args in (
        ["keys", "create", "big", "--quota", "9" * 30],
        ["keys", "set", "counted", "--rpm", "9" * 30],
        ["keys", "topup", "counted", "9" * 30],
    ):
        result = runner.invoke(args=args)
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert "at most" in result.output or "from 1 to" in result.output


def test_names_from_clients_reach_no_terminal_and_no_spreadsheet_as_commands(
    app, client, key, runner
):
    for model in ("\x1b[2J\x1b[31mgpt-evil", '=HYPERLINK("http://x","click")'):
        client.post("/v1/chat/completions", json={**CHAT, "model": model}, headers=auth(key))
    table = runner.invoke(args=["usage", "--by", "model"]).output
    assert "\x1b" not in table and "\\x1b[2J" in table
    sheet = runner.invoke(args=["usage", "--rows", "--csv"]).output
    assert "'=HYPERLINK(" in sheet and ",=HYPERLINK(" not in sheet
