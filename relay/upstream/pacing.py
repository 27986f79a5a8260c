"""Under CPU overload, streams wait a moment between reads so each wakeup relays more at once."""

import time
from typing import Any

import gevent

from relay.runtime import gevent_active

LAG_INTERVAL = 0.05  # how often the loop's lateness is sampled
LAG_THRESHOLD = 0.005  # lateness below this is an idle loop's noise: no pause at all
PAUSE_PER_LAG = 4.0  # pause = this times the lag, up to the configured maximum


class Pacer:
    """Measures how late this worker's gevent loop runs and turns that into a pause.

    Relaying an SSE event costs a wakeup, a read and a write whatever its size. When
    a worker has more events than CPU, every wakeup makes the loop later for all
    streams, and new calls wait longest for their first byte. Pausing a stream after
    each write lets the events that arrive meanwhile gather in the socket buffer, so
    the next read and write carry several: fewer wakeups exactly when the loop is
    late, and none of this while it keeps up (the pause is 0, nothing is delayed).
    The first byte of a stream is never paused.
    """

    def __init__(self, max_pause: float) -> None:
        self.max_pause = max_pause
        self.lag = 0.0
        self._sampler: Any = None

    def start(self) -> None:
        """Start sampling (once per worker); without gevent pausing stays off."""
        if self._sampler is not None or self.max_pause <= 0 or not gevent_active():
            return
        self._sampler = gevent.spawn(self._sample)

    def _sample(self) -> None:
        """Sleep a fixed interval and note how much later than asked the loop woke us."""
        while True:
            asked = time.monotonic()
            gevent.sleep(LAG_INTERVAL)
            late = time.monotonic() - asked - LAG_INTERVAL
            # Rise at once, fall gently: one quiet sample must not undo the relief.
            self.lag = late if late > self.lag else 0.7 * self.lag + 0.3 * late

    def pause(self) -> float:
        """Seconds a stream should wait before its next read (0 when the loop keeps up)."""
        if self.lag < LAG_THRESHOLD:
            return 0.0
        return min(self.max_pause, PAUSE_PER_LAG * self.lag)
