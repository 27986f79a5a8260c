"""requests' transport to upstreams: the urllib3 pool it owns, and replies read off the socket.

The one module of the relay that touches urllib3, and only where requests hands it over:
the PoolManager an `HTTPAdapter` owns, and `Response.raw`. Whatever urllib3 raises leaves
this module as one of requests' exceptions, as in requests' own adapters.py:

    sending (HTTPAdapter.send)   ConnectionError   refused, unreachable, unresolvable, TLS,
                                                   a pooled connection found dead
                                 ConnectTimeout    no connection within the connect timeout
                                 ReadTimeout       no status line within the read timeout
    reading a body               ReadTimeout       silence past the read timeout
    (body_chunks, read_body)     ContentDecodingError  a compressed body that does not decode
                                 ChunkedEncodingError  anything else that cut the body short

failures.classify says what each means for the call.
"""

import socket
from collections.abc import Iterator
from typing import Any

import certifi
from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter
from requests.exceptions import (
    ChunkedEncodingError,
    ConnectionError,
    ContentDecodingError,
    ReadTimeout,
    RequestException,
)
from requests.structures import CaseInsensitiveDict
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    HTTPError,
    NameResolutionError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.response import HTTPResponse

from relay.upstream.chunked import ChunkedBody
from relay.upstream.resolver import addresses

READ_SIZE = 65536  # most bytes passed on per read of an unframed or compressed body
ONE_SEND_MAX = 65536  # a request body up to this size goes out in one send with its head


class CachedResolution:
    """Mixin for urllib3 connections: connect to resolver.addresses(), not a fresh lookup."""

    def _new_conn(self) -> socket.socket:
        """Open the TCP connection, raising urllib3's own errors as its _new_conn does."""
        conn: Any = self  # a mixin: the attributes are urllib3's HTTPConnection's
        try:
            found = addresses(conn._dns_host, conn.port)
        except socket.gaierror as exc:
            raise NameResolutionError(conn.host, conn, exc) from exc
        failure = None
        for family, kind, proto, _, address in found:
            sock = socket.socket(family, kind, proto)
            try:
                for option in conn.socket_options or ():
                    sock.setsockopt(*option)
                if conn.timeout is None or isinstance(conn.timeout, int | float):
                    sock.settimeout(conn.timeout)
                if conn.source_address:
                    sock.bind(conn.source_address)
                sock.connect(address)
                return sock
            except TimeoutError as exc:
                sock.close()
                raise ConnectTimeoutError(
                    conn, f"Connection to {conn.host} timed out. (connect timeout={conn.timeout})"
                ) from exc
            except OSError as exc:
                sock.close()
                failure = exc  # try the next address, as socket.create_connection does
        raise NewConnectionError(conn, f"Failed to establish a new connection: {failure}")


class OneSendRequest:
    """Mixin for urllib3 connections: a request's head goes out with its body in one send.

    http.client sends the head when the headers end and urllib3 then sends the body: two
    system calls, two TCP segments (urllib3 sets TCP_NODELAY) and, to a TLS upstream, two
    records, for every call. Here the head is held until the body's first bytes (or the
    wait for the reply) and sent with them; a body over ONE_SEND_MAX follows on its own,
    so no upload is copied to save one system call.
    """

    _held: bytes | None = None  # the head, not sent yet
    _holding = False  # inside endheaders: its send is the head

    def endheaders(self, message_body: Any = None, *, encode_chunked: bool = False) -> None:
        """End the headers, holding the head for the body."""
        self._holding = True
        try:
            super().endheaders(message_body, encode_chunked=encode_chunked)  # type: ignore[misc]
        finally:
            self._holding = False

    def send(self, data: Any) -> None:
        """Hold the head; send it with the first body bytes (or before anything else)."""
        if self._holding and self._held is None and isinstance(data, bytes):
            self._held = data
            return
        held, self._held = self._held, None
        if held is not None:
            if isinstance(data, bytes) and len(data) <= ONE_SEND_MAX:
                data = held + data
            else:
                super().send(held)  # type: ignore[misc]
        super().send(data)  # type: ignore[misc]

    def getresponse(self) -> Any:
        """Send a head still held (a request without a body), then read the reply."""
        held, self._held = self._held, None
        if held is not None:
            super().send(held)  # type: ignore[misc]
        return super().getresponse()  # type: ignore[misc]

    def close(self) -> None:
        """Close, dropping a head never sent."""
        self._held = None
        super().close()  # type: ignore[misc]


class CachedHTTPConnection(OneSendRequest, CachedResolution, HTTPConnection):
    """Plain HTTP upstream connection."""


class CachedHTTPSConnection(OneSendRequest, CachedResolution, HTTPSConnection):
    """TLS upstream connection (the certificate is still checked against the host name)."""


class CachedHTTPPool(HTTPConnectionPool):
    """Pool of CachedHTTPConnection."""

    ConnectionCls = CachedHTTPConnection


class CachedHTTPSPool(HTTPSConnectionPool):
    """Pool of CachedHTTPSConnection."""

    ConnectionCls = CachedHTTPSConnection


POOL_CLASSES = {"http": CachedHTTPPool, "https": CachedHTTPSPool}


class UpstreamAdapter(HTTPAdapter):
    """requests' HTTPAdapter as the relay needs it: one pool, no retries, redirects or proxies.

    Calls go to `send` with a PreparedRequest, never through a Session: a Session keeps a
    cookie jar shared by every call, reads proxies, CA settings and .netrc credentials
    from the environment, and follows redirects, none of which a relay may do for its
    clients. The adapter does none of it, so nothing of one call reaches the next, by
    construction rather than by settings. (A Session with all of that switched off would
    still cost ~80 000 more instructions a call than this, by callgrind: ~2 % of a call.)
    """

    def __init__(self, pool_size: int) -> None:
        # max_retries=0 is requests' Retry(0, read=False): nothing is sent twice here
        # (forwarding decides what another target may try), and urllib3's connection
        # errors come out wrapped as requests' own. 16 pools: upstream hosts kept open.
        super().__init__(
            pool_connections=16, pool_maxsize=pool_size, max_retries=0, pool_block=False
        )

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        """The PoolManager: a connection per concurrent stream, certifi's CA bundle, and
        connections that skip needless resolving."""
        pool_kwargs.setdefault("ca_certs", certifi.where())
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = POOL_CLASSES

    def get_connection_with_tls_context(
        self,
        request: PreparedRequest,
        verify: Any,
        proxies: Any = None,
        cert: Any = None,
    ) -> HTTPConnectionPool:
        """The pool for the request's host: never a proxy's, so no proxy is looked up."""
        host, pool_kwargs = self.build_connection_pool_key_attributes(request, verify, cert)
        return self.poolmanager.connection_from_host(**host, pool_kwargs=pool_kwargs)

    def request_url(self, request: PreparedRequest, proxies: Any) -> str:
        """The path and query to send: the request goes to the upstream itself."""
        return request.path_url

    def build_response(self, req: PreparedRequest, resp: Any) -> Response:
        """A Response for urllib3's reply, without parsing its cookies into a jar.

        The relay never passes an upstream's cookies on (client.UPSTREAM_HEADERS) and keeps
        none; requests' own build_response would parse every Set-Cookie into the reply's
        jar and read a text encoding from Content-Type that the relay, passing bytes on,
        never uses.
        """
        response = Response()
        response.status_code = resp.status
        response.headers = CaseInsensitiveDict(resp.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url or ""
        response.request = req
        response.connection = self
        return response

    def send(
        self,
        request: PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> Response:
        """Send without a proxy; the few urllib3 errors requests lets out become ConnectionError."""
        try:
            return super().send(request, stream, timeout, verify, cert, proxies=None)
        except HTTPError as exc:
            raise ConnectionError(exc, request=request) from exc


def read_body(response: Response, limit: int | None = None) -> bytes:
    """A reply's body (up to `limit` bytes), decoded when compressed (gzip and the like)."""
    try:
        return response.raw.read(limit, decode_content=True) or b""
    except (HTTPError, OSError) as exc:
        raise _body_error(exc) from exc


def read_capped(response: Response, cap: int) -> bytes | None:
    """A reply's whole body, decoded, or None once more than `cap` bytes came (the rest
    left unread: the caller closes the connection).

    Decoded READ_SIZE bytes at a time (urllib3 inflates no more than it is asked for), so
    neither an endless body nor a compression bomb grows the worker past `cap`.
    """
    raw: HTTPResponse = response.raw
    try:
        length = raw.length_remaining
        if length is not None and length <= cap and not _encoded(raw):
            return raw.read(None, decode_content=True) or b""  # the common case: one read
        parts, total = [], 0
        while data := raw.read(READ_SIZE, decode_content=True):
            total += len(data)
            if total > cap:
                return None
            parts.append(data)
        return b"".join(parts)
    except (HTTPError, OSError) as exc:
        raise _body_error(exc) from exc


def _encoded(raw: HTTPResponse) -> bool:
    """Whether the body is compressed (its decoded size is not its Content-Length)."""
    return raw.headers.get("content-encoding", "identity").lower() not in ("identity", "")


def body_chunks(response: Response) -> Iterator[bytes]:
    """A reply's body as it arrives: all the bytes one socket read brought."""
    raw: HTTPResponse = response.raw
    try:
        body = _direct_chunked(raw)
        if body is not None:
            while data := body.read():
                yield data
            _release_chunked(raw, body)
            return
        if raw.chunked and raw.supports_chunked_reads():  # compressed: urllib3 decodes
            # With an amount, each chunk is inflated READ_SIZE bytes at a time: bounded.
            yield from raw.read_chunked(READ_SIZE, decode_content=True)
            return
        while data := raw.read1(READ_SIZE, decode_content=True):
            yield data
    except RequestException:
        raise  # already requests' (ChunkedBody's framing errors)
    except (HTTPError, OSError) as exc:
        raise _body_error(exc) from exc


def shut_down(response: Response) -> None:
    """Shut the reply's socket down, waking a read blocked on it (the client hung up)."""
    try:
        response.raw.shutdown()
    except (ValueError, RuntimeError, OSError):
        response.close()


def _body_error(exc: Exception) -> RequestException:
    """requests' exception for a urllib3 or socket error while reading a body."""
    if isinstance(exc, ReadTimeoutError | TimeoutError):
        return ReadTimeout(exc)
    if isinstance(exc, DecodeError):
        return ContentDecodingError(exc)
    return ChunkedEncodingError(exc)


def _direct_chunked(raw: HTTPResponse) -> ChunkedBody | None:
    """A ChunkedBody reading straight from the socket's buffered file, when it can.

    Only a plain (not compressed) chunked body whose headers were parsed by
    http.client and of which nothing has been read yet qualifies.
    """
    original = getattr(raw, "_original_response", None)
    fp = getattr(original, "fp", None)
    if not raw.chunked or fp is None or not hasattr(fp, "read1"):
        return None
    if _encoded(raw):
        return None
    if getattr(original, "chunk_left", None) is not None:
        return None  # http.client already started on the body
    return ChunkedBody(fp)


def _release_chunked(raw: HTTPResponse, body: ChunkedBody) -> None:
    """After the whole body was read: give the connection back to the pool when it is clean."""
    original: Any = raw._original_response
    original.close()  # as urllib3 does after read_chunked: the "file" is done, not the socket
    if body.extra:
        raw.close()
    else:
        raw.release_conn()
