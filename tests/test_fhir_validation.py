"""FHIR R4 validation of embedded resources (gateway/core/fhir_validation.py).

Resources are parsed as the gateway parses records: JSON decimals as ``decimal.Decimal``.
Pure Python: the R4 data ships in gateway/core/fhir_r4/.
"""

from __future__ import annotations

import copy
import gzip
import json
from decimal import Decimal

import pytest

from gateway.core.fhir_validation import (
    FhirR4Validator,
    default_validator,
    find_resources,
    validate_embedded,
    validate_resource,
)

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def parse(text: str):
    return json.loads(text, parse_float=Decimal)


def observation(**fields) -> dict:
    return {
        "resourceType": "Observation",
        "id": "obs-1",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "33914-3", "display": "eGFR"}]},
        "subject": {"reference": "Patient/p-1"},
        "effectiveDateTime": "2024-05-03",
        **fields,
    }


VALID = {
    "Patient": {"resourceType": "Patient", "id": "p-1", "identifier": [{"system": "https://clinic.example/mrn", "value": "0042"}],
                "name": [{"family": "Silva", "given": ["Ana"]}], "gender": "female", "birthDate": "1961-07", "active": True},
    "EpisodeOfCare": {"resourceType": "EpisodeOfCare", "status": "finished", "patient": {"reference": "Patient/p-1"},
                      "diagnosis": [{"condition": {"reference": "Condition/c-1"}, "rank": 1}], "period": {"start": "2024", "end": "2024-12-31"}},
    "Condition": {"resourceType": "Condition", "subject": {"reference": "Patient/p-1"}, "onsetDateTime": "2019-03",
                  "code": {"coding": [{"system": "http://snomed.info/sct", "version": "http://snomed.info/sct/900000000000207008/version/20240301", "code": "44054006", "userSelected": True},
                                      {"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11.9"}], "text": "T2DM"}},
    "Encounter": {"resourceType": "Encounter", "status": "triaged", "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER"},
                  "subject": {"reference": "Patient/p-1"}, "participant": [{"individual": {"reference": "Practitioner/p-1"}}],
                  "episodeOfCare": [{"reference": "EpisodeOfCare/e-1"}], "period": {"start": "2024-05-03T07:30:00+02:00"}},
    "Observation with comparator": observation(valueQuantity={"value": Decimal("60"), "comparator": ">", "unit": "mL/min/1.73m2", "system": UCUM, "code": "mL/min/{1.73_m2}"}),
    "Observation with trailing zeros": observation(valueQuantity={"value": Decimal("1.00"), "unit": "mg/dL", "system": UCUM, "code": "mg/dL"}),
    "Observation with integer value": observation(valueInteger=3),
    "Observation with integral Decimal": observation(valueInteger=Decimal("3")),
    "Observation with float value": observation(valueQuantity={"value": 7.1}),
    "Observation with Range": observation(valueRange={"low": {"value": Decimal("0.60")}, "high": {"value": Decimal("1.20")}}),
    "Observation status as extension only": {**observation(), "status": None, "_status": {"extension": [
        {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]}},
    "Observation with contained Patient": observation(contained=[{"resourceType": "Patient", "id": "p2"}], subject={"reference": "#p2"}),
    "MedicationRequest with date-only authoredOn": {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
                                                    "medicationCodeableConcept": {"text": "metformin 500 mg"},
                                                    "subject": {"reference": "Patient/p-1"}, "authoredOn": "2024-05-03"},
    "DiagnosticReport": {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "Renal panel"},
                         "subject": {"reference": "https://fhir.clinic.example/r4/Patient/p-1"}, "result": [{"reference": "Observation/obs-1/_history/2"}]},
    "Bundle": {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0", "resource": observation()},
        {"resource": {"resourceType": "Patient", "id": "p-1"}}]},
}
for name, resource in VALID.items():
    if resource.get("status", "") is None:
        del resource["status"]


@pytest.mark.parametrize("resource", VALID.values(), ids=VALID.keys())
def test_valid_resources_pass(resource):
    assert validate_resource(resource) == []


def changed(resource: dict, **fields) -> dict:
    doc = copy.deepcopy(resource)
    for key, value in fields.items():
        if value is None:
            del doc[key]
        else:
            doc[key] = value
    return doc


def with_value(path: list, value, resource=None) -> dict:
    doc = copy.deepcopy(resource or observation(valueQuantity={"value": Decimal("7.1"), "unit": "%"}))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


INVALID = {
    # wrong types
    "boolean as string": (changed(VALID["Patient"], active="yes"), [("/active", "expected boolean, got string")]),
    "decimal as string": (with_value(["valueQuantity", "value"], "7.1"), [("/valueQuantity/value", "expected number, got string")]),
    "CodeableConcept as string": (changed(observation(), code="eGFR"), [("/code", "expected object, got string")]),
    "array where one is expected": (changed(observation(), subject=[{"reference": "Patient/p-1"}]), [("/subject", "expected object, got array")]),
    "integer with a fraction": (changed(observation(), valueInteger=Decimal("1.0")), [("/valueInteger", "a FHIR integer is a whole number written without a decimal point")]),
    "integer out of 32 bits": (changed(observation(), valueInteger=2**31), [("/valueInteger", "a FHIR integer is between -2147483648 and 2147483647")]),
    "positiveInt zero": (with_value(["diagnosis", 0, "rank"], 0, VALID["EpisodeOfCare"]), [("/diagnosis/0/rank", "a FHIR positiveInt is between 1 and 2147483647")]),
    "decimal NaN": (with_value(["valueQuantity", "value"], Decimal("NaN")), [("/valueQuantity/value", "a FHIR decimal is a finite number")]),
    "day that does not exist": (changed(VALID["Patient"], birthDate="2023-02-29"), [("/birthDate", "not a valid FHIR date: that day does not exist")]),
    "date with a final newline": (changed(VALID["Patient"], birthDate="1961-07\n"), [("/birthDate", "not a valid FHIR date")]),
    "dateTime without zone": (changed(observation(), effectiveDateTime="2024-05-03T10:00:00"), [("/effectiveDateTime", "not a valid FHIR dateTime")]),
    # unknown fields
    "unknown element": (changed(observation(), foo=1), [("/foo", "unknown element: FHIR R4 Observation has no 'foo'")]),
    "unknown nested element": (with_value(["code", "coding", 0, "primary"], True), [("/code/coding/0/primary", "unknown element: FHIR R4 Coding has no 'primary'")]),
    "R5 element": (changed(VALID["EpisodeOfCare"], reason=[{"use": {"text": "x"}}]), [("/reason", "unknown element: FHIR R4 EpisodeOfCare has no 'reason'")]),
    # codes with a required binding
    "Observation.status": (changed(observation(), status="done"), [("/status", "'done' is not one of the codes allowed here: 'registered', 'preliminary', 'final', 'amended', 'corrected', 'cancelled', 'entered-in-error', 'unknown'")]),
    "Patient.gender": (changed(VALID["Patient"], gender="f"), [("/gender", "'f' is not one of the codes allowed here: 'male', 'female', 'other', 'unknown'")]),
    "Quantity.comparator": (with_value(["valueQuantity", "comparator"], "=="), [("/valueQuantity/comparator", "'==' is not one of the codes allowed here: '<', '<=', '>=', '>'")]),
    "Encounter.status R5 code": (changed(VALID["Encounter"], status="completed"), [("/status", "'completed' is not one of the codes allowed here: 'planned', 'arrived', 'triaged', 'in-progress', 'onleave', 'finished', 'cancelled', 'entered-in-error', 'unknown'")]),
    # references
    "reference with a space": (changed(observation(), subject={"reference": "Patient p-1"}), [("/subject/reference", "not a FHIR reference: expected Type/id (e.g. Patient/p-1), an absolute FHIR URL, urn:uuid:..., urn:oid:... or #contained-id")]),
    "reference to an unknown type": (changed(observation(), subject={"reference": "Human/p-1"}), [("/subject/reference", "'Human' is not a FHIR R4 resource type")]),
    "reference to a type not allowed here": (changed(observation(), subject={"reference": "Practitioner/p-1"}), [("/subject/reference", "Practitioner is not allowed here; FHIR R4 allows Device, Group, Location, Patient")]),
    "reference in a list to a type not allowed": (changed(VALID["DiagnosticReport"], result=[{"reference": "Observation/o"}, {"reference": "Patient/p-1"}]), [("/result/1/reference", "Patient is not allowed here; FHIR R4 allows Observation")]),
    "reference not a string": (changed(observation(), subject={"reference": 7}), [("/subject/reference", "expected string, got integer")]),
    # cardinality and choices
    "missing status": (changed(observation(), status=None), [("/status", "required by FHIR R4")]),
    "missing code": (changed(observation(), code=None), [("/code", "required by FHIR R4 Observation")]),
    "missing medication[x]": (changed(VALID["MedicationRequest with date-only authoredOn"], medicationCodeableConcept=None), [("/medication[x]", "one of medicationCodeableConcept, medicationReference is required by FHIR R4")]),
    "two value[x]": (changed(observation(valueString="high"), valueBoolean=True), [("/valueString", "only one value[x] is allowed, found valueBoolean, valueString")]),
    # nested resources
    "contained resource": (changed(observation(), contained=[{"resourceType": "Patient", "gender": "f"}]), [("/contained/0/gender", "'f' is not one of the codes allowed here: 'male', 'female', 'other', 'unknown'")]),
    "Bundle entry": (with_value(["entry", 0, "resource", "status"], "done", VALID["Bundle"]), [("/entry/0/resource/status", "'done' is not one of the codes allowed here: 'registered', 'preliminary', 'final', 'amended', 'corrected', 'cancelled', 'entered-in-error', 'unknown'")]),
    "unknown contained type": (changed(observation(), contained=[{"resourceType": "Nope"}]), [("/contained/0/resourceType", "'Nope' is not a FHIR R4 resource type")]),
    # the resource itself
    "not an object": ([observation()], [("", "a FHIR resource is a JSON object, got array")]),
    "no resourceType": ({"status": "final"}, [("/resourceType", "resourceType is required")]),
    "unknown resourceType": ({"resourceType": "Observations"}, [("/resourceType", "'Observations' is not a FHIR R4 resource type")]),
    "R5 resourceType": ({"resourceType": "SubscriptionStatus"}, [("/resourceType", "'SubscriptionStatus' is not a FHIR R4 resource type")]),
}


@pytest.mark.parametrize("resource, expected", INVALID.values(), ids=INVALID.keys())
def test_problems_are_reported_at_their_path(resource, expected):
    assert validate_resource(resource) == expected


def test_every_problem_is_reported_sorted_by_path():
    doc = changed(observation(), status="done", foo=1, subject={"reference": "Practitioner/p-1"})
    doc["component"] = [{"code": {"text": "x"}, "valueInteger": Decimal("5.5")} for _ in range(11)]
    assert [pointer for pointer, _ in validate_resource(doc)] == [
        "/component/0/valueInteger", *[f"/component/{i}/valueInteger" for i in range(1, 11)],
        "/foo", "/status", "/subject/reference",
    ]


def test_messages_do_not_repeat_free_text():
    secret = "SECRET-IDENTIFIER-0042"
    doc = changed(VALID["Patient"], birthDate=secret, identifier=[{"value": [secret]}], name=[{"family": {"text": secret}}])
    problems = validate_resource(doc)
    assert [p for p, _ in problems] == ["/birthDate", "/identifier/0/value", "/name/0/family"]
    assert all(secret not in message for _, message in problems)


def test_json_decimals_parsed_as_decimal_are_accepted_and_kept():
    text = json.dumps(observation()).replace('"effectiveDateTime"', '"valueQuantity": {"value": 0.60, "comparator": "<", "unit": "mg/dL"}, "effectiveDateTime"')
    doc = parse(text.replace("0.6,", "0.60,"))
    assert validate_resource(doc) == []
    assert str(doc["valueQuantity"]["value"]) == "0.60"


def test_find_resources_yields_each_embedded_resource_once():
    body = {
        "fhir": [observation(contained=[{"resourceType": "Patient"}]), VALID["Patient"]],
        "a/b": {"deep": [{"x": VALID["Condition"]}]},
        "plain": {"status": "final"},
    }
    found = [(pointer, resource["resourceType"]) for pointer, resource in find_resources(body, "/body")]
    assert found == [("/body/fhir/0", "Observation"), ("/body/fhir/1", "Patient"), ("/body/a~1b/deep/0/x", "Condition")]


def test_validate_embedded_names_the_resource_and_the_path():
    body = {"fhir": [VALID["Patient"], changed(observation(), status="done")], "other": {"resourceType": "Nope"}}
    assert validate_embedded(body, "/body") == [
        ("/body/fhir/1/status", "FHIR R4 Observation at /body/fhir/1: 'done' is not one of the codes allowed here: "
         "'registered', 'preliminary', 'final', 'amended', 'corrected', 'cancelled', 'entered-in-error', 'unknown'"),
        ("/body/other/resourceType", "FHIR R4 resource at /body/other: 'Nope' is not a FHIR R4 resource type"),
    ]
    assert validate_embedded({"fhir": [VALID["Patient"]]}) == []


def test_the_shipped_data_is_fhir_r4():
    validator = default_validator()
    assert validator is default_validator()
    assert len(validator.resource_types) == 146
    assert {"EpisodeOfCare", "MedicinalProduct", "Media"} <= validator.resource_types  # R4 only
    assert not {"SubscriptionStatus", "Citation", "ActorDefinition"} & validator.resource_types  # R4B/R5


def test_data_of_another_version_is_refused(tmp_path):
    (tmp_path / "fhir.schema.json.gz").write_bytes(gzip.compress(json.dumps({"id": "http://hl7.org/fhir/json-schema/5.0"}).encode()))
    (tmp_path / "structure.json.gz").write_bytes(gzip.compress(json.dumps({"fhirVersion": "5.0.0"}).encode()))
    with pytest.raises(ValueError, match="not the FHIR R4 4.0.1 data"):
        FhirR4Validator(tmp_path)


def test_validation_resolves_no_reference_at_run_time(monkeypatch):
    """The schema's ~10,000 ``{"$ref": "#/definitions/X"}`` are the definitions themselves once
    loaded: a resource is validated without a resolver lookup (which took most of the time),
    and problems deep inside referenced definitions are still found, with the same words."""
    import referencing._core

    def no_lookup(*args, **kwargs):
        raise AssertionError("a $ref was resolved while validating")
    validator = FhirR4Validator()
    monkeypatch.setattr(referencing._core.Resolver, "lookup", no_lookup)
    assert validator.validate(VALID["Encounter"]) == []
    bad = observation(code={"coding": [{"system": LOINC, "code": 5}]},
                      component=[{"code": {"text": "x"}, "valueQuantity": {"value": Decimal("1"), "comparator": "~"}}],
                      contained=[{"resourceType": "Patient", "gender": "f"}])
    problems = dict(validator.validate(bad))
    assert problems["/code/coding/0/code"] == "expected string, got integer", problems
    assert problems["/component/0/valueQuantity/comparator"].startswith("'~' is not one of the codes allowed here")
    assert problems["/contained/0/gender"].startswith("'f' is not one of the codes allowed here")

    seen, stack = set(), [validator._validator.schema]
    while stack:  # no reference is left anywhere the validator can reach
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            assert "$ref" not in node
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
