"""The upstream layer: routing calls to upstreams, the HTTP client, and relaying their replies.

`Upstreams` is the layer's one entry point. Only this package talks HTTP to upstreams
(through requests, with the adapter of adapter.py, the only module importing urllib3) or
touches gevent's sockets.
"""

from collections.abc import Callable, Iterable
from typing import Any

from relay.call import Call
from relay.upstream.client import get, make_adapter
from relay.upstream.forwarding import CallSink, forward
from relay.upstream.models import models_union
from relay.upstream.pacing import Pacer
from relay.upstream.replies import Relayed
from relay.upstream.routing import Router
from relay.upstreams_file import load_upstreams

__all__ = ["CallSink", "Relayed", "Upstreams"]


class Upstreams:
    """Every configured upstream, the requests adapter pooling connections to them, the pacer."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.router = Router(load_upstreams(config), cooldown=config["UPSTREAM_COOLDOWN"])
        self.http = make_adapter(config["UPSTREAM_POOL_SIZE"])
        self.pacer = Pacer(config["STREAM_MAX_PAUSE"])

    @property
    def single(self) -> bool:
        """Whether there is only one upstream (its /models can be forwarded as it is)."""
        return len(self.router.upstreams) == 1

    def forward(
        self,
        call: Call,
        client_headers: Iterable[tuple[str, str]],
        environ: dict[str, Any],
        sink: CallSink,
    ) -> Relayed:
        """Send a call to its upstream (retrying other keys before a reply starts)."""
        return forward(self, call, client_headers, environ, sink)

    def models(self, allows: Callable[[str], bool], aliases: dict[str, str]) -> bytes:
        """The union of every upstream's models that the caller may use, as a JSON list."""
        return models_union(self, allows, aliases)

    def check(self) -> list[tuple[str, str]]:
        """Call GET /models with every key of every upstream: (label, "ok" or what failed)."""
        timeout = (
            self.config["UPSTREAM_CONNECT_TIMEOUT"],
            min(self.config["UPSTREAM_READ_TIMEOUT"], 30),
        )
        results = []
        for upstream in self.router.upstreams:
            for index, key in enumerate(upstream.keys):
                label = f"{upstream.name} key #{index + 1}"
                try:
                    url = f"{upstream.base_url}/models"
                    status, _ = get(self.http, url, {"Authorization": f"Bearer {key}"}, timeout)
                except Exception as exc:  # noqa: BLE001 - report any failure as a line
                    results.append((label, f"unreachable ({type(exc).__name__})"))
                    continue
                results.append((label, "ok" if status == 200 else f"HTTP {status}"))
        return results

    def close(self) -> None:
        """Close pooled connections (tests, CLI)."""
        self.http.close()
