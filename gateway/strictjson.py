"""One strict JSON reader for everything a client sends as a record.

Lenient parsers disagree on hostile input (duplicate keys, ``NaN``, 64-bit overflow, deep
nesting), and a record must mean the same to the gateway, to Kubo's dag-cbor encoder and to
every later reader. Anything ambiguous is refused with a message, never a 500.
"""

from __future__ import annotations

import json
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


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise BadJSON("number out of the 64-bit float range")
    return value


def _depth(value: Any) -> int:
    """Nesting depth, iteratively (a recursive walk is what deep input attacks)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            items = item.values()
        elif isinstance(item, list):
            items = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            break
        stack.extend((child, level + 1) for child in items)
    return deepest


def loads(data: bytes | str) -> Any:
    """Parse strictly: UTF-8 only, no duplicate keys, no NaN/Infinity, 64-bit integers,
    finite floats, nesting at most ``MAX_DEPTH``. Raises ``BadJSON``."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadJSON(f"not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(data, object_pairs_hook=_pairs, parse_constant=_constant, parse_int=_int,
                           parse_float=_float)
    except BadJSON:
        raise
    except RecursionError:
        raise BadJSON(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise BadJSON(f"invalid JSON: {exc}") from None
    if _depth(value) > MAX_DEPTH:
        raise BadJSON(f"nested deeper than {MAX_DEPTH} levels")
    return value


def looks_like_json_object(data: bytes) -> bool:
    return data.lstrip()[:1] == b"{"
