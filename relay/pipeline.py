"""The steps every relayed call takes, whichever face it came in on: open, admit, forward, close.

A face plugs into these steps through its `Face` hooks; the steps are the same for both.
"""

import io
import logging

from flask import Response, current_app, g, request
from werkzeug.formparser import parse_form_data

from relay.auth import authenticate, bearer_token, find_client_key, strip_body_key, verify
from relay.call import MAX_END_USER, Call, KeyRecord
from relay.endpoints import account_group
from relay.errors import (
    EndpointNotAllowed,
    InvalidRequest,
    ModelNotAllowed,
    QuotaExceeded,
    ServiceUnavailable,
)
from relay.face import Face
from relay.i18n import Text
from relay.metering import (
    PriceTable,
    billing_of,
    implied_model,
    need_of,
    unit_of,
    variant_of,
)
from relay.state import state
from relay.store import Refusal, StoreError
from relay.upstream import Relayed

log = logging.getLogger("relay")
# The units of RELAY_PRICES as a refusal names them, in the language it is said in.
UNIT_WORDS = {"image": Text("image"), "second": Text("second"), "character": Text("character")}
UTF8_BOM = b"\xef\xbb\xbf"


def check_bearer_key() -> KeyRecord | None:
    """The record of an `Authorization: Bearer` key, checked before the body is read (it
    wins over a key in the body, so a wrong one is refused without reading what follows)."""
    token = bearer_token(request.headers)
    if not token:
        return None
    return verify(lambda: authenticate(state().store.keys, token))


def open_call(
    face: Face,
    path: str,
    raw: bytes,
    relayed: bool = True,
    form_key: str | None = None,
    known: KeyRecord | None = None,
) -> Call:
    """Parse the body, find and check the key, and describe the call; stored as g.call.

    `relayed` is False for the relay's own endpoints (balance): they authenticate the
    same way but are not forwarded and leave no usage row. `known`: the Bearer key's
    record, already checked (check_bearer_key).
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
    if call.json is not None and raw.lstrip().startswith(UTF8_BOM):
        call.body_changed = True  # re-encoded without it: upstreams refuse JSON behind a BOM
    key = find_client_key(request.headers, call.json, form_key)
    if strip_body_key(call.json):
        call.body_changed = True
    call.key = known or verify(lambda: authenticate(current.store.keys, key))
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
    """Refuse a call its key may not make; else reserve its likely cost against the quota."""
    key = call.key
    if key is None:  # pragma: no cover - open_call authenticates before anything is admitted
        raise InvalidRequest("The call has no key.")
    current = state()
    config = current.config
    metered = key.quota_tokens is not None or key.budget is not None
    implied = implied_model(call.path) if call.method == "POST" else None
    if implied and call.model is None and (metered or key.models is not None):
        name_the_model(call, implied)
    check_models(call, key, implied)
    check_account_wide(call, key, config["OPEN_ENDPOINTS"])
    if metered:
        check_billable(call, key, config["PRICES"])
    need = need_of(
        call, config["PRICES"], config["TOKENS_PER_MONEY"], config["RESERVE_COMPLETION_TOKENS"]
    )
    try:
        refusal = current.store.admit(call, need)
    except StoreError as exc:
        # A metered key's quota cannot be checked, and with a full disk no call could be
        # recorded: refuse rather than serve unmetered. Otherwise its row will be spooled.
        if metered or not current.store.can_record:
            raise ServiceUnavailable(
                "The relay's database is not taking writes right now; retry shortly."
            ) from None
        log.warning("call admitted without an in-flight row: %s", exc)
        refusal = None
    if refusal is not None:
        raise quota_refusal(refusal)
    current.limits.admit(call)


def name_the_model(call: Call, model: str) -> None:
    """Put the model an endpoint would use by default into the request, so the model that is
    checked and priced is the one that runs (JSON bodies; uploads are checked as named)."""
    call.model = call.model_requested = model
    if isinstance(call.json, dict):
        call.json["model"] = model
        call.body_changed = True


def check_models(call: Call, key: KeyRecord, implied: str | None) -> None:
    """The allow-list covers the model a call names, or the one its endpoint implies."""
    if key.models is None:
        return
    if call.path == "batches" and call.method == "POST":
        raise EndpointNotAllowed(
            "Batches name their models inside an uploaded file the relay does not read; "
            "keys with a model allow-list cannot create them."
        )
    asked = call.model or implied
    if asked is None and billing_of(call.path, call.method) in ("tokens", "units"):
        # The upstream would pick a model itself, one the list may not hold.
        raise ModelNotAllowed(
            "This key may use only some models, and this call names none: set `model` to "
            "one of %(models)s.",
            param="model",
            models=", ".join(key.models),
        )
    if not (key.allows_model(asked) or key.allows_model(call.model_requested)):
        if call.model_requested:
            raise ModelNotAllowed(
                "This key may not use the model %(model)r.",
                param="model",
                model=call.model_requested,
            )
        raise ModelNotAllowed(
            "This key may not use the model %(model)r, the default of /%(path)s.",
            param="model",
            model=implied,
            path=call.path,
        )


def check_account_wide(call: Call, key: KeyRecord, open_groups: tuple[str, ...]) -> None:
    """Endpoints shared by every key holder of the upstream account need opening for a key."""
    group = account_group(call.path, call.method)
    if group is None or group in key.endpoints or group in open_groups:
        return
    raise EndpointNotAllowed(
        "%(method)s /%(path)s reaches the relay's whole upstream account "
        "(%(group)s: every key holder's shares it), so it is closed to keys by default. "
        "Ask the relay's operator to open it for your key (--endpoints %(group)s).",
        method=call.method,
        path=call.path,
        group=group,
    )


def check_billable(call: Call, key: KeyRecord, prices: PriceTable) -> None:
    """A key with a quota or budget may only make calls the relay can measure and price."""
    billing = billing_of(call.path, call.method)
    models = (call.model, call.model_requested)
    model = call.model or Text("this model")
    if billing == "unbillable":
        raise EndpointNotAllowed(
            "%(method)s /%(path)s spends upstream money the relay cannot measure, so keys "
            "with a quota or budget cannot call it. Ask the relay's operator.",
            method=call.method,
            path=call.path,
        )
    unit = unit_of(call.path) if billing == "units" else None
    if unit and prices.unit_price(models, unit, variant_of(call.json)) is None:
        raise EndpointNotAllowed(
            "%(method)s /%(path)s has no price per %(unit)s for %(model)s (RELAY_PRICES), so "
            "keys with a quota or budget cannot call it. Ask the relay's operator.",
            method=call.method,
            path=call.path,
            unit=UNIT_WORDS[unit],
            model=model,
        )
    if billing == "tokens" and key.budget is not None and prices.token_rates(*models) is None:
        raise EndpointNotAllowed(
            "%(method)s /%(path)s has no token price for %(model)s (RELAY_PRICES), so keys "
            "with a quota or budget cannot call it. Ask the relay's operator.",
            method=call.method,
            path=call.path,
            model=model,
        )


def quota_refusal(refusal: Refusal) -> QuotaExceeded:
    """Why a call was refused for its quota, with the numbers the key holder needs."""
    if refusal.what == "budget":
        return QuotaExceeded(
            "This key's budget is spent: %(used).4f of %(limit).4f used, %(held).4f held by "
            "calls in flight, and this call needs at least %(needed).4f. Ask the relay's "
            "operator for a top-up.",
            used=refusal.used,
            limit=refusal.limit,
            held=refusal.held,
            needed=refusal.needed,
        )
    return QuotaExceeded(
        "This key's token quota is used up: %(used)d of %(limit)d tokens used and %(held)d "
        "held by calls in flight leave %(left)d; this call needs at least %(needed)d (its "
        "prompt, and max_tokens when it sets one). Send a lower max_tokens, or ask the "
        "relay's operator for a top-up.",
        used=int(refusal.used),
        limit=int(refusal.limit),
        held=int(refusal.held),
        left=max(int(refusal.limit - refusal.used - refusal.held), 0),
        needed=int(refusal.needed),
    )


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
