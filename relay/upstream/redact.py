"""Keeping the upstream key out of what clients get: whole bodies, streams split anywhere.

An upstream that echoes the request's Authorization (a debug mode, a proxy's error page, a
model repeating its prompt) would hand the operator's key to a key holder. Replies are
searched for it and it is replaced by REDACTED, in whole bodies and in streams, where the
key may be cut across two reads: the few bytes at a read's end that could be the start of
the key are held back until the next read says whether they are.
"""

REDACTED = b"[redacted]"
# Shorter keys are placeholders (the demo upstream's, a benchmark's "x"): replacing every
# such byte run in replies would mangle them and protect nothing.
MIN_SECRET = 8


def secret_of(api_key: str) -> bytes:
    """The bytes to look for in replies: the key, or b"" when it is too short to matter."""
    secret = api_key.encode("utf-8", "replace")
    return secret if len(secret) >= MIN_SECRET else b""


def redact(data: bytes, secret: bytes) -> bytes:
    """data with every copy of secret replaced."""
    return data.replace(secret, REDACTED) if secret and secret in data else data


def redact_text(text: str, secret: bytes) -> str:
    """A header value (the wire's bytes as latin-1 text, as http.client decodes them) with
    every copy of secret replaced."""
    if not secret:
        return text
    key = secret.decode("latin-1")
    return text.replace(key, REDACTED.decode()) if key in text else text


class KeyRedactor:
    """Redacts a key from a byte stream fed in pieces of any size, holding back at most
    len(key) - 1 bytes (only ever a tail that the key starts with)."""

    __slots__ = ("held", "secret")

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.held = b""

    def feed(self, data: bytes) -> bytes:
        """What of held + data can go out now, the key replaced."""
        secret = self.secret
        if self.held:
            data = self.held + data
            self.held = b""
        if secret in data:
            data = data.replace(secret, REDACTED)
        keep = self._key_start(data)
        if keep:
            self.held = data[-keep:]
            return data[:-keep]
        return data

    def flush(self) -> bytes:
        """The stream ended: what was held back was not the key after all."""
        held, self.held = self.held, b""
        return held

    def _key_start(self, data: bytes) -> int:
        """The length of the longest tail of data that is a start of the key (0 if none)."""
        secret = self.secret
        start = max(0, len(data) - len(secret) + 1)
        first = secret[:1]
        while (at := data.find(first, start)) != -1:
            if secret.startswith(data[at:]):
                return len(data) - at
            start = at + 1
        return 0
