"""Noticing at once when a streaming client hangs up, instead of at the next failed write."""

import logging
import socket

log = logging.getLogger("relay.disconnect")


def gevent_active():
    """Whether this process runs under gevent's monkey patching (gunicorn -k gevent)."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return False
    return monkey.is_module_patched("socket")


def client_socket(environ):
    """The client's socket, where the server exposes it (gunicorn's gevent workers do)."""
    return environ.get("gunicorn.socket") or environ.get("gunicorn.sock")


class DisconnectWatch:
    """Watches the client's socket in a greenlet and calls back when the client has gone.

    A WSGI app normally learns of a disconnect only when a write fails, one or two
    chunk intervals later; watching for EOF lets the relay close the upstream
    within milliseconds. Without gevent (tests' Flask client, other servers) it
    does nothing and the write failure path still applies.
    """

    def __init__(self, environ, on_disconnect):
        self._greenlet = None
        sock = client_socket(environ)
        if sock is None or not gevent_active():
            return
        import gevent

        self._greenlet = gevent.spawn(self._watch, sock, on_disconnect)

    @staticmethod
    def _watch(sock, on_disconnect):
        """Wait until the socket is readable; EOF (or an error) means the client left."""
        from gevent.socket import wait_read

        try:
            wait_read(sock.fileno())
            data = sock.recv(1, socket.MSG_PEEK)
        except OSError:
            data = b""
        if not data:  # data would be a pipelined request: the client is still there
            on_disconnect()

    def stop(self):
        """Stop watching (the stream ended on its own)."""
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None
