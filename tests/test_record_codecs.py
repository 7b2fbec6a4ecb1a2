"""A record is a record in any codec the gateway accepts for it, whatever client sends it.

``dag put`` of a record in dag-cbor (kubo-rpc-client's default input codec, ``ipfs dag put
--input-codec dag-cbor``) or cbor is appended to its episode exactly as in dag-json — validated,
chained, sealed, signed, indexed — and never lands in Kubo as a plain node. As raw bytes it is
refused with a hint. All through real clients: the Kubo CLI and kubo-rpc-client.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import cbor2
import pytest
import requests

from conftest import ipfs_cli
from records_helpers import encounter, opened, uid
from test_kubo_rpc_client import JS_DIR

PUT_RECORD = JS_DIR / "put_record.mjs"


def node_put(gateway, record: dict, **options) -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is required: install Node.js 20 or newer with npm, then run `make setup`.")
    done = subprocess.run([node, str(PUT_RECORD)], cwd=JS_DIR, capture_output=True, text=True, timeout=120,
                          input=json.dumps({"api": gateway.url, "authorization": f"Bearer {gateway.token}",
                                            "record": record, "options": options}))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def stored_record(gateway, cid: str) -> dict:
    r = requests.get(f"{gateway.url}/medicon/v1/records/{cid}", headers=gateway.headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def plaintext_in_kubo(kubo, cid: str, marker: str) -> bool:
    return marker.encode() in kubo.ipfs("block", "get", cid).stdout


@pytest.fixture
def episode(gateway):
    patient, episode = uid("p"), uid("e")
    r = requests.post(f"{gateway.url}/medicon/v1/patients/{patient}/episodes", headers=gateway.headers,
                      json=opened(patient, episode), timeout=30)
    assert r.status_code == 201, r.text
    return patient, episode


def test_kubo_rpc_client_dag_put_with_its_default_codec_appends_the_record(gateway, kubo, episode):
    patient, ep = episode
    marker = uid("marker")
    answer = node_put(gateway, encounter(patient, ep, note=marker))
    assert answer["ok"], answer
    record = stored_record(gateway, answer["cid"])
    assert record["seq"] == 1 and record["record"]["body"]["notes"] == marker
    assert not plaintext_in_kubo(kubo, answer["cid"], marker)  # sealed, not a plain dag-cbor node
    # the next record of the same chain, through the same client
    answer = node_put(gateway, encounter(patient, ep, note=marker + "-2"))
    assert answer["ok"] and stored_record(gateway, answer["cid"])["seq"] == 2, answer


def test_an_invalid_record_in_dag_cbor_is_refused_like_in_json(gateway, kubo, episode):
    patient, ep = episode
    bad = encounter(patient, ep)
    bad["body"]["class"] = "not-a-class"
    answer = node_put(gateway, bad)
    assert not answer["ok"] and "invalid record" in answer["error"] and "/body/class" in answer["error"]


@pytest.mark.parametrize("codec", ["dag-cbor", "cbor"])
def test_kubo_cli_dag_put_of_a_cbor_record(gateway, kubo, episode, tmp_path, codec):
    patient, ep = episode
    marker = uid("marker")
    data = cbor2.dumps(encounter(patient, ep, note=marker))
    out = ipfs_cli(gateway, "dag", "put", "--input-codec", codec, input=data)
    assert out.returncode == 0, out.stderr
    cid = out.stdout.decode().strip()
    assert stored_record(gateway, cid)["record"]["body"]["notes"] == marker
    assert not plaintext_in_kubo(kubo, cid, marker)


def test_a_record_as_raw_bytes_is_refused_with_a_hint(gateway, episode):
    patient, ep = episode
    for data in (json.dumps(encounter(patient, ep)).encode(), cbor2.dumps(encounter(patient, ep))):
        out = ipfs_cli(gateway, "dag", "put", "--input-codec", "raw", "--store-codec", "raw", input=data)
        assert out.returncode != 0 and b"input-codec dag-json or dag-cbor" in out.stderr, out.stderr


def test_cbor_that_no_record_may_hold_is_refused(gateway, episode):
    patient, ep = episode
    for value in (b"\x00bytes", 2 ** 70, {1: "non-string key"}, cbor2.CBORTag(99, "tag")):
        record = encounter(patient, ep)
        record["body"]["notes"] = value
        out = ipfs_cli(gateway, "dag", "put", "--input-codec", "dag-cbor", input=cbor2.dumps(record))
        assert out.returncode != 0 and b"invalid record" in out.stderr, (value, out.stderr)
