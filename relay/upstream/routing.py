"""Which upstream serves a model, and which of its keys to use next (round robin with cool-down)."""

import itertools
import threading
import time
from dataclasses import dataclass

from relay.upstreams_file import Upstream


@dataclass(frozen=True)
class Target:
    """One attempt: an upstream and the index of the key to use."""

    upstream: Upstream
    key_index: int

    @property
    def api_key(self) -> str:
        """The upstream API key of this attempt."""
        return self.upstream.keys[self.key_index]


class Router:
    """Chooses targets for a model: its upstream's keys in turn, then the fallback upstream.

    Keys that failed (401/429/5xx, no connection) rest for `cooldown` seconds. The
    state is per worker process: each worker learns about a bad key on its own.
    """

    def __init__(self, upstreams: list[Upstream], cooldown: float = 30.0) -> None:
        self.upstreams = upstreams
        self.by_name = {u.name: u for u in upstreams}
        self.default = next(u for u in upstreams if u.default)
        self.cooldown = cooldown
        # (upstream name, key index) -> monotonic time it may be used again
        self._resting: dict[tuple[str, int], float] = {}
        self._turns = {u.name: itertools.count() for u in upstreams}
        self._lock = threading.Lock()

    def upstream_for(self, model: str | None) -> Upstream:
        """The upstream configured for a model: exact name, then longest prefix, then default."""
        if model:
            for upstream in self.upstreams:
                if model in upstream.models:
                    return upstream
            best: tuple[str, Upstream] | None = None
            for upstream in self.upstreams:
                for prefix in upstream.prefixes:
                    if model.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
                        best = (prefix, upstream)
            if best:
                return best[1]
        return self.default

    def targets(self, model: str | None) -> list[Target]:
        """Every target worth trying for a model, best first (rested keys before resting ones)."""
        chain: list[Upstream] = []
        upstream: Upstream | None = self.upstream_for(model)
        while upstream is not None and upstream not in chain:
            chain.append(upstream)
            upstream = self.by_name.get(upstream.fallback) if upstream.fallback else None
        now = time.monotonic()
        ready: list[tuple[float, Target]] = []
        resting: list[tuple[float, Target]] = []
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

    def rest(self, target: Target) -> None:
        """Take a key out of rotation for the cool-down period."""
        self._resting[(target.upstream.name, target.key_index)] = time.monotonic() + self.cooldown

    def restore(self, target: Target) -> None:
        """Put a key back into rotation after it worked."""
        self._resting.pop((target.upstream.name, target.key_index), None)
