"""Reading request bodies safely: a hard size limit (chunked too) and strict UTF-8 JSON objects."""

import json
import math
from typing import Any, NoReturn
from urllib.parse import unquote_plus

from werkzeug.http import parse_options_header

from relay.errors import InvalidRequest, RequestTooLarge
from relay.runtime import abandon_body

READ_SIZE = 64 * 1024


def read_body(environ: dict[str, Any], max_bytes: int, keyless: bool = False) -> bytes:
    """Read the whole request body, refusing more than max_bytes with a 413.

    Werkzeug silently truncates a chunked body at MAX_CONTENT_LENGTH, so the
    limit is enforced here by counting what actually arrives. `keyless`: no key came in
    the headers, and the limit is the smaller one for bodies read only to find a key.
    """
    declared = environ.get("CONTENT_LENGTH")
    if declared:
        try:
            length = int(declared)
        except ValueError:
            raise InvalidRequest("Content-Length is not a number.") from None
        if length > max_bytes:
            abandon_body(environ)
            raise _too_large(max_bytes, keyless)
        if length <= 0:
            return b""
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    parts: list[bytes] = []
    size = 0
    while True:
        part = stream.read(READ_SIZE)
        if not part:
            break
        size += len(part)
        if size > max_bytes:
            abandon_body(environ)
            raise _too_large(max_bytes, keyless)
        parts.append(part)
    return b"".join(parts)


def _too_large(max_bytes: int, keyless: bool) -> RequestTooLarge:
    """The 413 error for a body over the limit."""
    if keyless:
        return RequestTooLarge(
            "A request without a key in its headers may send at most %(limit)d bytes "
            "(RELAY_KEYLESS_MAX_BODY_BYTES); send the key as 'Authorization: Bearer <key>'.",
            limit=max_bytes,
        )
    return RequestTooLarge(
        "Request body is larger than the relay accepts (%(limit)d bytes, RELAY_MAX_BODY_BYTES).",
        limit=max_bytes,
    )


def _finite_float(text: str) -> float:
    """json parse_float hook: reject numbers too large to be a finite float."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _reject_constant(name: str) -> NoReturn:
    """json parse_constant hook: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a name given twice is refused.

    The relay reads one value (the last) while an upstream may act on the other (the
    first): a `model` the key may not use would pass the allow-list.
    """
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"the name {name!r} is given twice in one object")
            seen.add(name)
    return value


def decode_utf8(raw: bytes, field: str | None = None) -> str:
    """Decode bytes as strict UTF-8 (a leading BOM is tolerated), else a 400 naming the body
    or the form field they came from."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if field is not None:
            raise InvalidRequest(
                "Form field %(field)r is not valid UTF-8 (byte %(byte)d).",
                field=field,
                byte=exc.start,
            ) from None
        raise InvalidRequest(
            "Request body is not valid UTF-8 (byte %(byte)d).", byte=exc.start
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Parse a body that must be a UTF-8 JSON object; anything else is a 400 invalid_request."""
    text = decode_utf8(raw)
    if not text.strip():
        raise InvalidRequest("Request body is empty; a JSON object was expected.")
    try:
        value = json.loads(
            text,
            parse_float=_finite_float,
            parse_constant=_reject_constant,
            object_pairs_hook=_unique_keys,
        )
    except RecursionError:
        raise InvalidRequest("Request body is nested too deeply.") from None
    except ValueError as exc:
        raise InvalidRequest("Request body is not valid JSON: %(reason)s.", reason=exc) from None
    if not isinstance(value, dict):
        raise InvalidRequest(
            "Request body must be a JSON object, not a JSON %(kind)s.", kind=type(value).__name__
        )
    return value


def looks_like_json(content_type: str | None, raw: bytes) -> bool:
    """Whether a body should be read as JSON: a JSON media type, or no type and a `{` start."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return True
    if media in ("", "text/plain", "application/x-www-form-urlencoded"):
        return raw.lstrip()[:1] == b"{"
    return False


def take_form_key(raw: bytes, content_type: str | None, field: str) -> tuple[bytes, str | None]:
    """A form or multipart body without its `field` parts, and the first one's value.

    A client key sent as a form field must never travel on to the upstream, whichever
    face the body came in on and however the part names it (`name="f"` or `name=f`).
    Other bodies are returned as they came.
    """
    media, options = parse_options_header(content_type or "")
    media = media.lower()
    if media == "application/x-www-form-urlencoded" and field.encode() in raw:
        return _take_urlencoded(raw, field)
    if media == "multipart/form-data" and options.get("boundary") and field.encode() in raw:
        return _take_multipart(raw, options["boundary"].encode("latin-1"), field)
    return raw, None


def _take_urlencoded(raw: bytes, field: str) -> tuple[bytes, str | None]:
    """The urlencoded pairs without `field` (other pairs byte for byte), and its value."""
    kept, value = [], None
    for pair in raw.split(b"&"):
        name, _, text = pair.partition(b"=")
        if unquote_plus(name.decode("latin-1")) == field:
            if value is None:
                value = unquote_plus(text.decode("latin-1"), encoding="utf-8", errors="replace")
            continue
        kept.append(pair)
    return b"&".join(kept), value


def _take_multipart(raw: bytes, boundary: bytes, field: str) -> tuple[bytes, str | None]:
    """The multipart body without the parts named `field` (other bytes untouched), and the
    first one's value."""
    delimiter = b"--" + boundary
    pieces = raw.split(delimiter)
    kept, value = [pieces[0]], None
    for piece in pieces[1:]:
        head, _, content = piece.partition(b"\r\n\r\n")
        if _part_name(head) == field:
            if value is None:
                value = content.removesuffix(b"\r\n").decode("utf-8", "replace")
            continue
        kept.append(piece)
    return delimiter.join(kept), value


def _part_name(head: bytes) -> str | None:
    """The `name` of a multipart part's Content-Disposition header, quoted or not."""
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-disposition":
            return parse_options_header(value.decode("latin-1"))[1].get("name")
    return None
