"""relay: a self-hosted OpenAI-compatible API relay with its own keys, usage, limits and quotas."""

import logging


def create_app(test_config=None):
    """Build the Flask app: config, store, limiter, the two API faces and the operator pages."""
    # Imports stay inside: `relay.config` must be importable without Flask (gunicorn master).
    from flask import Flask
    from werkzeug.middleware.proxy_fix import ProxyFix

    from relay import (
        admin,
        balance,
        cli,
        errors,
        health,
        keyholder,
        legacy_face,
        metrics,
        openai_face,
    )
    from relay import config as relay_config
    from relay.inflight import make_inflight
    from relay.ratelimit import KeyLimits, drop_stray_retry_after, make_limiter
    from relay.state import RelayState

    app = Flask(__name__, instance_relative_config=True)
    relay_config.configure(app, test_config)
    _configure_logging(app)

    state = RelayState(app)
    app.extensions["relay"] = state
    if app.config["PROXY_COUNT"]:
        # Trust X-Forwarded-For only as far as the operator's own proxies go.
        count = app.config["PROXY_COUNT"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=count, x_proto=count, x_host=0)
    errors.init_app(app)
    # Registered before the limiter so it runs after the limiter's header hook.
    app.after_request(drop_stray_retry_after)
    # The limiter's hooks must be registered before the faces' hooks (global limit first).
    state.limiter = make_limiter(app)
    key_limits = KeyLimits(state.limiter, make_inflight(state.limiter.storage), app.config)
    state.admission_checks.append(key_limits.admit)
    state.finish_hooks.append(key_limits.finish)
    app.register_blueprint(openai_face.make_blueprint(state.limiter))
    app.register_blueprint(legacy_face.make_blueprint(state.limiter))
    app.register_blueprint(balance.bp)
    app.register_blueprint(health.bp)
    metrics.init_app(app, state)
    admin.init_app(app)
    keyholder.init_app(app)
    cli.init_app(app)
    return app


def _configure_logging(app):
    """Log to stderr (gunicorn captures it) at RELAY_LOG_LEVEL."""
    level = getattr(logging, str(app.config["LOG_LEVEL"]).upper(), logging.INFO)
    logger = logging.getLogger("relay")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
