"""What gunicorn refuses before the app runs, as the relay words it: status, type, code, message.

Plain Python, gunicorn and Babel only (no Flask): the worker module that uses it is imported
by gunicorn's master too.
"""

import ssl
from dataclasses import dataclass
from http import HTTPStatus

from gunicorn.http import errors as http_errors

from relay.i18n import N_


class HeadTimeout(Exception):
    """A new connection did not send its whole request head within RELAY_CLIENT_HEADER_TIMEOUT."""


@dataclass(frozen=True)
class Refusal:
    """The reply to a request the app never saw."""

    status: int
    code: str
    message: str
    type: str = "invalid_request_error"

    @property
    def reason(self) -> str:
        """The status line's reason phrase."""
        return HTTPStatus(self.status).phrase

    @property
    def client_error(self) -> bool:
        """Whether the client's request was at fault (else the relay was: log a traceback)."""
        return self.type != "server_error"


# A chunked body gunicorn could not parse. The app's own reads turn these into a 400
# (client_guard.GuardedBody); one reaching the worker comes from gunicorn draining a
# body the app left unread, after the reply went out.
BODY_ERRORS: tuple[type[Exception], ...] = (
    http_errors.InvalidChunkSize,
    http_errors.ChunkMissingTerminator,
    http_errors.InvalidChunkExtension,
)
# Headers that framing and routing depend on, named in messages (never the client's bytes).
FRAMING_HEADERS = {
    "CONTENT-LENGTH": N_(
        "Content-Length must be one non-negative number, without Transfer-Encoding."
    ),
    "TRANSFER-ENCODING": N_("Transfer-Encoding must be chunked, once, last, and on HTTP/1.1."),
    "HOST": N_("The request must carry exactly one Host header."),
    "CONTENT-TYPE": N_("The request must carry at most one Content-Type header."),
}
BAD_REQUEST = "invalid_request"
# The status is the one gunicorn chose; codes other than invalid_request are werkzeug's
# names for the status, as the app's own errors use. The messages are fixed on purpose:
# gunicorn's own quote the client's bytes, and a malformed header line may hold a key.
REFUSALS: list[tuple[type[BaseException], Refusal]] = [
    (
        HeadTimeout,
        Refusal(408, "request_timeout", "The request head did not arrive in time."),
    ),
    (
        http_errors.LimitRequestLine,
        Refusal(414, "request_uri_too_large", "The request line is longer than 8190 bytes."),
    ),
    (
        http_errors.LimitRequestHeaders,
        Refusal(
            431,
            "request_header_fields_too_large",
            "The request headers are larger or more numerous than the relay accepts.",
        ),
    ),
    (
        http_errors.ObsoleteFolding,
        Refusal(400, BAD_REQUEST, "A request header is folded over several lines; send it on one."),
    ),
    (
        http_errors.InvalidRequestLine,
        Refusal(400, BAD_REQUEST, "The request line is not `METHOD /path HTTP/1.1`."),
    ),
    (
        http_errors.InvalidRequestMethod,
        Refusal(400, BAD_REQUEST, "The request method is not a valid HTTP method."),
    ),
    (
        http_errors.InvalidHTTPVersion,
        Refusal(400, BAD_REQUEST, "The HTTP version is not supported; use HTTP/1.1."),
    ),
    # The app's own reply headers: the relay is at fault, not the client.
    (
        http_errors.InvalidResponseHeader,
        Refusal(500, "internal_error", "The relay could not send its reply.", "server_error"),
    ),
    (
        http_errors.InvalidResponseHeaderName,
        Refusal(500, "internal_error", "The relay could not send its reply.", "server_error"),
    ),
    (
        http_errors.InvalidHeaderName,
        Refusal(400, BAD_REQUEST, "A request header name is not valid (nor are underscores)."),
    ),
    (
        http_errors.InvalidHeader,
        Refusal(400, BAD_REQUEST, "A request header is malformed."),
    ),
    (
        http_errors.UnsupportedTransferCoding,
        Refusal(501, "not_implemented", "Transfer-Encoding must be chunked (or none)."),
    ),
    (
        http_errors.ExpectationFailed,
        Refusal(417, "expectation_failed", "Only `Expect: 100-continue` is supported."),
    ),
    (
        http_errors.ForbiddenProxyRequest,
        Refusal(403, "forbidden", "PROXY protocol headers are not accepted from this address."),
    ),
    (
        http_errors.ConfigurationProblem,
        Refusal(500, "internal_error", "The relay's server is misconfigured.", "server_error"),
    ),
    (ssl.SSLError, Refusal(403, "forbidden", "The TLS handshake failed.")),
    (http_errors.ParseException, Refusal(400, BAD_REQUEST, "The request is not valid HTTP/1.1.")),
]
INTERNAL = Refusal(
    500, "internal_error", "The relay hit an internal error; it has been logged.", "server_error"
)


def refusal_for(exc: BaseException) -> Refusal:
    """The reply to what gunicorn raised while reading a request (INTERNAL for anything else)."""
    for kind, refusal in REFUSALS:
        if isinstance(exc, kind):
            header = getattr(exc, "hdr", None)
            if kind is http_errors.InvalidHeader and header in FRAMING_HEADERS:
                return Refusal(400, BAD_REQUEST, FRAMING_HEADERS[header])
            return refusal
    return INTERNAL
