"""The synthetic longitudinal FHIR patients (bench/fhir_synth.py): deterministic, interleaved
concurrent episodes, every record valid v2 and every resource valid FHIR R4. Pure Python."""

from __future__ import annotations

import collections
from decimal import Decimal

import pytest

from bench import fhir_synth
from gateway.core.fhir_validation import validate_embedded
from gateway.core.schemas import DEFAULT_SCHEMA_DIR, SchemaRegistry

BASE = "https://medicon.example/schemas/"


@pytest.fixture(scope="module")
def records() -> list[fhir_synth.SynthRecord]:
    return fhir_synth.generate(seed=11, patients=4, episodes=4, encounters=8)


@pytest.fixture(scope="module")
def resources(records) -> list[dict]:
    return [resource for synth in records for resource in synth.resources()]


def test_the_same_seed_gives_the_same_records():
    first = [fhir_synth.dumps(s.record) for s in fhir_synth.generate(seed=3)]
    assert first == [fhir_synth.dumps(s.record) for s in fhir_synth.generate(seed=3)]
    assert first != [fhir_synth.dumps(s.record) for s in fhir_synth.generate(seed=4)]


def test_every_record_is_valid_v2_and_every_resource_valid_fhir_r4(records):
    registry = SchemaRegistry.load(DEFAULT_SCHEMA_DIR)
    for index, synth in enumerate(records):
        assert synth.record["schema"].endswith("/v2")
        assert registry.validate(synth.record) == [], index
        assert validate_embedded(synth.record["body"], "/body") == [], index


def test_several_patients_with_at_least_three_concurrent_episodes_each(records, resources):
    assert len({s.record["patient"] for s in records}) == 4
    assert len(resources) >= 300
    most_open = collections.Counter()
    open_now = collections.Counter()
    for synth in records:
        patient, kind = synth.record["patient"], synth.record["schema"]
        if kind == BASE + "episode-opened/v2":
            open_now[patient] += 1
        elif kind == BASE + "episode-closed/v2":
            open_now[patient] -= 1
        most_open[patient] = max(most_open[patient], open_now[patient])
    assert min(most_open.values()) >= 3


def test_records_are_in_write_order_and_interleaved_across_episodes(records):
    by_episode = collections.defaultdict(list)
    for synth in records:
        by_episode[synth.record["episode"]].append(synth.record["schema"])
    for kinds in by_episode.values():
        assert kinds[0] == BASE + "episode-opened/v2"
        assert BASE + "episode-opened/v2" not in kinds[1:]
        assert BASE + "episode-closed/v2" not in kinds[:-1]
    switches = sum(a.record["episode"] != b.record["episode"] for a, b in zip(records, records[1:]))
    assert switches > len(records) / 2


def test_the_resource_types_and_values_the_v1_schemas_refused(resources):
    types = collections.Counter(r["resourceType"] for r in resources)
    assert {"Patient", "EpisodeOfCare", "Condition", "Encounter", "Observation", "MedicationRequest", "DiagnosticReport"} <= set(types)
    quantities = [r["valueQuantity"] for r in resources if "valueQuantity" in r]
    assert all(isinstance(q["value"], Decimal) for q in quantities)
    trailing_zeros = [str(q["value"]) for q in quantities if "." in str(q["value"]) and str(q["value"]).endswith("0")]
    assert len(trailing_zeros) >= 5  # significant trailing zeros: 1.00, 0.60...
    ranges = {str(r["referenceRange"][0]["low"]["value"]) for r in resources if "referenceRange" in r}
    assert "0.60" in ranges
    assert {">", "<"} <= {q.get("comparator") for q in quantities}
    authored = [r["authoredOn"] for r in resources if r["resourceType"] == "MedicationRequest"]
    assert authored and all(len(a) == 10 for a in authored)  # date only
    classes = {r["class"]["code"] for r in resources if r["resourceType"] == "Encounter"}
    assert {"AMB", "EMER"} <= classes


def test_references_point_at_generated_resources(resources):
    ids = {(r["resourceType"], r["id"]) for r in resources}
    external = {"Organization", "Practitioner"}

    def references(node):
        if isinstance(node, dict):
            if isinstance(node.get("reference"), str):
                yield node["reference"]
            for value in node.values():
                yield from references(value)
        elif isinstance(node, list):
            for value in node:
                yield from references(value)

    for resource in resources:
        for reference in references(resource):
            kind, rid = reference.split("/")
            assert kind in external or (kind, rid) in ids, reference


def test_amendments_say_which_record_they_correct(records):
    amendments = [(i, s) for i, s in enumerate(records) if s.record["schema"] == BASE + "amendment/v2"]
    assert amendments
    for index, synth in amendments:
        corrected = records[synth.corrects]
        assert synth.corrects < index and corrected.record["episode"] == synth.record["episode"]
        [fixed] = synth.record["body"]["fhir"]
        assert fixed["id"] in {r["id"] for r in corrected.resources()}
        assert synth.record["body"]["corrects"] == fhir_synth._placeholder_cid(corrected.record)


def test_json_lines_keep_decimals_as_written(tmp_path, records):
    out = tmp_path / "records.jsonl"
    assert fhir_synth.main(["--seed", "11", "--patients", "4", "--episodes", "4", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == len(records)
    assert [fhir_synth.loads(line)["record"] for line in lines] == [s.record for s in records]
    assert '"value":0.60' in out.read_text() or '"value":1.20' in out.read_text()
