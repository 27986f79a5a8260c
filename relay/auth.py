"""Finding the client's relay key in a request and checking it against the key store."""

import time

from relay.errors import InvalidApiKey
from relay.keys import month_start_ts, utc_minute

BODY_KEY_FIELD = "api_secret_key"
KEY_HEADERS = ("api-key", "x-api-key")
MAX_KEY_LENGTH = 512


def find_client_key(headers, body):
    """Return the key from Authorization: Bearer, the body field, or api-key headers (or None)."""
    authorization = headers.get("Authorization", "")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if isinstance(body, dict):
        value = body.get(BODY_KEY_FIELD)
        if isinstance(value, str) and value.strip():
            return value.strip()
    for name in KEY_HEADERS:
        value = headers.get(name, "").strip()
        if value:
            return value
    return None


def strip_body_key(body):
    """Remove the key field from a parsed body; True when something was removed."""
    if isinstance(body, dict) and BODY_KEY_FIELD in body:
        del body[BODY_KEY_FIELD]
        return True
    return False


def authenticate(store, key):
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
            f"Incorrect API key provided: this key expired at {utc_minute(record.expires_at)} UTC."
        )
    started = record.period_started_at or 0
    if record.quota_period == "monthly" and started < month_start_ts(time.time()):
        store.roll_periods()  # a new month began: this key's quota starts again
        record = store.get(record.id)
    return record
