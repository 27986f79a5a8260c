"""The Procfile's worker class: gunicorn's gevent worker, accepting new connections in batches."""

from gevent.server import StreamServer
from gunicorn.workers import ggevent

# Connections one worker may accept per wakeup of its listening socket.
ACCEPT_BATCH = 16


class BatchAcceptServer(StreamServer):
    """gevent's StreamServer that accepts up to ACCEPT_BATCH waiting connections at a time.

    With more than one worker gunicorn sets max_accept to 1, so a worker takes one
    new connection per turn of its event loop. With thousands of streams a turn
    takes 10-20 ms, so accepting stalled near 100 connections a second per worker
    while the kernel's backlog grew: new calls waited seconds before the relay even
    read them. Workers still share the load: the first to wake up accepts.
    """

    _max_accept = ACCEPT_BATCH

    @property
    def max_accept(self) -> int:
        """At least ACCEPT_BATCH, whatever gunicorn sets."""
        return self._max_accept

    @max_accept.setter
    def max_accept(self, value: int) -> None:
        self._max_accept = max(value, ACCEPT_BATCH)


class GeventWorker(ggevent.GeventWorker):
    """gunicorn's gevent worker with BatchAcceptServer listeners."""

    def run(self) -> None:
        """Serve as gunicorn does; its run() builds each listener's server by this module name."""
        ggevent.StreamServer = BatchAcceptServer
        super().run()
