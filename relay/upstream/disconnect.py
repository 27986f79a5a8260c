"""Noticing at once when a streaming client hangs up, instead of at the next failed write."""

import logging
import socket
from collections.abc import Callable
from typing import Any

import gevent
from gevent.socket import wait_read

from relay.runtime import gevent_active

log = logging.getLogger("relay.disconnect")


def client_socket(environ: dict[str, Any]) -> socket.socket | None:
    """The client's socket, where the server exposes it (gunicorn's gevent workers do)."""
    return environ.get("gunicorn.socket") or environ.get("gunicorn.sock")


class DisconnectWatch:
    """Watches the client's socket in a greenlet and calls back when the client has gone.

    A WSGI app normally learns of a disconnect only when a write fails, one or two
    chunk intervals later; watching for EOF lets the relay close the upstream
    within milliseconds. Without gevent (tests' Flask client, other servers) it
    does nothing and the write failure path still applies.

    An EOF already there when the watch starts is a client that half-closed its side
    after sending the request (HTTP allows it; `nc -N`, some HTTP/1.0 clients), still
    reading: it is left alone, and a client that had in fact gone is noticed, as without
    the watch, when a write to it fails. An EOF that comes later is a hang-up.
    """

    def __init__(self, environ: dict[str, Any], on_disconnect: Callable[[], None]) -> None:
        self._greenlet: Any = None
        self.fired = False  # the client left and on_disconnect was called
        sock = client_socket(environ)
        if sock is None or not gevent_active():
            return
        self._greenlet = gevent.spawn(self._watch, sock, on_disconnect)

    def _watch(self, sock: socket.socket, on_disconnect: Callable[[], None]) -> None:
        """Wait until the socket is readable; EOF (or an error) then means the client left."""
        plain = getattr(sock, "_sock", sock)  # gevent's socket would wait; its own one won't
        try:
            if plain.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                return  # half-closed before we answered: not a hang-up
        except BlockingIOError:
            pass  # nothing to read: the usual case, wait for what comes
        except OSError:
            self._fire(on_disconnect)
            return
        try:
            wait_read(sock.fileno())
            data = sock.recv(1, socket.MSG_PEEK)
        except OSError:
            data = b""
        if not data:  # data would be a pipelined request: the client is still there
            self._fire(on_disconnect)

    def _fire(self, on_disconnect: Callable[[], None]) -> None:
        """Note the hang-up and call back."""
        self.fired = True
        on_disconnect()

    def stop(self) -> None:
        """Stop watching (the stream ended on its own)."""
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None
