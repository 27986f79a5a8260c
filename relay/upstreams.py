"""Which upstream serves a model, and which of its keys to use next (round robin with cool-down)."""

import itertools
import os
import threading
import time
import tomllib
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class Target:
    """One attempt: an upstream and the index of the key to use."""

    upstream: Upstream
    key_index: int

    @property
    def api_key(self):
        """The upstream API key of this attempt."""
        return self.upstream.keys[self.key_index]


def load_upstreams(config):
    """Build the upstream list from RELAY_UPSTREAM_* and/or the upstreams TOML file."""
    upstreams = []
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


def _split_keys(value):
    """Keys from a comma-separated setting."""
    return [k.strip() for k in str(value or "").split(",") if k.strip()]


def _from_file(path, config):
    """Parse `[[upstream]]` tables from a TOML file."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"RELAY_UPSTREAMS_FILE {path} does not exist.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}.") from None
    upstreams = []
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


class Router:
    """Chooses targets for a model: its upstream's keys in turn, then the fallback upstream.

    Keys that failed (401/429/5xx, no connection) rest for `cooldown` seconds. The
    state is per worker process: each worker learns about a bad key on its own.
    """

    def __init__(self, upstreams, cooldown=30.0):
        self.upstreams = upstreams
        self.by_name = {u.name: u for u in upstreams}
        self.default = next(u for u in upstreams if u.default)
        self.cooldown = cooldown
        self._resting = {}  # (upstream name, key index) -> monotonic time it may be used again
        self._turns = {u.name: itertools.count() for u in upstreams}
        self._lock = threading.Lock()

    def upstream_for(self, model):
        """The upstream configured for a model: exact name, then longest prefix, then default."""
        if model:
            for upstream in self.upstreams:
                if model in upstream.models:
                    return upstream
            best = None
            for upstream in self.upstreams:
                for prefix in upstream.prefixes:
                    if model.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
                        best = (prefix, upstream)
            if best:
                return best[1]
        return self.default

    def targets(self, model):
        """Every target worth trying for a model, best first (rested keys before resting ones)."""
        chain = []
        upstream = self.upstream_for(model)
        while upstream is not None and upstream not in chain:
            chain.append(upstream)
            upstream = self.by_name.get(upstream.fallback) if upstream.fallback else None
        now = time.monotonic()
        ready, resting = [], []
        for upstream in chain:
            with self._lock:
                start = next(self._turns[upstream.name])
            count = len(upstream.keys)
            for offset in range(count):
                index = (start + offset) % count
                until = self._resting.get((upstream.name, index), 0)
                (ready if until <= now else resting).append((until, Target(upstream, index)))
        resting.sort(key=lambda pair: pair[0])  # the one that rested longest goes first
        return [t for _, t in ready] + [t for _, t in resting]

    def rest(self, target):
        """Take a key out of rotation for the cool-down period."""
        self._resting[(target.upstream.name, target.key_index)] = time.monotonic() + self.cooldown

    def restore(self, target):
        """Put a key back into rotation after it worked."""
        self._resting.pop((target.upstream.name, target.key_index), None)
