"""Encrypt and sign: what a record becomes before it reaches Kubo, and how it is read back.

A stored record node (dag-cbor) holds in clear only what ordering and verification need —
schema id, a keyed pseudonym of the episode, sequence number, the ``prev`` link, the data key
id — plus the sealed payload (AES-256-GCM under the patient's data key, the clear part as
associated data) and the gateway's Ed25519 signature over all of it. The payload carries the
record and the authenticated principal who wrote it, so the author is signed too. With
encryption off, the payload is the record's canonical JSON in clear (still signed).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from aiohttp import web

from . import crypto, plugins
from .appkeys import CONFIG, KEYRING, PLUGINS
from .errors import GatewayError
from .keyring import KeyShredded

NODE_VERSION = 1
PSEUDONYM_EPISODE = "episode"


class RecordErased(GatewayError):
    def __init__(self) -> None:
        super().__init__(410, "this patient's data was erased (crypto-shredded): it can never be read again")


def keyring(app: web.Application):
    """The key provider (``medicon_key_provider``; built in: the local keyring file)."""
    return app[KEYRING]


def key_id(ring: LocalKeyring) -> str:
    return hashlib.sha256(crypto.public_key_to_bytes(ring.verify_key)).hexdigest()[:16]


def clear_part(node: dict[str, Any]) -> dict[str, Any]:
    """What the signature and the encryption's associated data cover: every field but the
    signature, with ``prev`` as a CID string."""
    out = {k: v for k, v in node.items() if k != "sig"}
    prev = out.get("prev")
    if isinstance(prev, dict):
        out["prev"] = prev.get("/")
    return out


async def to_node(app: web.Application, record: dict[str, Any], signer: str) -> dict[str, Any]:
    """The node to store for ``record`` (dag-json form: ``prev`` as a link)."""
    ring = keyring(app)
    node: dict[str, Any] = {
        "v": NODE_VERSION,
        "schema": record["schema"],
        "episode": ring.pseudonym(PSEUDONYM_EPISODE, record["episode"]),
        "seq": record["seq"],
        "prev": record["prev"],
        "key": key_id(ring),
    }
    payload = crypto.canonical_json({"record": record, "signer": signer})
    if app[CONFIG].security.encrypt:
        try:
            sealed = await plugins.call(app[PLUGINS], "medicon_encrypt_record", payload=payload,
                                        aad=crypto.canonical_json(clear_part(node)),
                                        patient=record["patient"], keys=ring)
        except KeyShredded:
            raise RecordErased() from None
        if not sealed:
            raise GatewayError(500, "encryption is on but no plugin sealed the record")
        node.update(sealed[0][1])
    else:
        node["plain"] = payload.decode("utf-8")
    node["sig"] = crypto.sign(ring.signing_key, clear_part(node))
    node["prev"] = {"/": record["prev"]} if record["prev"] else None
    return node


def signature_ok(app: web.Application, node: dict[str, Any]) -> bool:
    ring = keyring(app)
    sig = node.get("sig")
    return isinstance(sig, str) and crypto.verify_signature(ring.verify_key, clear_part(node), sig)


async def from_node(app: web.Application, node: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(record, signer) from a stored node. ``RecordErased`` (410) after crypto-shredding;
    a node that does not open is a 502: the gateway wrote it, so Kubo returned something else."""
    if not isinstance(node, dict) or node.get("v") != NODE_VERSION:
        raise GatewayError(502, "the stored block is not a record node of this gateway")
    if "plain" not in node:
        clear = {k: v for k, v in node.items() if k not in ("sealed", "dek")}
        try:
            opened = await plugins.call(app[PLUGINS], "medicon_decrypt_record", node=node,
                                        aad=crypto.canonical_json(clear_part(clear)), keys=keyring(app))
        except KeyShredded:
            raise RecordErased() from None
        if not opened:
            raise GatewayError(502, "no plugin can open this sealed record")
        payload = opened[0][1]
    else:
        payload = str(node.get("plain", "")).encode("utf-8")
    try:
        opened = json.loads(payload)
        return opened["record"], opened["signer"]
    except (ValueError, KeyError, TypeError):
        raise GatewayError(502, "the record payload is malformed") from None
