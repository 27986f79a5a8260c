"""The relay's one error hierarchy and the one function that turns any failure into a JSON reply."""

import json
import logging

from flask import g, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("relay")


class RelayError(Exception):
    """A failure the client should see, with OpenAI's status, type and code."""

    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message, *, param=None, headers=None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


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


class NotFound(RelayError):
    """No such route."""

    status, type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(RelayError):
    """The route exists but not for this method."""

    status, type, code = 405, "invalid_request_error", "method_not_allowed"


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


# Werkzeug's own HTTP errors mapped onto ours, so every reply has one shape.
HTTP_EXCEPTIONS = {404: NotFound, 405: MethodNotAllowed, 413: RequestTooLarge}


def error_body(status, message, type_, code, param=None, legacy=False):
    """Build the OpenAI error object; legacy replies also carry `code` and `msg` at the top."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    if legacy:
        return {"code": status, "msg": message, **body}
    return body


def is_legacy_request():
    """Whether the current request came in on the legacy face."""
    face = g.get("face")
    if face is not None:
        return face == "legacy"
    path = request.path
    return path.startswith(("/api/v1/", "/index.php/api/v1/"))


def error_response(err):
    """Turn a RelayError into a Flask response in the face's shape."""
    from flask import current_app

    call = g.get("call")
    if call is not None and call.outcome == "ok":
        call.outcome = err.code
    body = error_body(
        err.status, err.message, err.type, err.code, err.param, legacy=is_legacy_request()
    )
    response = current_app.response_class(
        json.dumps(body, ensure_ascii=False), status=err.status, mimetype="application/json"
    )
    for name, value in err.headers.items():
        response.headers[name] = value
    return response


def handle_http_exception(exc):
    """Map werkzeug's 404/405/413/429 (and any other HTTP error) onto the relay's shape."""
    from flask_limiter.errors import RateLimitExceeded

    if isinstance(exc, RateLimitExceeded):
        reason = exc.description
        if not reason.startswith("Rate limit"):
            reason = f"Rate limit reached: {reason}."  # a bare limit such as "10 per 1 minute"
        err = RateLimited(f"{reason} Retry after the window resets.")
    elif exc.code in HTTP_EXCEPTIONS:
        messages = {
            404: f"Unknown path {request.path}.",
            405: f"Method {request.method} is not allowed on {request.path}.",
            413: "Request body is larger than the relay accepts.",
        }
        err = HTTP_EXCEPTIONS[exc.code](messages[exc.code])
    else:
        err = RelayError(exc.description or exc.name)
        err.status = exc.code or 500
        err.type = "invalid_request_error" if err.status < 500 else "server_error"
        err.code = exc.name.lower().replace(" ", "_")
    response = error_response(err)
    if exc.code == 405 and getattr(exc, "valid_methods", None):
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def handle_unexpected(exc):
    """Log an unexpected exception (never with request secrets) and reply with a plain 500."""
    if isinstance(exc, HTTPException):
        return handle_http_exception(exc)
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(RelayError("The relay hit an internal error; it has been logged."))


def init_app(app):
    """Register the handlers so every failure, ours or werkzeug's, gets the same body."""
    app.register_error_handler(RelayError, error_response)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
