"""Pin nodes: one recursive pin that keeps a batch of record blocks in Kubo.

Kubo spends more on a pin than on the block it keeps (each pin is a synced write to its pin
store), so the record blocks written together in one batch (``kubo.batcher``) are kept by one
pin: a small dag-cbor node linking them, stored and pinned recursively (without walking its
links) before the records are written. A pinned node keeps everything it links to, and every
record links to the one before it, so a record stays kept as long as any pin node of a later
record of its episode does.

A pin node is signed by the gateway, like a record node, so ``check`` and ``protect_pins`` tell
the gateway's pin nodes from anything a client could pin that looks like one: ``check`` counts
a record as pinned when a pin node of this deployment lists it, and ``--repair`` replaces a pin
node that keeps orphans (or lists blocks Kubo does not hold) by one that does not.
"""

from __future__ import annotations

import time
from typing import Any

from ..kubo import ipld
from ..security import crypto
from .sealing import Sealer

PIN_KIND = "medicon-pins"
PIN_VERSION = 1


def pin_node(sealer: Sealer, cids: list[str], at: int | None = None) -> dict[str, Any]:
    """The signed pin node (dag-json form) that keeps ``cids``, made at ``at`` (Unix seconds;
    now by default): ``check`` takes a block such a node lists but Kubo does not hold for a
    write that will never come only once the node is old."""
    clear = {"v": PIN_VERSION, "kind": PIN_KIND, "records": list(cids), "key": sealer.key_id,
             "at": int(time.time()) if at is None else at}
    return {**clear, "records": [{"/": cid} for cid in cids], "sig": crypto.sign(sealer.keys.signing_key, clear)}


def pin_block(sealer: Sealer, cids: list[str]) -> bytes:
    return ipld.encode(pin_node(sealer, cids))


def listed(node: Any) -> list[str] | None:
    """The record CIDs a pin node lists, or None if ``node`` is not shaped as one."""
    if not isinstance(node, dict) or node.get("kind") != PIN_KIND or node.get("v") != PIN_VERSION:
        return None
    records = node.get("records")
    if not isinstance(records, list):
        return None
    cids = [link.get("/") if isinstance(link, dict) else None for link in records]
    return cids if all(isinstance(cid, str) for cid in cids) else None


async def is_pin_node(sealer: Sealer, node: Any) -> bool:
    """A pin node signed by a gateway of this deployment."""
    cids = listed(node)
    if cids is None or not isinstance(node.get("sig"), str) or not isinstance(node.get("key"), str):
        return False
    if not isinstance(node.get("at"), int):
        return False
    key = await sealer.signer_key(node)
    clear = {"v": PIN_VERSION, "kind": PIN_KIND, "records": cids, "key": node["key"], "at": node["at"]}
    return key is not None and crypto.verify_signature(key, clear, node["sig"])
