"""Record nodes read as raw blocks (``gateway.kubo.ipld``): the same node as Kubo's ``dag/get``, and
a block that does not hash to its CID is refused."""

from __future__ import annotations

import json

import pytest

from conftest import app_client, gateway_config
from gateway.kubo import ipld
from gateway.http.appkeys import SERVICE
from records_helpers import encounter, opened, uid


@pytest.mark.parametrize("encrypt", [True, False])
async def test_record_nodes_decode_exactly_as_dag_get(aiohttp_client, kubo, encrypt):
    c = await app_client(aiohttp_client, gateway_config(kubo, **{"security.encrypt": encrypt}))
    patient, episode = uid("p"), uid("e")
    cids = [(await (await c.post(f"/medicon/v1/patients/{patient}/episodes",
                                 json=opened(patient, episode))).json())["cid"]]
    for i in range(3):
        r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode, note=f"n{i}"))
        cids.append((await r.json())["cid"])
    node = c.server.app[SERVICE].kubo
    for cid in cids:
        decoded = ipld.decode(cid, kubo.ipfs("block", "get", cid).stdout)
        assert decoded == await node.dag_get(cid) == await node.record_node(cid)
    assert decoded["prev"] == {"/": cids[-2]}
    assert ("sealed" in json.dumps(decoded)) is encrypt


def test_bytes_decode_like_dag_json_and_the_rest_falls_back(kubo):
    def put(doc: dict) -> str:
        return kubo.ipfs("dag", "put", "--store-codec=dag-cbor", "--input-codec=dag-json",
                         input=json.dumps(doc).encode()).stdout.decode().strip()
    cid = put({"b": {"/": {"bytes": "aGVsbG8"}}, "n": None, "t": True, "i": -7, "l": [1, "x"]})
    decoded = ipld.decode(cid, kubo.ipfs("block", "get", cid).stdout)
    assert decoded == json.loads(kubo.ipfs("dag", "get", cid).stdout)
    floaty = put({"f": 1.5})
    with pytest.raises(ipld.Unsupported):
        ipld.decode(floaty, kubo.ipfs("block", "get", floaty).stdout)
    raw = kubo.ipfs("add", "-Q", "--cid-version=1", "--raw-leaves", input=b"raw leaf").stdout.decode().strip()
    with pytest.raises(ipld.Unsupported):  # a raw-codec CID: not this decoder's
        ipld.sha256_of(raw)
    with pytest.raises(ipld.Unsupported):  # CIDv0
        ipld.sha256_of("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG")


def test_a_block_that_does_not_match_its_cid_is_refused(kubo):
    cid = kubo.ipfs("dag", "put", input=b'{"a": "b"}').stdout.decode().strip()
    block = bytearray(kubo.ipfs("block", "get", cid).stdout)
    assert ipld.decode(cid, bytes(block)) == {"a": "b"}
    block[-1] ^= 1
    with pytest.raises(ipld.BlockMismatch):
        ipld.decode(cid, bytes(block))


@pytest.mark.parametrize("encrypt", [True, False])
async def test_record_nodes_are_encoded_byte_for_byte_as_dag_put_stores_them(aiohttp_client, kubo, encrypt):
    """The gateway encodes its record nodes itself (and stores them with block/put, whose
    answer is the write's): the bytes, hence the CID, are those Kubo's dag/put makes of the
    same node — for real sealed nodes and for the odd shapes a node may take."""
    c = await app_client(aiohttp_client, gateway_config(kubo, **{"security.encrypt": encrypt}))
    patient, episode = uid("p"), uid("e")
    r = await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
    first = (await r.json())["cid"]
    r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode, note="ünïcødé ✓"))
    second = (await r.json())["cid"]
    service = c.server.app[SERVICE]
    odd = {"z": 1, "aa": -(2**63), "b": 2**63 - 1, "é": "x", "ab": [True, False, None, {"/": first}],
           "": {"nested": {"k": 0}}, "long key " * 3: "v" * 300}
    for node in (await service.kubo.dag_get(first), await service.kubo.dag_get(second), odd):
        put = kubo.ipfs("dag", "put", "--store-codec=dag-cbor", "--input-codec=dag-json",
                        input=json.dumps(node).encode()).stdout.decode().strip()
        assert ipld.cid_of(ipld.encode(node)) == put
        assert ipld.encode(node) == kubo.ipfs("block", "get", put).stdout
    assert ipld.cid_of(ipld.encode(await service.kubo.dag_get(second))) == second
    with pytest.raises(ipld.Unsupported):
        ipld.encode({"f": 1.5})


def test_the_gateways_own_cids_are_written_and_read_as_multiformats_does():
    """The fixed layout (CIDv1, base32, one-byte codec, sha2-256) the append path writes and
    reads without ``multiformats``: the same strings and bytes as ``multiformats`` for every
    codec it covers, and anything else (another case, trailing bits, another codec or hash)
    left to ``multiformats``."""
    import hashlib
    import os

    from multiformats import CID, multihash

    from gateway.kubo import cids
    for code, name in cids.FIXED_CODECS.items():
        for _ in range(300):
            digest = os.urandom(32)
            expected = str(CID("base32", 1, name, multihash.wrap(digest, "sha2-256")))
            assert cids.sha256_cid(code, digest) == expected
            assert cids.sha256_cid_bytes(expected) == bytes(CID.decode(expected))
            assert cids.canonical(expected) == expected
    text = cids.sha256_cid(0x71, hashlib.sha256(b"x").digest())
    assert ipld.cid_of(b"x") == text
    assert cids.sha256_cid_bytes(text.upper()) is None          # base32upper: multiformats' business
    assert cids.canonical(text.upper()) == text
    variants = [text[:-1] + c for c in "abcdefghijklmnopqrstuvwxyz234567"]
    exact = [v for v in variants if cids.sha256_cid_bytes(v) is not None]
    assert len(exact) == 8 and text in exact                    # the last character holds 3 bits
    sha512 = str(CID("base32", 1, "dag-cbor", multihash.wrap(os.urandom(64), "sha2-512")))
    assert cids.sha256_cid_bytes(sha512) is None and cids.canonical(sha512) == sha512
    v0 = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"
    assert cids.sha256_cid_bytes(v0) is None and cids.canonical(v0).startswith("bafy")
    link = {"/": cids.sha256_cid(0x55, os.urandom(32))}
    assert ipld.decode(ipld.cid_of(ipld.encode({"l": link})), ipld.encode({"l": link})) == {"l": link}


def test_is_cid_says_what_parse_cid_says_and_skips_its_parse_for_the_gateways_own_cids(monkeypatch):
    """``is_cid`` (the check on a pin request's CID, an RPC path's root, an attachment read)
    answers exactly as ``parse_cid`` for the gateway's own CIDs, their near misses and other
    strings, and reads a fixed-layout CID without a ``multiformats`` parse."""
    import os

    from gateway.kubo import cids
    own = [cids.sha256_cid(code, os.urandom(32)) for code in cids.FIXED_CODECS for _ in range(50)]
    others = [c[:-1] + x for c in own[:20] for x in "a7q"] + [c.upper() for c in own[:5]] + [
        "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", "zQmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG",
        "bafkqaaa", "", "b", "not a cid", "b" + "a" * 58, "b" * 600, None, 7, own[0] + "a"]
    for text in own + others:
        assert cids.is_cid(text) == (cids.parse_cid(text) is not None), text
    fresh = [cids.sha256_cid(0x71, os.urandom(32)) for _ in range(20)]

    def no_parse(text):
        raise AssertionError(f"multiformats parsed {text}")
    monkeypatch.setattr(cids, "_parse", no_parse)
    assert all(cids.is_cid(c) for c in fresh)


def test_is_cid_caches_nothing_for_text_no_cid_can_be():
    """A request can name any text as a CID; is_cid refuses what is too long before any cached
    reader keeps it (8192 entries of megabytes each would be gigabytes)."""
    from gateway.kubo import cids
    before = (cids.sha256_cid_bytes.cache_info().currsize, cids._parse.cache_info().currsize)
    for n in range(20):
        assert not cids.is_cid("b" + "a" * (cids.MAX_CID_TEXT + n))
    assert (cids.sha256_cid_bytes.cache_info().currsize, cids._parse.cache_info().currsize) == before
