"""Record schemas: the built-in kinds, the violations they report, and loading schema folders.

Pure Python: no Kubo, no network.
"""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path

import pytest

from gateway.core.schemas import (
    DEFAULT_SCHEMA_DIR,
    SchemaError,
    SchemaRegistry,
    Violation,
    is_rfc3339_datetime,
)

BASE = "https://medicon.example/schemas/"
COMMON = BASE + "common/v1"
ENVELOPE = BASE + "envelope/v1"
OPENED = BASE + "episode-opened/v1"
ENCOUNTER = BASE + "encounter/v1"
CLOSED = BASE + "episode-closed/v1"
AMENDMENT = BASE + "amendment/v1"
# The FHIR-shaped v2 kinds load beside v1 (tests/test_schemas_v2.py tests them).
V2_KINDS = [BASE + kind + "/v2" for kind in ("episode-opened", "encounter", "episode-closed", "amendment")]

EXAMPLES = DEFAULT_SCHEMA_DIR / "examples"
CID_V0 = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"


@pytest.fixture(scope="module")
def registry() -> SchemaRegistry:
    return SchemaRegistry.load(DEFAULT_SCHEMA_DIR)


def example(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def found(violations: list[Violation]) -> list[tuple[str, str, str]]:
    return [(v.pointer, v.schema_id, v.keyword) for v in violations]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


# --- the built-in kinds ---------------------------------------------------------------------


def test_kinds_are_the_four_record_kinds_in_v1_and_v2(registry):
    assert registry.kinds() == sorted([OPENED, ENCOUNTER, CLOSED, AMENDMENT, *V2_KINDS])
    for abstract in (ENVELOPE, COMMON):
        assert abstract in registry
        assert not registry.is_record_kind(abstract)
    assert registry.is_record_kind(ENCOUNTER)
    assert "https://medicon.example/schemas/nope/v1" not in registry


def test_schema_returns_a_copy(registry):
    schema = registry.schema(ENCOUNTER)
    assert schema["$id"] == ENCOUNTER
    schema["$defs"]["body"]["required"].append("status")
    assert registry.validate(example("encounter")) == []
    with pytest.raises(KeyError):
        registry.schema(BASE + "nope/v1")


@pytest.mark.parametrize("name", ["episode-opened", "encounter", "episode-closed", "amendment"])
def test_examples_are_valid(registry, name):
    assert registry.validate(example(name)) == []


def test_there_is_one_example_per_kind(registry):
    claimed = sorted(json.loads(p.read_text())["schema"] for p in EXAMPLES.glob("*.json"))
    assert claimed == registry.kinds()


def test_a_minimal_record_of_each_kind_is_valid(registry):
    common = {"patient": "p1", "episode": "e1", "author": "a"}
    assert registry.validate({**common, "schema": OPENED, "body": {"type": "x", "managingOrganization": "o"}}) == []
    assert registry.validate({**common, "schema": ENCOUNTER, "body": {"class": "other"}}) == []
    assert registry.validate({**common, "schema": CLOSED, "body": {"reason": "r", "period_end": "2024-01-01T00:00:00Z"}}) == []
    assert registry.validate({**common, "schema": AMENDMENT, "body": {"corrects": CID_V0, "reason": "r", "changes": {}}}) == []


def _set(path: str, value):
    def mutate(doc):
        *parents, last = path.strip("/").split("/")
        for p in parents:
            doc = doc[int(p) if p.isdigit() else p]
        doc[int(last) if last.isdigit() else last] = value

    return mutate


def _delete(path: str):
    def mutate(doc):
        *parents, last = path.strip("/").split("/")
        for p in parents:
            doc = doc[int(p) if p.isdigit() else p]
        del doc[last]

    return mutate


INVALID = {
    # envelope, through any kind
    "extra top-level property": ("encounter", _set("/extra", 1), [("/extra", ENVELOPE, "additionalProperties")]),
    "missing author": ("episode-closed", _delete("/author"), [("/author", ENVELOPE, "required")]),
    "missing body": ("amendment", _delete("/body"), [("/body", ENVELOPE, "required")]),
    "body not an object": ("encounter", _set("/body", "lab"), [("/body", ENVELOPE, "type")]),
    "patient bad pattern": ("encounter", _set("/patient", "jane doe"), [("/patient", COMMON, "pattern")]),
    "episode too long": ("encounter", _set("/episode", "e" * 129), [("/episode", COMMON, "maxLength")]),
    "seq wrong type": ("encounter", _set("/seq", "1"), [("/seq", ENVELOPE, "type")]),
    "seq negative": ("encounter", _set("/seq", -1), [("/seq", ENVELOPE, "minimum")]),
    "author empty": ("encounter", _set("/author", ""), [("/author", ENVELOPE, "minLength")]),
    "recorded_at without offset": ("encounter", _set("/recorded_at", "2024-05-03T10:02:11"), [("/recorded_at", COMMON, "format")]),
    "recorded_at impossible day": ("amendment", _set("/recorded_at", "2024-02-30T10:00:00Z"), [("/recorded_at", COMMON, "format")]),
    "prev bad CID": ("encounter", _set("/prev", "Qm-not-a-cid"), [("/prev", COMMON, "pattern")]),
    "prev CIDv0 too short": ("encounter", _set("/prev", CID_V0[:-1]), [("/prev", COMMON, "pattern")]),
    # episode-opened
    "opened prev not null": ("episode-opened", _set("/prev", CID_V0), [("/prev", OPENED, "type")]),
    "opened wrong status": ("episode-opened", _set("/body/status", "finished"), [("/body/status", OPENED, "enum")]),
    "opened missing type": ("episode-opened", _delete("/body/type"), [("/body/type", OPENED, "required")]),
    "opened missing organization": ("episode-opened", _delete("/body/managingOrganization"), [("/body/managingOrganization", OPENED, "required")]),
    "opened coding without code": ("episode-opened", _set("/body/type", {"display": "x"}), [("/body/type/code", COMMON, "required")]),
    "opened type wrong type": ("episode-opened", _set("/body/type", 7), [("/body/type", COMMON, "type")]),
    "opened reason not a list": ("episode-opened", _set("/body/reason", "x"), [("/body/reason", OPENED, "type")]),
    "opened period bad start": ("episode-opened", _set("/body/period/start", "2024-05-02"), [("/body/period/start", COMMON, "format")]),
    "opened period without start": ("episode-opened", _set("/body/period", {"end": "2024-05-02T00:00:00Z"}), [("/body/period/start", COMMON, "required")]),
    # encounter
    "encounter wrong class": ("encounter", _set("/body/class", "surgery"), [("/body/class", ENCOUNTER, "enum")]),
    "encounter missing class": ("encounter", _delete("/body/class"), [("/body/class", ENCOUNTER, "required")]),
    "encounter wrong status": ("encounter", _set("/body/status", "done"), [("/body/status", ENCOUNTER, "enum")]),
    "encounter prev null": ("encounter", _set("/prev", None), [("/prev", ENCOUNTER, "type")]),
    "encounter unknown body field": ("encounter", _set("/body/diagnosis", "x"), [("/body/diagnosis", ENCOUNTER, "additionalProperties")]),
    "encounter notes wrong type": ("encounter", _set("/body/notes", 5), [("/body/notes", COMMON, "type")]),
    "encounter notes too long": ("encounter", _set("/body/notes", "x" * 100001), [("/body/notes", COMMON, "maxLength")]),
    "participant without name or id": ("encounter", _set("/body/participants/0", {"role": "performer"}), [("/body/participants/0/id", ENCOUNTER, "required")]),
    "location wrong type": ("encounter", _set("/body/location", ["lab"]), [("/body/location", ENCOUNTER, "type")]),
    "observation value wrong type": ("encounter", _set("/body/observations/1/value", None), [("/body/observations/1/value", ENCOUNTER, "type")]),
    "observation quantity without unit": ("encounter", _set("/body/observations/0/value", {"value": 7.1}), [("/body/observations/0/value/unit", COMMON, "required")]),
    "observation code as text": ("encounter", _set("/body/observations/0/code", "HbA1c"), [("/body/observations/0/code", COMMON, "type")]),
    "observation bad effective": ("encounter", _set("/body/observations/0/effective", "yesterday"), [("/body/observations/0/effective", COMMON, "format")]),
    "fhir without resourceType": ("encounter", _set("/body/fhir/0", {"status": "final"}), [("/body/fhir/0/resourceType", ENCOUNTER, "required")]),
    "attachment bad CID": ("encounter", _set("/body/attachments/0/cid", "bafy!"), [("/body/attachments/0/cid", COMMON, "pattern")]),
    "attachment negative size": ("encounter", _set("/body/attachments/0/size", -1), [("/body/attachments/0/size", ENCOUNTER, "minimum")]),
    # episode-closed
    "closed missing period_end": ("episode-closed", _delete("/body/period_end"), [("/body/period_end", CLOSED, "required")]),
    "closed bad period_end": ("episode-closed", _set("/body/period_end", "2025-05-02T25:00:00Z"), [("/body/period_end", COMMON, "format")]),
    "closed missing reason": ("episode-closed", _delete("/body/reason"), [("/body/reason", CLOSED, "required")]),
    "closed prev null": ("episode-closed", _set("/prev", None), [("/prev", CLOSED, "type")]),
    # amendment
    "amendment bad corrects": ("amendment", _set("/body/corrects", "record-17"), [("/body/corrects", COMMON, "pattern")]),
    "amendment missing changes": ("amendment", _delete("/body/changes"), [("/body/changes", AMENDMENT, "required")]),
    "amendment changes not an object": ("amendment", _set("/body/changes", "unit is mmol/L"), [("/body/changes", AMENDMENT, "type")]),
    "amendment prev null": ("amendment", _set("/prev", None), [("/prev", AMENDMENT, "type")]),
}


@pytest.mark.parametrize("name, mutate, expected", INVALID.values(), ids=INVALID.keys())
def test_invalid_records(registry, name, mutate, expected):
    doc = copy.deepcopy(example(name))
    mutate(doc)
    assert found(registry.validate(doc)) == expected


@pytest.mark.parametrize(
    "schema, message",
    [
        ("https://medicon.example/schemas/nope/v1", "not a known record kind"),
        (ENVELOPE, "not a known record kind"),  # abstract: not a kind
        (42, "not a known record kind"),
    ],
)
def test_unknown_schema_is_one_violation_at_schema(registry, schema, message):
    doc = {**example("encounter"), "schema": schema, "extra": 1}
    [violation] = registry.validate(doc)
    assert (violation.pointer, violation.schema_id, violation.keyword) == ("/schema", ENVELOPE, "enum")
    assert message in violation.message and ENCOUNTER in violation.message


def test_missing_schema_and_non_object(registry):
    doc = example("encounter")
    del doc["schema"]
    assert found(registry.validate(doc)) == [("/schema", ENVELOPE, "required")]
    assert found(registry.validate(["not", "a", "record"])) == [("", ENVELOPE, "type")]


def test_all_errors_are_reported_sorted_by_pointer(registry):
    doc = example("encounter")
    doc["zzz"] = True
    doc["body"]["class"] = "surgery"
    del doc["author"]
    violations = registry.validate(doc)
    assert found(violations) == [
        ("/author", ENVELOPE, "required"),
        ("/body/class", ENCOUNTER, "enum"),
        ("/zzz", ENVELOPE, "additionalProperties"),
    ]


def test_array_indexes_sort_as_numbers_and_each_extra_property_is_reported(registry):
    doc = example("encounter")
    obs = doc["body"]["observations"][2]
    doc["body"]["observations"] = [copy.deepcopy(obs) for _ in range(11)]
    doc["body"]["observations"][10]["value"] = None
    doc["body"]["observations"][2]["value"] = None
    doc["a"], doc["b"] = 1, 2
    assert [v.pointer for v in registry.validate(doc)] == [
        "/a",
        "/b",
        "/body/observations/2/value",
        "/body/observations/10/value",
    ]


def test_violation_text(registry):
    doc = example("encounter")
    doc["body"]["class"] = "surgery"
    [violation] = registry.validate(doc)
    assert violation.message.startswith("'surgery' is not one of ['lab', ")
    assert str(violation) == f"/body/class: {violation.message} (schema {ENCOUNTER})"
    assert str(Violation("", "m", ENVELOPE, "type")) == f"/: m (schema {ENVELOPE})"


def test_pointer_escapes_and_long_values_are_truncated(registry):
    doc = example("encounter")
    doc["a/b~c"] = 1
    doc["body"]["notes"] = ["x" * 1000]
    violations = registry.validate(doc)
    assert [v.pointer for v in violations] == ["/a~1b~0c", "/body/notes"]
    message = violations[1].message
    assert message.endswith("...(truncated) is not of type 'string'") and len(message) < 250


@pytest.mark.parametrize(
    "value, ok",
    [
        ("2024-05-03T10:02:11Z", True),
        ("2024-05-03t10:02:11.123456789z", True),
        ("2024-05-03T10:02:11-03:30", True),
        ("2016-12-31T23:59:60Z", True),  # leap second
        ("2024-02-29T00:00:00Z", True),
        ("2023-02-29T00:00:00Z", False),
        ("2024-05-03T10:02:11", False),  # no offset
        ("2024-05-03 10:02:11Z", False),
        ("2024-05-03", False),
        ("2024-05-03T24:00:00Z", False),
        ("2024-05-03T10:02:11+24:00", False),
        ("2024-05-03T10:02Z", False),
        ("２０２４-05-03T10:02:11Z", False),  # non-ASCII digits
        ("", False),
    ],
)
def test_rfc3339_date_time(value, ok):
    assert is_rfc3339_datetime(value) is ok


# --- schema folders -------------------------------------------------------------------------


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


LAB_ORDER = "https://hospital.example/schemas/lab-order/v1"


def lab_order_schema(**extra) -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": LAB_ORDER,
        "$ref": ENVELOPE,
        "properties": {
            "prev": {"type": "string"},
            "body": {
                "required": ["test"],
                "properties": {
                    "test": {"$ref": COMMON + "#/$defs/coding"},
                    "urgent": {"type": "boolean"},
                },
                "additionalProperties": False,
            },
        },
        **extra,
    }


def test_an_institution_folder_extends_the_built_in_kinds(tmp_path):
    write(tmp_path / "lab" / "lab-order-v1.json", lab_order_schema())
    write(tmp_path / "examples" / "lab-order.json", {"not": "a schema"})  # examples/ is skipped
    registry = SchemaRegistry.load(DEFAULT_SCHEMA_DIR, tmp_path)
    assert registry.kinds() == sorted([OPENED, ENCOUNTER, CLOSED, AMENDMENT, *V2_KINDS, LAB_ORDER])

    doc = {
        "schema": LAB_ORDER,
        "patient": "p1",
        "episode": "e1",
        "prev": CID_V0,
        "author": "dr",
        "body": {"test": {"system": "http://loinc.org", "code": "4548-4"}},
    }
    assert registry.validate(doc) == []
    doc["body"] = {"test": {"system": "http://loinc.org"}, "urgent": "yes"}
    doc["recorded_at"] = "now"
    assert found(registry.validate(doc)) == [
        ("/body/test/code", COMMON, "required"),
        ("/body/urgent", LAB_ORDER, "type"),
        ("/recorded_at", COMMON, "format"),
    ]
    assert registry.validate(example("encounter")) == []


def test_ref_to_an_unknown_uri_fails_at_load_without_network(tmp_path, no_network):
    unknown = "https://elsewhere.example/schemas/thing/v1"
    schema = lab_order_schema()
    schema["properties"]["body"]["properties"]["test"] = {"$ref": unknown + "#/$defs/x"}
    path = write(tmp_path / "lab-order-v1.json", schema)
    with pytest.raises(SchemaError) as caught:
        SchemaRegistry.load(DEFAULT_SCHEMA_DIR, tmp_path)
    assert unknown in str(caught.value) and str(path) in str(caught.value)


def test_ref_to_a_missing_definition_fails_at_load(tmp_path):
    schema = lab_order_schema()
    schema["properties"]["body"]["properties"]["test"] = {"$ref": COMMON + "#/$defs/nope"}
    write(tmp_path / "lab-order-v1.json", schema)
    with pytest.raises(SchemaError, match="common/v1#/\\$defs/nope"):
        SchemaRegistry.load(DEFAULT_SCHEMA_DIR, tmp_path)


def test_the_envelope_is_only_found_when_its_folder_is_loaded(tmp_path):
    write(tmp_path / "lab-order-v1.json", lab_order_schema())
    with pytest.raises(SchemaError, match="envelope/v1"):
        SchemaRegistry.load(tmp_path)


def test_duplicate_id_names_both_files(tmp_path):
    first = write(tmp_path / "a" / "lab-order-v1.json", lab_order_schema())
    second = write(tmp_path / "b" / "lab-order-copy.json", lab_order_schema(title="copy"))
    with pytest.raises(SchemaError) as caught:
        SchemaRegistry.load(DEFAULT_SCHEMA_DIR, tmp_path)
    assert str(first) in str(caught.value) and str(second) in str(caught.value)


def test_duplicate_of_a_built_in_id_names_both_files(tmp_path):
    built_in = DEFAULT_SCHEMA_DIR / "record" / "encounter-v1.json"
    copied = write(tmp_path / "encounter.json", built_in.read_text())
    with pytest.raises(SchemaError) as caught:
        SchemaRegistry.load(DEFAULT_SCHEMA_DIR, tmp_path)
    assert str(built_in) in str(caught.value) and str(copied) in str(caught.value)


@pytest.mark.parametrize(
    "content, reason",
    [
        ('{"$schema": ', "not a readable JSON file"),
        ("[]", "must be a JSON object"),
        (lab_order_schema(type=5), "not a valid 2020-12 schema"),
        ({**lab_order_schema(), "$schema": "http://json-schema.org/draft-07/schema#"}, "$schema must be"),
        ({**lab_order_schema(), "$id": "lab-order/v1"}, "$id must be an absolute URI"),
    ],
    ids=["bad JSON", "not an object", "invalid schema", "other draft", "relative $id"],
)
def test_a_bad_schema_file_is_named(tmp_path, content, reason):
    path = write(tmp_path / "sub" / "broken.json", content)
    with pytest.raises(SchemaError) as caught:
        SchemaRegistry.load(DEFAULT_SCHEMA_DIR, tmp_path)
    assert str(path) in str(caught.value) and reason in str(caught.value)


def test_a_missing_folder_is_an_error(tmp_path):
    with pytest.raises(SchemaError, match="not a schema folder"):
        SchemaRegistry.load(tmp_path / "nope")


@pytest.mark.parametrize("field", ["/patient", "/episode", "/prev"])
def test_a_pattern_must_match_up_to_the_end_not_before_a_final_newline(registry, field):
    # JSON Schema patterns are ECMA-262: "$" is the end of the string. Python's "$" also
    # matches before a final "\n", which let "patient-0042\n" pass as an identifier.
    doc = example("encounter")
    _set(field, doc[field.strip("/")] + "\n")(doc)
    assert found(registry.validate(doc)) == [(field, COMMON, "pattern")]
