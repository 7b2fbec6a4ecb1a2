"""The compiled validator (jsonschema-rs) that answers "valid" for most records must never call
valid what jsonschema refuses: property-based, on records mutated from the examples and the
synthetic FHIR patients — values swapped for strings with the characters where regex dialects
disagree, numbers at the edges, fields dropped or added — its "valid" is checked against
jsonschema's verdict on the same document. Deterministic unless ``MEDICON_FUZZ_EXAMPLES`` is set."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import fhir_synth
from gateway.core.schemas import DEFAULT_SCHEMA_DIR, FAST_KEYWORDS, SchemaRegistry, _keywords

FUZZ = os.environ.get("MEDICON_FUZZ_EXAMPLES")
REGISTRY = SchemaRegistry.load(DEFAULT_SCHEMA_DIR)
EXAMPLES = [json.loads(p.read_text()) for p in sorted((DEFAULT_SCHEMA_DIR / "examples").glob("*.json"))]
SYNTH = [r.record for r in fhir_synth.generate(seed=3, patients=2, episodes=3, encounters=4)]
SEEDS = EXAMPLES + SYNTH
# Characters regex dialects and string-length rules disagree on: separators Python's \s takes
# and others do not (and back), a BOM, line and paragraph separators, non-ASCII digits, a final
# newline (for a final $), astral characters.
TRICKY = ["\x1c", "\x1f", "\ufeff", "\u2028", "\u2029", "\u0085", "\u00a0", "\u3000", "\u180e", "\u200b",
          "\n", "\r\n", "\t", " ", "١٢", "𝟘", "😀", "é", "Z", "z", "T", "t", "+14:00", "60", ":60",
          "2024-02-29", "2023-02-29", "2024-13-01", "0000", "urn:uuid:", "#", "/", "-", "."]


def fuzz(default: int):
    return settings(max_examples=max(default, int(FUZZ)) if FUZZ else default, deadline=None,
                    derandomize=not FUZZ, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _set(doc, path, value):
    if not path:
        return value
    target = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return doc


def _drop(doc, path):
    if not path:
        return doc
    target = doc
    for step in path[:-1]:
        target = target[step]
    del target[path[-1]]
    return doc


strings = st.one_of(
    st.sampled_from(TRICKY),
    st.lists(st.sampled_from(TRICKY), min_size=1, max_size=4).map("".join),
    st.text(max_size=12),
    st.builds(lambda a, b, c: a + b + c, st.text(alphabet="abcXYZ09-.:T", max_size=8), st.sampled_from(TRICKY),
              st.text(alphabet="abcXYZ09-.:TZ+", max_size=8)),
)
values = st.one_of(strings, st.integers(min_value=-(2**63), max_value=2**64 - 1),
                   # a fresh [] and {} each time: one shared object put in itself would make a cycle
                   st.sampled_from([0, -1, 1, 0.5, 1.0, -0.0, 1e300, 2**53 + 1, True, False, None, [], {}])
                   .map(copy.deepcopy),
                   st.floats(allow_nan=False, allow_infinity=False),
                   # decimals as the exact parser gives them: 5.0 is an integer for both, 1E+400 no float
                   st.sampled_from([Decimal("5.0"), Decimal("-0.0"), Decimal("1E+2"), Decimal("1E+400"),
                                    Decimal("0.30000000000000000001"), Decimal("120.50")]),
                   st.decimals(allow_nan=False, allow_infinity=False, places=3))


@st.composite
def mutated(draw):
    doc = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from([p for p in paths if p != ("schema",)]))
        how = draw(st.sampled_from(["set", "drop", "append", "edit", "add"]))
        here = doc
        for step in path:
            here = here[step]
        if how == "set" and path:
            doc = _set(doc, path, draw(values))
        elif how == "drop" and path:
            doc = _drop(doc, path)
        elif how == "append" and isinstance(here, str):
            doc = _set(doc, path, here + draw(strings) if draw(st.booleans()) else draw(strings) + here)
        elif how == "edit" and isinstance(here, str) and here:
            i = draw(st.integers(min_value=0, max_value=len(here) - 1))
            doc = _set(doc, path, here[:i] + draw(st.sampled_from(TRICKY)) + here[i + 1:])
        elif how == "add" and isinstance(here, dict):
            here[draw(st.sampled_from(["extra", "id", "value", "system", "code", "display"]))] = draw(values)
    return doc


def test_the_built_in_schemas_get_the_compiled_validator():
    assert set(REGISTRY._fast) == set(REGISTRY.kinds())
    for document in SEEDS:  # the unchanged records are valid for both
        assert REGISTRY._fast[document["schema"]].is_valid(document), document["schema"]
        assert REGISTRY.validate(document) == []


@fuzz(600)
@given(doc=mutated())
def test_compiled_valid_means_jsonschema_valid(doc):
    slow = [str(v) for v in REGISTRY._validators[doc["schema"]].iter_errors(doc)]
    fast = REGISTRY._fast[doc["schema"]].is_valid(doc)
    if fast:
        assert slow == [], f"the compiled validator accepted what jsonschema refuses: {slow}"
    assert REGISTRY.validate(doc) == [] if not slow else REGISTRY.validate(doc)  # the verdict is jsonschema's


def test_a_schema_with_a_keyword_outside_the_shared_set_is_validated_by_jsonschema_alone(tmp_path: Path):
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://t.example/k/v1",
              "type": "object", "required": ["schema"], "properties": {"schema": {"const": "https://t.example/k/v1"},
                                                                       "n": {"multipleOf": 0.01}}}
    assert "multipleOf" in _keywords(schema) - FAST_KEYWORDS
    (tmp_path / "k.json").write_text(json.dumps(schema))
    registry = SchemaRegistry.load(tmp_path)
    assert registry._fast == {}
    # jsonschema computes multipleOf in floats: 0.07 is not a multiple of 0.01 there
    assert [v.keyword for v in registry.validate({"schema": "https://t.example/k/v1", "n": 0.07})] == ["multipleOf"]


@pytest.mark.parametrize("text", ["a\x1cb", "a\ufeffb", "ab\n", "١٢"])
def test_patterns_read_as_python_reads_them_in_both(tmp_path: Path, text):
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://t.example/p/v1",
              "type": "object", "properties": {"a": {"pattern": "^\\S+$"}, "b": {"pattern": "^[a-z]+$"},
                                               "d": {"pattern": "^\\d+$"}}}
    (tmp_path / "p.json").write_text(json.dumps(schema))
    registry = SchemaRegistry.load(tmp_path)
    fast = registry._fast["https://t.example/p/v1"]
    for key in ("a", "b", "d"):
        doc = {key: text}
        slow = list(registry._validators["https://t.example/p/v1"].iter_errors(doc))
        assert fast.is_valid(doc) == (slow == []), (key, text)


@pytest.mark.parametrize("text, integral", [("5", True), ("5.0", True), ("1E+2", True), ("-0.0", True),
                                            ("5.5", False), ("5.000000000000000000001", False)])
def test_an_integer_written_with_a_decimal_point_is_judged_alike_by_both(tmp_path: Path, text, integral):
    """The exact parser keeps ``5.0`` a Decimal; JSON Schema counts it an integer. Both validators
    must agree, or a record would pass or fail depending on which one judged it."""
    from gateway.core.strictjson import loads
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://t.example/i/v1",
              "type": "object", "properties": {"n": {"type": "integer", "maximum": 100}}}
    (tmp_path / "i.json").write_text(json.dumps(schema))
    registry = SchemaRegistry.load(tmp_path)
    doc = loads('{"n": %s}' % text)
    slow = list(registry._validators["https://t.example/i/v1"].iter_errors(doc))
    assert (slow == []) == integral and registry._fast["https://t.example/i/v1"].is_valid(doc) == integral
