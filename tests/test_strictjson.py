"""``strictjson.loads``: what it refuses (nesting past 64, unpaired surrogates in strings and
keys), whichever way it finds out — the parsed value walked when a surrogate could be there,
only the text's brackets counted otherwise — and what it must not refuse for it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import strictjson
from gateway.core.strictjson import MAX_DEPTH, BadJSON


def nested(depth: int, leaf: str = "1") -> str:
    return '{"a":' * depth + leaf + "}" * depth


@pytest.mark.parametrize("text", [
    "[" * MAX_DEPTH + "]" * MAX_DEPTH, nested(MAX_DEPTH),
    # more brackets than the limit, all inside strings: not nested
    json.dumps(["[{" * 100, {"k": "]" * 70 + '"\\'}]),
    "[" * (MAX_DEPTH - 1) + json.dumps("[" * 200) + "]" * (MAX_DEPTH - 1),
    '"\\ud83d\\ude00"', '"\\\\ud800"', '{"\\u00e9": "\\u00e9"}', '"é"',
])
def test_accepted(text):
    assert strictjson.loads(text) == json.loads(text)
    assert strictjson.loads(text.encode("utf-8")) == json.loads(text)


@pytest.mark.parametrize("text, message", [
    ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "nested deeper"),
    (nested(MAX_DEPTH + 1), "nested deeper"),
    ("[" * MAX_DEPTH + '{"a": "x"}' + "]" * MAX_DEPTH, "nested deeper"),
    # a surrogate escape somewhere, and too deep: the walk finds the depth too
    ('["\\ud83d\\ude00", ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "]", "nested deeper"),
    ('"\\ud800"', "unpaired"), ('"x\\uDFFFy"', "unpaired"), ('{"\\udc00": 1}', "unpaired"),
    ('["ok", {"a": ["\\ude00"]}]', "unpaired"),
])
def test_refused(text, message):
    for data in (text, text.encode("utf-8")):
        with pytest.raises(BadJSON, match=message):
            strictjson.loads(data)


@pytest.mark.parametrize("text", ['"\ud800"', '{"\udfff": 1}', '["\ud83d"]'])
def test_a_surrogate_in_a_str_handed_in_is_refused(text):
    with pytest.raises(BadJSON, match="unpaired"):
        strictjson.loads(text)


_VALUES = st.recursive(st.none() | st.integers(-10, 10) | st.text(alphabet='[]{}"\\ab\u00e9', max_size=6),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                           st.text(alphabet='[]{}"\\k', max_size=4), inner, max_size=3), max_leaves=30)


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(_VALUES, st.integers(0, MAX_DEPTH + 3))
def test_the_bracket_count_agrees_with_the_values_depth(value, wrap):
    """Whatever brackets, quotes and backslashes the strings hold, the text's nesting is the
    value's depth: refused exactly when it passes the limit."""
    for _ in range(wrap):
        value = [value]
    text = json.dumps(value)
    assert strictjson._nesting(text) == _depth(value)
    if _depth(value) > MAX_DEPTH:
        with pytest.raises(BadJSON, match="nested deeper"):
            strictjson.loads(text)
    else:
        assert strictjson.loads(text) == value
