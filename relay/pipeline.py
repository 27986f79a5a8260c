"""The steps every relayed call takes, whichever face it came in on: open, admit, forward, close."""

from flask import g, request
from werkzeug.formparser import parse_form_data

from relay import forwarding
from relay.auth import authenticate, find_client_key, strip_body_key
from relay.call import Call
from relay.errors import InvalidApiKey, InvalidRequest, ModelNotAllowed, QuotaExceeded
from relay.ratelimit import check_unauthenticated
from relay.request_body import read_body
from relay.state import state

MAX_END_USER = 64


def open_call(face, path, parse_body):
    """Read the body, find and check the key, and describe the call; stored as g.call."""
    g.face = face
    current = state()
    raw = read_body(request.environ, current.config["MAX_BODY_BYTES"])
    call = Call(
        face=face,
        method=request.method,
        path=path,
        query=request.query_string,
        body=raw,
        content_type=request.content_type,
    )
    call.json = parse_body(raw, request)
    key = find_client_key(request.headers, call.json)
    if strip_body_key(call.json):
        call.body_changed = True
    try:
        call.key = authenticate(current.keys, key)
    except InvalidApiKey:
        check_unauthenticated()
        raise
    g.call = call
    describe(call, current.config["MODEL_ALIASES"])
    return call


def describe(call, aliases):
    """Take model, stream, usage wish and end user from the body; map model aliases."""
    body = call.json
    if not isinstance(body, dict):
        call.model_requested = call.model = multipart_model(call)
        return
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("The model field must be a string.", param="model")
    call.model_requested = model
    call.model = aliases.get(model, model) if model else model
    if call.model != model:
        body["model"] = call.model
        call.body_changed = True
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("The stream field must be true or false.", param="stream")
    call.stream = stream is True
    options = body.get("stream_options")
    call.client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    user = body.get("user")
    if isinstance(user, str):
        call.end_user = user[:MAX_END_USER]


def multipart_model(call):
    """The `model` form field of a multipart upload (audio), read without consuming the body."""
    if not (call.content_type or "").startswith("multipart/form-data") or not call.body:
        return None
    import io

    environ = {
        "wsgi.input": io.BytesIO(call.body),
        "CONTENT_LENGTH": str(len(call.body)),
        "CONTENT_TYPE": call.content_type,
        "REQUEST_METHOD": "POST",
    }
    _, form, files = parse_form_data(environ, silent=True)
    for upload in files.values():
        upload.close()
    return form.get("model")


def admit(call):
    """Refuse a call its key may not make: model allow-list, spent token or money quota."""
    key = call.key
    if not (key.allows_model(call.model) or key.allows_model(call.model_requested)):
        raise ModelNotAllowed(
            f"This key may not use the model {call.model_requested!r}.", param="model"
        )
    if key.quota_tokens is not None and key.used_tokens >= key.quota_tokens:
        raise QuotaExceeded(
            f"This key's token quota is used up ({key.used_tokens} of {key.quota_tokens}). "
            "Ask the relay's operator for a top-up."
        )
    if key.budget is not None and key.spent >= key.budget:
        raise QuotaExceeded(
            f"This key's budget is spent ({key.spent:.4f} of {key.budget:.4f}). "
            "Ask the relay's operator for a top-up."
        )
    current = state()
    for check in current.admission_checks:
        check(call)


def run(call):
    """Admit and forward a call; the reply (or error) goes back through Flask."""
    admit(call)
    return forwarding.forward(state(), call, request.headers.items(), request.environ)


def close_call(response):
    """after_request: complete calls whose reply is already whole (streams complete themselves)."""
    call = g.get("call")
    if call is not None and not call.streaming and not call.completed:
        call.status = response.status_code
        call.bytes_out = call.bytes_out or (response.content_length or 0)
        state().complete(call)
    return response
