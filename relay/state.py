"""The per-process objects every request shares: store, keys, router, upstream pool, limiter."""

import logging
import sqlite3

from flask import current_app

from relay.config import ConfigError
from relay.db import Database
from relay.keys import KeyStore
from relay.pacing import Pacer
from relay.upstream_http import make_pool
from relay.upstreams import Router, load_upstreams
from relay.usage import UsageRecorder

log = logging.getLogger("relay")


class RelayState:
    """Built once per app by create_app; reached through `state()` during requests."""

    def __init__(self, app):
        config = app.config
        self.config = config
        self.db = Database(config["DATABASE"], write_timeout=config["DB_WRITE_TIMEOUT"])
        try:
            self.db.migrate()
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(
                f"RELAY_DATABASE {config['DATABASE']} cannot be opened for writing ({exc})."
            ) from None
        self.keys = KeyStore(self.db)
        self.recorder = UsageRecorder(self.db, config["PRICES"])
        self.router = Router(load_upstreams(config), cooldown=config["UPSTREAM_COOLDOWN"])
        self.http = make_pool(config["UPSTREAM_POOL_SIZE"])
        self.limiter = None  # set by create_app once flask-limiter is configured
        self.admission_checks = []  # called with each call before it is forwarded
        self.finish_hooks = []  # called with every finished call (metrics, limits)
        self.stream_hooks = []  # called when a streamed reply starts (metrics)
        self.pacer = Pacer(config["STREAM_MAX_PAUSE"])

    def complete(self, call):
        """Record a finished call once: its usage row, then every finish hook."""
        if call.completed:
            return
        call.completed = True
        self.recorder.record(call)
        for hook in self.finish_hooks:
            try:
                hook(call)
            except Exception:  # a metrics or limit hiccup must not lose the reply
                log.exception("finish hook failed")


def state():
    """The current app's RelayState."""
    return current_app.extensions["relay"]
