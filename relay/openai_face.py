"""The OpenAI face: every path under /v1 is forwarded as it came, but for the key fields."""

from flask import Blueprint, g, request

from relay import pipeline
from relay.ratelimit import per_key_rpm
from relay.request_body import looks_like_json, parse_json_object

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def parse_body(raw, req):
    """JSON bodies must be UTF-8 JSON objects; other bodies (multipart, binary) pass untouched."""
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

    @bp.route("/<path:path>", methods=METHODS)
    @per_key_rpm(limiter)
    def relay_call(path):
        """Forward the call upstream."""
        return pipeline.run(g.call)

    bp.after_request(pipeline.close_call)
    return bp
