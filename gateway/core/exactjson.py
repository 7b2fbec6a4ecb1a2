"""JSON text kept as it was written, and JSON written around it without touching it.

A record is stored as the client's JSON text (``records.ClientRecord``), so that a reader gets
back the same number text (``1.00``, not ``1.0``), the same key order (``resourceType`` first)
and the same string escapes. This module finds values inside such a text by JSON pointer and
changes top-level members in place (the gateway's envelope fields), leaving every other byte
as it was; and it writes JSON that embeds such texts verbatim (``Raw``, ``render``).

The texts handled here were accepted by ``strictjson`` first: no duplicate keys, no NaN, so
positions found by the standard library's scanner are unambiguous.
"""

from __future__ import annotations

import json
import re
import secrets
from decimal import Decimal
from json.decoder import scanstring
from typing import Any, Iterator

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"


class Raw:
    """JSON text to be written as it is inside a document rendered by ``render``."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def dumps(value: Any, *, sort_keys: bool = False) -> str:
    """Compact JSON (UTF-8 text, no ``\\u`` escapes beyond what JSON needs) in which a
    ``Decimal`` is written as its own text: ``Decimal("1.00")`` stays ``1.00``. NaN and
    infinities have no JSON form and raise ValueError."""
    parts: list[str] = []
    _dump(value, parts, sort_keys)
    return "".join(parts)


def _dump(value: Any, out: list[str], sort_keys: bool) -> None:
    if isinstance(value, dict):
        items = sorted(value.items()) if sort_keys else value.items()
        out.append("{")
        for index, (key, item) in enumerate(items):
            if not isinstance(key, str):
                raise TypeError("JSON object keys are strings")
            out.append("," if index else "")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _dump(item, out, sort_keys)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for index, item in enumerate(value):
            out.append("," if index else "")
            _dump(item, out, sort_keys)
        out.append("]")
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("NaN and infinities have no JSON form")
        out.append(str(value))
    elif isinstance(value, Raw):
        out.append(value.text)
    else:
        out.append(json.dumps(value, ensure_ascii=False, allow_nan=False))


def render(value: Any, *, sort_keys: bool = False) -> str:
    """``value`` as compact JSON, with every ``Raw`` in it written verbatim: a response that
    embeds stored records or FHIR resources without re-serialising them. For a value parsed
    from JSON (string keys) the same text as ``dumps``, written by the standard library's C
    encoder (about 4× faster); ``dumps`` also refuses keys that are no strings, which a
    value from elsewhere (a CBOR map) may have."""
    raws: list[str] = []
    nonce = secrets.token_hex(8)

    def mark(item: Any) -> Any:
        if isinstance(item, Raw):
            raws.append(item.text)
            return f"\x00raw-{nonce}-{len(raws) - 1}\x00"
        if isinstance(item, Decimal):
            raws.append(dumps(item))
            return f"\x00raw-{nonce}-{len(raws) - 1}\x00"
        raise TypeError(f"{type(item).__name__} is not JSON")

    text = json.dumps(value, default=mark, ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                      sort_keys=sort_keys)
    if not raws:
        return text
    # json.dumps writes the marker's NUL characters as \u0000: no client text can forge one,
    # and the nonce is fresh for every call (one pattern for all calls: compiling one with the
    # nonce in it cost more than the rest of a small answer).
    return _RAW_MARKER.sub(lambda m: raws[int(m.group(2))] if m.group(1) == nonce else m.group(0), text)


_RAW_MARKER = re.compile(r'"\\u0000raw-([0-9a-f]{16})-([0-9]+)\\u0000"')


# --- positions inside a text --------------------------------------------------------------------

def skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in _WHITESPACE:
        at += 1
    return at


def value_end(text: str, start: int) -> int:
    """Where the JSON value starting at ``start`` ends (one past its last character)."""
    _, end = _DECODER.raw_decode(text, start)
    return end


def items(text: str, start: int) -> Iterator[tuple[str | int, int, int]]:
    """(key or index, value start, value end) of each member of the object, or each element
    of the array, that starts at ``start``."""
    closing = {"{": "}", "[": "]"}.get(text[start])
    if closing is None:
        return
    at = skip_space(text, start + 1)
    index = 0
    if text[at] == closing:
        return
    while True:
        if closing == "}":
            key, at = scanstring(text, at + 1)
            at = skip_space(text, skip_space(text, at) + 1)  # past the colon
        else:
            key = index
        end = value_end(text, at)
        yield key, at, end
        index += 1
        at = skip_space(text, end)
        if text[at] == closing:
            return
        at = skip_space(text, at + 1)  # past the comma


def span(text: str, pointer: str) -> tuple[int, int]:
    """(start, end) of the value a JSON pointer (``/body/fhir/3``) names; KeyError if none."""
    start = skip_space(text, 0)
    end = value_end(text, start)
    for token in pointer.split("/")[1:] if pointer else ():
        name = token.replace("~1", "/").replace("~0", "~")
        for key, value_start, value_end_ in items(text, start):
            if key == name or (isinstance(key, int) and name == str(key)):
                start, end = value_start, value_end_
                break
        else:
            raise KeyError(pointer)
    return start, end


def extract(text: str, pointer: str) -> str:
    """The text of the value a JSON pointer names, exactly as it stands in ``text``."""
    start, end = span(text, pointer)
    return text[start:end]


def object_text(text: str) -> str:
    """The JSON object ``text`` holds, without the whitespace around it."""
    start = skip_space(text, 0)
    return text[start:value_end(text, start)]


def set_members(text: str, fields: dict[str, Any]) -> str:
    """The object ``text`` with each of ``fields`` set: a member already there gets the new
    value in its place, a new one is added at the end; every other byte stays as it was."""
    start = skip_space(text, 0)
    members = {key: (value_start, end) for key, value_start, end in items(text, start)}
    last_end = max((end for _, end in members.values()), default=start + 1)
    edits: list[tuple[int, int, str]] = []
    added = []
    for key, value in fields.items():
        if key in members:
            edits.append((*members[key], dumps(value)))
        else:
            added.append(json.dumps(key, ensure_ascii=False) + ":" + dumps(value))
    if added:
        edits.append((last_end, last_end, ("," if members else "") + ",".join(added)))
    for begin, end, replacement in sorted(edits, reverse=True):
        text = text[:begin] + replacement + text[end:]
    return text


def insert_member(text: str, after: str, key: str, value: Any) -> str:
    """The object ``text`` with the member ``key`` added right after the member ``after`` (or
    first, if there is no ``after``): e.g. a server-assigned ``id`` after ``resourceType``."""
    start = skip_space(text, 0)
    at = next((end for name, _, end in items(text, start) if name == after), None)
    member = json.dumps(key, ensure_ascii=False) + ":" + dumps(value)
    if at is None:
        empty = text[skip_space(text, start + 1)] == "}"
        return text[:start + 1] + member + ("" if empty else ",") + text[start + 1:]
    return text[:at] + "," + member + text[at:]
