"""The upstream list: RELAY_UPSTREAM_* settings and `upstreams.toml`, read and checked.

Plain Python with no network imports, so gunicorn's master can check it before forking.
"""

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from relay.config import ConfigError, check_base_url


@dataclass
class Upstream:
    """One OpenAI-compatible endpoint with one or more API keys."""

    name: str
    base_url: str
    keys: list[str]
    models: set[str] = field(default_factory=set)
    prefixes: tuple[str, ...] = ()
    default: bool = False
    fallback: str | None = None
    stream_usage: bool = True


def load_upstreams(config: dict[str, Any]) -> list[Upstream]:
    """Build the upstream list from RELAY_UPSTREAM_* and/or the upstreams TOML file."""
    upstreams: list[Upstream] = []
    if config.get("UPSTREAMS_FILE"):
        upstreams.extend(_from_file(config["UPSTREAMS_FILE"], config))
    if config.get("UPSTREAM_BASE_URL") and not any(u.name == "default" for u in upstreams):
        keys = _split_keys(config.get("UPSTREAM_API_KEY"))
        if not keys:
            raise ConfigError("RELAY_UPSTREAM_API_KEY is not set.")
        upstreams.append(
            Upstream(
                name="default",
                base_url=config["UPSTREAM_BASE_URL"],
                keys=keys,
                default=not any(u.default for u in upstreams),
                stream_usage=config["STREAM_USAGE"],
            )
        )
    if not upstreams:
        raise ConfigError("No upstream is configured: set RELAY_UPSTREAM_BASE_URL.")
    if not any(u.default for u in upstreams):
        upstreams[0].default = True
    names = {u.name for u in upstreams}
    for upstream in upstreams:
        if upstream.fallback and upstream.fallback not in names:
            raise ConfigError(
                f"Upstream {upstream.name!r} falls back to {upstream.fallback!r}, "
                "which is not configured."
            )
    return upstreams


def _split_keys(value: object) -> list[str]:
    """Keys from a comma-separated setting."""
    return [k.strip() for k in str(value or "").split(",") if k.strip()]


def _from_file(path: str, config: dict[str, Any]) -> list[Upstream]:
    """Parse `[[upstream]]` tables from a TOML file."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"RELAY_UPSTREAMS_FILE {path} does not exist.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}.") from None
    upstreams: list[Upstream] = []
    for number, table in enumerate(data.get("upstream") or [], start=1):
        where = f"{path}, upstream #{number}"
        name = str(table.get("name") or f"upstream{number}")
        if "base_url" not in table:
            raise ConfigError(f"{where} has no base_url.")
        keys = list(table.get("keys") or [])
        if table.get("api_key"):
            keys.append(table["api_key"])
        for variable in table.get("keys_env") or []:
            keys.extend(_split_keys(os.environ.get(variable)))
        if not keys:
            raise ConfigError(f"{where} ({name}) has no keys (keys, api_key or keys_env).")
        upstreams.append(
            Upstream(
                name=name,
                base_url=check_base_url(f"{where} base_url", table["base_url"]),
                keys=[str(k) for k in keys],
                models=set(table.get("models") or []),
                prefixes=tuple(table.get("prefixes") or []),
                default=bool(table.get("default", False)),
                fallback=table.get("fallback"),
                stream_usage=bool(table.get("stream_usage", config["STREAM_USAGE"])),
            )
        )
    return upstreams
