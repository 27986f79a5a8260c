"""One gevent worker's guard over its clients: head and body deadlines, and JSON refusals.

The worker imports this module once it has loaded the app (it imports Flask, which
gunicorn's master, importing the worker class, has no use for).
"""

import json
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import gevent
from gunicorn.http import errors as http_errors

from relay.config import DEFAULTS
from relay.errors import SHAPER, ErrorShaper, InvalidRequest, RelayError, RequestTimeout, error_body
from relay.i18n import Text
from relay.serve.refusals import HeadTimeout, Refusal


class GuardedBody:
    """gunicorn's request body read against a deadline, its parse errors the relay's own.

    The clock starts at the first read: the whole body must arrive within the timeout. A
    late body raises RequestTimeout (408) and a malformed chunked one InvalidRequest (400)
    into the app, which answers them in its face's shape. Either way the request is marked
    to close: where the next request would start on its connection is unknown.
    """

    def __init__(self, req: Any, timeout: float) -> None:
        self._req = req
        self._body = req.body
        self._timeout = timeout
        self._deadline: float | None = None
        # Off once the app has answered (release): a read through a guard still held
        # somewhere then goes straight to gunicorn's body, without the relay's errors.
        self.armed = True

    @property
    def raw(self) -> Any:
        """gunicorn's own body, which this guards."""
        return self._body

    def abandon(self) -> None:
        """The app answers without reading the rest of the body: close the connection after
        the reply, rather than have gunicorn read (and throw away) what is left of it."""
        self._req.force_close()

    @property
    def failed(self) -> bool:
        """gunicorn's flag that a read failed (its parser then closes the connection)."""
        return getattr(self._body, "failed", False) is True

    def read(self, size: int | None = None) -> bytes:
        """Read up to size bytes (all when None)."""
        data: bytes = self._guarded(self._body.read, size)
        return data

    def readline(self, size: int | None = None) -> bytes:
        """Read one line."""
        line: bytes = self._guarded(self._body.readline, size)
        return line

    def readlines(self, hint: int | None = None) -> list[bytes]:
        """Read every line."""
        lines: list[bytes] = self._guarded(self._body.readlines, hint)
        return lines

    def __iter__(self) -> Iterator[bytes]:
        """The body line by line."""
        return self

    def __next__(self) -> bytes:
        """The next line."""
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def _guarded(self, read: Callable[[int | None], Any], size: int | None) -> Any:
        """One read of the body within what is left of its time."""
        if not self.armed:
            return read(size)
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self._timeout
        timer = gevent.Timeout(max(0.0, self._deadline - now))
        timer.start()
        try:
            return read(size)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise self._fail(
                RequestTimeout(
                    "The request body did not arrive within %(seconds)g seconds.",
                    seconds=self._timeout,
                )
            ) from None
        except http_errors.NoMoreData:
            raise self._fail(
                InvalidRequest("The connection closed before the whole request body arrived.")
            ) from None
        except http_errors.ParseException:
            raise self._fail(
                InvalidRequest("The chunked request body is malformed (its chunks or trailers).")
            ) from None
        finally:
            timer.close()

    def _fail(self, err: RelayError) -> RelayError:
        """Close the connection after the reply to this request, and return err."""
        self._req.force_close()
        return err


class ClientGuard:
    """The deadlines and refusals of one worker, from its app's settings."""

    def __init__(self, app: Any) -> None:
        # Anything but the relay's app (gunicorn's own error app, say) gets the defaults.
        config: Mapping[str, Any] = getattr(app, "config", None) or DEFAULTS
        self.header_timeout = float(config["CLIENT_HEADER_TIMEOUT"])
        self.body_timeout = float(config["CLIENT_BODY_TIMEOUT"])
        extensions = getattr(app, "extensions", None) or {}
        self.shape: ErrorShaper | None = extensions.get(SHAPER)

    def head_deadline(self) -> gevent.Timeout:
        """The time a new connection has for its request head; HeadTimeout when it runs out."""
        return gevent.Timeout(self.header_timeout, HeadTimeout())

    def guard_body(self, req: Any) -> GuardedBody:
        """Put the request's body under RELAY_CLIENT_BODY_TIMEOUT; returns the guard."""
        guarded = GuardedBody(req, self.body_timeout)
        req.body = guarded
        return guarded

    @staticmethod
    def release(req: Any, guarded: GuardedBody) -> None:
        """The app has answered: give the request its own body back and turn the guard off.

        gunicorn drains what the app left unread, itself bounded by keepalive, and must not
        meet the relay's errors there. The guard holds the request, so left on it the two
        would form a reference cycle, freed only by the garbage collector: every call's
        request, body and readers, a collection every few dozen calls.
        """
        guarded.armed = False
        req.body = guarded.raw

    def reply(self, refusal: Refusal, path: str | None) -> bytes:
        """The whole HTTP reply to a refused request, in the shape of its face when known."""
        body = error_body(refusal.message, refusal.type, refusal.code)
        if path is not None and self.shape is not None:
            body = self.shape(path, refusal.status, body, Text(refusal.message))
        data = json.dumps(body, ensure_ascii=False).encode()
        head = (
            f"HTTP/1.1 {refusal.status} {refusal.reason}\r\n"
            "Connection: close\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        return head.encode("latin-1") + data
