"""Last in every run (conftest orders it): no key of any kind in a reply or log line of the run."""

import inspect

from conftest import (
    CAPTURED_LOG_FILES,
    CAPTURED_REPLIES,
    LOG_CAPTURE,
    SECRETS_SEEN,
    UPSTREAM_KEY,
    auth,
)

from relay.store import keys


def _haystacks():
    """Everything the relay said during the session: replies, in-process logs, gunicorn logs."""
    yield from CAPTURED_REPLIES
    yield from (line.encode() for line in LOG_CAPTURE.lines)
    for path in CAPTURED_LOG_FILES:
        if path.exists():
            yield path.read_bytes()


def test_no_secret_in_any_reply_or_log(client, key, fake):
    # Make sure this run has at least some traffic of its own, errors and logs included.
    client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": []}, headers=auth(key))
    client.get("/v1/models", headers=auth(key + "x"))
    fake.rejected_keys.add(UPSTREAM_KEY)
    client.get("/v1/models", headers=auth(key))
    secrets = [s.encode() for s in SECRETS_SEEN]
    checked = 0
    for haystack in _haystacks():
        checked += 1
        for secret in secrets:
            assert secret not in haystack, f"a secret leaked: …{secret[-6:].decode()}"
    assert checked > 10 and len(secrets) > 1


def test_key_check_is_constant_time():
    # The lookup is by hash; the final comparison must stay hmac.compare_digest.
    source = inspect.getsource(keys.KeyStore.authenticate)
    assert "hmac.compare_digest" in source
    assert "==" not in source.split("compare_digest", 1)[0].split("def authenticate", 1)[1]
