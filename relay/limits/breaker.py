"""Failing open: while the limits storage fails, calls go on without limits, briefly and visibly.

Limits protect the upstream account; an outage of the relay would hurt it more. So when
the storage (Redis, or the SQLite file) errors or times out, the check or update is
skipped as if nothing had been counted yet. After a failure the storage is left alone
for RETRY_SECONDS, so a hung server costs each worker one timeout per interval rather
than one per call; the next operation then probes it, and the first answer closes the
breaker again: limits apply at once. Every operation not applied is counted (hooks: the
`relay_limits_unavailable_total` metric), and a warning is logged at most once a minute.
"""

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("relay.limits")
T = TypeVar("T")
RETRY_SECONDS = 1.0  # a failed storage is skipped this long before the next call probes it
WARN_SECONDS = 60.0  # at most one "unavailable" warning per process and minute
Errors = type[BaseException] | tuple[type[BaseException], ...]


class Breaker:
    """Decides whether to try the limits storage now, and notes how each try went."""

    def __init__(
        self,
        retry_seconds: float = RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.retry_seconds = retry_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._open = False  # the last try failed: skipping until _skip_until, then probing
        self._skip_until = 0.0
        self._warned_at: float | None = None
        self._recovery_unsaid = False  # a warning went out; say once when it is over
        self._missed = 0  # operations not applied since the last warning
        self._hooks: list[Callable[[], None]] = []

    def on_unavailable(self, hook: Callable[[], None]) -> None:
        """Call `hook()` for every limits operation not applied (the metrics counter)."""
        self._hooks.append(hook)

    @property
    def degraded(self) -> bool:
        """Whether the last try of the storage failed (limits are not being applied)."""
        return self._open

    def run(self, operation: Callable[[], T], fallback: T, errors: Errors) -> T:
        """`operation()`; `fallback` while the storage is skipped or when it raises `errors`."""
        if not self.should_try():
            self.skipped()
            return fallback
        try:
            result = operation()
        except errors as exc:
            self.failed(f"{type(exc).__name__}: {exc}")
            return fallback
        self.succeeded()
        return result

    def should_try(self) -> bool:
        """True when closed, or when open and due a probe (the others skip meanwhile)."""
        if not self._open:
            return True
        with self._lock:
            now = self._clock()
            if now < self._skip_until:
                return False
            # This caller probes; whoever comes during its wait keeps skipping.
            self._skip_until = now + self.retry_seconds
            return True

    def skipped(self) -> None:
        """An operation was not tried because the storage failed a moment ago."""
        with self._lock:
            self._missed += 1
        self._notify()

    def failed(self, reason: str, counted: bool = True) -> None:
        """The storage failed (`counted`: an operation went unapplied, not just a probe)."""
        with self._lock:
            now = self._clock()
            self._open = True
            self._skip_until = now + self.retry_seconds
            self._missed += int(counted)
            due = self._warned_at is None or now - self._warned_at >= WARN_SECONDS
            if due:
                self._warned_at, missed, self._missed = now, self._missed, 0
                self._recovery_unsaid = True
        if due:
            log.warning(
                "limits storage is unavailable (%s): calls go on without rate, token-rate "
                "and concurrency limits until it answers, tried again every %g s "
                "(%d limit operations not applied since the last warning)",
                reason,
                self.retry_seconds,
                missed,
            )
        if counted:
            self._notify()

    def succeeded(self) -> None:
        """The storage answered: close the breaker."""
        if not self._open:
            return
        with self._lock:
            self._open = False
            self._skip_until = 0.0
            say, self._recovery_unsaid = self._recovery_unsaid, False
        if say:
            log.info("limits storage answers again: limits apply again")

    def _notify(self) -> None:
        """Tell the hooks one operation was not applied."""
        for hook in self._hooks:
            hook()
