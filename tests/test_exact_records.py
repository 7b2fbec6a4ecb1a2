"""Records come back exactly as sent: the same number text (1.00, 0.60), key order and string
escapes, through every door and every read path; only the gateway's envelope fields (prev,
seq, recorded_at) are added. Older (version 1) record nodes stay readable."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import app_client, gateway_config, ipfs_cli
from gateway.core import exactjson
from gateway.core.records import ClientRecord, request_digest
from gateway.core.sealing import clear_part
from gateway.http.appkeys import SERVICE
from gateway.kubo import ipld
from gateway.security import crypto
from gateway.storage.model import IndexedRecord
from records_helpers import opened, uid

V2 = "https://medicon.example/schemas"

# Written by hand, the way a FHIR system writes it: pretty-printed, resourceType first,
# significant trailing zeros, a long decimal, escapes a serializer would not reproduce.
OPENED_TEXT = """{
  "schema": "%(base)s/episode-opened/v2",
  "patient": "%(patient)s",
  "episode": "%(episode)s",
  "prev": null,
  "seq": 0,
  "recorded_at": "2026-02-01T08:00:00Z",
  "author": "dr.ana.silva@clinic.example",
  "body": {
    "status": "active",
    "period": {"start": "2026-02-01"},
    "fhir": [
      {"resourceType": "EpisodeOfCare", "id": "eoc-1", "status": "active",
       "patient": {"reference": "Patient/%(patient)s"}},
      {"resourceType": "Patient", "id": "%(patient)s", "name": [{"family": "Jos\\u00e9", "given": ["Ana \\/ Bé"]}]}
    ]
  }
}"""

ENCOUNTER_TEXT = """{"schema":"%(base)s/encounter/v2",  "patient":"%(patient)s","episode":"%(episode)s",
 "author":"lab.central@clinic.example","body":{"status":"finished","class":{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"AMB"},
 "fhir":[{"resourceType":"Observation","id":"obs-1","status":"final",
   "code":{"coding":[{"system":"http://loinc.org","code":"2160-0"}]},
   "subject":{"reference":"Patient/%(patient)s"},
   "valueQuantity":{"value":1.00,"unit":"mg/dL","system":"http://unitsofmeasure.org","code":"mg/dL"},
   "referenceRange":[{"low":{"value":0.60},"high":{"value":1.20}}]},
  {"resourceType":"Observation","id":"obs-2","status":"final","code":{"text":"ratio"},
   "subject":{"reference":"Patient/%(patient)s"},"valueQuantity":{"value":5.5500000000000000001}}]}}"""


def texts(patient: str, episode: str) -> tuple[str, str]:
    names = {"base": V2, "patient": patient, "episode": episode}
    return OPENED_TEXT % names, ENCOUNTER_TEXT % names


def added_envelope(sent: str, returned: str) -> dict:
    """The members the gateway added to ``sent``: ``returned`` must be ``sent`` with them
    inserted after its last member, every other byte unchanged."""
    end = sent.rindex("}")
    head = sent[:end].rstrip()
    assert returned.startswith(head), (sent, returned)
    assert returned.endswith(sent[len(head):]), (sent, returned)
    added = returned[len(head):len(returned) - len(sent) + len(head)]
    assert added.startswith(",")
    return json.loads("{" + added[1:] + "}")


# --- the text tools ------------------------------------------------------------------------------

def test_spans_and_members_keep_every_other_byte():
    text = '{ "a" : [1.00, {"b":"\\u00e9"}] ,\n "c":{"d":0.60}}'
    assert exactjson.extract(text, "/a/0") == "1.00"
    assert exactjson.extract(text, "/a/1/b") == '"\\u00e9"'
    assert exactjson.extract(text, "/c") == '{"d":0.60}'
    with pytest.raises(KeyError):
        exactjson.span(text, "/a/2")
    changed = exactjson.set_members(text, {"c": 5, "e": Decimal("2.50")})
    assert changed == '{ "a" : [1.00, {"b":"\\u00e9"}] ,\n "c":5,"e":2.50}'
    assert exactjson.set_members("{ }", {"x": None}) == '{"x":null }'
    assert exactjson.render({"r": exactjson.Raw(text), "n": Decimal("0.10")}) == '{"r":' + text + ',"n":0.10}'
    assert exactjson.dumps({"b": 1, "a": [Decimal("1.0"), 2.5]}, sort_keys=True) == '{"a":[1.0,2.5],"b":1}'


def test_a_record_parses_decimals_exactly_and_sets_fields_in_place():
    record = ClientRecord.from_text('  {"schema":"s","body":{"v":1.00}}\n')
    assert record.text == '{"schema":"s","body":{"v":1.00}}'
    assert record["body"]["v"] == Decimal("1.00") and str(record["body"]["v"]) == "1.00"
    assert record.with_fields(schema="s") is record  # unchanged members keep the client's text
    linked = record.with_fields(prev=None, seq=0)
    assert linked.text == '{"schema":"s","body":{"v":1.00},"prev":null,"seq":0}'
    assert dict(linked) == {"schema": "s", "body": {"v": Decimal("1.00")}, "prev": None, "seq": 0}


# --- through the doors ---------------------------------------------------------------------------

async def test_rest_reads_return_the_bytes_sent(aiohttp_client, kubo):
    client = await app_client(aiohttp_client, gateway_config(kubo))
    patient, episode = uid("p"), uid("e")
    first, second = texts(patient, episode)
    r = await client.post(f"/medicon/v1/patients/{patient}/episodes", data=first.encode(),
                          headers={"Content-Type": "application/json"})
    assert r.status == 201, await r.text()
    answer = await r.text()
    # the client gave every envelope field: the record is its text, byte for byte
    assert exactjson.extract(answer, "/record") == first
    opened_cid = json.loads(answer)["cid"]

    r = await client.post(f"/medicon/v1/episodes/{episode}/records", data=second.encode(),
                          headers={"Content-Type": "application/json"})
    assert r.status == 201, await r.text()
    answer = await r.text()
    returned = exactjson.extract(answer, "/record")
    envelope = added_envelope(second, returned)
    assert envelope["prev"] == opened_cid and envelope["seq"] == 1 and "recorded_at" in envelope
    cid = json.loads(answer)["cid"]

    r = await client.get(f"/medicon/v1/records/{cid}")
    assert exactjson.extract(await r.text(), "/record") == returned
    r = await client.get(f"/medicon/v1/episodes/{episode}/history")
    history = await r.text()
    assert exactjson.extract(history, "/records/0/record") == first
    assert exactjson.extract(history, "/records/1/record") == returned
    r = await client.get(f"/ipfs/{cid}")
    assert await r.text() == returned
    r = await client.post(f"/api/v0/cat?arg={cid}")
    assert await r.text() == returned
    # the embedded resources, each byte for byte: decimals as written, resourceType first
    sent_obs = exactjson.extract(second, "/body/fhir/0")
    assert exactjson.extract(returned, "/body/fhir/0") == sent_obs
    assert '"value":1.00' in sent_obs and '"value":0.60' in sent_obs
    assert exactjson.extract(returned, "/body/fhir/1/valueQuantity/value") == "5.5500000000000000001"
    assert exactjson.extract(first, "/body/fhir/1/name/0/family") == '"Jos\\u00e9"'
    r = await client.get(f"/medicon/v1/episodes/{episode}/verify")
    assert (await r.json())["ok"]


async def test_a_retry_returns_the_original_text(aiohttp_client, kubo):
    client = await app_client(aiohttp_client, gateway_config(kubo))
    patient, episode = uid("p"), uid("e")
    first, second = texts(patient, episode)
    await client.post(f"/medicon/v1/patients/{patient}/episodes", data=first.encode())
    sent = [await client.post(f"/medicon/v1/episodes/{episode}/records", data=second.encode(),
                              headers={"Idempotency-Key": "k-1"}) for _ in range(2)]
    assert [r.status for r in sent] == [201, 200]
    records = [exactjson.extract(await r.text(), "/record") for r in sent]
    assert records[0] == records[1]


def test_kubo_cli_dag_put_add_and_cat_keep_the_bytes(gateway, tmp_path):
    patient, episode = uid("p"), uid("e")
    first, second = texts(patient, episode)
    put = ipfs_cli(gateway, "dag", "put", input=first.encode())
    assert put.returncode == 0, put.stderr
    opened_cid = put.stdout.decode().strip()
    assert ipfs_cli(gateway, "cat", opened_cid).stdout.decode() == first
    (tmp_path / "lab.json").write_text(second)
    added = ipfs_cli(gateway, "add", "-Q", str(tmp_path / "lab.json"))
    assert added.returncode == 0, added.stderr
    cid = added.stdout.decode().strip()
    returned = ipfs_cli(gateway, "cat", cid).stdout.decode()
    assert added_envelope(second, returned)["prev"] == opened_cid
    r = requests.get(f"{gateway.url}/ipfs/{cid}", headers=gateway.headers, timeout=30)
    assert r.text == returned


async def test_the_sealed_payload_holds_the_text_and_the_signature_covers_it(aiohttp_client, kubo):
    """With encryption off the payload is visible: it is the client's text, in a version 2
    node, signed; changing one digit of it breaks the signature."""
    client = await app_client(aiohttp_client, gateway_config(kubo, **{"security.encrypt": False}))
    service = client.app[SERVICE]
    patient, episode = uid("p"), uid("e")
    first, _ = texts(patient, episode)
    r = await client.post(f"/medicon/v1/patients/{patient}/episodes", data=first.encode())
    cid = (await r.json())["cid"]
    node = await service.kubo.dag_get(cid)
    assert node["v"] == 2
    payload = json.loads(node["plain"])
    assert payload == {"format": 2, "signer": payload["signer"], "text": first}
    assert await service.sealer.verified(node)
    forged = {**node, "plain": node["plain"].replace("2026-02-01", "2026-02-02", 1)}
    assert forged["plain"] != node["plain"] and not await service.sealer.verified(forged)


async def test_version_1_records_stay_readable_and_verify(aiohttp_client, kubo):
    """A record node as gateways wrote them before (v 1: the parsed record in the payload)
    reads back as its JSON, verifies, and an episode continues after it in version 2."""
    client = await app_client(aiohttp_client, gateway_config(kubo))
    service = client.app[SERVICE]
    patient, episode = uid("p"), uid("e")
    record = {**opened(patient, episode), "prev": None, "seq": 0, "recorded_at": "2026-01-01T00:00:00Z"}
    node = {"v": 1, "schema": record["schema"], "episode": service.sealer.episode_pseudonym(episode),
            "seq": 0, "prev": None, "key": service.sealer.key_id}
    payload = crypto.canonical_json({"record": record, "signer": "admin-old"})
    node.update(await service.plugins.call("medicon_encrypt_record", payload=payload,
                                           aad=crypto.canonical_json(clear_part(node)), patient=patient,
                                           keys=service.keys))
    node["sig"] = crypto.sign(service.keys.signing_key, clear_part(node))
    cid = await service.kubo.put_block(ipld.encode(node))
    await service.storage.heads.create_episode(IndexedRecord(cid, episode, patient, 0, record["schema"],
                                                             record["recorded_at"]))
    r = await client.get(f"/medicon/v1/records/{cid}")
    assert r.status == 200, await r.text()
    text = exactjson.extract(await r.text(), "/record")
    assert json.loads(text) == record and text == json.dumps(record, separators=(",", ":"), sort_keys=True)
    r = await client.post(f"/medicon/v1/episodes/{episode}/records", json={
        "schema": f"{V2}/encounter/v2", "author": "lab", "body": {"status": "finished", "class": {"code": "AMB"}}})
    assert r.status == 201, await r.text()
    r = await client.get(f"/medicon/v1/episodes/{episode}/verify")
    verdict = await r.json()
    assert verdict["ok"] and verdict["checked"] == 2, verdict["break"]


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-10**30, max_value=10**30)
    | st.decimals(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_JSON_VALUES)
def test_render_writes_a_parsed_value_as_dumps_does_so_request_digests_stay_the_same(value):
    """``request_digest`` writes the record with ``render`` (the C encoder) where it used
    ``dumps``: for every value parsed from JSON the text, and so every digest already in an
    index, is the same."""
    assert exactjson.render(value, sort_keys=True) == exactjson.dumps(value, sort_keys=True)
    assert exactjson.render(value) == exactjson.dumps(value)
    record = {"schema": "s", "body": value}
    expected = hashlib.sha256(exactjson.dumps({"record": record, "signer": "token:t"}, sort_keys=True)
                              .encode("utf-8")).hexdigest()
    assert request_digest(record, "token:t") == expected
