"""Configuration: defaults, checks, and one clear sentence (no traceback) when it is wrong."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, RelayServer, free_port

from relay.app import create_app
from relay.config import ConfigError, load_settings


def run(args, env):
    """Run a command in the repo with only the given RELAY_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        args,
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def flask_bin():
    """The venv's flask command."""
    return os.path.join(os.path.dirname(sys.executable), "flask")


@pytest.mark.parametrize(
    ("env", "phrase"),
    [
        ({}, "RELAY_UPSTREAM_BASE_URL is not set"),
        ({"RELAY_UPSTREAM_BASE_URL": "ftp://x"}, "must be an http(s) URL"),
        ({"RELAY_UPSTREAM_BASE_URL": "http://x/v1"}, "RELAY_UPSTREAM_API_KEY is not set"),
        (
            {
                "RELAY_UPSTREAM_BASE_URL": "http://x/v1",
                "RELAY_UPSTREAM_API_KEY": "k",
                "RELAY_LEGACY_MAX_CHARS": "lots",
            },
            "RELAY_LEGACY_MAX_CHARS must be a number",
        ),
        (
            {
                "RELAY_UPSTREAM_BASE_URL": "http://x/v1",
                "RELAY_UPSTREAM_API_KEY": "k",
                "RELAY_MODEL_ALIASES": "gpt-4",
            },
            "RELAY_MODEL_ALIASES must look like",
        ),
        (
            {
                "RELAY_UPSTREAM_BASE_URL": "http://x/v1",
                "RELAY_UPSTREAM_API_KEY": "k",
                "RELAY_DEFAULT_COMPLETION_MODEL": " ",
            },
            "RELAY_DEFAULT_COMPLETION_MODEL must name a model",
        ),
    ],
)
def test_bad_config_is_one_sentence(tmp_path, env, phrase):
    env = {"RELAY_DATABASE": str(tmp_path / "x.sqlite"), **env}
    result = run([flask_bin(), "--app", "app", "keys", "list"], env)
    assert result.returncode != 0
    assert phrase in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.server
def test_gunicorn_refuses_to_start_with_one_sentence(tmp_path):
    port = free_port()
    server = RelayServer(tmp_path, {})
    result = run(
        ["/bin/sh", "-c", server.command()],
        {"PORT": str(port), "RELAY_DATABASE": str(tmp_path / "x.sqlite")},
    )
    assert result.returncode != 0
    assert "relay: RELAY_UPSTREAM_BASE_URL is not set" in result.stderr
    assert "Traceback" not in result.stderr


def test_defaults_and_env_conversion(tmp_path):
    settings = load_settings(
        str(tmp_path),
        environ={
            "RELAY_UPSTREAM_BASE_URL": "https://api.example.com/v1/",
            "RELAY_UPSTREAM_API_KEY": "k",
            "RELAY_DEFAULT_RPM": "60",
            "RELAY_STREAM_USAGE": "off",
        },
    )
    assert settings["UPSTREAM_BASE_URL"] == "https://api.example.com/v1"
    assert settings["DEFAULT_RPM"] == 60 and settings["STREAM_USAGE"] is False
    assert settings["LEGACY_MAX_CHARS"] == 2000
    assert settings["DATABASE"] == os.path.join(str(tmp_path), "relay.sqlite")
    # Only the old service's non-model name is an alias: gpt-4 means gpt-4.
    assert settings["MODEL_ALIASES"] == {"gpt-3.5": "gpt-3.5-turbo"}
    assert settings["DEFAULT_MODEL"] == "gpt-3.5"
    assert settings["DEFAULT_COMPLETION_MODEL"] == "gpt-3.5-turbo-instruct"


def test_client_timeouts_have_defaults_and_bounds(tmp_path):
    base = {"RELAY_UPSTREAM_BASE_URL": "http://x/v1", "RELAY_UPSTREAM_API_KEY": "k"}
    settings = load_settings(str(tmp_path), environ=base)
    assert (settings["CLIENT_HEADER_TIMEOUT"], settings["CLIENT_BODY_TIMEOUT"]) == (10.0, 60.0)
    settings = load_settings(str(tmp_path), environ={**base, "RELAY_CLIENT_BODY_TIMEOUT": "2.5"})
    assert settings["CLIENT_BODY_TIMEOUT"] == 2.5
    for name in ("RELAY_CLIENT_HEADER_TIMEOUT", "RELAY_CLIENT_BODY_TIMEOUT"):
        with pytest.raises(ConfigError, match=f"{name} must be at least 0.1"):
            load_settings(str(tmp_path), environ={**base, name: "0"})


def test_unwritable_database_is_a_config_error(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot be opened"):
        create_app(
            {
                "DATABASE": str(blocked / "relay.sqlite"),
                "UPSTREAM_BASE_URL": "http://x/v1",
                "UPSTREAM_API_KEY": "k",
            }
        )
