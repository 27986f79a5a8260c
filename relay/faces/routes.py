"""A face's URL rules: the relay's own endpoints, /models, and every other path forwarded."""

import json
from typing import Any

from flask import Blueprint, Response, current_app, g, request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from relay import pipeline
from relay.auth import BODY_KEY_FIELD, key_in_headers
from relay.errors import InvalidRequest, RelayError, RequestTooLarge
from relay.face import Face
from relay.faces import balance
from relay.faces.request_body import read_body, take_form_key
from relay.limits import Limits, count_unauthenticated
from relay.runtime import abandon_body
from relay.state import state

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
# The relay's own endpoints under each prefix (answered here, never forwarded).
OWN_ENDPOINTS = {
    "relay_key": ("/relay/key", ["GET", "POST"]),
    "billing_subscription": ("/dashboard/billing/subscription", ["GET"]),
    "billing_usage": ("/dashboard/billing/usage", ["GET"]),
}
# Every path the relay answers itself (/models too: it may merge several upstreams' lists),
# with its methods. Any other method gets a 405 rather than the catch-all, which would
# forward it upstream with the operator's key.
OWN_PATHS = {rule: methods for rule, methods in OWN_ENDPOINTS.values()} | {"/models": ["GET"]}
REFUSED = "wrong_method"


def read_and_open(face: Face, relayed: bool) -> None:
    """Check a Bearer key, read the body (bounded by what is known of the caller), find the
    key in it otherwise, and open the call."""
    try:
        known = pipeline.check_bearer_key()
    except RelayError:
        abandon_body(request.environ)  # refused before its body: none of it is read
        raise
    config = current_app.config
    # A body is read whole only for a caller who named a key up front; without one, it
    # is read just far enough to find a key in it (legacy bodies carry theirs).
    keyless = not key_in_headers(request.headers)
    limit = config["KEYLESS_MAX_BODY_BYTES"] if keyless else config["MAX_BODY_BYTES"]
    try:
        raw = read_body(request.environ, min(limit, config["MAX_BODY_BYTES"]), keyless)
        raw, form_key = take_form_key(raw, request.content_type, BODY_KEY_FIELD)
        pipeline.open_call(face, g.api_path, raw, relayed, form_key, known)
    except (InvalidRequest, RequestTooLarge):
        if keyless and "call" not in g:
            # A body refused before any key was found in it is a stranger's failure too:
            # repeating it gets the address blocked, as guessing keys does.
            count_unauthenticated()
        raise


def make_blueprint(face: Face, limits: Limits) -> Blueprint:
    """The blueprint of one face, under each of its prefixes."""
    bp = Blueprint(face.name, __name__)

    @bp.url_value_preprocessor
    def name_the_call(endpoint: str | None, values: dict[str, Any] | None) -> None:
        """Note the face and path first (before any limit), so every answer is counted."""
        g.face_name, g.api_path = face.name, face.api_path(request.path) or ""

    @bp.before_request
    def open_call() -> None:
        """Read the body and authenticate before the per-key limits and the view run."""
        endpoint = (request.endpoint or "").rpartition(".")[2]
        if endpoint in (REFUSED, "not_ours"):
            return  # refused before any key is asked for, as in HTTP
        read_and_open(face, endpoint not in OWN_ENDPOINTS)

    def own_reply(payload: dict[str, Any]) -> Response:
        """A reply of the relay's own, in the face's shape."""
        return current_app.response_class(
            json.dumps(face.wrap_own(payload), ensure_ascii=False), mimetype="application/json"
        )

    def relay_key() -> Response:
        """The caller's key: quota, used, remaining, limits, expiry."""
        config = current_app.config
        summary = balance.key_summary(g.call.key, config["DEFAULT_RPM"], config["OPEN_ENDPOINTS"])
        return own_reply(summary)

    def billing_subscription() -> Response:
        """OpenAI's old subscription object."""
        return own_reply(balance.subscription(g.call.key))

    def billing_usage() -> Response:
        """OpenAI's old usage object for the caller's key."""
        return own_reply(balance.usage(state().store, g.call.key, request.args))

    def models() -> Response:
        """GET /models: the upstream's list, or the union the key may use."""
        return pipeline.list_models(g.call, face)

    def relay_call(path: str) -> Response:
        """Forward the call upstream."""
        return pipeline.run(g.call, face)

    def not_ours(rest: str) -> Response:
        """/relay/… is the relay's own namespace: an unknown path there is a 404, never sent."""
        raise NotFound()

    def wrong_method() -> Response:
        """Another method on one of the relay's own paths: a 405 naming the allowed ones."""
        allowed = OWN_PATHS["/" + g.api_path]
        automatic = ["HEAD"] if "GET" in allowed else []
        raise MethodNotAllowed(valid_methods=[*allowed, *automatic, "OPTIONS"])

    own_views = {
        "relay_key": limits.exempt(relay_key),
        "billing_subscription": limits.exempt(billing_subscription),
        "billing_usage": limits.exempt(billing_usage),
    }
    models_view = limits.per_key_rpm(models)
    relay_view = limits.per_key_rpm(relay_call)
    refuse_view = limits.exempt(wrong_method)
    for prefix in face.prefixes:
        for endpoint, (rule, methods) in OWN_ENDPOINTS.items():
            bp.add_url_rule(prefix + rule, endpoint, own_views[endpoint], methods=methods)
        bp.add_url_rule(prefix + "/models", "models", models_view, methods=["GET"])
        for rule, methods in OWN_PATHS.items():
            others = [method for method in METHODS if method not in methods]
            bp.add_url_rule(
                prefix + rule, REFUSED, refuse_view, methods=others, provide_automatic_options=False
            )
        bp.add_url_rule(
            prefix + "/relay/<path:rest>", "not_ours", limits.exempt(not_ours), methods=METHODS
        )
        bp.add_url_rule(prefix + "/<path:path>", "relay_call", relay_view, methods=METHODS)
    bp.after_request(pipeline.close_call)
    return bp
