"""What this process runs under: gevent's patched world (gunicorn's gevent workers) or threads."""

from gevent import monkey


def gevent_active() -> bool:
    """Whether gevent's monkey patching is in effect (gunicorn -k gevent, the Procfile's worker)."""
    return bool(monkey.is_module_patched("socket"))
