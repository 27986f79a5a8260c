"""GET /healthz: 200 when the process is up and the database takes writes; whether limits apply."""

from flask import Blueprint, Flask, Response, jsonify

from relay.errors import ServiceUnavailable
from relay.state import state
from relay.store import StoreError

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """Prove the database is writable with one tiny write; 503 otherwise.

    `"limits": "degraded"` says the limits storage (Redis) does not answer, so calls are
    served without limits; that alone is no reason to take the instance out of service.
    """
    current = state()
    try:
        current.store.check_writable(timeout=2.0)
    except StoreError as exc:
        raise ServiceUnavailable(
            "The relay's database does not take writes: %(reason)s.", reason=exc
        ) from None
    return jsonify(status="ok", limits="ok" if current.limits.available() else "degraded")


def init_app(app: Flask) -> None:
    """Register /healthz."""
    app.register_blueprint(bp)
