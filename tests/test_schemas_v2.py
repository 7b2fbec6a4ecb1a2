"""Record schemas v2 (FHIR R4 shaped): typical FHIR values are accepted, wrong ones are refused
with the pointer of the field, and v1 is untouched.

Records are parsed as the gateway parses them: JSON decimals as ``decimal.Decimal``. Embedded
FHIR resources of the accepted cases must also pass the FHIR R4 validator. Pure Python.
"""

from __future__ import annotations

import copy
import json
from decimal import Decimal

import pytest

from gateway.core.fhir_validation import validate_embedded
from gateway.core.schemas import DEFAULT_SCHEMA_DIR, SchemaRegistry, Violation

BASE = "https://medicon.example/schemas/"
COMMON = BASE + "common/v2"
ENVELOPE = BASE + "envelope/v1"
OPENED = BASE + "episode-opened/v2"
ENCOUNTER = BASE + "encounter/v2"
CLOSED = BASE + "episode-closed/v2"
AMENDMENT = BASE + "amendment/v2"
V1_KINDS = ["episode-opened", "encounter", "episode-closed", "amendment"]
EXAMPLES = DEFAULT_SCHEMA_DIR / "examples"
RECORD_DIR = DEFAULT_SCHEMA_DIR / "record"
CID_V0 = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


@pytest.fixture(scope="module")
def registry() -> SchemaRegistry:
    return SchemaRegistry.load(DEFAULT_SCHEMA_DIR)


def parse(text: str):
    return json.loads(text, parse_float=Decimal)


def example(name: str) -> dict:
    return parse((EXAMPLES / f"{name}.json").read_text())


def found(violations: list[Violation]) -> list[tuple[str, str, str]]:
    return [(v.pointer, v.schema_id, v.keyword) for v in violations]


def at(doc: dict, pointer: str):
    *parents, last = pointer.strip("/").split("/")
    for p in parents:
        doc = doc[int(p) if p.isdigit() else p]
    return doc, int(last) if last.isdigit() else last


def put(pointer: str, value):
    def mutate(doc):
        parent, key = at(doc, pointer)
        parent[key] = copy.deepcopy(value)
    return mutate


def delete(pointer: str):
    def mutate(doc):
        parent, key = at(doc, pointer)
        del parent[key]
    return mutate


def both(*mutations):
    def mutate(doc):
        for m in mutations:
            m(doc)
    return mutate


def observation(**value) -> dict:
    return {"status": "final", "code": {"coding": [{"system": LOINC, "code": "8867-4"}]}, **value}


def coding(code: str, system: str = ACT_CODE) -> dict:
    return {"system": system, "code": code}


def fhir_observation(**value) -> dict:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "33914-3"}]},
        "subject": {"reference": "Patient/patient-0042"},
        **value,
    }


OBS = "/body/observations/0"

# name -> (example, mutation): typical FHIR R4 content, each valid under v2. The first 18
# are the classes of values the v1 schemas refused in the replay of synthetic FHIR patients.
VALID = {
    # 1-3 episode-opened embeds the episode's resources
    "opened embeds EpisodeOfCare": ("episode-opened-v2", put("/body/fhir", [{"resourceType": "EpisodeOfCare", "status": "planned", "patient": {"reference": "Patient/patient-0042"}}])),
    "opened embeds Condition": ("episode-opened-v2", put("/body/fhir", [{"resourceType": "Condition", "subject": {"reference": "Patient/patient-0042"}, "code": {"text": "Asthma"}, "recordedDate": "2024-05"}])),
    "opened embeds Patient": ("episode-opened-v2", put("/body/fhir", [{"resourceType": "Patient", "active": True, "gender": "other", "birthDate": "1970"}])),
    # 4-6 EpisodeOfCare statuses
    "episode status finished": ("episode-opened-v2", put("/body/status", "finished")),
    "episode status cancelled": ("episode-opened-v2", put("/body/status", "cancelled")),
    "episode status entered-in-error": ("episode-closed-v2", put("/body/status", "entered-in-error")),
    # 7-10 Encounter statuses
    "encounter status arrived": ("encounter-v2", put("/body/status", "arrived")),
    "encounter status triaged": ("encounter-v2", put("/body/status", "triaged")),
    "encounter status onleave": ("encounter-v2", put("/body/status", "onleave")),
    "encounter status unknown": ("encounter-v2", put("/body/status", "unknown")),
    # 11 Encounter.class is a v3 ActCode Coding
    "encounter class EMER": ("encounter-v2", put("/body/class", {**coding("EMER"), "display": "emergency"})),
    # 12 date-only and partial dates where FHIR allows them
    "MedicationRequest authoredOn date only": ("encounter-v2", put("/body/fhir/1/authoredOn", "2024-05-03")),
    # 13 CodeableConcept: several codings, version, userSelected, text
    "CodeableConcept with several codings": ("encounter-v2", put(OBS + "/code", {"coding": [
        {"system": LOINC, "version": "2.77", "code": "4548-4", "display": "Hemoglobin A1c", "userSelected": True},
        {"system": "http://snomed.info/sct", "code": "43396009", "userSelected": False}], "text": "HbA1c"})),
    # 14 Quantity with a comparator
    "Quantity with comparator eGFR >60": ("encounter-v2", put(OBS, observation(valueQuantity={"value": 60, "comparator": ">", "unit": "mL/min/1.73m2", "system": UCUM, "code": "mL/min/{1.73_m2}"}))),
    # 15 Quantity with only a coded UCUM unit
    "Quantity with only a UCUM code": ("encounter-v2", put(OBS, observation(valueQuantity={"value": Decimal("5.4"), "system": UCUM, "code": "mmol/L"}))),
    # 16-18 value[x] forms
    "valueCodeableConcept": ("encounter-v2", put(OBS, observation(valueCodeableConcept={"coding": [{"system": "http://snomed.info/sct", "code": "260385009", "display": "Negative"}]}))),
    "valueRange": ("encounter-v2", put(OBS, observation(valueRange={"low": {"value": 2, "unit": "mg"}, "high": {"value": Decimal("4.50"), "unit": "mg"}}))),
    "valueRatio": ("encounter-v2", put(OBS, observation(valueRatio={"numerator": {"value": 1}, "denominator": {"value": 128}}))),
    # 19 references of the form Type/id
    "reference Practitioner/p-1": ("encounter-v2", put("/body/participant/0/individual", {"reference": "Practitioner/p-1"})),
    # more typical content
    "encounter class AMB": ("encounter-v2", put("/body/class", coding("AMB"))),
    "encounter class IMP": ("encounter-v2", put("/body/class", {**coding("IMP"), "display": "inpatient encounter"})),
    "encounter class from another system (extensible binding)": ("encounter-v2", put("/body/class", coding("home-visit", "https://clinic.example/encounter-class"))),
    "period start year only": ("episode-opened-v2", put("/body/period", {"start": "2024"})),
    "period start year-month": ("episode-opened-v2", put("/body/period", {"start": "2024-05"})),
    "dateTime with fraction and offset": ("encounter-v2", put("/body/period", {"start": "2024-05-03T07:30:00.123+14:00", "end": "2024-05-03T09:00:00Z"})),
    "leap day": ("episode-opened-v2", put("/body/period", {"start": "2024-02-29"})),
    "closed period end partial": ("episode-closed-v2", put("/body/period", {"end": "2025-05"})),
    "valueString": ("encounter-v2", put(OBS, observation(valueString="Clear, yellow"))),
    "valueBoolean": ("encounter-v2", put(OBS, observation(valueBoolean=False))),
    "valueInteger": ("encounter-v2", put(OBS, observation(valueInteger=3))),
    "valuePeriod": ("encounter-v2", put(OBS, observation(valuePeriod={"start": "2024-05-01", "end": "2024-05-03"}))),
    "valueDateTime": ("encounter-v2", put(OBS, observation(valueDateTime="2024-04"))),
    "valueTime": ("encounter-v2", put(OBS, observation(valueTime="06:30:00"))),
    "valueSampledData": ("encounter-v2", put(OBS, observation(valueSampledData={"origin": {"value": 0}, "period": 10, "dimensions": 1, "data": "1 2 3"}))),
    "effectivePeriod and issued": ("encounter-v2", put(OBS, observation(effectivePeriod={"start": "2024-05-03T07:30:00Z"}, issued="2024-05-03T10:00:00Z", valueBoolean=True))),
    "blood pressure components": ("encounter-v2", put(OBS, observation(component=[
        {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": {"value": 120, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}},
        {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]}, "valueQuantity": {"value": 80, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}}]))),
    "significant trailing zeros": ("encounter-v2", put(OBS, observation(valueQuantity={"value": Decimal("0.60"), "unit": "mg/dL"}))),
    "decimal beyond float precision and range": ("encounter-v2", put(OBS, observation(valueQuantity={"value": Decimal("1.0000000000000000000000001E+400")}))),
    "dataAbsentReason without value": ("encounter-v2", put(OBS, observation(dataAbsentReason={"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "not-performed"}]}))),
    "absolute, urn and contained references": ("encounter-v2", put("/body/reasonReference", [
        {"reference": "https://fhir.clinic.example/r4/Condition/cond-1/_history/2"},
        {"reference": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"}, {"reference": "#cond-2"},
        {"identifier": {"system": "https://clinic.example/conditions", "value": "C-17"}, "display": "logical reference"}])),
    "identifier and extension": ("episode-opened-v2", put("/body/identifier", [{"use": "official", "system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345", "extension": [{"url": "https://clinic.example/fhir/ext/source", "valueString": "import"}]}])),
    "Encounter.class with extension": ("encounter-v2", put("/body/class", {**coding("VR"), "extension": [{"url": "https://clinic.example/ext/x"}]})),
    "diagnosis with rank": ("encounter-v2", put("/body/diagnosis", [{"condition": {"reference": "Condition/cond-t2dm"}, "rank": 1}])),
    "amendment embeds a corrected Observation": ("amendment-v2", put("/body/fhir/0", fhir_observation(status="corrected", valueQuantity={"value": Decimal("1.00"), "comparator": ">=", "unit": "mg/dL", "system": UCUM, "code": "mg/dL"}))),
    "closed embeds the final EpisodeOfCare": ("episode-closed-v2", put("/body/fhir/0/status", "cancelled")),
    "encounter embeds a DiagnosticReport": ("encounter-v2", put("/body/fhir", [{"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "Renal panel"}, "subject": {"reference": "Patient/patient-0042"}, "effectiveDateTime": "2024-05-03", "result": [{"reference": "Observation/obs-creatinine"}]}])),
    "minimal encounter": ("encounter-v2", lambda doc: doc.update(body={"status": "planned", "class": coding("AMB")})),
    "minimal episode-opened": ("episode-opened-v2", lambda doc: doc.update(body={"status": "waitlist"})),
}


@pytest.mark.parametrize("name, mutate", VALID.values(), ids=VALID.keys())
def test_typical_fhir_content_is_valid(registry, name, mutate):
    doc = example(name)
    mutate(doc)
    assert registry.validate(doc) == []
    assert validate_embedded(doc["body"], "/body") == []


@pytest.mark.parametrize("name", [f"{kind}-v2" for kind in V1_KINDS])
def test_v2_examples_are_valid_and_their_resources_are_fhir_r4(registry, name):
    doc = example(name)
    assert doc["schema"] == BASE + name.replace("-v2", "/v2")
    assert registry.validate(doc) == []
    assert doc["body"]["fhir"] and validate_embedded(doc["body"], "/body") == []


@pytest.mark.parametrize("name", V1_KINDS)
def test_v1_examples_are_still_valid_under_v1(registry, name):
    doc = example(name)
    assert doc["schema"] == BASE + name + "/v1"
    assert registry.validate(doc) == []


@pytest.mark.parametrize("name", V1_KINDS)
def test_a_v2_body_is_not_a_v1_body(registry, name):
    doc = example(f"{name}-v2")
    doc["schema"] = BASE + name + "/v1"
    assert registry.validate(doc) != []


def test_v1_schemas_are_unchanged_in_meaning(registry):
    # v1 still refuses what it refused: the replay's values are new in v2 only.
    doc = example("encounter")
    doc["body"]["status"] = "arrived"
    assert found(registry.validate(doc)) == [("/body/status", BASE + "encounter/v1", "enum")]


# name -> (example, mutation, expected [(pointer, schema $id, keyword)])
INVALID = {
    "episode status not in the value set": ("episode-opened-v2", put("/body/status", "closed"), [("/body/status", OPENED, "enum")]),
    "episode-opened prev not null": ("episode-opened-v2", put("/prev", CID_V0), [("/prev", OPENED, "type")]),
    "episode-opened missing status": ("episode-opened-v2", delete("/body/status"), [("/body/status", OPENED, "required")]),
    "closed with a non-final status": ("episode-closed-v2", put("/body/status", "active"), [("/body/status", CLOSED, "enum")]),
    "closed period without end": ("episode-closed-v2", delete("/body/period/end"), [("/body/period/end", CLOSED, "required")]),
    "encounter status not in the value set": ("encounter-v2", put("/body/status", "done"), [("/body/status", ENCOUNTER, "enum")]),
    "encounter class as a bare code": ("encounter-v2", put("/body/class", "AMB"), [("/body/class", COMMON, "type")]),
    "encounter class not an ActEncounterCode": ("encounter-v2", put("/body/class/code", "XYZ"), [("/body/class/code", ENCOUNTER, "enum")]),
    "encounter missing class": ("encounter-v2", delete("/body/class"), [("/body/class", ENCOUNTER, "required")]),
    "date with month 13": ("episode-opened-v2", put("/body/period/start", "2024-13"), [("/body/period/start", COMMON, "pattern")]),
    "day that does not exist": ("episode-opened-v2", put("/body/period/start", "2023-02-29"), [("/body/period/start", COMMON, "format")]),
    "dateTime with time but no zone": ("encounter-v2", put("/body/period/start", "2024-05-03T07:30:00"), [("/body/period/start", COMMON, "pattern")]),
    "dateTime without seconds": ("encounter-v2", put("/body/period/start", "2024-05-03T07:30Z"), [("/body/period/start", COMMON, "pattern")]),
    "date with a final newline": ("episode-opened-v2", put("/body/period/start", "2024-05-02\n"), [("/body/period/start", COMMON, "pattern")]),
    "instant without time": ("encounter-v2", put(OBS + "/issued", "2024-05-03"), [(OBS + "/issued", COMMON, "pattern")]),
    "comparator not in the value set": ("encounter-v2", put(OBS + "/valueQuantity/comparator", "=="), [(OBS + "/valueQuantity/comparator", COMMON, "enum")]),
    "unit code without system": ("encounter-v2", delete(OBS + "/valueQuantity/system"), [(OBS + "/valueQuantity/system", COMMON, "dependentRequired")]),
    "decimal as a string": ("encounter-v2", put(OBS + "/valueQuantity/value", "7.1"), [(OBS + "/valueQuantity/value", COMMON, "type")]),
    "valueInteger with a fraction": ("encounter-v2", put(OBS, observation(valueInteger=Decimal("1.5"))), [(OBS + "/valueInteger", COMMON, "type")]),
    "two value[x]": ("encounter-v2", put(OBS + "/valueString", "7.1 %"), [(OBS + "/valueString", ENCOUNTER, "not")]),
    "unknown value[x] type": ("encounter-v2", put(OBS + "/valueMoney", {"value": 1}), [(OBS + "/valueMoney", ENCOUNTER, "additionalProperties")]),
    "observation without code": ("encounter-v2", delete(OBS + "/code"), [(OBS + "/code", ENCOUNTER, "required")]),
    "coding userSelected not boolean": ("encounter-v2", put(OBS + "/code/coding/0/userSelected", "yes"), [(OBS + "/code/coding/0/userSelected", COMMON, "type")]),
    "CodeableConcept with no coding": ("encounter-v2", put(OBS + "/code/coding", []), [(OBS + "/code/coding", COMMON, "minItems")]),
    "empty CodeableConcept": ("encounter-v2", put(OBS + "/code", {}), [(OBS + "/code", COMMON, "minProperties")]),
    "coding with an unknown field": ("encounter-v2", put(OBS + "/code/coding/0/primary", True), [(OBS + "/code/coding/0/primary", COMMON, "additionalProperties")]),
    "code with a double space": ("encounter-v2", put(OBS + "/code/coding/0/code", "4548  4"), [(OBS + "/code/coding/0/code", COMMON, "pattern")]),
    "reference with a space": ("encounter-v2", put("/body/participant/0/individual/reference", "Practitioner p-1"), [("/body/participant/0/individual/reference", COMMON, "pattern")]),
    "reference with a lowercase type": ("encounter-v2", put("/body/participant/0/individual/reference", "practitioner/p-1"), [("/body/participant/0/individual/reference", COMMON, "pattern")]),
    "reference id too long": ("encounter-v2", put("/body/participant/0/individual/reference", "Practitioner/" + "x" * 65), [("/body/participant/0/individual/reference", COMMON, "pattern")]),
    "rank zero": ("encounter-v2", put("/body/diagnosis", [{"condition": {"reference": "Condition/c"}, "rank": 0}]), [("/body/diagnosis/0/rank", COMMON, "minimum")]),
    "extension without url": ("episode-opened-v2", put("/body/identifier/0/extension", [{"valueString": "x"}]), [("/body/identifier/0/extension/0/url", COMMON, "required")]),
    "embedded resource without resourceType": ("episode-opened-v2", delete("/body/fhir/2/resourceType"), [("/body/fhir/2/resourceType", COMMON, "required")]),
    "unknown body field": ("encounter-v2", put("/body/subject", {"reference": "Patient/x"}), [("/body/subject", ENCOUNTER, "additionalProperties")]),
    "amendment corrects not a CID": ("amendment-v2", put("/body/corrects", "record-17"), [("/body/corrects", COMMON, "pattern")]),
    "envelope rules are v1's": ("amendment-v2", both(put("/extra", 1), put("/patient", "patient 42")), [("/extra", ENVELOPE, "additionalProperties"), ("/patient", BASE + "common/v1", "pattern")]),
}


@pytest.mark.parametrize("name, mutate, expected", INVALID.values(), ids=INVALID.keys())
def test_invalid_values_are_refused_at_their_field(registry, name, mutate, expected):
    doc = example(name)
    mutate(doc)
    assert found(registry.validate(doc)) == expected


def test_decimals_are_not_constrained_through_floats():
    """A FHIR decimal is any JSON number, kept exactly: no multipleOf or bounds on decimals,
    which jsonschema would evaluate with float arithmetic or would fail on Decimal('1E+400')."""
    for path in RECORD_DIR.glob("*-v2.json"):
        assert "multipleOf" not in path.read_text(), path
    common = json.loads((RECORD_DIR / "common-v2.json").read_text())
    assert common["$defs"]["decimal"]["type"] == "number"
    assert not {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & set(common["$defs"]["decimal"])


def test_validation_keeps_decimal_values_as_written(registry):
    doc = example("encounter-v2")
    assert registry.validate(doc) == []
    value = doc["body"]["fhir"][0]["valueQuantity"]["value"]
    assert isinstance(value, Decimal) and str(value) == "1.00"


@pytest.mark.parametrize("value", ["2024", "2024-05", "2024-05-03", "2024-05-03T10:02:11Z", "2024-05-03T10:02:11.5-03:30", "2016-12-31T23:59:60Z"])
def test_fhir_date_time_forms(registry, value):
    doc = example("encounter-v2")
    doc["body"]["period"] = {"start": value}
    assert registry.validate(doc) == []


@pytest.mark.parametrize("value", ["24", "2024-5", "2024-05-3", "0000-01-01", "2024-05-03T10", "2024-05-03T24:00:00Z", "2024-05-03T10:02:11+14:30", "2024-05-03 10:02:11Z", "2024-04-31"])
def test_not_fhir_date_times(registry, value):
    doc = example("encounter-v2")
    doc["body"]["period"] = {"start": value}
    assert {v.pointer for v in registry.validate(doc)} == {"/body/period/start"}
