"""A generated longitudinal patient set (bench/fhir_synth.py: several patients, at least three
concurrent episodes each, hundreds of resources) written into a real gateway — as records
through the REST API, and as FHIR transaction Bundles through the facade — and read back
through the FHIR facade: every resource byte for byte as sent, valid FHIR R4, every version in
its _history, each patient's $everything in write order."""

from __future__ import annotations

import collections

import pytest

from bench import fhir_replay, fhir_synth
from conftest import start_gateway
from gateway.core.fhir_validation import validate_resource


@pytest.fixture(scope="module")
def gateway(kubo):
    gw = start_gateway(kubo)
    yield gw
    assert gw.stop() == 0


@pytest.mark.parametrize("mode, seed", [("records", 11), ("transactions", 12)])
def test_replay_reads_back_every_resource_exactly(gateway, mode, seed, capsys):
    records = fhir_synth.generate(seed=seed, patients=4, episodes=3, encounters=8)
    assert len({s.record["patient"] for s in records}) == 4
    client = fhir_replay.Gateway(gateway.url, gateway.token)
    replay = (fhir_replay.replay_records if mode == "records" else fhir_replay.replay_transactions)(client, records)
    assert replay.resources >= 200
    types = collections.Counter(kind for kind, _ in replay.versions)
    assert {"Patient", "EpisodeOfCare", "Condition", "Encounter", "Observation", "MedicationRequest",
            "DiagnosticReport"} <= set(types)
    assert any(len(v) > 1 for v in replay.versions.values()), "no amended or closed resource: no history"
    check = fhir_replay.read_back(client, replay, validate_resource)
    assert check["problems"] == []
    with capsys.disabled():
        print(f"\nreplay ({mode}): {replay.records} records, {replay.resources} resources in "
              f"{replay.seconds:.1f} s = {replay.records / replay.seconds:.1f} records/s; "
              f"{check['reads']} reads in {check['seconds']:.1f} s")
