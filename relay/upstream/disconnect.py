"""Noticing at once when a streaming client hangs up, instead of at the next failed write."""

import logging
import socket
from collections.abc import Callable
from typing import Any

import gevent

from relay.runtime import gevent_active

log = logging.getLogger("relay.disconnect")


def client_socket(environ: dict[str, Any]) -> socket.socket | None:
    """The client's socket, where the server exposes it (gunicorn's gevent workers do)."""
    return environ.get("gunicorn.socket") or environ.get("gunicorn.sock")


class DisconnectWatch:
    """Watches the client's socket from gevent's loop and calls back when the client has gone.

    A WSGI app normally learns of a disconnect only when a write fails, one or two
    chunk intervals later; watching for EOF lets the relay close the upstream
    within milliseconds. Without gevent (tests' Flask client, other servers) it
    does nothing and the write failure path still applies. The watch is an I/O watcher
    on the event loop, not a greenlet: nothing is spawned or switched to per call.

    An EOF already there when the watch starts is a client that half-closed its side
    after sending the request (HTTP allows it; `nc -N`, some HTTP/1.0 clients), still
    reading: it is left alone, and a client that had in fact gone is noticed, as without
    the watch, when a write to it fails. An EOF that comes later is a hang-up.
    """

    __slots__ = ("_on_disconnect", "_plain", "_watcher", "fired")

    def __init__(self, environ: dict[str, Any], on_disconnect: Callable[[], None]) -> None:
        self._watcher: Any = None
        self.fired = False  # the client left and on_disconnect was called
        sock = client_socket(environ)
        if sock is None or not gevent_active():
            return
        # gevent's socket would wait for data; its own socket answers at once.
        self._plain = getattr(sock, "_sock", sock)
        self._on_disconnect = on_disconnect
        state = self._peek()
        if state is not None:  # data (a pipelined request) or an EOF already: no watch
            if state == "gone":
                self._fire()
            return
        self._watcher = gevent.get_hub().loop.io(sock.fileno(), 1)  # 1: readable
        self._watcher.start(self._readable)

    def _peek(self) -> str | None:
        """None while nothing is readable; "data", "eof" (half-closed), or "gone" (error)."""
        try:
            data = self._plain.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError:
            return "gone"
        return "data" if data else "eof"

    def _readable(self) -> None:
        """In the event loop: the socket became readable; EOF or an error means a hang-up
        (data would be a pipelined request: the client is still there)."""
        state = self._peek()
        if state is None:
            return  # woken for nothing: keep watching
        self.stop()
        if state != "data":
            try:
                self._fire()
            except Exception:  # the loop must go on whatever the callback does
                log.exception("disconnect callback failed")

    def _fire(self) -> None:
        """Note the hang-up and call back."""
        self.fired = True
        self._on_disconnect()

    def stop(self) -> None:
        """Stop watching (the call ended on its own)."""
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
