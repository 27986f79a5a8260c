"""Credentials: the client's relay key in a request, checked against the store; the admin token.

Every credential check (relay keys on both faces and the key page, the admin token on
/admin and /metrics) goes through `verify`, so a failure always counts against the
caller's address and guessing stays slow.
"""

import hmac
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from werkzeug.datastructures import Headers

from relay.call import KeyRecord
from relay.errors import AdminAuthRequired, InvalidApiKey
from relay.limits import count_unauthenticated
from relay.store.keys import KeyStore, month_start_ts, utc_minute

BODY_KEY_FIELD = "api_secret_key"
KEY_HEADERS = ("api-key", "x-api-key")
MAX_KEY_LENGTH = 512
T = TypeVar("T")
HeaderSource = Headers | Mapping[str, str]


def verify(check: Callable[[], T]) -> T:
    """Run one credential check; a failure first counts against the caller's address.

    Past RELAY_UNAUTHENTICATED_RPM failures a minute the answer is a 429 instead.
    """
    try:
        return check()
    except (InvalidApiKey, AdminAuthRequired):
        count_unauthenticated()
        raise


def key_in_headers(headers: HeaderSource) -> bool:
    """Whether the request names a key in its headers (else it can only be in the body)."""
    return bool(bearer_token(headers)) or any(headers.get(name, "").strip() for name in KEY_HEADERS)


def find_client_key(headers: HeaderSource, body: Any, form_key: str | None = None) -> str | None:
    """Return the key from Authorization: Bearer, the body field (JSON, or a form field taken
    out of a form body), or api-key headers (or None)."""
    token = bearer_token(headers)
    if token:
        return token
    for value in (body.get(BODY_KEY_FIELD) if isinstance(body, dict) else None, form_key):
        if isinstance(value, str) and value.strip():
            return value.strip()
    for name in KEY_HEADERS:
        value = headers.get(name, "").strip()
        if value:
            return value
    return None


def strip_body_key(body: Any) -> bool:
    """Remove the key field from a parsed body; True when something was removed."""
    if isinstance(body, dict) and BODY_KEY_FIELD in body:
        del body[BODY_KEY_FIELD]
        return True
    return False


def authenticate(store: KeyStore, key: str | None) -> KeyRecord:
    """Return the key's record, or raise invalid_api_key without ever echoing the key."""
    if key is None:
        raise InvalidApiKey(
            "Incorrect API key provided: no key was sent. Pass your relay key as "
            "'Authorization: Bearer <key>' (or the api_secret_key body field)."
        )
    if len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidApiKey("Incorrect API key provided.")
    record = store.authenticate(key)
    if record is None:
        raise InvalidApiKey("Incorrect API key provided. Ask the relay's operator for a valid key.")
    if not record.enabled:
        raise InvalidApiKey("Incorrect API key provided: this key is disabled.")
    if record.expired():
        raise InvalidApiKey(
            "Incorrect API key provided: this key expired at %(expired)s UTC.",
            expired=utc_minute(record.expires_at),
        )
    started = record.period_started_at or 0
    if record.quota_period == "monthly" and started < month_start_ts(time.time()):
        store.roll_periods()  # a new month began: this key's quota starts again
        record = store.get(record.id) or record
    return record


def bearer_token(headers: HeaderSource) -> str:
    """The token of `Authorization: Bearer <token>`, or ""."""
    scheme, _, sent = headers.get("Authorization", "").strip().partition(" ")
    return sent.strip() if scheme.lower() == "bearer" else ""


def check_admin_token(sent: str, token: str, message: str) -> None:
    """Raise AdminAuthRequired unless `sent` is the admin token (compared in constant time)."""
    if not sent or not hmac.compare_digest(sent.encode(), token.encode()):
        raise AdminAuthRequired(message, headers={"WWW-Authenticate": 'Bearer realm="relay"'})
