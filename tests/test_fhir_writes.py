"""FHIR R4 validation of the resources a record embeds, on every write
(``records.fhir_validation``: enforce by default, warn, off)."""

from __future__ import annotations

import logging

import pytest

from conftest import app_client, gateway_config
from records_helpers import uid

V2 = "https://medicon.example/schemas"


def opened(patient: str, episode: str, resource: dict) -> dict:
    return {"schema": f"{V2}/episode-opened/v2", "episode": episode, "author": "dr.a",
            "body": {"status": "active", "fhir": [
                {"resourceType": "EpisodeOfCare", "status": "active", "patient": {"reference": f"Patient/{patient}"}},
                resource]}}


BAD = {"resourceType": "Observation", "status": "done", "code": {"text": "HbA1c"},
       "valueQuantity": {"value": 7.1}, "valueString": "high"}


async def test_enforce_refuses_with_the_resource_and_the_path_and_stores_nothing(aiohttp_client, kubo):
    config = gateway_config(kubo)
    assert config.records.fhir_validation == "enforce"
    client = await app_client(aiohttp_client, config)
    patient, episode = uid("p"), uid("e")
    r = await client.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode, BAD))
    assert r.status == 400
    problems = (await r.json())["error"]["problems"]
    assert any(p.startswith("/body/fhir/1/status: FHIR R4 Observation at /body/fhir/1: 'done' is not one of")
               for p in problems), problems
    assert any(p.startswith("/body/fhir/1/valueString: FHIR R4 Observation at /body/fhir/1: only one value[x]")
               for p in problems), problems
    r = await client.get(f"/medicon/v1/patients/{patient}/episodes")
    assert (await r.json())["episodes"] == []
    good = {**BAD, "status": "final"}
    del good["valueString"]
    r = await client.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode, good))
    assert r.status == 201, await r.text()


@pytest.mark.parametrize("mode", ["warn", "off"])
async def test_warn_and_off_accept(aiohttp_client, kubo, caplog, mode):
    client = await app_client(aiohttp_client, gateway_config(kubo, **{"records.fhir_validation": mode}))
    patient, episode = uid("p"), uid("e")
    with caplog.at_level(logging.WARNING, logger="gateway.core.service"):
        r = await client.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode, BAD))
    assert r.status == 201, await r.text()
    warned = [rec.getMessage() for rec in caplog.records if "FHIR R4 problem" in rec.getMessage()]
    if mode == "warn":
        assert warned == ["record accepted with 2 FHIR R4 problem(s) in its embedded EpisodeOfCare, Observation "
                          "(records.fhir_validation = warn)"]
        assert patient not in warned[0] and episode not in warned[0]
    else:
        assert warned == []


def test_an_unknown_mode_is_a_config_error(kubo):
    from gateway.config import ConfigError
    with pytest.raises(ConfigError, match="fhir_validation"):
        gateway_config(kubo, **{"records.fhir_validation": "strict"})
