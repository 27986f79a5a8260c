"""The Procfile's worker class: gunicorn's gevent worker with batched accepts and client guards."""

import socket
import weakref
from datetime import datetime
from typing import TYPE_CHECKING, Any

import gevent
from gevent.server import StreamServer
from gunicorn import util
from gunicorn.http import wsgi
from gunicorn.http.message import Request
from gunicorn.http.wsgi import Response, default_environ
from gunicorn.workers import ggevent

from relay.serve.one_write import OneWriteResponse
from relay.serve.refusals import BODY_ERRORS, HeadTimeout, Refusal, refusal_for

if TYPE_CHECKING:
    from relay.serve.client_guard import ClientGuard

# Connections one worker may accept per wakeup of its listening socket.
ACCEPT_BATCH = 16
# Streams still running this long before the graceful timeout are ended by the relay itself,
# with an error event and a usage row, instead of being killed mid-event by gunicorn.
CUT_MARGIN = 3.0
# After a refusal, what of the client's request is still read and dropped before closing.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024


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
    """gunicorn's gevent worker with BatchAcceptServer listeners and deadlines on clients.

    A new connection has RELAY_CLIENT_HEADER_TIMEOUT to send its request head (then a 408);
    between requests gunicorn's keepalive bounds the wait, as before. A request body has
    RELAY_CLIENT_BODY_TIMEOUT to arrive (client_guard.GuardedBody). Whatever gunicorn
    refuses itself is answered in OpenAI's JSON error shape instead of its HTML page.
    """

    guard: "ClientGuard"  # set by load_wsgi, before the worker serves anything

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The greenlets of connections that have had a request: their next head is a
        # keep-alive wait, bounded by gunicorn's keepalive rather than the header timeout.
        self._served: weakref.WeakSet[Any] = weakref.WeakSet()

    def run(self) -> None:
        """Serve as gunicorn does; its run() builds each listener's server by this module name."""
        ggevent.StreamServer = BatchAcceptServer
        wsgi.Response = OneWriteResponse  # what wsgi.create builds for HTTP/1 requests
        gevent.spawn(self._end_streams_before_the_kill)
        super().run()

    def _end_streams_before_the_kill(self) -> None:
        """On a graceful stop (or reload), let streams run on; just before gunicorn's graceful
        timeout kills what is left, end those streams with an error event and a row."""
        while self.alive:
            gevent.sleep(0.5)
        timeout = float(self.cfg.graceful_timeout)
        gevent.sleep(max(timeout - min(CUT_MARGIN, timeout / 2), 0.0))
        # Imported here: gunicorn's master imports this module before workers patch ssl.
        from relay.upstream.streaming import cut_all  # noqa: PLC0415

        if ended := cut_all():
            self.log.warning("ended %d streams at the graceful timeout (pid:%s)", ended, self.pid)

    def load_wsgi(self) -> None:
        """Load the app, then take the client deadlines from its settings."""
        super().load_wsgi()
        # Imported here, in the worker: client_guard imports Flask, and gunicorn's master
        # imports this module (to find the worker class) before any worker patches.
        from relay.serve.client_guard import ClientGuard  # noqa: PLC0415

        self.guard = ClientGuard(self.wsgi)

    def timeout_ctx(self) -> Any:
        """The bound on reading the next request head of the current connection."""
        if gevent.getcurrent() in self._served:
            return super().timeout_ctx()
        return self.guard.head_deadline()

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        """Serve one request with its body under the body deadline."""
        self._served.add(gevent.getcurrent())
        body = self.guard.guard_body(req)
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            self.guard.release(req, body)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """Answer what gunicorn refused in OpenAI's JSON error shape (gunicorn's is HTML)."""
        started = datetime.now()
        addr = addr or ("", -1)  # a unix socket's peer has no address
        ip = addr[0]
        if isinstance(exc, BODY_ERRORS):
            # gunicorn was draining a body the app left unread: its reply has gone out.
            self.log.debug("closing a connection whose unread body was malformed: %s", ip)
            return
        refusal = refusal_for(exc)
        if isinstance(exc, HeadTimeout):
            self.log.debug("request head from %s timed out", ip)
        elif refusal.client_error:
            # One line, no traceback and none of the client's bytes (they may hold a key).
            name = type(exc).__name__
            self.log.info("refused a request from %s: %s %s", ip, refusal.status, name)
        else:
            self.log.exception("Error handling request")
        parsed = getattr(exc, "req", None)  # a request refused for its headers comes with it
        if req is None and isinstance(parsed, Request):
            req = parsed
        path = req.path if isinstance(req, Request) else None
        data = self.guard.reply(refusal, path)
        try:
            util.write_nonblock(client, data)
            if not isinstance(exc, HeadTimeout):  # its slot is freed at once
                _linger(client)
        except OSError:
            self.log.debug("Failed to send error message.")
        if isinstance(req, Request):
            self._log_access(req, client, addr, refusal, len(data), started)

    def _log_access(
        self, req: Any, client: Any, addr: Any, refusal: Refusal, size: int, started: datetime
    ) -> None:
        """The access-log line gunicorn writes for a request it refused."""
        environ = default_environ(req, client, self.cfg)
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = addr[0], str(addr[1])
        resp = Response(req, client, self.cfg)
        resp.status = f"{refusal.status} {refusal.reason}"
        resp.response_length = size
        self.log.access(resp, req, environ, datetime.now() - started)


def _linger(client: Any) -> None:
    """Let the client read a refusal before the connection closes.

    gunicorn refuses a request before reading all of it (a request line over its limit,
    a body behind broken framing); closing a socket with unread input sends a reset,
    which can destroy the reply on its way. So: send FIN after the reply, then read and
    drop what still comes, for a bounded time and amount.
    """
    client.shutdown(socket.SHUT_WR)
    dropped = 0
    with gevent.Timeout(LINGER_SECONDS, False):
        while dropped < LINGER_BYTES:
            data = client.recv(64 * 1024)
            if not data:
                break
            dropped += len(data)
