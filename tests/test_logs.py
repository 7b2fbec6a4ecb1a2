"""Logs: ``--log-format json`` writes one JSON object a line, an access line per request with its
request id, principal, route template, status and duration; under a burst of requests that carry
patient ids in paths, queries and bodies, and tokens good, revoked and forged, no line holds a
token, a patient id, an episode id or a CID. Text stays the default (``dev`` too)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp

from conftest import ROOT, BlockingTokens, storage_env, bearer, make_token, new_data_dir, token_path
from gateway.cli import build_parser
from records_helpers import encounter, opened, uid

ACCESS = "medicon_gateway.access"


class LoggingGateway:
    """The gateway process with its stderr (its log) in a file."""

    def __init__(self, node, tmp_path: Path, *global_args: str) -> None:
        self.data_dir = new_data_dir()
        self.token = make_token(self.data_dir, name="admin-logs")
        self.log_path = tmp_path / "gateway.log"
        self._log = self.log_path.open("w")
        env = {**os.environ, "MEDICON_KUBO_API_URL": node.api_url, "MEDICON_KUBO_GATEWAY_URL": node.gateway_url, "MEDICON_KUBO_API_AUTH": node.api_secret,
               **storage_env(self.data_dir),
               "MEDICON_RECORDS_DATA_DIR": self.data_dir}
        self.process = subprocess.Popen([sys.executable, "-m", "gateway", *global_args, "serve", "--port", "0"],
                                        env=env, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=ROOT)
        line = self.process.stdout.readline()
        assert line.startswith("MEDICON_GATEWAY_URL="), (line, self.log_path.read_text())
        self.url = line.strip().split("=", 1)[1]

    def stop(self) -> str:
        self.process.terminate()
        assert self.process.wait(30) == 0
        self._log.close()
        return self.log_path.read_text()


async def _burst(gw: LoggingGateway, patients: list[str], revoked: str, forged: str
                 ) -> tuple[int, list[str], list[str]]:
    """About 200 requests, 32 at a time: appends, reads, RPC and gateway reads, refused
    credentials, unknown routes; patient ids in paths, queries and bodies. Returns how many were
    sent, the episode ids and the CIDs."""
    admin = bearer(gw.token)
    basic = {"Authorization": "Basic " + base64.b64encode(f"someone:{gw.token}".encode()).decode()}
    seen: list[str] = []
    sent = 0
    gate = asyncio.Semaphore(32)
    async with aiohttp.ClientSession(gw.url) as s:

        async def call(method: str, path: str, headers: dict, **kw) -> int:
            nonlocal sent
            async with gate:
                sent += 1
                async with s.request(method, path, headers=headers, **kw) as r:
                    await r.read()
                    return r.status

        episodes = {p: uid("e") for p in patients}
        seen += episodes.values()
        statuses = await asyncio.gather(*(
            call("POST", f"/medicon/v1/patients/{p}/episodes", basic if i % 2 else admin, json=opened(p, episodes[p]))
            for i, p in enumerate(patients)))
        assert statuses == [201] * len(patients)

        async def append(p: str) -> None:
            nonlocal sent
            async with gate:
                sent += 1
                async with s.post(f"/medicon/v1/episodes/{episodes[p]}/records", headers=admin,
                                  json=encounter(p, episodes[p], note=f"seen {p} today")) as r:
                    assert r.status == 201, await r.text()
                    seen.append((await r.json())["cid"])
        await asyncio.gather(*(append(p) for p in patients for _ in range(3)))
        cids = [c for c in seen if c.startswith("bafy")]

        work = []
        for i, p in enumerate(patients):
            e = episodes[p]
            work += [
                call("GET", f"/medicon/v1/episodes/{e}", admin),
                call("GET", f"/medicon/v1/episodes/{e}/history?limit=2&cursor=0", admin),
                call("GET", f"/medicon/v1/patients/{p}/episodes?status=open", admin),
                call("GET", f"/medicon/v1/episodes/{e}?patient={p}", {**admin, "X-Request-Id": f"trace-{i}"}),
                call("GET", f"/medicon/v1/patients/{p}/episodes", bearer(revoked)),
                call("GET", f"/medicon/v1/patients/{p}/episodes", bearer(forged)),
                call("GET", f"/medicon/v1/patients/{p}/episodes", {"Authorization": f"Bearer not-a-token-{p}"}),
                call("GET", f"/medicon/v1/patients/{p}/episodes", {}),
                call("GET", f"/medicon/v1/patients/{p}/no-such-thing", admin),
                call("POST", f"/api/v0/no-such-command/{p}", admin),
                call("POST", f"/medicon/v1/episodes/{e}/records", admin, json=encounter(p, e, seq=99)),
            ]
        for cid in cids:
            work += [call("POST", f"/api/v0/cat?arg={cid}", admin), call("GET", f"/ipfs/{cid}", admin),
                     call("GET", f"/medicon/v1/records/{cid}", bearer(revoked))]
        random.Random(7).shuffle(work)
        await asyncio.gather(*work)
    return sent, list(episodes.values()), cids


async def test_json_log_under_a_burst_holds_no_token_and_no_patient_id(kubo, tmp_path):
    gw = LoggingGateway(kubo, tmp_path, "--log-level", "INFO", "--log-format", "json")
    try:
        patients = [f"pat-{uuid.uuid4().hex[:10]}" for _ in range(8)]
        with BlockingTokens(token_path(gw.data_dir)) as store:
            revoked, info = store.create("revoked-logs", "clinician")
            store.revoke(info.id)
        forged = "mdc_" + uuid.uuid4().hex * 2
        sent, episodes, cids = await _burst(gw, patients, revoked, forged)
    finally:
        text = gw.stop()

    lines = [line for line in text.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(e, dict) and {"time", "level", "logger", "message"} <= e.keys() for e in entries)
    access = [e for e in entries if e["logger"] == ACCESS]
    assert len(access) == sent
    for e in access:
        assert {"request_id", "principal", "method", "surface", "route", "status", "duration_ms"} <= e.keys(), e
        assert isinstance(e["status"], int) and e["duration_ms"] >= 0
        assert "?" not in e["route"] and not any(p in e["route"] for p in patients)
    routes = {e["route"] for e in access}
    assert {"/medicon/v1/patients/{patient}/episodes", "/medicon/v1/episodes/{episode}/records",
            "/medicon/v1/episodes/{episode}", "cat", "unknown", "/ipfs/{path}"} <= routes
    assert {e["principal"] for e in access} == {"token:admin-logs", None}
    refused = [e for e in access if e["status"] == 401]
    assert len(refused) == 4 * len(patients) + len(cids)  # every refusal is logged, naming no one
    assert sum(e["status"] == 409 for e in access) == len(patients)
    traced = {e["request_id"] for e in access if e["request_id"].startswith("trace-")}
    assert traced == {f"trace-{i}" for i in range(len(patients))}
    assert len({e["request_id"] for e in access}) >= sent - len(patients)

    secrets = [gw.token, revoked, forged, base64.b64encode(f"someone:{gw.token}".encode()).decode()]
    for needle in secrets + patients + episodes + cids:
        assert needle not in text, f"{needle[:12]}… is in the log"
    assert "mdc_" not in text


def test_text_is_the_default_and_dev_keeps_it():
    assert build_parser().parse_args(["serve"]).log_format == "text"
    assert build_parser().parse_args(["dev"]).log_format == "text"


async def test_text_access_lines(kubo, tmp_path):
    gw = LoggingGateway(kubo, tmp_path, "--log-level", "INFO")
    try:
        async with aiohttp.ClientSession(gw.url, headers=bearer(gw.token)) as s:
            async with s.get("/medicon/v1/whoami") as r:
                assert r.status == 200
    finally:
        text = gw.stop()
    line = next(line for line in text.splitlines() if ACCESS in line)
    assert "INFO medicon_gateway.access: GET /medicon/v1/whoami 200 " in line
    assert line.endswith("ms principal=token:admin-logs")
    assert not any(line.startswith("{") for line in text.splitlines())
