"""The steps every relayed call takes, whichever face it came in on: open, admit, forward, close.

A face plugs into these steps through its `Face` hooks; the steps are the same for both.
"""

import io

from flask import Response, current_app, g, request
from werkzeug.formparser import parse_form_data

from relay.auth import authenticate, find_client_key, strip_body_key, verify
from relay.call import MAX_END_USER, Call
from relay.errors import InvalidRequest, ModelNotAllowed, QuotaExceeded
from relay.face import Face
from relay.state import state
from relay.upstream import Relayed


def open_call(face: Face, path: str, raw: bytes, relayed: bool = True) -> Call:
    """Parse the body, find and check the key, and describe the call; stored as g.call.

    `relayed` is False for the relay's own endpoints (balance): they authenticate the
    same way but are not forwarded and leave no usage row.
    """
    current = state()
    call = Call(
        face=face.name,
        method=request.method,
        path=path,
        query=request.query_string,
        body=raw,
        content_type=request.content_type,
        relayed=relayed,
    )
    call.json = face.parse_body(raw, call.method, path, call.content_type)
    key = find_client_key(request.headers, call.json)
    if strip_body_key(call.json):
        call.body_changed = True
    call.key = verify(lambda: authenticate(current.store.keys, key))
    g.call = call
    if relayed:
        describe(call, current.config["MODEL_ALIASES"])
        face.prepare(call)
    return call


def describe(call: Call, aliases: dict[str, str]) -> None:
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
    call.stream_requested = stream is True
    options = body.get("stream_options")
    call.client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    user = body.get("user")
    if isinstance(user, str):
        call.end_user = user[:MAX_END_USER]


def multipart_model(call: Call) -> str | None:
    """The `model` form field of a multipart upload (audio), read without consuming the body."""
    if not (call.content_type or "").startswith("multipart/form-data") or not call.body:
        return None
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


def admit(call: Call) -> None:
    """Refuse a call its key may not make: model allow-list, spent quota, key limits."""
    key = call.key
    if key is None:  # pragma: no cover - open_call authenticates before anything is admitted
        raise InvalidRequest("The call has no key.")
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
    state().limits.admit(call)


def run(call: Call, face: Face) -> Response:
    """Admit and forward a call; its reply goes back in the face's shape."""
    admit(call)
    current = state()
    relayed = current.upstreams.forward(call, request.headers.items(), request.environ, current)
    return respond(call, face, relayed)


def list_models(call: Call, face: Face) -> Response:
    """GET /models: forwarded from a lone upstream, else the union the key may use."""
    current = state()
    if current.upstreams.single and call.key is not None and call.key.models is None:
        return run(call, face)
    admit(call)
    allows = call.key.allows_model if call.key is not None else (lambda _model: True)
    body = current.upstreams.models(allows, current.config["MODEL_ALIASES"])
    call.upstream_name = "*"
    return respond(call, face, Relayed(200, [("Content-Type", "application/json")], body))


def respond(call: Call, face: Face, relayed: Relayed) -> Response:
    """The Flask response for a relayed reply: streams as they come, whole bodies wrapped."""
    response_class = current_app.response_class
    if relayed.streamed:
        return response_class(
            relayed.body, relayed.status, relayed.headers, direct_passthrough=True
        )
    body = face.wrap_reply(call, relayed)
    call.bytes_out = len(body)
    return response_class(body, relayed.status, relayed.headers)


def close_call(response: Response) -> Response:
    """after_request: add the face's headers; complete calls whose reply is already whole."""
    call: Call | None = g.get("call")
    if call is None:
        return response
    for name, value in call.reply_headers:
        response.headers[name] = value
    if call.relayed and not call.reply_streamed and not call.completed:
        call.status = response.status_code
        call.bytes_out = call.bytes_out or (response.content_length or 0)
        state().complete(call)
    return response
