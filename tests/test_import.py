"""``medicon-gateway import``: records from a JSON-lines file appended in order through the
record service (no web server), with progress, resumable by running it again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import requests

from conftest import ROOT, start_gateway, storage_env, new_data_dir
from records_helpers import closed, encounter, opened, uid


def run_import(kubo, data_dir: str, *args: str) -> tuple[int, dict, str]:
    env = {**os.environ, **storage_env(data_dir), "MEDICON_KUBO_API_URL": kubo.api_url,
           "MEDICON_KUBO_GATEWAY_URL": kubo.gateway_url, "MEDICON_KUBO_API_AUTH": kubo.api_secret,
           "MEDICON_RECORDS_DATA_DIR": data_dir}
    done = subprocess.run([sys.executable, "-m", "gateway", "import", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    return done.returncode, json.loads(done.stdout), done.stderr


def test_import_appends_in_order_reports_refusals_and_resumes(kubo, tmp_path):
    data_dir = new_data_dir()
    patient, first, second = uid("p"), uid("e"), uid("e")
    lines = [opened(patient, first), opened(patient, second)]
    lines += [encounter(patient, ep, note=f"n{i}") for i in range(5) for ep in (first, second)]
    bad = encounter(patient, first)
    bad["body"]["class"] = "no-such-class"
    records = [json.dumps(r) for r in lines] + [json.dumps(bad), "{not json", "", json.dumps(closed(patient, second))]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(records) + "\n")

    status, report, err = run_import(kubo, data_dir, str(path), "--keep-going", "--as", "migration")
    assert status == 1, err
    assert report["records"] == 15 and report["imported"] == 13 and report["repeated"] == 0
    assert [(f["line"], f["error"]) for f in report["failed"]] == [(13, "RecordInvalid"), (14, "Invalid")]
    assert "/body/class" in report["failed"][0]["message"]  # the field, as the API would name it
    assert "import: records 15/15 (100%)" in err  # plain progress lines, not a terminal

    again_status, again, _ = run_import(kubo, data_dir, str(path), "--keep-going", "--as", "migration")
    assert again["imported"] == 0 and again["repeated"] == 13 and len(again["failed"]) == 2  # resumed: no duplicate

    gw = start_gateway(kubo, data_dir=data_dir)
    try:
        for ep, length, status_ in ((first, 6, "open"), (second, 7, "closed")):
            episode = requests.get(f"{gw.url}/medicon/v1/episodes/{ep}", headers=gw.headers, timeout=30).json()
            assert (episode["length"], episode["status"]) == (length, status_)
            history = requests.get(f"{gw.url}/medicon/v1/episodes/{ep}/history", headers=gw.headers, timeout=30).json()
            notes = [r["record"]["body"].get("notes") for r in history["records"][1:6]]
            assert notes == [f"n{i}" for i in range(5)]  # in the file's order
            verdict = requests.get(f"{gw.url}/medicon/v1/episodes/{ep}/verify", headers=gw.headers, timeout=30).json()
            assert verdict["ok"] is True
        signer = requests.get(f"{gw.url}/medicon/v1/audit?limit=1000", headers=gw.headers, timeout=30).json()
        assert any(e["principal"] == "cli:migration" and e["action"] == "record:write" for e in signer["entries"])
    finally:
        gw.stop()


def test_import_stops_at_the_first_refusal_without_keep_going(kubo, tmp_path):
    data_dir = new_data_dir()
    patient, ep = uid("p"), uid("e")
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [opened(patient, ep), encounter(patient, uid("e")),
                                                        encounter(patient, ep)]))
    status, report, _ = run_import(kubo, data_dir, str(path))
    assert status == 1 and report["imported"] == 1 and [f["line"] for f in report["failed"]] == [2]
