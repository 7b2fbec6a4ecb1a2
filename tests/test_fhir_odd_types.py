"""A ``resourceType`` that is not a string (an object, an array, a number, true, null) is the
client's mistake wherever it comes: in a record's ``body.fhir``, in a resource's
``contained``, in a transaction Bundle's entry. Refused with its path (the record schema or FHIR
R4 validation), or accepted where ``records.fhir_validation`` is warn or off and the record
schema does not look — never a 5xx, and the FHIR index and search go on working. (A JSON object
or array is no member of a set of type names, and was once asked as one: a 500.)"""

from __future__ import annotations

import pytest

from conftest import app_client, gateway_config
from gateway.core.fhir_validation import validate_resource
from records_helpers import uid

V2 = "https://medicon.example/schemas"
ODD = [{"a": 1}, ["Observation"], 7, True, None]
ODD_IDS = ["object", "array", "number", "boolean", "null"]
MODES = ["enforce", "warn", "off"]


def _opened(patient: str, episode: str, resource: dict) -> dict:
    return {"schema": f"{V2}/episode-opened/v2", "episode": episode, "author": "dr.a",
            "body": {"status": "active", "fhir": [
                {"resourceType": "EpisodeOfCare", "id": f"eoc-{episode}", "status": "active",
                 "patient": {"reference": f"Patient/{patient}"}},
                resource]}}


def _with_contained(patient: str, kind) -> dict:
    return {"resourceType": "Observation", "id": f"o-{uid('x')}", "status": "final", "code": {"text": "weight"},
            "subject": {"reference": f"Patient/{patient}"}, "contained": [{"resourceType": kind, "id": "c1"}]}


@pytest.mark.parametrize("kind", ODD, ids=ODD_IDS)
def test_the_validator_names_the_element(kind):
    assert validate_resource({"resourceType": kind}) == [("/resourceType", "resourceType must be a string, got "
                                                         + {dict: "object", list: "array", int: "integer",
                                                            bool: "boolean", type(None): "null"}[type(kind)])]
    [(where, message)] = validate_resource({"resourceType": "Observation", "status": "final", "code": {"text": "t"},
                                            "contained": [{"resourceType": kind}]})
    assert where == "/contained/0/resourceType" and message.startswith("resourceType must be a string"), message


@pytest.mark.parametrize("mode", MODES)
async def test_a_record_whose_resource_type_is_no_string_is_refused_by_its_schema(aiohttp_client, kubo, mode):
    client = await app_client(aiohttp_client, gateway_config(kubo, **{"records.fhir_validation": mode}))
    for kind in ODD:
        patient, episode = uid("p"), uid("e")
        r = await client.post(f"/medicon/v1/patients/{patient}/episodes",
                              json=_opened(patient, episode, {"resourceType": kind, "id": "x-1", "status": "final"}))
        assert r.status == 400, await r.text()
        problems = (await r.json())["error"]["problems"]
        assert any(p.startswith("/body/fhir/1/resourceType: ") for p in problems), problems


@pytest.mark.parametrize("mode", MODES)
async def test_a_contained_resource_type_that_is_no_string_is_refused_or_accepted_as_the_mode_says(
        aiohttp_client, kubo, mode):
    client = await app_client(aiohttp_client, gateway_config(kubo, **{"records.fhir_validation": mode}))
    patient = uid("p")
    for kind in ODD:
        r = await client.post(f"/medicon/v1/patients/{patient}/episodes",
                              json=_opened(patient, uid("e"), _with_contained(patient, kind)))
        if mode == "enforce":
            assert r.status == 400, await r.text()
            problems = (await r.json())["error"]["problems"]
            assert any(p.startswith("/body/fhir/1/contained/0/resourceType: FHIR R4 Observation at /body/fhir/1: "
                                    "resourceType must be a string") for p in problems), problems
        else:
            assert r.status == 201, await r.text()
    r = await client.get("/fhir/r4/Observation", params={"patient": patient})
    assert r.status == 200, await r.text()
    found = [e["resource"] for e in (await r.json()).get("entry", [])]
    assert len(found) == (0 if mode == "enforce" else len(ODD)), found


@pytest.mark.parametrize("kind", ODD, ids=ODD_IDS)
async def test_a_bundle_entry_whose_resource_type_is_no_string_is_refused(aiohttp_client, kubo, kind):
    client = await app_client(aiohttp_client, gateway_config(kubo))
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": kind, "id": "x-1"}, "request": {"method": "PUT", "url": "Observation/x-1"}}]}
    r = await client.post("/fhir/r4", json=bundle, headers={"Content-Type": "application/fhir+json"})
    assert r.status == 400, await r.text()
    outcome = await r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "no FHIR R4 resourceType" in str(outcome), outcome
