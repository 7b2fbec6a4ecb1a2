"""Synthetic longitudinal FHIR R4 patients, as v2 records in the order they would be written.

Each patient has several episodes of care open at once (diabetes, hypertension, CKD...); each
episode is opened (EpisodeOfCare, Condition, the Patient), gets encounters over months (an
Encounter, Observations, a DiagnosticReport, MedicationRequests) and maybe an amendment, and
is usually closed. The records of all episodes and patients are interleaved by time, as a
clinic would write them. Values are what FHIR data really holds and the v1 schemas refused:
decimals with significant trailing zeros (``Decimal("1.00")``, ``Decimal("0.60")``),
comparators (eGFR ">60"), date-only ``authoredOn``, partial dates, several codings.

Deterministic: the same arguments give the same records. Written for the gateway's tests and
benchmarks (PyPI's synthetic FHIR generators make single-episode bundles without
EpisodeOfCare, comparators or exact decimals).

    python -m bench.fhir_synth --seed 7 --patients 4 --out records.jsonl
    python -m bench.fhir_synth --measure        # validate everything, print the cost per resource
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import random
import sys
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

BASE = "https://medicon.example/schemas/"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
START = datetime(2023, 1, 9, 8, 0, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Lab:
    """A lab test: LOINC code, UCUM unit, normal range, decimals shown, and when the result is
    reported with a comparator (below the detection limit, above the reportable range)."""

    code: str
    display: str
    unit: str
    low: Decimal
    high: Decimal
    places: int
    floor: Decimal | None = None  # below it: "<floor"
    ceiling: Decimal | None = None  # above it: ">ceiling"


LABS = {
    "hba1c": Lab("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", Decimal("4.0"), Decimal("5.6"), 1),
    "glucose": Lab("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", Decimal("70"), Decimal("99"), 0),
    "creatinine": Lab("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", Decimal("0.60"), Decimal("1.20"), 2),
    "egfr": Lab("33914-3", "Glomerular filtration rate/1.73 sq M.predicted", "mL/min/{1.73_m2}", Decimal("60"), Decimal("120"), 0, ceiling=Decimal("60")),
    "potassium": Lab("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", Decimal("3.5"), Decimal("5.1"), 1),
    "crp": Lab("1988-5", "C reactive protein [Mass/volume] in Serum or Plasma", "mg/L", Decimal("0.0"), Decimal("5.0"), 1, floor=Decimal("0.5")),
    "tsh": Lab("3016-3", "Thyrotropin [Units/volume] in Serum or Plasma", "m[IU]/L", Decimal("0.40"), Decimal("4.00"), 2, floor=Decimal("0.01")),
    "ldl": Lab("13457-7", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by calculation", "mg/dL", Decimal("50"), Decimal("130"), 0),
}


@dataclass(frozen=True)
class Condition:
    key: str
    snomed: str
    display: str
    icd10: str
    labs: tuple[str, ...]
    drug: tuple[str, str]  # RxNorm code, display
    vitals: bool = False


CONDITIONS = [
    Condition("diabetes", "44054006", "Diabetes mellitus type 2", "E11.9", ("hba1c", "glucose", "creatinine", "egfr"), ("860975", "metformin hydrochloride 500 MG Extended Release Oral Tablet")),
    Condition("hypertension", "38341003", "Hypertensive disorder", "I10", ("potassium", "creatinine"), ("314076", "lisinopril 10 MG Oral Tablet"), vitals=True),
    Condition("ckd", "431855005", "Chronic kidney disease stage 1", "N18.1", ("creatinine", "egfr", "potassium"), ("197361", "amlodipine 5 MG Oral Tablet")),
    Condition("hypothyroidism", "40930008", "Hypothyroidism", "E03.9", ("tsh",), ("966222", "levothyroxine sodium 0.05 MG Oral Tablet")),
    Condition("hyperlipidemia", "55822004", "Hyperlipidemia", "E78.5", ("ldl",), ("617312", "atorvastatin 20 MG Oral Tablet")),
    Condition("pneumonia", "233604007", "Pneumonia", "J18.9", ("crp",), ("308182", "amoxicillin 500 MG Oral Capsule")),
]


@dataclass
class SynthRecord:
    """A v2 record to write, in order. ``corrects`` is the index (in the generated list) of the
    record an amendment corrects: its ``body.corrects`` holds a placeholder CID until the
    writer puts the CID that record got."""

    record: dict[str, Any]
    corrects: int | None = None

    def resources(self) -> Iterator[dict]:
        yield from self.record["body"].get("fhir", [])


def generate(seed: int = 0, patients: int = 3, episodes: int = 3, encounters: int = 8,
             prefix: str = "synth") -> list[SynthRecord]:
    """``patients`` patients with ``episodes`` concurrent episodes each (3 to 6), about
    ``encounters`` encounters per episode; all records interleaved by time. Every id starts
    with ``prefix``, so several sets can go into one gateway without meeting."""
    if not 3 <= episodes <= len(CONDITIONS):
        raise ValueError(f"episodes must be between 3 and {len(CONDITIONS)}")
    rng = random.Random(seed)
    timelines = []
    for number in range(patients):
        patient = _patient(rng, seed, number, prefix)
        for index, condition in enumerate(rng.sample(CONDITIONS, episodes)):
            timelines.append(_episode(rng, patient, condition, index, encounters))
    events = heapq.merge(*timelines, key=lambda event: (event[0], event[1]))
    out: list[SynthRecord] = []
    written: dict[str, int] = {}  # resource key -> index of the record that carried it
    for _, _, record, corrects_key, carries in events:
        corrects = written.get(corrects_key) if corrects_key else None
        if corrects is not None:
            record["body"]["corrects"] = _placeholder_cid(out[corrects].record)
        for key in carries:
            written[key] = len(out)
        out.append(SynthRecord(record, corrects))
    return out


# --- one patient, one episode -----------------------------------------------------------------


@dataclass
class _Patient:
    id: str
    resource: dict
    born: date


def _patient(rng: random.Random, seed: int, number: int, prefix: str = "synth") -> _Patient:
    pid = f"{prefix}-{seed}-{number:03d}"
    born = date(rng.randint(1940, 2000), rng.randint(1, 12), rng.randint(1, 28))
    resource = {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"system": "https://clinic.example/mrn", "value": f"MRN{seed:03d}{number:05d}"}],
        "active": True,
        "name": [{"use": "official", "family": rng.choice(["Silva", "Okafor", "Novak", "Haddad", "Larsen"]), "given": [rng.choice(["Ana", "Ben", "Chen", "Dara", "Emil"])]}],
        "gender": rng.choice(["female", "male", "other", "unknown"]),
        # Older records often know only the year and month of birth.
        "birthDate": born.isoformat()[:7] if rng.random() < 0.3 else born.isoformat(),
    }
    return _Patient(pid, resource, born)


def _episode(rng: random.Random, patient: _Patient, condition: Condition, index: int, encounters: int) -> list[tuple]:
    """The episode's events: (time, tie-break, record, key of the corrected resource, keys carried)."""
    eid = f"{patient.id}-{condition.key}"
    ref = lambda kind, rid: {"reference": f"{kind}/{rid}"}  # noqa: E731
    subject = ref("Patient", patient.id)
    opened_at = START + timedelta(days=rng.randint(0, 20), hours=index)
    condition_id = f"cond-{eid}"
    episode_resource = {
        "resourceType": "EpisodeOfCare",
        "id": f"eoc-{eid}",
        "status": "active",
        "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/episodeofcare-type", "code": "hacc", "display": "Home and Community Care"}]}],
        "diagnosis": [{"condition": ref("Condition", condition_id), "rank": 1}],
        "patient": subject,
        "managingOrganization": ref("Organization", "clinic-example"),
        "period": {"start": opened_at.date().isoformat()},
    }
    condition_resource = {
        "resourceType": "Condition",
        "id": condition_id,
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
        "code": {
            "coding": [
                {"system": SNOMED, "version": "http://snomed.info/sct/900000000000207008/version/20230301", "code": condition.snomed, "display": condition.display, "userSelected": True},
                {"system": "http://hl7.org/fhir/sid/icd-10", "code": condition.icd10},
            ],
            "text": condition.display,
        },
        "subject": subject,
        "onsetDateTime": str(opened_at.year - rng.randint(0, 6)),  # a year only: partial dateTime
        "recordedDate": opened_at.date().isoformat(),
    }
    envelope = {"patient": patient.id, "episode": eid, "author": f"dr.{index}@clinic.example"}
    opened = {
        **envelope,
        "schema": BASE + "episode-opened/v2",
        "prev": None,
        "body": {
            "status": "active",
            "type": [{"text": condition.display + " follow-up"}],
            "diagnosis": [{"condition": ref("Condition", condition_id), "rank": 1}],
            "managingOrganization": {"reference": "Organization/clinic-example", "display": "Clinic Example"},
            "careManager": ref("Practitioner", f"p-{index}"),
            "period": {"start": opened_at.date().isoformat()},
            "fhir": [episode_resource, condition_resource] + ([patient.resource] if index == 0 else []),
        },
    }
    events = [(opened_at, eid, opened, None, ())]
    at = opened_at
    observations: list[str] = []
    for visit in range(max(1, encounters + rng.randint(-2, 2))):
        at = at + timedelta(days=rng.randint(10, 60), hours=rng.randint(0, 8), minutes=rng.randint(0, 59))
        record, ids = _encounter(rng, envelope, patient, condition, eid, visit, at)
        observations += ids
        events.append((at, eid, record, None, tuple(ids)))
        if ids and rng.random() < 0.08:
            corrected_id = rng.choice(ids)
            events.append((at + timedelta(hours=4), eid, _amendment(rng, envelope, condition, corrected_id, subject), corrected_id, ()))
    if rng.random() < 0.75:
        closed_at = at + timedelta(days=rng.randint(1, 30))
        final = {**episode_resource, "status": rng.choice(["finished", "finished", "cancelled"]),
                 "period": {"start": opened_at.date().isoformat(), "end": closed_at.isoformat(timespec="seconds")}}
        closed = {**envelope, "schema": BASE + "episode-closed/v2", "body": {
            "status": final["status"], "period": final["period"], "reason": "Follow-up completed.",
            "outcome": {"coding": [{"system": SNOMED, "code": "385669000", "display": "Successful"}]}, "fhir": [final]}}
        events.append((closed_at, eid, closed, None, ()))
    return events


def _encounter(rng, envelope, patient, condition, eid, visit, at) -> tuple[dict, list[str]]:
    subject = {"reference": f"Patient/{patient.id}"}
    encounter_id = f"enc-{eid}-{visit}"
    klass = rng.choices(["AMB", "VR", "EMER", "IMP", "HH"], weights=[70, 12, 8, 5, 5])[0]
    status = "finished" if rng.random() < 0.9 else rng.choice(["arrived", "triaged", "in-progress", "onleave", "unknown"])
    effective = at.isoformat(timespec="seconds")
    resources: list[dict] = [{
        "resourceType": "Encounter",
        "id": encounter_id,
        "status": status,
        "class": {"system": ACT_CODE, "code": klass},
        "subject": subject,
        "episodeOfCare": [{"reference": f"EpisodeOfCare/eoc-{eid}"}],
        "participant": [{"individual": {"reference": "Practitioner/p-1"}}],
        "period": {"start": effective},
        "reasonReference": [{"reference": f"Condition/cond-{eid}"}],
    }]
    observation_ids = []
    for number, key in enumerate(rng.sample(condition.labs, rng.randint(1, len(condition.labs)))):
        obs_id = f"obs-{eid}-{visit}-{number}"
        observation_ids.append(obs_id)
        resources.append(_lab_observation(rng, LABS[key], obs_id, subject, encounter_id, effective))
    if condition.vitals:
        obs_id = f"obs-{eid}-{visit}-bp"
        observation_ids.append(obs_id)
        resources.append(_blood_pressure(rng, obs_id, subject, encounter_id, effective))
    if len(observation_ids) > 1:
        resources.append({
            "resourceType": "DiagnosticReport",
            "id": f"dr-{eid}-{visit}",
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}]}],
            "code": {"text": f"{condition.display} panel"},
            "subject": subject,
            "encounter": {"reference": f"Encounter/{encounter_id}"},
            "effectiveDateTime": effective,
            "issued": effective,
            "result": [{"reference": f"Observation/{i}"} for i in observation_ids],
        })
    if visit == 0 or rng.random() < 0.3:
        code, display = condition.drug
        resources.append({
            "resourceType": "MedicationRequest",
            "id": f"mr-{eid}-{visit}",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": code, "display": display}]},
            "subject": subject,
            "encounter": {"reference": f"Encounter/{encounter_id}"},
            "authoredOn": at.date().isoformat(),  # date only, as many systems send it
            "requester": {"reference": "Practitioner/p-1"},
            "dosageInstruction": [{"text": "once daily", "timing": {"repeat": {"frequency": 1, "period": Decimal("1"), "periodUnit": "d"}}}],
        })
    record = {**envelope, "schema": BASE + "encounter/v2", "body": {
        "status": status,
        "class": {"system": ACT_CODE, "code": klass},
        "episodeOfCare": [{"reference": f"EpisodeOfCare/eoc-{eid}"}],
        "participant": [{"individual": {"reference": "Practitioner/p-1", "display": "Dr. Ana Silva"}}],
        "period": {"start": effective},
        "reasonReference": [{"reference": f"Condition/cond-{eid}"}],
        "fhir": resources,
    }}
    return record, observation_ids


def _lab_observation(rng, lab: Lab, obs_id, subject, encounter_id, effective) -> dict:
    span = lab.high - lab.low
    value = (lab.low + span * Decimal(rng.uniform(-0.3, 1.4))).quantize(Decimal(1).scaleb(-lab.places))
    quantity = {"value": max(value, Decimal(0).quantize(value)), "unit": lab.unit, "system": UCUM, "code": lab.unit}
    if lab.ceiling is not None and quantity["value"] > lab.ceiling:
        quantity.update(value=lab.ceiling, comparator=">")
    elif lab.floor is not None and quantity["value"] < lab.floor:
        quantity.update(value=lab.floor, comparator="<")
    interpretation = "H" if quantity["value"] > lab.high else "L" if quantity["value"] < lab.low else "N"
    return {
        "resourceType": "Observation",
        "id": obs_id,
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
        "code": {"coding": [{"system": LOINC, "code": lab.code, "display": lab.display}]},
        "subject": subject,
        "encounter": {"reference": f"Encounter/{encounter_id}"},
        "effectiveDateTime": effective,
        "valueQuantity": quantity,
        "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": interpretation}]}],
        "referenceRange": [{"low": {"value": lab.low, "unit": lab.unit, "system": UCUM, "code": lab.unit},
                            "high": {"value": lab.high, "unit": lab.unit, "system": UCUM, "code": lab.unit}}],
    }


def _blood_pressure(rng, obs_id, subject, encounter_id, effective) -> dict:
    def component(code, display, value):
        return {"code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
                "valueQuantity": {"value": Decimal(value), "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}}

    return {
        "resourceType": "Observation",
        "id": obs_id,
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": LOINC, "code": "85354-9", "display": "Blood pressure panel"}]},
        "subject": subject,
        "encounter": {"reference": f"Encounter/{encounter_id}"},
        "effectiveDateTime": effective,
        "component": [component("8480-6", "Systolic blood pressure", rng.randint(105, 175)),
                      component("8462-4", "Diastolic blood pressure", rng.randint(60, 105))],
    }


def _amendment(rng, envelope, condition, corrected_id, subject) -> dict:
    lab = LABS[condition.labs[0]]
    value = (lab.low + (lab.high - lab.low) / 2).quantize(Decimal(1).scaleb(-lab.places))
    corrected = {
        "resourceType": "Observation",
        "id": corrected_id,
        "status": "corrected",
        "code": {"coding": [{"system": LOINC, "code": lab.code}]},
        "subject": subject,
        "valueQuantity": {"value": value, "unit": lab.unit, "system": UCUM, "code": lab.unit},
    }
    return {**envelope, "schema": BASE + "amendment/v2", "body": {
        "corrects": "",  # the CID of the corrected record: see SynthRecord.corrects
        "reason": "Result re-measured on a second sample.",
        "reasonCode": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "FIXDATA"}]},
        "changes": {"observation": corrected_id, "valueQuantity": corrected["valueQuantity"]},
        "fhir": [corrected],
    }}


def _placeholder_cid(record: dict) -> str:
    """A well-formed CIDv1 (raw, sha2-256, base32) of the record's JSON: stands in for the CID
    the record gets when written."""
    import base64

    digest = hashlib.sha256(dumps(record).encode()).digest()
    raw = bytes([0x01, 0x55, 0x12, 0x20]) + digest
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


# --- JSON with exact decimals ----------------------------------------------------------------


def dumps(document: Any) -> str:
    """JSON text in which every Decimal is written as it is (1.00 stays 1.00)."""
    decimals: list[str] = []

    def mark(value):
        if isinstance(value, Decimal):
            decimals.append(str(value))
            return f"\x00decimal{len(decimals) - 1}\x00"
        raise TypeError(f"{type(value).__name__} is not JSON")

    text = json.dumps(document, default=mark, ensure_ascii=False, separators=(",", ":"))
    for index, number in enumerate(decimals):
        text = text.replace(json.dumps(f"\x00decimal{index}\x00"), number, 1)
    return text


def loads(text: str) -> Any:
    return json.loads(text, parse_float=Decimal)


# --- command line ------------------------------------------------------------------------------


def measure(records: list[SynthRecord]) -> dict:
    """Validate every record against the v2 schemas and every resource against FHIR R4."""
    from gateway.core.fhir_validation import default_validator, validate_resource
    from gateway.core.schemas import DEFAULT_SCHEMA_DIR, SchemaRegistry

    started = time.perf_counter()
    default_validator()
    build = time.perf_counter() - started
    registry = SchemaRegistry.load(DEFAULT_SCHEMA_DIR)
    resources = [r for s in records for r in s.resources()]
    problems = sum(len(registry.validate(s.record)) for s in records)
    started = time.perf_counter()
    sum(len(registry.validate(s.record)) for s in records)
    schema_seconds = time.perf_counter() - started
    problems += sum(len(validate_resource(r)) for r in resources)  # warm-up: refs resolve lazily
    started = time.perf_counter()
    sum(len(validate_resource(r)) for r in resources)
    fhir_seconds = time.perf_counter() - started
    by_type: dict[str, list[float]] = {}
    for resource in resources:
        started = time.perf_counter()
        validate_resource(resource)
        by_type.setdefault(resource["resourceType"], []).append(time.perf_counter() - started)
    return {
        "records": len(records),
        "resources": len(resources),
        "problems": problems,
        "fhir_validator_build_s": round(build, 3),
        "v2_schema_us_per_record": round(schema_seconds / len(records) * 1e6),
        "fhir_r4_us_per_resource": round(fhir_seconds / len(resources) * 1e6),
        "fhir_r4_us_by_type": {k: round(sum(v) / len(v) * 1e6) for k, v in sorted(by_type.items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--encounters", type=int, default=8)
    parser.add_argument("--out", type=Path, help="write the records as JSON lines")
    parser.add_argument("--measure", action="store_true", help="validate everything and print the cost")
    args = parser.parse_args(argv)
    records = generate(args.seed, args.patients, args.episodes, args.encounters)
    if args.out:
        with args.out.open("w", encoding="utf-8") as out:
            for synth in records:
                out.write(dumps({"record": synth.record, "corrects": synth.corrects}) + "\n")
    if args.measure:
        print(json.dumps(measure(records), indent=2))
    elif not args.out:
        print(f"{len(records)} records, {sum(1 for s in records for _ in s.resources())} resources (use --out or --measure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
