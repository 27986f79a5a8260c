"""The OpenAI face: every path under /v1 is forwarded as it came, but for the key fields."""

from flask import Blueprint, current_app, g, request

from relay import pipeline
from relay.models_list import models_union
from relay.ratelimit import per_key_rpm
from relay.request_body import looks_like_json, parse_json_object
from relay.state import state

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


# Endpoints whose bodies are always JSON objects: the relay reads them (model, stream,
# the prompt for estimates), so they must parse whatever Content-Type says.
JSON_ENDPOINTS = {
    "chat/completions", "completions", "embeddings", "moderations", "responses",
    "images/generations", "audio/speech",
}  # fmt: skip


def parse_body(raw, req):
    """JSON bodies must be UTF-8 JSON objects; other bodies (multipart, binary) pass untouched."""
    path = (req.view_args or {}).get("path")
    if req.method == "POST" and path in JSON_ENDPOINTS:
        return parse_json_object(raw)
    if raw and looks_like_json(req.content_type, raw):
        return parse_json_object(raw)
    return None


def make_blueprint(limiter):
    """Build the /v1 blueprint with this app's limiter."""
    bp = Blueprint("openai", __name__, url_prefix="/v1")

    @bp.before_request
    def open_call():
        """Authenticate and describe the call before limits and the view run."""
        g.face = "openai"
        path = (request.view_args or {}).get("path", request.path.removeprefix("/v1/"))
        pipeline.open_call("openai", path, parse_body)

    @bp.get("/models")
    @per_key_rpm(limiter)
    def list_models():
        """One upstream: forwarded as is. Several, or an allow-list: the relay's own union."""
        current, call = state(), g.call
        if len(current.router.upstreams) == 1 and call.key.models is None:
            return pipeline.run(call)
        pipeline.admit(call)
        body = models_union(current, call.key)
        call.upstream_name = "*"
        return current_app.response_class(body, mimetype="application/json")

    @bp.route("/<path:path>", methods=METHODS)
    @per_key_rpm(limiter)
    def relay_call(path):
        """Forward the call upstream."""
        return pipeline.run(g.call)

    bp.after_request(pipeline.close_call)
    return bp
