"""Record semantics through every door: ipfshttpclient, the Kubo CLI, the REST API."""

from __future__ import annotations

import asyncio
import json

import ipfshttpclient
import pytest

from conftest import app_client, gateway_config, ipfs_cli
from gateway.http.app import create_app
from gateway.http.appkeys import SERVICE
from records_helpers import closed, encounter, opened, stamp, uid


@pytest.fixture
def ipfs(gateway):
    with ipfshttpclient.Client(f"{gateway.multiaddr}/http", headers=gateway.headers) as c:
        yield c


def test_add_json_and_get_json(ipfs, kubo):
    patient, episode = uid("p"), uid("e")
    first = ipfs.add_json(opened(patient, episode))
    assert first.startswith("bafyrei")
    second = ipfs.add_json(encounter(patient, episode, note="HbA1c 7.1%"))
    got = ipfs.get_json(second)
    assert got["prev"] == first and got["seq"] == 1 and got["body"]["notes"] == "HbA1c 7.1%"
    assert ipfs.get_json(first)["prev"] is None
    # stored as dag-cbor with prev a real IPLD link: standard tools walk the chain on Kubo itself
    walked = json.loads(kubo.ipfs("dag", "get", f"{second}/prev").stdout)
    assert walked["seq"] == 0 and walked["prev"] is None and walked["schema"].endswith("episode-opened/v1")
    # ...but sees neither the patient nor the episode id: the body is sealed, the episode a pseudonym
    raw = kubo.ipfs("dag", "get", second).stdout.decode()
    assert patient not in raw and episode not in raw and "HbA1c" not in raw


def test_plain_json_is_a_blob(ipfs, kubo):
    cid = ipfs.add_json({"not": "a record"})
    assert cid.startswith("Qm")
    assert ipfs.get_json(cid) == {"not": "a record"}


def test_cli_add_bad_record_names_the_field_and_stores_nothing(gateway, kubo, tmp_path):
    patient, episode = uid("p"), uid("e")
    assert ipfs_cli(gateway, "add", "-Q", input=json.dumps(opened(patient, episode)).encode()).returncode == 0
    bad = encounter(patient, episode, cls="astrology")
    bad["body"]["status"] = 42
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(bad))
    result = ipfs_cli(gateway, "add", str(f))
    assert result.returncode != 0
    err = result.stderr.decode()
    assert "/body/class" in err and "/body/status" in err and "encounter/v1" in err, err
    # the bytes are not in Kubo (hash computed directly on Kubo without storing)
    file_cid = ipfs_cli(kubo, "add", "-Q", "--only-hash", str(f)).stdout.decode().strip()
    assert file_cid
    assert ipfs_cli(kubo, "block", "stat", "--offline", file_cid).returncode != 0


def test_cli_add_record_file_and_cat_it_back(gateway, kubo, tmp_path):
    patient, episode = uid("p"), uid("e")
    f = tmp_path / "open.json"
    f.write_text(json.dumps(opened(patient, episode)))
    out = ipfs_cli(gateway, "add", str(f))
    assert out.returncode == 0, out.stderr
    words = out.stdout.decode().split()
    assert words[0] == "added" and words[2] == "open.json"
    cid = words[1]
    cat = ipfs_cli(gateway, "cat", cid)
    assert json.loads(cat.stdout)["episode"] == episode
    # dag put through the gateway is a door too
    enc = ipfs_cli(gateway, "dag", "put", input=json.dumps(encounter(patient, episode)).encode())
    assert enc.returncode == 0, enc.stderr
    assert json.loads(ipfs_cli(gateway, "cat", enc.stdout.decode().strip()).stdout)["prev"] == cid


def test_ipfs_path_reads_a_record_as_json(gateway, ipfs):
    import requests
    patient, episode = uid("p"), uid("e")
    cid = ipfs.add_json(opened(patient, episode))
    r = requests.get(f"{gateway.url}/ipfs/{cid}", headers=gateway.headers)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    assert r.json()["episode"] == episode
    r = requests.get(f"{gateway.url}/ipfs/{cid}", headers={**gateway.headers, "If-None-Match": r.headers["ETag"]})
    assert r.status_code == 304


def test_mixed_add_is_refused_and_nothing_is_appended(ipfs, gateway, tmp_path):
    import requests
    patient, episode = uid("p"), uid("e")
    files = [("file", ("a.json", json.dumps(opened(patient, episode)), "application/json")),
             ("file", ("scan.pdf", b"%PDF-1.7 not json", "application/pdf"))]
    r = requests.post(f"{gateway.url}/api/v0/add", files=files, headers=gateway.headers)
    assert r.status_code == 400 and "separate request" in r.json()["Message"]
    r = requests.get(f"{gateway.url}/medicon/v1/patients/{patient}/episodes", headers=gateway.headers)
    assert r.json()["episodes"] == []


def test_multi_record_add_is_all_or_nothing(gateway):
    import requests
    patient, episode = uid("p"), uid("e")
    good = opened(patient, episode)
    bad = encounter(patient, episode)
    del bad["author"]
    files = [("file", ("1.json", json.dumps(good))), ("file", ("2.json", json.dumps(bad)))]
    r = requests.post(f"{gateway.url}/api/v0/add", files=files, headers=gateway.headers)
    assert r.status_code == 400
    assert "2.json" in r.json()["Message"] and "/author" in r.json()["Message"]
    assert requests.get(f"{gateway.url}/medicon/v1/patients/{patient}/episodes", headers=gateway.headers).json()["episodes"] == []
    files[1] = ("file", ("2.json", json.dumps(encounter(patient, episode))))
    r = requests.post(f"{gateway.url}/api/v0/add", files=files, headers=gateway.headers)
    assert r.status_code == 200
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert [line["Name"] for line in lines] == ["1.json", "2.json"]


# --- REST API, in-process ------------------------------------------------------------------

async def test_rest_flow_patient_episodes_encounters_history(client, kubo):
    patient = uid("p")
    episodes = []
    for _ in range(3):
        r = await client.post(f"/medicon/v1/patients/{patient}/episodes", json={
            "author": "dr.house", "recorded_at": stamp(),
            "body": {"type": "care", "managingOrganization": "clinic-a", "period": {"start": "2026-01-01T08:00:00Z"}}})
        assert r.status == 201, await r.text()
        episodes.append((await r.json())["episode"]["id"])

    async def add(ep: str, i: int):
        r = await client.post(f"/medicon/v1/episodes/{ep}/records", json={
            "schema": encounter("x", "y")["schema"], "author": "lab", "recorded_at": stamp(),
            "body": {"class": ["lab", "pharmacy", "doctor", "imaging"][i % 4], "notes": f"{ep}#{i}",
                     "period": {"start": "2026-01-02T08:00:00Z"}}})
        assert r.status == 201, await r.text()
        return (await r.json())["cid"]

    # interleaved: encounter i of every episode before encounter i+1 of any
    cids = {ep: [] for ep in episodes}
    for i in range(20):
        for ep, cid in zip(episodes, await asyncio.gather(*(add(ep, i) for ep in episodes))):
            cids[ep].append(cid)

    for ep in episodes:
        seen, cursor = [], None
        while True:
            url = f"/medicon/v1/episodes/{ep}/history?limit=7" + (f"&cursor={cursor}" if cursor else "")
            page = await (await client.get(url)).json()
            seen += page["records"]
            cursor = page["next"]
            if cursor is None:
                break
        assert [r["seq"] for r in seen] == list(range(21))
        assert [r["record"]["body"]["notes"] for r in seen[1:]] == [f"{ep}#{i}" for i in range(20)]
        assert [r["cid"] for r in seen[1:]] == cids[ep]
        for older, newer in zip(seen, seen[1:]):
            assert newer["record"]["prev"] == older["cid"]
        head = seen[-1]["cid"]
        # Kubo itself walks the chain, and the head's recursive pin covers every record
        assert json.loads(kubo.ipfs("dag", "get", f"{head}/prev/prev").stdout)["seq"] == 18
        assert head in kubo.ipfs("pin", "ls", "--type=recursive", head).stdout.decode()
        for rec in seen:
            assert kubo.ipfs("pin", "ls", rec["cid"], check=False).returncode == 0
        verdict = await (await client.get(f"/medicon/v1/episodes/{ep}/verify")).json()
        site = client.server.app[SERVICE].keys.gateway_id  # this gateway signed every record
        assert verdict == {"episode": ep, "ok": True, "length": 21, "checked": 21, "erased": False,
                           "break": None, "signers": {site: 21}}

    listing = await (await client.get(f"/medicon/v1/patients/{patient}/episodes?status=open")).json()
    assert sorted(e["id"] for e in listing["episodes"]) == sorted(episodes)


async def test_pin_add_of_a_head_pins_the_whole_episode(client, kubo):
    patient, episode = uid("p"), uid("e")
    r = await client.post("/api/v0/dag/put", data=_form(opened(patient, episode)))
    cids = [(await r.json())["Cid"]["/"]]
    for i in range(5):
        r = await client.post("/api/v0/dag/put", data=_form(encounter(patient, episode, note=str(i))))
        cids.append((await r.json())["Cid"]["/"])
    # the gateway pins every record; unpin them all, then pin the head alone: all pinned again
    for cid in cids:
        assert kubo.ipfs("pin", "ls", "--type=recursive", cid, check=False).returncode == 0
    kubo.ipfs("pin", "rm", *cids)
    assert kubo.ipfs("pin", "ls", cids[0], check=False).returncode != 0
    kubo.ipfs("pin", "add", cids[-1])
    for cid in cids:
        assert kubo.ipfs("pin", "ls", cid, check=False).returncode == 0


def _form(doc):
    import aiohttp
    form = aiohttp.FormData()
    form.add_field("file", json.dumps(doc).encode(), filename="r.json", content_type="application/json")
    return form


async def test_strict_policy_stale_prev_gets_409_with_current_head(aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo, **{"records.chain_policy": "strict"}))
    patient, episode = uid("p"), uid("e")
    r = await c.post(f"/medicon/v1/patients/{patient}/episodes", json={**opened(patient, episode)})
    head = (await r.json())["cid"]
    r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode))
    assert r.status == 409 and "prev is required" in (await r.json())["error"]["message"]
    r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode, prev=head))
    assert r.status == 201
    new_head = (await r.json())["cid"]
    # the exact same append again is a retry after a lost answer: the original, not a 409
    r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode, prev=head))
    assert r.status == 200 and (await r.json())["cid"] == new_head
    # another writer with the same stale prev loses
    r = await c.post(f"/medicon/v1/episodes/{episode}/records",
                     json=encounter(patient, episode, prev=head, note="other writer"))
    assert r.status == 409
    err = (await r.json())["error"]
    assert err["current"]["head"] == new_head and new_head in err["message"]
    # the same over the RPC API, in Kubo's error shape
    r = await c.post("/api/v0/dag/put", data=_form(encounter(patient, episode, prev=head, note="third")))
    assert r.status == 409
    body = await r.json()
    assert body["Type"] == "error" and new_head in body["Message"]


async def test_closed_and_unknown_episodes_refuse_appends(client):
    patient, episode = uid("p"), uid("e")
    await client.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
    r = await client.post(f"/medicon/v1/episodes/{episode}/records", json=closed(patient, episode))
    assert r.status == 201
    r = await client.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode))
    assert r.status == 409 and "closed" in (await r.json())["error"]["message"]
    r = await client.post("/api/v0/dag/put", data=_form(encounter(patient, uid("e"))))
    assert r.status == 409 and "does not exist" in (await r.json())["Message"]
    r = await client.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
    assert r.status == 409 and "already exists" in (await r.json())["error"]["message"]
    closed_list = await (await client.get(f"/medicon/v1/patients/{patient}/episodes?status=closed")).json()
    assert [e["id"] for e in closed_list["episodes"]] == [episode]


async def test_time_never_goes_backwards(client):
    patient, episode = uid("p"), uid("e")
    await client.post(f"/medicon/v1/patients/{patient}/episodes",
                      json=opened(patient, episode, recorded_at="2026-03-01T00:00:00Z"))
    r = await client.post(f"/medicon/v1/episodes/{episode}/records",
                          json=encounter(patient, episode, recorded_at="2026-02-01T00:00:00Z"))
    assert r.status == 409 and "before" in (await r.json())["error"]["message"]


async def test_50_concurrent_appenders_make_one_contiguous_chain(client):
    patient, episode = uid("p"), uid("e")
    await client.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
    results = await asyncio.gather(*(
        client.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode, note=str(i)))
        for i in range(50)))
    acked = {}
    for r in results:
        assert r.status == 201, await r.text()
        body = await r.json()
        acked[body["cid"]] = body["seq"]
    assert sorted(acked.values()) == list(range(1, 51))
    page = await (await client.get(f"/medicon/v1/episodes/{episode}/history?limit=500")).json()
    chain = {r["cid"]: r["seq"] for r in page["records"]}
    assert set(acked) <= set(chain) and len(chain) == 51
    verdict = await (await client.get(f"/medicon/v1/episodes/{episode}/verify")).json()
    assert verdict["ok"] is True and verdict["checked"] == 51


async def test_verify_reports_the_first_break(client, kubo):
    patient, episode = uid("p"), uid("e")
    await client.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
    cids = []
    for i in range(4):
        r = await client.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode))
        cids.append((await r.json())["cid"])
    kubo.ipfs("pin", "rm", *cids[1:])  # every record under seq 2 pins it too
    kubo.ipfs("block", "rm", cids[1])  # seq 2 gone from Kubo
    verdict = await (await client.get(f"/medicon/v1/episodes/{episode}/verify")).json()
    assert verdict["ok"] is False
    assert verdict["break"]["seq"] == 2 and verdict["break"]["cid"] == cids[1]
    assert verdict["checked"] == 2


async def test_invalid_records_get_400_naming_fields(client):
    patient, episode = uid("p"), uid("e")
    bad = opened(patient, episode, prev="bafyreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy")
    r = await client.post("/api/v0/dag/put", data=_form(bad))
    assert r.status == 400
    body = await r.json()
    assert body["Code"] == 1 and "/prev" in body["Message"] and "episode-opened/v1" in body["Message"]
    r = await client.post(f"/medicon/v1/patients/{patient}/episodes", json={"body": {}, "author": "x"})
    assert r.status == 400
    err = (await r.json())["error"]
    assert err["status"] == 400 and any("/body/" in p for p in err["problems"])
    r = await client.post(f"/medicon/v1/patients/{patient}/episodes", data=b"{not json")
    assert r.status == 400 and "JSON" in (await r.json())["error"]["message"]
    doc = encounter(patient, episode)
    doc["schema"] = "https://medicon.example/schemas/horoscope/v1"
    r = await client.post("/api/v0/dag/put", data=_form(doc))
    assert r.status == 400 and "/schema" in (await r.json())["Message"]
    doc = opened(patient, episode)
    doc["body"]["note"] = {"/": "bafyreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"}
    r = await client.post("/api/v0/dag/put", data=_form(doc))
    assert r.status == 400


async def test_rest_api_errors_and_openapi(client):
    r = await client.get("/medicon/v1/episodes/nope")
    assert r.status == 404 and (await r.json())["error"]["status"] == 404
    r = await client.get("/medicon/v1/records/bafyreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy")
    assert r.status == 404
    r = await client.get("/medicon/v1/nothing/here")
    assert r.status == 404
    doc = await (await client.get("/medicon/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    paths = set(doc["paths"])
    for route in ("/patients/{patient}/episodes", "/episodes/{episode}/records", "/episodes/{episode}",
                  "/episodes/{episode}/history", "/records/{cid}", "/episodes/{episode}/verify"):
        assert "/medicon/v1" + route in paths or route in paths, route
