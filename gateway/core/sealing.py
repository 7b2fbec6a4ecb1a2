"""Encrypt and sign: what a record becomes before it reaches Kubo, and how it is read back.

A stored record node (dag-cbor) holds in clear only what ordering and verification need —
schema id, a keyed pseudonym of the episode, sequence number, the ``prev`` link, the data key
id — plus the sealed payload (sealed by the ``medicon_encrypt_record`` hook: AES-256-GCM under
the patient's data key, the clear part as associated data) and the writing gateway's Ed25519
signature over all of it, with ``key`` naming that gateway's key (several gateways may share
one database: each checks the others' signatures against their registered keys). With
encryption off, the payload is in clear (still signed).

Payload formats, by the node's ``v``:

* ``v: 2`` (written now): ``{"format": 2, "signer": …, "text": …}`` — ``text`` is the record's
  JSON text as the client wrote it, with only the gateway's envelope fields set
  (``ClientRecord``), so a reader gets back the client's bytes: numbers as written (``1.00``),
  keys in the client's order, strings with the client's escapes. The signature covers the
  sealed payload, so it covers those bytes.
* ``v: 1`` (older records, still read): ``{"record": …, "signer": …}`` — the record as parsed
  then (numbers as floats, keys sorted); it reads back as that value written out compactly.

The payload carries the authenticated principal who wrote the record, so the author is signed
too.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import Internal, Invalid, Unavailable
from ..security import crypto
from ..security.keys import KeyProvider
from . import strictjson
from .plugins import PluginHost
from .records import ClientRecord

NODE_VERSION = 2           # what this gateway writes
NODE_VERSIONS = (1, 2)     # what it reads
PAYLOAD_FORMAT = 2
PSEUDONYM_EPISODE = "episode"
_KNOWN = object()  # signature_ok's default: the signer's key if already known


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
        self._signers: dict[str, Ed25519PublicKey] = {self.key_id: keys.verify_key}

    def episode_pseudonym(self, episode: str) -> str:
        return self.keys.pseudonym(PSEUDONYM_EPISODE, episode)

    async def to_node(self, record: ClientRecord | dict[str, Any], signer: str) -> dict[str, Any]:
        """The node to store for ``record`` (dag-json form: ``prev`` as a link); its payload
        holds the record's text as it is (a record given as a value is written out first)."""
        record = ClientRecord.of(record)
        node: dict[str, Any] = {
            "v": NODE_VERSION,
            "schema": record["schema"],
            "episode": self.episode_pseudonym(record["episode"]),
            "seq": record["seq"],
            "prev": record["prev"],
            "key": self.key_id,
        }
        payload = crypto.canonical_json({"format": PAYLOAD_FORMAT, "signer": signer, "text": record.text})
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

    async def signer_key(self, node: dict[str, Any]) -> Ed25519PublicKey | None:
        """The public key of the gateway the node names as its signer (``key``): this one's, or
        another registered gateway's (asked of the key provider once, then kept); None if no
        gateway of this deployment has that key."""
        kid = node.get("key") if isinstance(node, dict) else None
        if not isinstance(kid, str):
            return self.keys.verify_key
        known = self._signers.get(kid)
        lookup = getattr(self.keys, "verify_key_for", None)
        if known is None and lookup is not None:
            known = await lookup(kid)
            if known is not None:
                self._signers[kid] = known
        return known

    async def verified(self, node: dict[str, Any]) -> bool:
        """The node carries the signature of a gateway of this deployment."""
        return self.signature_ok(node, await self.signer_key(node))

    async def signed_by(self, node: dict[str, Any]) -> str | None:
        """The id of the gateway whose key the node names (which site wrote it), if known."""
        lookup = getattr(self.keys, "gateway_of", None)
        kid = node.get("key") if isinstance(node, dict) else None
        return await lookup(kid) if lookup is not None and isinstance(kid, str) else None

    def signature_ok(self, node: dict[str, Any], key: Any = _KNOWN) -> bool:
        """Synchronous check against ``key`` (from ``signer_key``; None never verifies), or by
        default against the keys already known (this gateway's, and signers met before)."""
        if key is _KNOWN:
            kid = node.get("key")
            key = self._signers.get(kid) if isinstance(kid, str) else self.keys.verify_key
        sig = node.get("sig")
        return key is not None and isinstance(sig, str) and crypto.verify_signature(key, clear_part(node), sig)

    async def from_node(self, node: dict[str, Any], keys: Any = None) -> tuple[ClientRecord, str]:
        """(record, signer) from a stored node of either version. ``Erased`` after
        crypto-shredding; a node that does not open is ``Unavailable``: the gateway wrote it, so
        Kubo returned something else. ``keys``: the key provider's view to open it with
        (``KeysForOneRead`` for many records), by default the provider itself."""
        if not isinstance(node, dict) or node.get("v") not in NODE_VERSIONS:
            raise Unavailable("the stored block is not a record node of this gateway")
        if "plain" not in node:
            clear = {k: v for k, v in node.items() if k not in ("sealed", "dek")}
            payload = await self._plugins.call("medicon_decrypt_record", node=node,
                                               aad=crypto.canonical_json(clear_part(clear)), keys=keys or self.keys)
            if payload is None:
                raise Unavailable("no plugin can open this sealed record")
        else:
            payload = str(node.get("plain", "")).encode("utf-8")
        try:
            opened = json.loads(payload)
            if node["v"] == 1:
                return ClientRecord.of(opened["record"]), opened["signer"]
            if opened["format"] != PAYLOAD_FORMAT:
                raise ValueError("unknown payload format")
            return ClientRecord.from_text(opened["text"]), opened["signer"]
        except (ValueError, KeyError, TypeError, strictjson.BadJSON, Invalid):
            raise Unavailable("the record payload is malformed") from None

    async def is_record_node(self, node: Any) -> bool:
        """A record node signed by a gateway of this deployment."""
        return isinstance(node, dict) and node.get("v") in NODE_VERSIONS and await self.verified(node)
