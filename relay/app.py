"""The app factory: configuration, then each layer built once and wired into one RelayState."""

import logging
from typing import Any

from flask import Flask, Response
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import PathConverter

from relay import config as relay_config
from relay import errors, faces
from relay.config import ConfigError
from relay.errors import StoreUnavailable, error_response
from relay.limits import Limits
from relay.serve import cli
from relay.state import EXTENSION, RelayState
from relay.store import Pricing, Store, StoreError
from relay.upstream import Upstreams
from relay.web import admin, health, keyholder, language, metrics, sessions

# What opening the store can raise: the engines' errors, or the file system's.
OPEN_ERRORS: tuple[type[Exception], ...] = (*StoreError, OSError)


def create_app(test_config: dict[str, Any] | None = None, migrate: bool = True) -> Flask:
    """Build the Flask app: config, store, limits, upstreams, the two API faces, the web pages.

    migrate=False leaves the store as it is found (the `db` commands: a backup, a check or a
    dry run must not change it, and a restore replaces it).
    """
    app = Flask(
        __name__,
        instance_relative_config=True,
        template_folder="web/templates",
        static_folder="web/static",
    )
    _no_redirects(app)
    relay_config.configure(app, test_config)
    _configure_logging(app)
    if app.config["PROXY_COUNT"]:
        # Trust X-Forwarded-For only as far as the operator's own proxies go.
        count = app.config["PROXY_COUNT"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=count, x_proto=count, x_host=0)  # type: ignore[method-assign]
    api_faces = faces.build_faces(app.config)
    errors.init_app(app, faces.error_shaper(api_faces))
    for kind in StoreError:  # a key lookup the database did not answer: 503, never a 500
        app.register_error_handler(kind, _store_unavailable)
    limits = Limits(app)  # its hooks run before the faces' (the global limit first)
    app.extensions[EXTENSION] = RelayState(
        app.config,
        open_store(app.config, migrate),
        Upstreams(app.config),
        limits,
        metrics.init_app(app),
    )
    faces.init_app(app, api_faces, limits)
    health.init_app(app)
    language.init_app(app)
    admin.init_app(app)
    keyholder.init_app(app)
    sessions.init_app(app)
    cli.init_app(app)
    return app


class SegmentsConverter(PathConverter):
    """`<path:...>` without empty segments: `chat//completions` is no path of the API's."""

    regex = "[^/]+(?:/[^/]+)*/?"


def _no_redirects(app: Flask) -> None:
    """Route every URL as it is spelt: werkzeug builds its redirects from the Host header.

    It redirects `/v1//chat/completions` to `http://<Host>/v1/chat/completions`
    (merge_slashes), so whoever sets Host picks where the client is sent. Here a doubled
    slash matches no rule and `<path>` parts have no empty segments: a JSON 404, like any
    unknown URL. Werkzeug also redirects a URL missing a rule's trailing slash: each such
    rule has its twin without the slash, or is not strict (`/`, in web/keyholder.py).
    """
    app.url_map.merge_slashes = False
    app.url_map.converters["path"] = SegmentsConverter


def open_store(config: dict[str, Any], migrate: bool = True) -> Store:
    """The store, migrated; ConfigError in one sentence when its file cannot be written."""
    pricing = Pricing(config["PRICES"], config["TOKENS_PER_MONEY"])
    store = Store(config["DATABASE"], config["DB_WRITE_TIMEOUT"], pricing, config["SPOOL_FILE"])
    if not migrate:
        return store  # opened on first use, as found
    try:
        store.migrate()
        store.recover()  # calls of a worker that died (gunicorn starts this one in its place)
    except OPEN_ERRORS as exc:
        store.close()
        raise ConfigError(
            f"RELAY_DATABASE {store.description} cannot be opened for writing ({exc})."
        ) from None
    return store


def _store_unavailable(exc: Exception) -> Response:
    """The reply to a request whose database read or write failed: 503 store_unavailable."""
    logging.getLogger("relay").warning("database unavailable: %s", exc)
    return error_response(
        StoreUnavailable("The relay's database is unavailable right now; retry shortly.")
    )


def _configure_logging(app: Flask) -> None:
    """Log to stderr (gunicorn captures it) at RELAY_LOG_LEVEL."""
    level = getattr(logging, str(app.config["LOG_LEVEL"]).upper(), logging.INFO)
    logger = logging.getLogger("relay")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
