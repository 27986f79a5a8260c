"""Legacy request bodies: JSON whatever the Content-Type, or PHP-style forms in bracket notation."""

import json
import math
import re
from typing import Any, Literal
from urllib.parse import parse_qsl

from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from relay.errors import InvalidRequest
from relay.faces.request_body import decode_utf8, parse_json_object
from relay.i18n import Text

FLOAT_FIELDS = {"temperature", "top_p", "frequency_penalty", "presence_penalty"}
INT_FIELDS = {"max_tokens", "max_completion_tokens", "n", "best_of", "seed", "top_logprobs"}
BOOL_FIELDS = {"stream", "echo", "include_usage", "parallel_tool_calls", "store"}
TRUE = {"1", "true", "on", "yes"}
FALSE = {"0", "false", "off", "no", ""}
BRACKETS = re.compile(r"\[([^\[\]]*)\]")
# name=value pairs joined by &, nothing else (no white space): what http_build_query makes.
# Names are field names (letters, digits, _.-+~, PHP's brackets, %-escapes); neither part
# holds "&" and names hold no "=", so matching is linear.
FORM_BODY = re.compile(rb"[\w.+~%\[\]-]+=[^&\s]*(?:&[\w.+~%\[\]-]+=[^&\s]*)*&?")
MAX_FIELDS = 1000  # PHP's max_input_vars: no legacy client sent more
MAX_DEPTH = 32  # levels of brackets in one field name
MAX_INDEX_DIGITS = 9  # a longer run of digits is a name, not an index
BodyKind = Literal["json", "form", "multipart"]


def parse_legacy_body(raw: bytes, content_type: str | None) -> dict[str, Any] | None:
    """Decode a legacy body into a dict (None when empty): JSON, a urlencoded form or multipart."""
    if not raw.strip():
        return None
    media, options = parse_options_header(content_type or "")
    kind = body_kind(raw, media.lower())
    if kind == "multipart":
        pairs, _ = multipart_fields(raw, options.get("boundary"))
        return coerce_types(nest(pairs))
    if kind == "form":
        return coerce_types(nest(urlencoded_fields(raw)))
    return coerce_types(parse_json_object(raw))


def body_kind(raw: bytes, media: str) -> BodyKind:
    """How to read a legacy body, by its first bytes before its (often wrong) media type.

    A body that starts like JSON is JSON whatever the header claims (curl -d, PHP clients
    that set the wrong type, Notepad's byte-order mark). Any other body is a form when its
    type says so, or when it is made of name=value pairs: the old PHP example adds
    `Content-Type: application/json` to an http_build_query body. The rest is read as
    JSON, so it gets the 400 that says why it is not.
    """
    if _looks_like_json(raw):
        return "json"
    if media == "multipart/form-data":
        return "multipart"
    if media == "application/x-www-form-urlencoded" or FORM_BODY.fullmatch(raw.strip()):
        return "form"
    return "json"


def _looks_like_json(raw: bytes) -> bool:
    """Whether a body starts like JSON (after white space and a UTF-8 byte-order mark)."""
    return raw.lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()[:1] in (b"{", b"[")


def urlencoded_fields(raw: bytes) -> list[tuple[str, str]]:
    """Name/value pairs of a urlencoded body, strictly UTF-8."""
    text = decode_utf8(raw)
    if text.count("&") >= MAX_FIELDS:  # counted before any is parsed
        raise InvalidRequest("A form body may have %(limit)d fields at most.", limit=MAX_FIELDS)
    try:
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_FIELDS,
        )
    except UnicodeDecodeError:
        raise InvalidRequest("Form body is not valid UTF-8 once percent-decoded.") from None
    except ValueError as exc:
        raise InvalidRequest("Form body is malformed: %(reason)s.", reason=exc) from None
    return pairs


def multipart_fields(raw: bytes, boundary: str | None) -> tuple[list[tuple[str, str]], bool]:
    """(name/value pairs of the text fields, whether there were files), strictly UTF-8."""
    if not boundary:
        raise InvalidRequest("multipart/form-data without a boundary.")
    decoder = MultipartDecoder(boundary.encode("latin-1"), max_form_memory_size=len(raw) + 1)
    try:
        decoder.receive_data(raw)
        decoder.receive_data(None)
        pairs: list[tuple[str, str]] = []
        parts: list[bytes] = []
        name, is_file, files = "", False, 0
        while True:
            event = decoder.next_event()
            if isinstance(event, NeedData | Epilogue):
                break
            if isinstance(event, Field | File):
                name, parts, is_file = event.name, [], isinstance(event, File)
                files += is_file
            elif isinstance(event, Data):
                parts.append(event.data)
                if not event.more_data and not is_file:
                    pairs.append((name, decode_utf8(b"".join(parts), field=name)))
            if len(pairs) > MAX_FIELDS:
                raise InvalidRequest(
                    "A form body may have %(limit)d fields at most.", limit=MAX_FIELDS
                )
    except ValueError as exc:
        raise InvalidRequest("multipart body is malformed: %(reason)s.", reason=exc) from None
    return pairs, files > 0


def multipart_has_files(raw: bytes, content_type: str | None) -> bool:
    """Whether a multipart body carries file parts (an upload to pass on as multipart)."""
    media, options = parse_options_header(content_type or "")
    if media.lower() != "multipart/form-data" or not options.get("boundary"):
        return False
    if _looks_like_json(raw):
        return False
    return multipart_fields(raw, options["boundary"])[1]


def nest(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Build nested dicts/lists from PHP bracket names: messages[0][role]=user, stop[]=x.

    Linear in the number of fields: each object remembers the next index `[]` gets
    (recomputing it per field made 60 KB of `a[]=1&a[]=1…` freeze a worker). Names
    nested deeper than MAX_DEPTH are a 400, as PHP caps max_input_nesting_level.
    """
    root: dict[str, Any] = {}
    next_index: dict[int, int] = {}  # id(object) -> what its next `[]` is
    for name, value in pairs:
        head, _, _ = name.partition("[")
        path = [head, *BRACKETS.findall(name[len(head) :])] if "[" in name else [name]
        if len(path) > MAX_DEPTH:
            raise InvalidRequest(
                "Form field names may be nested %(depth)d levels deep at most.",
                param=head,
                depth=MAX_DEPTH,
            )
        node = root
        for depth, part in enumerate(path):
            segment = part if part else str(next_index.get(id(node), 0))
            if _is_index(segment):
                number = int(segment) + 1
                if number > next_index.get(id(node), 0):
                    next_index[id(node)] = number
            if depth == len(path) - 1:
                node[segment] = value
            else:
                child = node.get(segment)
                if not isinstance(child, dict):
                    child = {}
                    node[segment] = child
                node = child
    # The body itself is always an object, even if its field names are 0, 1, 2…
    return {name: _lists(value) for name, value in root.items()}


def _is_index(segment: str) -> bool:
    """Whether a bracket segment is a list index (PHP: a plain non-negative integer)."""
    return segment.isdigit() and segment.isascii() and len(segment) <= MAX_INDEX_DIGITS


def _lists(node: Any) -> Any:
    """Dicts keyed 0..n-1 become lists, as PHP's json_encode does; others stay objects."""
    if not isinstance(node, dict):
        return node
    converted = {k: _lists(v) for k, v in node.items()}
    if converted and set(converted) == {str(i) for i in range(len(converted))}:
        return [converted[str(i)] for i in range(len(converted))]
    return converted


def coerce_types(body: dict[str, Any]) -> dict[str, Any]:
    """Give known fields OpenAI's types: numbers and booleans from strings, `user` a string."""
    for name, value in list(body.items()):
        if name in FLOAT_FIELDS | INT_FIELDS | BOOL_FIELDS:
            body[name] = _typed(name, value)
        elif name == "user":
            body[name] = end_user_id(value)
        elif name == "stream_options" and isinstance(value, dict):
            coerce_types(value)
    return body


def end_user_id(value: Any) -> str | None:
    """`user` as OpenAI takes it, a string: a whole number (a PHP integer id) as its digits.

    A fraction or a boolean is refused rather than guessed at: 1e20 has already lost
    the id's digits in the client, and true names nobody.
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    shown: object
    if isinstance(value, bool | float):
        shown = json.dumps(value)
    else:
        shown = Text("an array") if isinstance(value, list) else Text("an object")
    raise InvalidRequest(
        "The user field must be a string or a whole number (an end-user id), not %(shown)s.",
        param="user",
        shown=shown,
    )


def _typed(name: str, value: Any) -> Any:
    """One field's value as its type; strings that are not one are a 400."""
    if value is None or (not isinstance(value, str) and not isinstance(value, list | dict)):
        if name in BOOL_FIELDS and isinstance(value, int) and not isinstance(value, bool):
            return bool(value)
        return value
    if not isinstance(value, str):
        raise InvalidRequest("The %(name)s field must be a single value.", param=name, name=name)
    text = value.strip().lower()
    try:
        if name in BOOL_FIELDS:
            if text in TRUE:
                return True
            if text in FALSE:
                return False
            raise ValueError(text)
        if name in INT_FIELDS:
            return int(text)
        number = float(text)
        if not math.isfinite(number):
            raise ValueError(text)
        return number
    except ValueError:
        if name in BOOL_FIELDS:
            raise InvalidRequest(
                "The %(name)s field must be true or false, not %(value)r.",
                param=name,
                name=name,
                value=value,
            ) from None
        raise InvalidRequest(
            "The %(name)s field must be a number, not %(value)r.",
            param=name,
            name=name,
            value=value,
        ) from None
