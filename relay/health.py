"""GET /healthz: 200 when the process is up and the database takes writes."""

import sqlite3
import time

from flask import Blueprint, jsonify

from relay.errors import ServiceUnavailable
from relay.state import state

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """Prove the database is writable with one tiny write; 503 otherwise."""
    try:
        state().db.write(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO health (id, checked_at) VALUES (1, ?)", (time.time(),)
            ),
            timeout=2.0,
        )
    except sqlite3.Error as exc:
        raise ServiceUnavailable(f"The relay's database does not take writes: {exc}.") from None
    return jsonify(status="ok")
