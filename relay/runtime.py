"""What this process runs under: gevent's patched world (gunicorn's gevent workers) or threads,
and what its server lets the app do about a request body it will not read."""

from typing import Any

from gevent import monkey


def gevent_active() -> bool:
    """Whether gevent's monkey patching is in effect (gunicorn -k gevent, the Procfile's worker)."""
    return bool(monkey.is_module_patched("socket"))


def abandon_body(environ: dict[str, Any]) -> None:
    """Answer without reading the rest of the body: the connection closes after the reply
    (under gunicorn: serve/client_guard.py), so no one waits for bytes nobody will read,
    and gunicorn does not read and throw away a large body to reach the next request."""
    abandon = getattr(environ.get("wsgi.input"), "abandon", None)
    if abandon is not None:
        abandon()
