"""Load and check the relay's configuration: defaults, instance file, RELAY_* environment, tests."""

import os
import runpy
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import dotenv

from relay import i18n, metering
from relay.endpoints import parse_groups
from relay.metering import PriceTable

if TYPE_CHECKING:  # typing only: gunicorn's master imports this module without Flask
    from flask import Flask

ENV_PREFIX = "RELAY"
SECRET_FILE = "secret_key"  # noqa: S105 - a file name: the secret is made into it, in instance/
MIB = 1024 * 1024
POSTGRES_SCHEMES = ("postgresql", "postgres")
POSTGRES_SPOOL = "relay-postgres.spool.jsonl"

# Every setting the relay reads, with its default. README.md documents each one.
DEFAULTS = {
    "UPSTREAM_BASE_URL": None,
    "UPSTREAM_API_KEY": None,
    "UPSTREAMS_FILE": None,  # default: instance/upstreams.toml when it exists
    "DATABASE": None,  # default: instance/relay.sqlite; or postgresql://user:pass@host/db
    "SPOOL_FILE": None,  # default: <database>.spool.jsonl, instance/relay-postgres.spool.jsonl
    "ADMIN_TOKEN": None,
    # Only the old service's non-model name: real names (gpt-4…) mean what they say.
    "MODEL_ALIASES": "gpt-3.5=gpt-3.5-turbo",
    "DEFAULT_MODEL": "gpt-3.5",  # legacy chat calls without a model
    "DEFAULT_COMPLETION_MODEL": "gpt-3.5-turbo-instruct",  # legacy `completions` without one
    "RATELIMIT_STORAGE_URI": None,  # default: sqlite:///instance/ratelimit.sqlite
    "RATELIMIT_STRATEGY": "fixed-window",
    "RATELIMIT_STORAGE_TIMEOUT": 0.25,  # seconds Redis may take before limits fail open
    "LEASE_SECONDS": 60.0,  # a calls-at-once lease outlives its holder by at most this
    "DEFAULT_RPM": None,
    "DEFAULT_TPM": None,
    "DEFAULT_MAX_CONCURRENT": None,
    "GLOBAL_RPM": None,
    "UNAUTHENTICATED_RPM": 60,
    "AUTH_BLOCK_SECONDS": 600.0,  # how long an address past UNAUTHENTICATED_RPM waits
    "PROXY_COUNT": 0,
    "LEGACY_MAX_CHARS": 2000,
    "MAX_BODY_BYTES": 32 * MIB,
    "KEYLESS_MAX_BODY_BYTES": 1 * MIB,  # a body read only to look for the key in it
    "MAX_REPLY_BYTES": 64 * MIB,  # a whole (non-stream) upstream reply, after decompression
    "UPSTREAM_CONNECT_TIMEOUT": 5.0,
    "UPSTREAM_READ_TIMEOUT": 120.0,
    "UPSTREAM_RETRIES": 2,
    "UPSTREAM_RETRY_BUDGET": 15.0,
    "UPSTREAM_COOLDOWN": 30.0,
    "UPSTREAM_POOL_SIZE": 4096,
    "STREAM_USAGE": True,
    "STREAM_MAX_PAUSE": 0.25,  # seconds; 0 turns load-adaptive pacing of streams off
    "PRICES": None,  # "model=prompt_per_1k:completion_per_1k,..." for money budgets
    "TOKENS_PER_MONEY": 500000.0,  # a token quota's charge per 1.0 of a unit-priced call
    "RESERVE_COMPLETION_TOKENS": 1000,  # reserved for the answer of a call without max_tokens
    "METRICS": True,
    "DB_WRITE_TIMEOUT": 30.0,
    "GRACEFUL_TIMEOUT": 300,  # seconds a stop or reload lets running calls finish
    "CLIENT_HEADER_TIMEOUT": 10.0,  # seconds a new connection has to send its request head
    "CLIENT_BODY_TIMEOUT": 60.0,  # seconds a request body has to arrive in full
    "SECRET_KEY": None,  # signs admin sessions; default: random, kept in instance/secret_key
    "SESSION_COOKIE_SECURE": False,  # Flask's own setting: on when served over HTTPS
    "LOG_LEVEL": "INFO",
    "OPEN_ENDPOINTS": "",  # account-wide endpoint groups open to every key (endpoints.py)
    "LANGUAGE": None,  # the pages' language for everyone; default: each browser's choice
    "LEGACY_LANGUAGE": "zh",  # the legacy face's `msg` on failures: the old services' language
}

INT_SETTINGS = {
    "DEFAULT_RPM": (1, None),
    "DEFAULT_TPM": (1, None),
    "DEFAULT_MAX_CONCURRENT": (1, None),
    "GLOBAL_RPM": (1, None),
    "UNAUTHENTICATED_RPM": (0, None),
    "PROXY_COUNT": (0, 10),
    "LEGACY_MAX_CHARS": (0, None),
    "MAX_BODY_BYTES": (1024, None),
    "KEYLESS_MAX_BODY_BYTES": (1024, None),
    "MAX_REPLY_BYTES": (65536, None),
    "UPSTREAM_RETRIES": (0, 10),
    "UPSTREAM_POOL_SIZE": (1, None),
    "RESERVE_COMPLETION_TOKENS": (0, None),
    "GRACEFUL_TIMEOUT": (1, 86400),
}
FLOAT_SETTINGS = {
    "RATELIMIT_STORAGE_TIMEOUT": (0.01, 30.0),
    "LEASE_SECONDS": (1.0, 86400.0),
    "UPSTREAM_CONNECT_TIMEOUT": (0.05, 600.0),
    "UPSTREAM_READ_TIMEOUT": (0.05, 3600.0),
    "UPSTREAM_RETRY_BUDGET": (0.0, 3600.0),
    "UPSTREAM_COOLDOWN": (0.0, 86400.0),
    "DB_WRITE_TIMEOUT": (0.1, 3600.0),
    "CLIENT_HEADER_TIMEOUT": (0.1, 600.0),
    "CLIENT_BODY_TIMEOUT": (0.1, 3600.0),
    "STREAM_MAX_PAUSE": (0.0, 5.0),
    "TOKENS_PER_MONEY": (0.0, 1e12),
    "AUTH_BLOCK_SECONDS": (1.0, 86400.0 * 7),
}
BOOL_SETTINGS = ("STREAM_USAGE", "METRICS", "SESSION_COOKIE_SECURE")
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


class ConfigError(Exception):
    """A setting is missing or invalid; the message is one sentence for the operator."""


def load_dotenv_file(path: str = ".env") -> None:
    """Load `.env` from the working directory into os.environ, never overriding real variables."""
    if os.path.isfile(path):
        dotenv.load_dotenv(path, override=False)


def default_instance_path() -> str:
    """`instance/` beside the `relay` package, as Flask computes it for the app."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "instance")


def load_settings(
    instance_path: str,
    test_config: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Settings from defaults, instance/config.py, RELAY_* variables and test overrides, checked.

    Plain dict work with no Flask import, so gunicorn's master can check the
    configuration before forking without importing ssl ahead of gevent's patching.
    """
    settings: dict[str, Any] = dict(DEFAULTS)
    if test_config is None:
        instance_file = os.path.join(instance_path, "config.py")
        if os.path.isfile(instance_file):
            values = runpy.run_path(instance_file)
            settings.update({k: v for k, v in values.items() if k.isupper()})
        load_dotenv_file()
    environ = os.environ if environ is None else environ
    prefix = ENV_PREFIX + "_"
    for name, value in environ.items():
        if name.startswith(prefix):
            settings[name[len(prefix) :]] = value
    if test_config is not None:
        settings.update(test_config)
    check(settings, instance_path)
    return settings


def configure(app: "Flask", test_config: Mapping[str, Any] | None = None) -> None:
    """Fill app.config with the checked settings."""
    app.config.update(load_settings(app.instance_path, test_config))


def check(config: dict[str, Any], instance_path: str) -> None:
    """Convert and validate every setting in place; raise ConfigError with one clear sentence."""
    for name, (int_low, int_high) in INT_SETTINGS.items():
        config[name] = _as_number(name, config[name], int, int_low, int_high)
    for name, (low, high) in FLOAT_SETTINGS.items():
        config[name] = _as_number(name, config[name], float, low, high)
    for name in BOOL_SETTINGS:
        config[name] = _as_bool(name, config[name])
    config["DEFAULT_MODEL"] = _model_name("DEFAULT_MODEL", config["DEFAULT_MODEL"])
    config["DEFAULT_COMPLETION_MODEL"] = _model_name(
        "DEFAULT_COMPLETION_MODEL", config["DEFAULT_COMPLETION_MODEL"]
    )
    config["LANGUAGE"] = _language("LANGUAGE", config["LANGUAGE"], optional=True)
    config["LEGACY_LANGUAGE"] = _language("LEGACY_LANGUAGE", config["LEGACY_LANGUAGE"])
    if not config["DATABASE"]:
        config["DATABASE"] = os.path.join(instance_path, "relay.sqlite")
    config["SPOOL_FILE"] = config["SPOOL_FILE"] or default_spool_file(
        str(config["DATABASE"]), instance_path
    )
    if not config["RATELIMIT_STORAGE_URI"]:
        path = os.path.join(instance_path, "ratelimit.sqlite")
        config["RATELIMIT_STORAGE_URI"] = f"sqlite:///{os.path.abspath(path)}"
    if not config["UPSTREAMS_FILE"]:
        default_file = os.path.join(instance_path, "upstreams.toml")
        config["UPSTREAMS_FILE"] = default_file if os.path.isfile(default_file) else None
    _parse_tables(config)
    if config["RATELIMIT_STRATEGY"] not in ("fixed-window", "moving-window"):
        raise ConfigError(
            "RELAY_RATELIMIT_STRATEGY must be fixed-window or moving-window, "
            f"not {config['RATELIMIT_STRATEGY']!r}."
        )
    if config["UPSTREAM_BASE_URL"]:
        config["UPSTREAM_BASE_URL"] = check_base_url(
            "RELAY_UPSTREAM_BASE_URL", config["UPSTREAM_BASE_URL"]
        )
    if not config["UPSTREAMS_FILE"]:
        if not config["UPSTREAM_BASE_URL"]:
            raise ConfigError(
                "RELAY_UPSTREAM_BASE_URL is not set: put it (and RELAY_UPSTREAM_API_KEY) in .env, "
                "e.g. RELAY_UPSTREAM_BASE_URL=https://api.openai.com/v1, or run `make run` "
                "to try the relay against its demo upstream."
            )
        if not config["UPSTREAM_API_KEY"]:
            raise ConfigError(
                "RELAY_UPSTREAM_API_KEY is not set: put your upstream account's API key in .env."
            )
    if not config["SECRET_KEY"]:
        config["SECRET_KEY"] = instance_secret(instance_path)


def is_postgres_url(target: str) -> bool:
    """Whether RELAY_DATABASE names a PostgreSQL database (`postgresql://…`) or a SQLite file."""
    scheme, sep, _ = target.partition("://")
    if sep and scheme.lower() not in POSTGRES_SCHEMES:
        raise ConfigError(
            f"RELAY_DATABASE must be a SQLite file path or a postgresql:// URL, not {scheme}://…."
        )
    return bool(sep)


def default_spool_file(database: str, instance_path: str) -> str:
    """Where usage rows wait while the database refuses them: beside a SQLite file, or
    instance/relay-postgres.spool.jsonl for PostgreSQL (each machine keeps its own)."""
    if is_postgres_url(database):
        return os.path.join(instance_path, POSTGRES_SPOOL)
    return database + ".spool.jsonl"


def _parse_tables(config: dict[str, Any]) -> None:
    """The settings written as lists: aliases, prices, open endpoint groups."""
    config["MODEL_ALIASES"] = parse_aliases(config["MODEL_ALIASES"])
    config["PRICES"] = parse_prices(config["PRICES"])
    try:
        config["OPEN_ENDPOINTS"] = parse_groups(config["OPEN_ENDPOINTS"], "RELAY_OPEN_ENDPOINTS")
    except ValueError as exc:
        raise ConfigError(f"{exc}.") from None


def instance_secret(instance_path: str) -> str:
    """The secret that signs admin sessions when RELAY_SECRET_KEY is unset: random, made once
    into instance/secret_key (0600) and shared by every worker and restart.

    Never derived from the admin token: a session cookie any visitor gets would then let
    the token be guessed offline.
    """
    path = os.path.join(instance_path, SECRET_FILE)
    try:
        os.makedirs(instance_path, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # made before, or by a sibling worker just now
        else:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(secrets.token_hex(32))
        for _ in range(100):  # a sibling that just created it may still be writing it
            with open(path, encoding="ascii") as handle:
                secret = handle.read().strip()
            if len(secret) == 64:
                return secret
            time.sleep(0.01)
    except OSError as exc:
        raise ConfigError(
            f"RELAY_SECRET_KEY is not set and {path} cannot be made ({exc.strerror}): "
            "set RELAY_SECRET_KEY or let the relay write to instance/."
        ) from None
    raise ConfigError(f"{path} does not hold a secret; delete it and start again.")


def check_base_url(name: str, value: object) -> str:
    """Return an http(s) base URL without its trailing slash, or raise ConfigError."""
    parts = urlsplit(str(value).strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{name} must be an http(s) URL such as https://api.openai.com/v1, not {value!r}."
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"{name} must not carry a query string or fragment.")
    if not str(value).isascii():
        raise ConfigError(f"{name} must be ASCII (write an international host name in punycode).")
    return str(value).strip().rstrip("/")


def parse_aliases(value: object) -> dict[str, str]:
    """Parse `alias=model,alias2=model2` (or a dict) into a dict; ConfigError when malformed."""
    if isinstance(value, dict):
        return {str(k).strip(): str(v).strip() for k, v in value.items()}
    aliases = {}
    for item in str(value or "").split(","):
        if not item.strip():
            continue
        alias, sep, model = item.partition("=")
        if not sep or not alias.strip() or not model.strip():
            raise ConfigError(
                f"RELAY_MODEL_ALIASES must look like gpt-3.5=gpt-3.5-turbo,fast=gpt-4o-mini; "
                f"{item.strip()!r} has no '=' between an alias and a model."
            )
        aliases[alias.strip()] = model.strip()
    return aliases


def parse_prices(value: object) -> PriceTable:
    """Parse RELAY_PRICES (see metering.parse_prices); ConfigError in one sentence when bad."""
    try:
        return metering.parse_prices(value)
    except ValueError as exc:
        raise ConfigError(
            "RELAY_PRICES must look like gpt-4o=0.0025:0.01 (per 1000 tokens) or "
            f"dall-e-3@hd=0.08/image (per image, second or character); {exc} is not."
        ) from None


def _as_number(
    name: str, value: Any, kind: type[int] | type[float], low: float, high: float | None
) -> int | float | None:
    """Convert one numeric setting, keeping None for unset optional limits."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        if DEFAULTS[name] is None:
            return None
        value = DEFAULTS[name]
    try:
        number = kind(str(value).strip()) if not isinstance(value, int | float) else kind(value)
    except ValueError:
        raise ConfigError(f"RELAY_{name} must be a number, not {value!r}.") from None
    if number < low or (high is not None and number > high):
        upper = f" and at most {high}" if high is not None else ""
        raise ConfigError(f"RELAY_{name} must be at least {low}{upper}, not {value!r}.")
    return number


def _model_name(name: str, value: object) -> str:
    """A setting that names a model: a non-empty string."""
    model = str(value or "").strip()
    if not model:
        raise ConfigError(f"RELAY_{name} must name a model, e.g. {DEFAULTS[name]}.")
    return model


def _language(name: str, value: object, optional: bool = False) -> str | None:
    """A setting naming one of the relay's languages (en, zh); None for an unset optional one."""
    if optional and (value is None or not str(value).strip()):
        return None
    chosen = i18n.language(value)
    if chosen is None:
        spelled = " or ".join(i18n.LANGUAGES)
        raise ConfigError(
            f"RELAY_{name} must be {spelled} (zh is Simplified Chinese), not {value!r}."
        )
    return chosen


def _as_bool(name: str, value: object) -> bool:
    """Convert on/off style settings to bool."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"RELAY_{name} must be on or off, not {value!r}.")
