"""The records that travel between the layers: one call, the key it runs under, its usage."""

import hashlib
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

FaceName = Literal["openai", "legacy"]
# "replaced": the upstream reported numbers that are not believable; the estimate was used.
UsageSource = Literal["upstream", "estimated", "replaced", "none"]
# How a call ended: normally, by a hang-up or a broken upstream, or with one of the relay's
# own error codes (errors.py) that the client was answered with.
Outcome = Literal[
    "ok",
    "client_disconnected",
    "upstream_dropped",
    "worker_lost",
    "shutdown",
    "upstream_timeout",
    "upstream_error",
    "invalid_request",
    "invalid_api_key",
    "model_not_allowed",
    "endpoint_not_allowed",
    "not_found",
    "method_not_allowed",
    "request_too_large",
    "insufficient_user_quota",
    "rate_limit_exceeded",
    "service_unavailable",
    "internal_error",
    "error",
]
OUTCOMES: frozenset[str] = frozenset(get_args(Outcome))
MAX_END_USER = 64  # characters of a call's end-user id kept in its usage row
LIMIT_ID_CHARS = 20  # 80 bits: no two keys of a relay share counters by chance


def as_outcome(code: str) -> Outcome:
    """An error code as a call outcome ("error" for codes a call cannot end with)."""
    return code if code in OUTCOMES else "error"  # type: ignore[return-value]


def limit_id(key_hash: str) -> str:
    """The name a key's limits are counted under: the same wherever the key exists.

    Derived from the stored hash alone, so every instance holding the key (adopted with
    `--key`, or in a shared database) counts it in one place, whatever its row id there;
    a short hash of that hash says nothing useful about the key (nor is it the hash).
    """
    digest = hashlib.sha256(b"relay limits\0" + key_hash.encode("ascii"))
    return digest.hexdigest()[:LIMIT_ID_CHARS]


@dataclass(frozen=True)
class KeyRecord:
    """One key's row, as the request pipeline needs it (read fresh from the store per call)."""

    id: int
    name: str
    enabled: bool
    quota_tokens: int | None
    used_tokens: int
    budget: float | None
    spent: float
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None
    models: tuple[str, ...] | None
    expires_at: float | None
    created_at: float
    last_used_at: float | None
    quota_period: str
    period_started_at: float | None
    key_hint: str
    limit_id: str  # names its rate, token-rate and concurrency counters; "" once deleted
    endpoints: tuple[str, ...] = ()  # account-wide endpoint groups opened for this key

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "KeyRecord":
        """Build from a `keys` row."""
        models = row.get("models")
        key_hash = row.get("key_hash")  # NULL for a deleted key, which can make no call
        return cls(
            id=row["id"],
            name=row["name"],
            enabled=bool(row["enabled"]),
            quota_tokens=row.get("quota_tokens"),
            used_tokens=row.get("used_tokens") or 0,
            budget=row.get("budget"),
            spent=row.get("spent") or 0.0,
            rpm=row.get("rpm"),
            tpm=row.get("tpm"),
            max_concurrent=row.get("max_concurrent"),
            models=tuple(m for m in models.split(",") if m) if models else None,
            expires_at=row.get("expires_at"),
            created_at=row["created_at"],
            last_used_at=row.get("last_used_at"),
            quota_period=row.get("quota_period") or "none",
            period_started_at=row.get("period_started_at"),
            key_hint=row.get("key_hint") or "",
            limit_id=limit_id(key_hash) if key_hash else "",
            endpoints=tuple(e for e in (row.get("endpoints") or "").split(",") if e),
        )

    @property
    def remaining_tokens(self) -> int | None:
        """Tokens left, or None for an unlimited key."""
        if self.quota_tokens is None:
            return None
        return max(self.quota_tokens - self.used_tokens, 0)

    def expired(self, now: float | None = None) -> bool:
        """Whether the key's expiry time has passed."""
        return self.expires_at is not None and (now or time.time()) >= self.expires_at

    def allows_model(self, model: str | None) -> bool:
        """Whether the allow-list (if any) admits this model (exact name or `prefix*`)."""
        if self.models is None or model is None:
            return True
        for allowed in self.models:
            if allowed == model or (allowed.endswith("*") and model.startswith(allowed[:-1])):
                return True
        return False


@dataclass
class Usage:
    """What a call consumed: tokens (and where the numbers came from), and priced units."""

    prompt: int = 0
    completion: int = 0
    total: int = 0
    source: UsageSource = "none"
    units: float = 0.0  # images, audio seconds or speech characters (see metering.py)
    unit: str | None = None

    def as_openai(self) -> dict[str, int]:
        """The numbers as an OpenAI usage object."""
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.total,
        }


@dataclass
class Call:
    """Everything the pipeline learns about one call; the usage recorder turns it into a row."""

    face: FaceName
    method: str
    path: str  # upstream path relative to the base URL, e.g. "chat/completions"
    query: bytes = b""
    body: bytes = b""
    json: dict | None = None  # the parsed body when it is a JSON object
    body_changed: bool = False  # json differs from body and must be re-encoded
    content_type: str | None = None
    key: KeyRecord | None = None
    relayed: bool = True  # False for the relay's own endpoints (balance): no usage row
    model_requested: str | None = None
    model: str | None = None  # after alias mapping: what the upstream is asked for
    stream_requested: bool = False  # the client asked for `"stream": true`
    client_wants_usage: bool = False
    end_user: str | None = None
    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=time.time)
    call_id: str = field(default_factory=lambda: secrets.token_hex(12))  # its usage row's id
    reserved: bool = False  # an in-flight row (and reservation) exists for this call
    # Filled in while the call runs.
    upstream_name: str | None = None
    upstream_request_id: str | None = None
    model_served: str | None = None
    attempts: int = 0
    status: int | None = None
    outcome: Outcome = "ok"
    usage: Usage = field(default_factory=Usage)
    ttfb: float | None = None
    bytes_out: int = 0
    reply_streamed: bool = False  # the reply is a stream: its generator completes the call
    completed: bool = False
    reply_headers: list[tuple[str, str]] = field(default_factory=list)  # the face's additions
    lease: object = None  # concurrency slot held while the call runs

    def mark_first_byte(self) -> None:
        """Note the time the first byte of the reply left for the client."""
        if self.ttfb is None:
            self.ttfb = time.perf_counter() - self.started

    def set_usage(self, counts: tuple[int, int, int], source: UsageSource) -> None:
        """Store (prompt, completion, total) and where the numbers came from."""
        self.usage.prompt, self.usage.completion, self.usage.total = counts
        self.usage.source = source
