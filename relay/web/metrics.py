"""GET /metrics for Prometheus: requests, latency, tokens, upstream errors, open streams, limits.

Gunicorn runs several worker processes. When PROMETHEUS_MULTIPROC_DIR is set (the
gunicorn config sets it before forking), every worker writes its numbers to files there
and a scrape adds them all up, whichever worker answers it. Without it (flask run,
tests) the numbers are this process's own.
"""

import os
import time
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector

from relay.auth import bearer_token, check_admin_token, verify
from relay.call import Call
from relay.limits import EXTENSION as LIMITS_EXTENSION
from relay.limits import Limits

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Route groups keep label values few: ids in paths (files/file-abc) must not become series.
ROUTE_GROUPS = (
    "chat/completions",
    "completions",
    "embeddings",
    "images/generations",
    "images/edits",
    "images/variations",
    "images",
    "audio/speech",
    "audio/transcriptions",
    "audio/translations",
    "audio",
    "moderations",
    "models",
    "files",
    "uploads",
    "batches",
    "responses",
    "fine_tuning",
    "assistants",
    "threads",
    "vector_stores",
    "relay/key",
    "dashboard/billing/subscription",
    "dashboard/billing/usage",
)
UPSTREAM_FAILURES = ("upstream_error", "upstream_timeout", "upstream_dropped")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
# Model names come from clients and upstreams; past this many, new ones share one label.
MAX_MODELS = 200
MAX_LABEL = 64

bp = Blueprint("metrics", __name__)


def route_group(path: str) -> str:
    """The route group of an upstream path such as `chat/completions` or `files/file-abc`."""
    path = path.strip("/")
    for group in ROUTE_GROUPS:
        if path == group or path.startswith(group + "/"):
            return group
    return "other"


class Metrics:
    """One app's metrics; `observe` is a finish hook, `stream_opened` the stream-start hook."""

    def __init__(self) -> None:
        # prometheus_client picks its storage when first imported: trust the directory only
        # if that import saw it too, else the files would be empty and the numbers lost.
        file_backed = getattr(values.ValueClass, "_multiprocess", False)
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV)) and file_backed
        # A registry per app (never the global one): tests build many apps in one process.
        self.registry = CollectorRegistry()
        self.models: set[str] = set()
        # (metric, label values) -> its child: `labels()` validates and locks on every
        # call; the label values are bounded (route groups, statuses, MAX_MODELS models).
        self.children: dict[tuple[Counter | Histogram, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "relay_requests",
            "Relayed requests by face, route group and HTTP status.",
            ["face", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "relay_request_duration_seconds",
            "Time from a relayed call's arrival to its end (the last byte of a stream).",
            ["face", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "relay_tokens",
            "Tokens used by relayed calls, by model and kind (prompt or completion).",
            ["model", "kind"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "relay_upstream_errors",
            "Calls the upstream failed: unreachable, 5xx, timed out or dropped mid-stream.",
            ["upstream", "code"],
            registry=self.registry,
        )
        self.streams_open = Gauge(
            "relay_streams_open",
            "Streamed replies in progress.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.limits_unavailable = Counter(
            "relay_limits_unavailable",
            "Requests (and lease renewals) that went without some of their limits because "
            "the limits storage failed or was being skipped after a failure (fail open).",
            registry=self.registry,
        )

    def _model_label(self, model: str | None) -> str:
        """A bounded label value for a model name."""
        model = (model or "-")[:MAX_LABEL]
        if model not in self.models:
            if len(self.models) >= MAX_MODELS:
                return "other"
            self.models.add(model)
        return model

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """The metric's child for these label values, made once."""
        key = (metric, labels)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = metric.labels(*labels)
        return child

    def stream_opened(self, call: Call) -> None:
        """A streamed reply started; `observe` counts it down when the call completes."""
        self.streams_open.inc()

    def observe(self, call: Call) -> None:
        """Finish hook: count one completed relayed call."""
        face, route = call.face, route_group(call.path)
        self._child(self.requests, face, route, str(call.status or 0)).inc()
        self._child(self.latency, face, route).observe(time.perf_counter() - call.started)
        prompt, completion = call.usage.prompt, call.usage.completion
        model = self._model_label(call.model_served or call.model)
        if prompt:
            self._child(self.tokens, model, "prompt").inc(prompt)
        if completion:
            self._child(self.tokens, model, "completion").inc(completion)
        if call.outcome in UPSTREAM_FAILURES:
            self._child(self.upstream_errors, call.upstream_name or "-", call.outcome).inc()
        if call.reply_streamed:
            self.streams_open.dec()

    def count_uncalled(self, response: Response) -> Response:
        """after_request: count API requests that left no usage row (refused, own endpoints)."""
        face = g.get("face_name")
        call = g.get("call")
        if face is not None and (call is None or not call.relayed):
            route = route_group(g.get("api_path", ""))
            self._child(self.requests, face, route, str(response.status_code)).inc()
        return response

    def exposition(self) -> bytes:
        """The Prometheus text of every worker's numbers (or this process's alone)."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)


@bp.get("/metrics")
def metrics_view() -> Response:
    """Prometheus text; needs the admin token as a bearer token when one is set."""
    token = current_app.config["ADMIN_TOKEN"]
    if token:
        sent = bearer_token(request.headers)
        message = "GET /metrics needs 'Authorization: Bearer <RELAY_ADMIN_TOKEN>'."
        verify(lambda: check_admin_token(sent, token, message))
    body = current_app.extensions["relay_metrics"].exposition()
    return current_app.response_class(body, content_type=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> Metrics | None:
    """Serve /metrics and return the call observer (None when RELAY_METRICS=off)."""
    if not app.config["METRICS"]:
        return None
    metrics = Metrics()
    app.extensions["relay_metrics"] = metrics
    limits: Limits | None = app.extensions.get(LIMITS_EXTENSION)
    if limits is not None:
        limits.on_unavailable(metrics.limits_unavailable.inc)
    app.after_request(metrics.count_uncalled)
    app.register_blueprint(bp)
    return metrics
