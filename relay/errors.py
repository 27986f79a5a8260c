"""The relay's one error hierarchy and the one function that turns any failure into a JSON reply.

    RelayError (500 internal_error)
    ├── InvalidRequest       400 invalid_request
    ├── InvalidApiKey        401 invalid_api_key
    ├── AdminAuthRequired    401 admin_token_required
    ├── ModelNotAllowed      403 model_not_allowed
    ├── EndpointNotAllowed   403 endpoint_not_allowed
    ├── NotFound             404 not_found
    ├── MethodNotAllowed     405 method_not_allowed
    ├── RequestTimeout       408 request_timeout
    ├── RequestTooLarge      413 request_too_large
    ├── QuotaExceeded        429 insufficient_user_quota
    ├── RateLimited          429 rate_limit_exceeded (with Retry-After)
    ├── UpstreamError        502 upstream_error
    ├── UpstreamTimeout      504 upstream_timeout
    └── ServiceUnavailable   503 service_unavailable
        └── StoreUnavailable 503 store_unavailable

Werkzeug's HTTP errors and flask-limiter's 429 are mapped onto these; anything else is
logged and answered as a plain 500. A face may wrap the body (the legacy face adds its
`code`/`msg` envelope) through the shaper given to `init_app`. What gunicorn refuses
before the app runs (a malformed request head) gets the same body from the worker
(relay/serve/worker.py), built by `error_body` too.

Messages are English templates with named values (`%(model)r`), so `error.message` stays
English, as client libraries match its wording, while the legacy face's `msg` and the
pages can say the same template in another language (relay/i18n.py). `pybabel extract`
finds the templates by the class names (babel.cfg).
"""

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask, Response, current_app, g, request
from flask_limiter.errors import RateLimitExceeded
from werkzeug.exceptions import HTTPException

from relay.call import as_outcome
from relay.i18n import Text

log = logging.getLogger("relay")
SHAPER = "relay_error_shaper"
# Adds a face's envelope to an error body: (URL path, status, OpenAI error body, the
# message's template and values) -> reply body.
ErrorShaper = Callable[[str, int, dict[str, Any], Text], dict[str, Any]]


class RelayError(Exception):
    """A failure the client should see, with OpenAI's status, type and code."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        **values: object,
    ) -> None:
        """`message` is an English template; `values` fill its `%(name)s` placeholders."""
        self.text = Text(message, values)
        self.message = self.text.english()
        super().__init__(self.message)
        self.param = param
        self.headers = dict(headers or {})


class InvalidRequest(RelayError):
    """The body or a field is malformed."""

    status, type, code = 400, "invalid_request_error", "invalid_request"


class InvalidApiKey(RelayError):
    """The key is missing, unknown, disabled, expired or deleted."""

    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class AdminAuthRequired(RelayError):
    """An operator-only endpoint was called without the admin token."""

    status, type, code = 401, "invalid_request_error", "admin_token_required"


class ModelNotAllowed(RelayError):
    """The key's allow-list does not include the requested model."""

    status, type, code = 403, "invalid_request_error", "model_not_allowed"


class EndpointNotAllowed(RelayError):
    """This key may not call this endpoint (it cannot be billed, or it is account-wide)."""

    status, type, code = 403, "invalid_request_error", "endpoint_not_allowed"


class NotFound(RelayError):
    """No such route."""

    status, type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(RelayError):
    """The route exists but not for this method."""

    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class RequestTimeout(RelayError):
    """The client did not send its whole request body in time (RELAY_CLIENT_BODY_TIMEOUT)."""

    status, type, code = 408, "invalid_request_error", "request_timeout"


class RequestTooLarge(RelayError):
    """The body is over RELAY_MAX_BODY_BYTES."""

    status, type, code = 413, "invalid_request_error", "request_too_large"


class QuotaExceeded(RelayError):
    """The key's token (or money) quota is spent."""

    status, type, code = 429, "insufficient_quota", "insufficient_user_quota"


class RateLimited(RelayError):
    """A request, token or concurrency limit was hit."""

    status, type, code = 429, "requests", "rate_limit_exceeded"


class UpstreamError(RelayError):
    """The upstream failed in a way we cannot pass through (5xx, HTML, reset, refused)."""

    status, type, code = 502, "upstream_error", "upstream_error"


class UpstreamTimeout(RelayError):
    """The upstream did not answer within the read timeout."""

    status, type, code = 504, "upstream_error", "upstream_timeout"


class ServiceUnavailable(RelayError):
    """The relay itself cannot serve (its database is not writable, say)."""

    status, type, code = 503, "server_error", "service_unavailable"


class StoreUnavailable(ServiceUnavailable):
    """The relay's database does not answer (PostgreSQL down or unreachable, say)."""

    code = "store_unavailable"


def error_body(message: str, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object, the one shape of every error the relay sends."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(err: RelayError) -> Response:
    """Turn a RelayError into a Flask response, in the shape of the face it came in on."""
    call = g.get("call")
    if call is not None and call.outcome == "ok":
        call.outcome = as_outcome(err.code)
    body = error_body(err.message, err.type, err.code, err.param)
    shape: ErrorShaper | None = current_app.extensions.get(SHAPER)
    if shape is not None:
        body = shape(request.path, err.status, body, err.text)
    response = current_app.response_class(
        json.dumps(body, ensure_ascii=False), status=err.status, mimetype="application/json"
    )
    for name, value in err.headers.items():
        response.headers[name] = value
    return response


def handle_http_exception(exc: HTTPException) -> Response:
    """Map werkzeug's 404/405/413/429 (and any other HTTP error) onto the relay's shape, so
    every reply has one."""
    err: RelayError
    valid_methods = getattr(exc, "valid_methods", None) or []
    if isinstance(exc, RateLimitExceeded):
        err = _rate_limited(exc)
    elif exc.code == 404:
        err = NotFound("Unknown path %(path)s.", path=request.path)
    elif exc.code == 405 and valid_methods:
        err = MethodNotAllowed(
            "Method %(method)s is not allowed on %(path)s; use %(allowed)s.",
            method=request.method,
            path=request.path,
            allowed=", ".join(valid_methods),
        )
    elif exc.code == 405:
        err = MethodNotAllowed(
            "Method %(method)s is not allowed on %(path)s.",
            method=request.method,
            path=request.path,
        )
    elif exc.code == 413:
        err = RequestTooLarge("Request body is larger than the relay accepts.")
    else:
        err = RelayError(exc.description or exc.name)
        err.status = exc.code or 500
        err.type = "invalid_request_error" if err.status < 500 else "server_error"
        err.code = exc.name.lower().replace(" ", "_")
    response = error_response(err)
    if exc.code == 405 and valid_methods:
        response.headers["Allow"] = ", ".join(valid_methods)
    return response


def _rate_limited(exc: RateLimitExceeded) -> RateLimited:
    """flask-limiter's 429 in the relay's words: every limit it enforces is per minute."""
    rpm = exc.limit.limit.amount
    if exc.limit.scope == "global":  # flask-limiter's scope of the application-wide limit
        return RateLimited(
            "Rate limit reached for the whole relay: %(rpm)d requests/minute. "
            "Retry after the window resets.",
            rpm=rpm,
        )
    return RateLimited(
        "Rate limit reached for this key: %(rpm)d requests/minute. Retry after the window resets.",
        rpm=rpm,
    )


def handle_unexpected(exc: Exception) -> Response:
    """Log an unexpected exception (never with request secrets) and reply with a plain 500."""
    if isinstance(exc, HTTPException):
        return handle_http_exception(exc)
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(RelayError("The relay hit an internal error; it has been logged."))


def init_app(app: Flask, shaper: ErrorShaper | None = None) -> None:
    """Register the handlers so every failure, ours or werkzeug's, gets the same body."""
    if shaper is not None:
        app.extensions[SHAPER] = shaper
    app.register_error_handler(RelayError, error_response)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
