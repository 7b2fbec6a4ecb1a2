"""Record nodes read as raw blocks: hash-checked against their CID, decoded here.

Kubo's ``dag/get`` decodes dag-cbor and re-encodes it as dag-json for every read, about three
times the work of ``block/get``. The gateway's own record nodes are small and simple (strings,
integers, null and one link), so it fetches the raw block, checks that its SHA-256 is the one
the CID names (Kubo does not re-hash on read by default), and decodes it with ``cbor2`` into
exactly the form ``dag/get`` gives. Anything outside that form (other hashes or codecs, CIDv0
links, floats, other tags) is ``Unsupported``, and the caller falls back to ``dag/get``.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import cbor2

DAG_CBOR = 0x71
SHA2_256 = 0x12
CID_TAG = 42


class Unsupported(ValueError):
    """Not a block this decoder covers: use Kubo's ``dag/get``."""


class BlockMismatch(ValueError):
    """The bytes Kubo returned do not hash to the CID asked for."""


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while at < len(data) and shift < 64:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7
    raise Unsupported("malformed varint in CID")


def _b32decode(text: str) -> bytes:
    return base64.b32decode(text.upper() + "=" * (-len(text) % 8))


def sha256_of(cid: str) -> bytes:
    """The SHA-256 digest a base32 CIDv1 of a dag-cbor block names."""
    if not cid.startswith("b"):
        raise Unsupported("not a base32 CIDv1")
    try:
        raw = _b32decode(cid[1:])
    except ValueError:
        raise Unsupported("not a base32 CIDv1") from None
    version, at = _varint(raw, 0)
    codec, at = _varint(raw, at)
    code, at = _varint(raw, at)
    length, at = _varint(raw, at)
    if (version, codec, code, length) != (1, DAG_CBOR, SHA2_256, 32) or len(raw) - at != 32:
        raise Unsupported("not a sha2-256 dag-cbor CIDv1")
    return raw[at:]


def _link(tag: cbor2.CBORTag) -> dict[str, str]:
    if tag.tag != CID_TAG or not isinstance(tag.value, bytes) or tag.value[:2] != b"\x00\x01":
        raise Unsupported(f"CBOR tag {tag.tag} or a CIDv0 link")
    return {"/": "b" + base64.b32encode(tag.value[1:]).decode("ascii").lower().rstrip("=")}


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
