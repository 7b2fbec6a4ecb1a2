"""One strict JSON reader for everything a client sends as a record.

Lenient parsers disagree on hostile input (duplicate keys, ``NaN``, 64-bit overflow, deep
nesting), and a record must mean the same to the gateway, to Kubo's dag-cbor encoder and to
every later reader. Anything ambiguous is refused with a message, never a 500.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from decimal import Decimal
from typing import Any

MAX_DEPTH = 64
INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # what dag-cbor integers can hold


class BadJSON(ValueError):
    """The bytes are not JSON this gateway accepts as a record; the message says why."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadJSON(f"duplicate key {key[:80]!r}")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise BadJSON(f"{name} is not a JSON number")


def _int(text: str) -> int:
    if len(text) > 21:
        raise BadJSON("integer out of the 64-bit range")
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise BadJSON("integer out of the 64-bit range")
    return value


def _decimal(text: str) -> Decimal:
    """A number with a fraction or an exponent, exactly as written (``1.00`` stays ``1.00``:
    FHIR decimals keep their precision), within the range of a 64-bit float (``1e400`` is
    refused: many readers could not hold it)."""
    if math.isinf(float(text)):
        raise BadJSON("number out of the 64-bit float range")
    return Decimal(text)


def _lone_surrogate(text: str) -> bool:
    """A ``\\ud800``-style escape without its pair: valid JSON, but no UTF-8 (so no dag-cbor,
    no signature) can carry it."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check(value: Any) -> None:
    """Nesting depth and strings, iteratively (a recursive walk is what deep input attacks)."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, str):
            if _lone_surrogate(item):
                raise BadJSON("a string holds an unpaired UTF-16 surrogate escape")
            continue
        if isinstance(item, dict):
            if any(_lone_surrogate(key) for key in item):
                raise BadJSON("a key holds an unpaired UTF-16 surrogate escape")
            items = item.values()
        elif isinstance(item, list):
            items = item
        else:
            continue
        if level > MAX_DEPTH:
            raise BadJSON(f"nested deeper than {MAX_DEPTH} levels")
        stack.extend((child, level + 1) for child in items)


# A \u escape of a UTF-16 surrogate (D800-DFFF), or what a search cannot tell from one (an
# escaped backslash before "ud800"); a JSON string literal; what is not a bracket.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _may_hold_lone_surrogates(text: str) -> bool:
    """Whether a string parsed from ``text`` can hold an unpaired surrogate: only through a
    \\u escape of one, or one in ``text`` itself (a ``str`` handed in, not decoded UTF-8)."""
    return _SURROGATE_ESCAPE.search(text) is not None or _lone_surrogate(text)


def _nesting(text: str) -> int:
    """How deep a JSON text that parsed nests: its brackets outside strings, counted (at C
    speed; walking the parsed value was most of the time of reading a record)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def loads(data: bytes | str) -> Any:
    """Parse strictly: UTF-8 only, no duplicate keys, no NaN/Infinity, 64-bit integers,
    numbers with a fraction or exponent as ``Decimal`` (in the 64-bit float range), nesting
    at most ``MAX_DEPTH``, no unpaired surrogate escapes. Raises ``BadJSON``."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadJSON(f"not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(data, object_pairs_hook=_pairs, parse_constant=_constant, parse_int=_int,
                           parse_float=_decimal)
    except BadJSON:
        raise
    except RecursionError:
        raise BadJSON(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise BadJSON(f"invalid JSON: {exc}") from None
    if _may_hold_lone_surrogates(data):
        _check(value)  # every string and key, and the depth
    elif data.count("[") + data.count("{") > MAX_DEPTH and _nesting(data) > MAX_DEPTH:
        raise BadJSON(f"nested deeper than {MAX_DEPTH} levels")  # (fewer brackets: not that deep)
    return value


def looks_like_json_object(data: bytes) -> bool:
    return data.lstrip()[:1] == b"{"


# A string (possibly cut short at the end of the text), or one structural character.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[{}\[\],:]', re.DOTALL)


def top_level_keys(data: bytes | str) -> set[str]:
    """The keys at the top level of a JSON object, found without parsing the values: for text
    too deep, too broken or not UTF-8 enough for a parser, to tell what it claims to be.
    Best effort; an empty set if ``data`` is not an object."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    keys: set[str] = set()
    depth, expect_key = 0, False
    for match in _TOKEN.finditer(data.lstrip()):
        token = match.group()
        if token[0] == '"':
            if depth == 1 and expect_key:
                try:
                    key = json.loads(token)
                except ValueError:
                    key = token.strip('"')
                if isinstance(key, str):
                    keys.add(key)
            expect_key = False
        elif token in "{[":
            if depth == 0 and token != "{":
                return set()
            depth += 1
            expect_key = depth == 1
        elif token in "}]":
            depth -= 1
            if depth <= 0:
                break
        elif token == "," and depth == 1:
            expect_key = True
        elif token == ":":
            expect_key = False
    return keys
