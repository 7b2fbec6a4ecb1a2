"""Encrypt and sign: what a record becomes before it reaches Kubo, and how it is read back.

A stored record node (dag-cbor) holds in clear only what ordering and verification need —
schema id, a keyed pseudonym of the episode, sequence number, the ``prev`` link, the data key
id — plus the sealed payload (sealed by the ``medicon_encrypt_record`` hook: AES-256-GCM under
the patient's data key, the clear part as associated data) and the gateway's Ed25519 signature
over all of it. The payload carries the record and the authenticated principal who wrote it,
so the author is signed too. With encryption off, the payload is the record's canonical JSON in
clear (still signed).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..errors import Internal, Unavailable
from ..security import crypto
from ..security.keys import KeyProvider
from .plugins import PluginHost

NODE_VERSION = 1
PSEUDONYM_EPISODE = "episode"


def clear_part(node: dict[str, Any]) -> dict[str, Any]:
    """What the signature and the encryption's associated data cover: every field but the
    signature, with ``prev`` as a CID string."""
    out = {k: v for k, v in node.items() if k != "sig"}
    prev = out.get("prev")
    if isinstance(prev, dict):
        out["prev"] = prev.get("/")
    return out


class Sealer:
    def __init__(self, keys: KeyProvider, plugins: PluginHost, *, encrypt: bool) -> None:
        self.keys = keys
        self._plugins = plugins
        self._encrypt = encrypt
        self.key_id = hashlib.sha256(crypto.public_key_to_bytes(keys.verify_key)).hexdigest()[:16]

    def episode_pseudonym(self, episode: str) -> str:
        return self.keys.pseudonym(PSEUDONYM_EPISODE, episode)

    async def to_node(self, record: dict[str, Any], signer: str) -> dict[str, Any]:
        """The node to store for ``record`` (dag-json form: ``prev`` as a link)."""
        node: dict[str, Any] = {
            "v": NODE_VERSION,
            "schema": record["schema"],
            "episode": self.episode_pseudonym(record["episode"]),
            "seq": record["seq"],
            "prev": record["prev"],
            "key": self.key_id,
        }
        payload = crypto.canonical_json({"record": record, "signer": signer})
        if self._encrypt:
            sealed = await self._plugins.call("medicon_encrypt_record", payload=payload,
                                              aad=crypto.canonical_json(clear_part(node)),
                                              patient=record["patient"], keys=self.keys)
            if not sealed:
                raise Internal("encryption is on but no plugin sealed the record")
            node.update(sealed)
        else:
            node["plain"] = payload.decode("utf-8")
        node["sig"] = crypto.sign(self.keys.signing_key, clear_part(node))
        node["prev"] = {"/": record["prev"]} if record["prev"] else None
        return node

    def signature_ok(self, node: dict[str, Any]) -> bool:
        sig = node.get("sig")
        return isinstance(sig, str) and crypto.verify_signature(self.keys.verify_key, clear_part(node), sig)

    async def from_node(self, node: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """(record, signer) from a stored node. ``Erased`` after crypto-shredding; a node that
        does not open is ``Unavailable``: the gateway wrote it, so Kubo returned something else."""
        if not isinstance(node, dict) or node.get("v") != NODE_VERSION:
            raise Unavailable("the stored block is not a record node of this gateway")
        if "plain" not in node:
            clear = {k: v for k, v in node.items() if k not in ("sealed", "dek")}
            payload = await self._plugins.call("medicon_decrypt_record", node=node,
                                               aad=crypto.canonical_json(clear_part(clear)), keys=self.keys)
            if payload is None:
                raise Unavailable("no plugin can open this sealed record")
        else:
            payload = str(node.get("plain", "")).encode("utf-8")
        try:
            opened = json.loads(payload)
            return opened["record"], opened["signer"]
        except (ValueError, KeyError, TypeError):
            raise Unavailable("the record payload is malformed") from None

    def is_own_record_node(self, node: Any) -> bool:
        return isinstance(node, dict) and node.get("v") == NODE_VERSION and self.signature_ok(node)
