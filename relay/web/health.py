"""GET /healthz: 200 when the process is up and the database takes writes."""

from flask import Blueprint, Flask, Response, jsonify

from relay.errors import ServiceUnavailable
from relay.state import state
from relay.store import StoreError

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """Prove the database is writable with one tiny write; 503 otherwise."""
    try:
        state().store.check_writable(timeout=2.0)
    except StoreError as exc:
        raise ServiceUnavailable(f"The relay's database does not take writes: {exc}.") from None
    return jsonify(status="ok")


def init_app(app: Flask) -> None:
    """Register /healthz."""
    app.register_blueprint(bp)
