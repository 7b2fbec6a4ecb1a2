"""Replay synthetic longitudinal FHIR patients (``bench.fhir_synth``) into a running gateway and
read every resource back through its FHIR R4 facade: byte for byte as sent, valid FHIR R4, in
order. Prints records/s and resources/s of the writes, and the reads' pace.

Two ways in, as clients write:

* ``records``: each generated record as it is, ``POST /medicon/v1/...`` (one record per request,
  its JSON text written with exact decimals);
* ``transactions``: each generated record's resources as a FHIR transaction Bundle (``PUT
  Type/id`` entries) to ``POST /fhir/r4``, which places them in records itself.

    python -m bench.fhir_replay                    # its own Kubo and gateway, both modes
    python -m bench.fhir_replay --url http://127.0.0.1:5080 --token mdc_... --mode transactions
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import requests

from bench import fhir_synth

FHIR_JSON = "application/fhir+json"


@dataclass
class Replay:
    """What was written, to check the reads against: every version of every resource as
    sent, in write order."""

    records: int = 0
    resources: int = 0
    seconds: float = 0.0
    versions: dict[tuple[str, str], list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    order: list[tuple[str, str]] = field(default_factory=list)           # latest version's write order
    patients: dict[tuple[str, str], str] = field(default_factory=dict)    # resource -> patient
    episodes: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))  # schema order

    def wrote(self, patient: str, resource: dict) -> str:
        key = (resource["resourceType"], resource["id"])
        text = fhir_synth.dumps(resource)
        self.versions[key].append(text)
        if key in self.order:
            self.order.remove(key)
        self.order.append(key)
        self.patients[key] = patient
        self.resources += 1
        return text


class Gateway:
    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def post(self, path: str, text: str, content_type: str = "application/json") -> requests.Response:
        r = self.http.post(self.url + path, data=text.encode("utf-8"), headers={"Content-Type": content_type},
                           timeout=120)
        if r.status_code not in (200, 201):
            raise AssertionError(f"POST {path}: {r.status_code} {r.text[:2000]}")
        return r

    def get(self, path: str, **params) -> requests.Response:
        r = self.http.get(self.url + path, params=params, timeout=120)
        if r.status_code != 200:
            raise AssertionError(f"GET {path}: {r.status_code} {r.text[:2000]}")
        return r


def replay_records(gateway: Gateway, records: list[fhir_synth.SynthRecord]) -> Replay:
    """Each record through the REST API, as generated (amendments name the real CID)."""
    out, cids = Replay(), []
    started = time.perf_counter()
    for synth in records:
        record = synth.record
        if synth.corrects is not None:
            record = {**record, "body": {**record["body"], "corrects": cids[synth.corrects]}}
        opening = record["schema"].endswith("episode-opened/v2")
        path = (f"/medicon/v1/patients/{record['patient']}/episodes" if opening
                else f"/medicon/v1/episodes/{record['episode']}/records")
        cids.append(gateway.post(path, fhir_synth.dumps(record)).json()["cid"])
        out.records += 1
        for resource in synth.resources():
            out.wrote(record["patient"], resource)
        out.episodes[record["episode"]].append(record["schema"])
    out.seconds = time.perf_counter() - started
    return out


def bundle(synth: fhir_synth.SynthRecord) -> dict[str, Any]:
    """A generated record's resources as a transaction Bundle of PUT entries."""
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in synth.resources()]}


def replay_transactions(gateway: Gateway, records: list[fhir_synth.SynthRecord]) -> Replay:
    """Each generated record's resources as one FHIR transaction."""
    out = Replay()
    started = time.perf_counter()
    for synth in records:
        answer = gateway.post("/fhir/r4", fhir_synth.dumps(bundle(synth)), FHIR_JSON).json()
        assert answer["type"] == "transaction-response", answer
        out.records += 1
        for resource in synth.resources():
            out.wrote(synth.record["patient"], resource)
    out.seconds = time.perf_counter() - started
    return out


def read_back(gateway: Gateway, replay: Replay, validate=None) -> dict[str, Any]:
    """Every resource by id (the latest version), every version by ``_history``, and every
    patient's ``$everything``: each byte for byte as sent (and valid, if ``validate`` is given:
    a function returning a resource's FHIR problems), ``$everything`` in write order."""
    problems: list[str] = []
    started = time.perf_counter()
    reads = 0
    for (kind, rid), versions in replay.versions.items():
        got = gateway.get(f"/fhir/r4/{kind}/{rid}")
        reads += 1
        if got.text != versions[-1]:
            problems.append(f"{kind}/{rid}: read differs from what was sent")
        if got.headers.get("ETag") != f'W/"{len(versions)}"':
            problems.append(f"{kind}/{rid}: ETag {got.headers.get('ETag')} for {len(versions)} version(s)")
        if validate is not None and validate(json.loads(got.text, parse_float=Decimal)):
            problems.append(f"{kind}/{rid}: not valid FHIR R4 as read")
        if len(versions) > 1:
            history = gateway.get(f"/fhir/r4/{kind}/{rid}/_history").text
            reads += 1
            texts = _entry_resources(history)
            if texts != versions[::-1]:
                problems.append(f"{kind}/{rid}: _history differs from the versions sent")
    by_patient = collections.defaultdict(list)
    for key in replay.order:
        by_patient[replay.patients[key]].append(key)
    for patient, expected in by_patient.items():
        found: list[tuple[tuple[str, str], str]] = []
        page = gateway.get(f"/fhir/r4/Patient/{patient}/$everything", _count="100").text
        while True:
            reads += 1
            doc = json.loads(page)
            texts = _entry_resources(page)
            found += [((e["resource"]["resourceType"], e["resource"]["id"]), t) for e, t in zip(doc.get("entry", []), texts)]
            following = [link["url"] for link in doc["link"] if link["relation"] == "next"]
            if not following:
                break
            page = gateway.http.get(following[0], timeout=120).text
        if [key for key, _ in found] != expected:
            problems.append(f"Patient/{patient}/$everything: not every resource, or not in write order")
        if any(text != replay.versions[key][-1] for key, text in found):
            problems.append(f"Patient/{patient}/$everything: a resource differs from what was sent")
    return {"reads": reads, "seconds": time.perf_counter() - started, "problems": problems}


def _entry_resources(bundle_text: str) -> list[str]:
    """The resources of a Bundle's entries, as their exact text in the answer."""
    from gateway.core import exactjson
    doc = json.loads(bundle_text)
    return [exactjson.extract(bundle_text, f"/entry/{i}/resource") for i in range(len(doc.get("entry", [])))]


def run(gateway: Gateway, mode: str, records: list[fhir_synth.SynthRecord]) -> dict[str, Any]:
    from gateway.core.fhir_validation import validate_resource
    replay = (replay_records if mode == "records" else replay_transactions)(gateway, records)
    check = read_back(gateway, replay, validate_resource)
    return {
        "mode": mode, "records": replay.records, "resources": replay.resources,
        "write_seconds": round(replay.seconds, 2),
        "records_per_s": round(replay.records / replay.seconds, 1),
        "resources_per_s": round(replay.resources / replay.seconds, 1),
        "reads": check["reads"], "reads_per_s": round(check["reads"] / check["seconds"], 1),
        "problems": check["problems"][:20],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running gateway (default: start Kubo and a gateway of its own)")
    parser.add_argument("--token", help="an admin token of that gateway")
    parser.add_argument("--mode", choices=["records", "transactions", "both"], default="both")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--encounters", type=int, default=8)
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    modes = ["records", "transactions"] if args.mode == "both" else [args.mode]
    results = []
    procs = None
    try:
        if args.url:
            url, token = args.url, args.token
        else:
            from bench.procs import Procs
            procs = Procs(Path(tempfile.mkdtemp(prefix="medicon-bench-")))
            procs.start_kubo()
            procs.ensure_keyring()
            token = procs.create_token().token
            url = procs.start_gateway().url
        for number, mode in enumerate(modes):  # another seed per mode: fresh patients and ids
            records = fhir_synth.generate(args.seed + number, args.patients, args.episodes, args.encounters)
            results.append(run(Gateway(url, token), mode, records))
    finally:
        if procs is not None:
            procs.close()
    report = {"seed": args.seed, "patients": args.patients, "episodes": args.episodes,
              "encounters": args.encounters, "cores": os.cpu_count(), "results": results}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
