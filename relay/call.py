"""The state of one relayed call, from the client's request to its usage row."""

import time
from dataclasses import dataclass, field


@dataclass
class Call:
    """Everything the pipeline learns about one call; `UsageRecorder` turns it into a row."""

    face: str  # "openai" or "legacy"
    method: str
    path: str  # upstream path relative to the base URL, e.g. "chat/completions"
    query: bytes = b""
    body: bytes = b""
    json: dict | None = None  # the parsed body when it is a JSON object
    body_changed: bool = False  # json differs from body and must be re-encoded
    content_type: str | None = None
    key: object = None  # KeyRecord
    model_requested: str | None = None
    model: str | None = None  # after alias mapping: what the upstream is asked for
    stream: bool = False
    client_wants_usage: bool = False
    end_user: str | None = None
    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=time.time)
    # Filled in while the call runs.
    upstream_name: str | None = None
    upstream_request_id: str | None = None
    model_served: str | None = None
    attempts: int = 0
    status: int | None = None
    outcome: str = "ok"
    tokens: tuple = (0, 0, 0)
    usage_source: str = "none"  # "upstream", "estimated" or "none"
    ttfb: float | None = None
    bytes_out: int = 0
    streaming: bool = False  # the reply generator, not the request, completes the call
    completed: bool = False
    estimated_usage: dict | None = None  # the usage object we made up, for legacy replies
    lease: object = None  # concurrency slot held while the call runs
    reply_hook: object = None  # face-specific rewrite of JSON replies (legacy envelope)

    def mark_first_byte(self):
        """Note the time the first byte of the reply left for the client."""
        if self.ttfb is None:
            self.ttfb = time.perf_counter() - self.started

    def set_usage(self, usage_tuple, source):
        """Store (prompt, completion, total) and where the numbers came from."""
        self.tokens = usage_tuple
        self.usage_source = source
