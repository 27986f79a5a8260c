"""The per-process objects every request shares: config, store, upstreams, limits, metrics."""

import logging
from collections.abc import Callable
from typing import Any, Protocol

from flask import current_app

from relay.call import Call
from relay.limits import Limits
from relay.metering import measure_units
from relay.store import Store
from relay.upstream import Upstreams

log = logging.getLogger("relay")
EXTENSION = "relay"


class CallObserver(Protocol):
    """Watches calls without changing them (the metrics)."""

    def stream_opened(self, call: Call) -> None:
        """A streamed reply started."""

    def observe(self, call: Call) -> None:
        """A call completed."""


class RelayState:
    """Built complete by create_app, once per app; reached through `state()` during requests."""

    def __init__(
        self,
        config: dict[str, Any],
        store: Store,
        upstreams: Upstreams,
        limits: Limits,
        metrics: CallObserver | None,
    ) -> None:
        self.config = config
        self.store = store
        self.upstreams = upstreams
        self.limits = limits
        self.metrics = metrics  # None when RELAY_METRICS=off

    def stream_opened(self, call: Call) -> None:
        """A streamed reply started: the open-streams gauge goes up until the call completes."""
        if self.metrics is not None:
            self.metrics.stream_opened(call)

    def progress(self, call: Call, completion_estimate: int) -> None:
        """A stream got this far: noted in its in-flight row."""
        self.store.progress(call, completion_estimate)

    def complete(self, call: Call) -> None:
        """Finish a call once: its usage row, its limits' release, its metrics."""
        if call.completed:
            return
        call.completed = True
        measure_units(call, None)  # unit-priced replies that were not JSON (speech, text)
        self.store.record(call)
        _quietly(self.limits.finish, call)
        if self.metrics is not None:
            _quietly(self.metrics.observe, call)

    def close(self) -> None:
        """Close what this process holds open: upstream connections and database files."""
        self.upstreams.close()
        self.store.close()
        self.limits.close()


def _quietly(step: Callable[[Call], None], call: Call) -> None:
    """Run one finishing step; a limits or metrics hiccup must not lose the reply."""
    try:
        step(call)
    except Exception:
        log.exception("finishing a call failed in %s", getattr(step, "__qualname__", step))


def state() -> RelayState:
    """The current app's RelayState."""
    relay_state: RelayState = current_app.extensions[EXTENSION]
    return relay_state
