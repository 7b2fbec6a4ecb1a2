"""Record nodes read as raw blocks: hash-checked against their CID, decoded here.

Kubo's ``dag/get`` decodes dag-cbor and re-encodes it as dag-json for every read, about three
times the work of ``block/get``. The gateway's own record nodes are small and simple (strings,
integers, null and one link), so it fetches the raw block, checks that its SHA-256 is the one
the CID names (Kubo does not re-hash on read by default), and decodes it into exactly the form
``dag/get`` gives. Anything outside that form (other hashes or codecs, CIDv0 links, floats,
other tags) is ``Unsupported``, and the caller falls back to ``dag/get``.

CIDs are read with ``multiformats``. The CBOR itself is decoded with ``cbor2``, not the
``dag-cbor`` package: measured here on a 1.1 kB record node, ``dag_cbor.decode`` takes 294 µs
and ``cbor2.loads`` 2.3 µs (its run-time type validation dominates), and the strictness
``dag-cbor`` adds is not needed for blocks whose hash was just checked and whose shape is
checked below.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import cbor2
from multiformats import CID

from .cids import FIXED_CODECS, parse_cid, sha256_cid, sha256_cid_bytes

CID_TAG = 42
DAG_CBOR = 0x71


class Unsupported(ValueError):
    """Not a block this decoder covers: use Kubo's ``dag/get``."""


class BlockMismatch(ValueError):
    """The bytes Kubo returned do not hash to the CID asked for."""


def sha256_of(cid: str) -> bytes:
    """The SHA-256 digest a CIDv1 of a dag-cbor block names."""
    fixed = sha256_cid_bytes(cid) if isinstance(cid, str) else None
    if fixed is not None and fixed[1] == DAG_CBOR:
        return fixed[4:]
    parsed = parse_cid(cid)
    if parsed is None or parsed.version != 1 or parsed.codec.name != "dag-cbor" \
            or parsed.hashfun.name != "sha2-256" or len(parsed.raw_digest) != 32:
        raise Unsupported("not a sha2-256 dag-cbor CIDv1")
    return bytes(parsed.raw_digest)


def _link(tag: cbor2.CBORTag) -> dict[str, str]:
    if tag.tag != CID_TAG or not isinstance(tag.value, bytes) or tag.value[:2] != b"\x00\x01":
        raise Unsupported(f"CBOR tag {tag.tag} or a CIDv0 link")
    raw = tag.value[1:]
    if len(raw) == 36 and raw[1] in FIXED_CODECS and raw[2:4] == b"\x12\x20":
        return {"/": sha256_cid(raw[1], raw[4:])}
    try:
        link = CID.decode(tag.value[1:])
    except Exception:
        raise Unsupported("a link that is not a CID") from None
    return {"/": str(link.set(base="base32"))}


def _as_dag_json(value: Any) -> Any:
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise Unsupported("a map key that is not a string")
        return {key: _as_dag_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_dag_json(item) for item in value]
    if isinstance(value, cbor2.CBORTag):
        return _link(value)
    if isinstance(value, bytes):
        return {"/": {"bytes": base64.b64encode(value).decode("ascii").rstrip("=")}}
    if value is None or isinstance(value, (str, bool, int)):
        return value
    raise Unsupported(f"a {type(value).__name__} value")


def link_target(value: Any) -> Any:
    """The CID a dag-json link ``{"/": cid}`` names; any other value as it is (a ``prev`` of
    null, or something that is not a link, for the caller to refuse)."""
    return value.get("/") if isinstance(value, dict) else value


def decode(cid: str, block: bytes) -> Any:
    """The node ``block`` holds, as ``dag/get`` would give it; ``BlockMismatch`` if its hash is
    not the one ``cid`` names, ``Unsupported`` for what this decoder does not cover."""
    if hashlib.sha256(block).digest() != sha256_of(cid):
        raise BlockMismatch(f"the block Kubo returned for {cid} does not match its hash")
    try:
        node = cbor2.loads(block)
    except Exception as exc:  # a block the CID names, but not CBOR this decoder reads
        raise Unsupported(f"undecodable dag-cbor: {type(exc).__name__}") from None
    return _as_dag_json(node)


def encode(node: dict[str, Any]) -> bytes:
    """``node`` (the dag-json form the gateway writes: strings, integers, booleans, null, maps
    with string keys, lists, and links ``{"/": cid}``) as dag-cbor bytes — exactly the bytes
    Kubo's ``dag/put`` stores for it (map keys length-first, then bytewise; minimal integers;
    links as tag 42). The gateway then stores the block with ``block/put``, whose answer comes
    only after the block is written and pinned. Anything else (floats, bytes) is
    ``Unsupported``: the encoding of those is Kubo's business."""
    return cbor2.dumps(_as_cbor(node), canonical=True)


def _as_cbor(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"/"}:
            return cbor2.CBORTag(CID_TAG, b"\x00" + _link_bytes(value["/"]))
        if not all(isinstance(key, str) for key in value):
            raise Unsupported("a map key that is not a string")
        return {key: _as_cbor(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_cbor(item) for item in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    raise Unsupported(f"a {type(value).__name__} value")


def _link_bytes(text: Any) -> bytes:
    """A link's binary CIDv1: the gateway's own links (``cids.sha256_cid`` strings) read
    directly, anything else by ``multiformats``."""
    if isinstance(text, str):
        fixed = sha256_cid_bytes(text)
        if fixed is not None:
            return fixed
    link = parse_cid(text) if isinstance(text, str) else None
    if link is None:
        raise Unsupported("a map keyed \"/\" that is not a link")
    return bytes(link.set(version=1))


def cid_of(block: bytes) -> str:
    """The CIDv1 (dag-cbor, sha2-256, base32) of a dag-cbor block."""
    return sha256_cid(DAG_CBOR, hashlib.sha256(block).digest())
