"""The legacy face: the old PHP-era service's body-key API on /index.php/api/v1 and /api/v1."""

import json

from flask import Blueprint, current_app, g, request

from relay import pipeline
from relay.errors import InvalidRequest
from relay.legacy_body import drop_multipart_field, multipart_has_files, parse_legacy_body
from relay.legacy_chat import check_messages, trim_history
from relay.openai_face import METHODS
from relay.ratelimit import per_key_rpm
from relay.usage import GENERATION_PATHS

PREFIXES = ("/index.php/api/v1", "/api/v1")
TRIMMED_HEADER = "X-Relay-Trimmed-Messages"


def envelope(call, parsed):
    """The reply with the old service's `code`/`msg` beside the OpenAI fields."""
    error = parsed.get("error")
    if call.status and call.status >= 400 and error is not None:
        message = error.get("message") if isinstance(error, dict) else str(error)
        wrapped = {"code": call.status, "msg": message or "Upstream error.", "error": error}
    else:
        if call.estimated_usage is not None and not isinstance(parsed.get("usage"), dict):
            parsed["usage"] = call.estimated_usage
        wrapped = {
            "code": 0,
            "msg": "",
            **{k: v for k, v in parsed.items() if k not in ("code", "msg")},
        }
    return json.dumps(wrapped, ensure_ascii=False).encode("utf-8")


def prepare(call):
    """Apply the old service's defaults and rules to a legacy call before it is admitted."""
    body = call.json
    call.reply_hook = envelope
    if call.json is None:
        return
    if multipart_has_files(call.body, call.content_type):
        # An upload: pass the multipart body on, minus the key field.
        call.body = drop_multipart_field(call.body, call.content_type, "api_secret_key")
        call.json = None
        return
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > pipeline.MAX_END_USER):
        raise InvalidRequest(
            f"user must be a string of at most {pipeline.MAX_END_USER} characters.", param="user"
        )
    if call.path == "chat/completions":
        check_messages(body.get("messages"))
        limit = current_app.config["LEGACY_MAX_CHARS"]
        kept, dropped = trim_history(body["messages"], limit)
        if dropped:
            body["messages"] = kept
            g.trimmed_messages = dropped
    # Forms and wrongly typed JSON are re-sent as JSON, always.
    call.body_changed = True


def add_trim_header(response):
    """Tell the client how many old messages were dropped to fit the limit."""
    dropped = g.get("trimmed_messages")
    if dropped:
        response.headers[TRIMMED_HEADER] = str(dropped)
    return response


def make_blueprint(limiter):
    """Build the legacy blueprint (both prefixes) with this app's limiter."""
    bp = Blueprint("legacy", __name__)

    @bp.before_request
    def open_call():
        """Default model, authentication and the chat rules, before limits and the view."""
        g.face = "legacy"
        path = (request.view_args or {}).get("path", "")
        if request.method == "POST" and path in GENERATION_PATHS:
            pipeline.open_call("legacy", path, _with_default_model)
        else:
            pipeline.open_call("legacy", path, parse_legacy_body)
        prepare(g.call)

    def relay_call(path):
        """Forward the call upstream (same pipeline as the OpenAI face)."""
        return pipeline.run(g.call)

    view = per_key_rpm(limiter)(relay_call)
    for prefix in PREFIXES:
        bp.add_url_rule(f"{prefix}/<path:path>", view_func=view, methods=METHODS)
    bp.after_request(add_trim_header)
    bp.after_request(pipeline.close_call)
    return bp


def _with_default_model(raw, req):
    """Parse a generation body and fill in the default model when it names none."""
    body = parse_legacy_body(raw, req)
    if body is None:
        body = {}
    if not body.get("model"):
        body["model"] = current_app.config["DEFAULT_MODEL"]
    return body
