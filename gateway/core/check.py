"""``medicon-gateway check``: compare the head store with Kubo after a crash or an incident.

Every indexed record must be in Kubo and pinned — recursively on its own, or listed by one of
the gateway's pin nodes (``core.pins``: one pin per batch of records) — every chain verifying.
Pins of record nodes the index does not hold, and records that pin nodes list but the index
does not hold, are examined one by one: a node stored by an append whose head never moved (a
crash, a lost compare-and-swap whose clean-up failed) is an orphan, never acknowledged.
``--repair`` re-pins unpinned records, removes orphan pins, and replaces a pin node that keeps
orphans by one that does not. Runs on the record service alone: no web server.

Safe while gateways write. An append stores and pins its node *before* it moves the head, so
a pinned node the index does not hold may be one an append is about to commit; a snapshot of
the pins and the index cannot tell the two apart. What can: the node names its position in its
episode (``seq``, and ``prev``, the head it expects), and a position, once taken, is taken for
good (heads only move forward, by compare-and-swap). So a node is an orphan only when the
episode's record at its ``seq`` is another one, or the episode is closed before it; a node
whose position is still free (the episode's next one, or an opening whose episode is not there
yet) is reported as ``pending`` and left alone, to be decided by a later run. A node further
along (appends are chained before the ones before them commit) shares the fate of the node its
``prev`` names. A block a pin node lists but Kubo does not hold is a write still under way,
unless the pin node is older than ``HOLE_AFTER`` seconds: then it is a write that never came.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from ..config import Config
from ..errors import MediconError
from ..storage.model import Episode
from . import pins as pin_nodes
from .service import RecordService

ORPHAN, COMMITTED, PENDING = "orphan", "committed", "pending"
# Seconds after which a block a pin node lists, and Kubo does not hold, is taken as never coming
# (the gateway writes a batch's blocks right after its pin node).
HOLE_AFTER = 600
# How far along ``prev`` links a node beyond its episode's end is followed.
MAX_CHAIN = 10_000


# ``progress(phase, done, total)``: told as each phase (``records``, ``episodes``, ``pins``)
# starts and after each item, so a command can show how far it got; the core prints nothing.
Progress = Callable[[str, int, int], None]


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


async def check(config: Config, *, repair: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    async with RecordService.open(config) as service:
        return await check_service(service, repair=repair, progress=progress)


async def check_service(service: RecordService, *, repair: bool = False,
                        progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or _no_progress
    heads, kubo = service.storage.heads, service.kubo
    episodes = await heads.episodes()
    records = await heads.all_records()
    # Read after the index: a record indexed above was pinned before its head moved, so it is
    # in this set unless its pin was removed since.
    pins = await kubo.recursive_pins()
    report: dict[str, Any] = {"episodes": len(episodes), "records": len(records), "missing": [],
                              "unpinned": [], "broken": [], "orphans": [], "pending": [], "repaired": []}
    indexed = {r.cid for r in records}
    unindexed = sorted(pins - indexed)
    # The pins the index does not hold: the gateway's pin nodes, and record nodes pinned on
    # their own. Only dag-cbor nodes (sha2-256): attachments and raw data are their owners'.
    keepers: dict[str, dict[str, Any]] = {}
    own_records: dict[str, dict[str, Any]] = {}
    for pin in unindexed:
        node = await _node(service, pin) if pin.startswith("bafyrei") else None
        if node is None:
            continue
        if await pin_nodes.is_pin_node(service.sealer, node):
            keepers[pin] = node
        elif await service.sealer.is_record_node(node):
            own_records[pin] = node
    kept = pins | {cid for node in keepers.values() for cid in pin_nodes.listed(node)}
    progress("records", 0, len(records))
    for done, record in enumerate(records, 1):
        if not await kubo.has_block(record.cid):
            report["missing"].append({"cid": record.cid, "episode": record.episode, "seq": record.seq})
        elif record.cid not in kept:
            report["unpinned"].append(record.cid)
            if repair:
                await kubo.pin_add(record.cid)
                report["repaired"].append({"pinned": record.cid})
        progress("records", done, len(records))
    progress("episodes", 0, len(episodes))
    for done, episode in enumerate(episodes, 1):
        verdict = await service.verify_episode(episode)
        if not verdict["ok"]:
            report["broken"].append(verdict)
        progress("episodes", done, len(episodes))
    by_pseudonym = {service.sealer.episode_pseudonym(e.id): e.id for e in episodes}
    progress("pins", 0, len(own_records) + len(keepers))
    done = 0
    for pin, node in own_records.items():
        fate = await _fate(service, pin, node, by_pseudonym)
        if fate == PENDING:
            report["pending"].append(pin)
        elif fate == ORPHAN:
            report["orphans"].append(pin)
            if repair and await kubo.pin_rm(pin):
                report["repaired"].append({"unpinned": pin})
        done += 1
        progress("pins", done, len(own_records) + len(keepers))
    for pin, keeper in keepers.items():
        drop = []
        for cid in pin_nodes.listed(keeper):
            if cid in indexed:
                continue
            node = await _node(service, cid)
            if node is None:  # never written (yet)
                fate = ORPHAN if time.time() - keeper["at"] > HOLE_AFTER else PENDING
            else:
                fate = await _fate(service, cid, node, by_pseudonym)
            if fate == PENDING:
                report["pending"].append(cid)
            elif fate == ORPHAN:
                report["orphans"].append(cid)
                drop.append(cid)
        if drop and repair:
            keep = [cid for cid in pin_nodes.listed(keeper) if cid not in drop]
            if await _replace_pin_node(service, pin, keep):
                report["repaired"].append({"pin node": pin, "unpinned": drop})
        done += 1
        progress("pins", done, len(own_records) + len(keepers))
    report["clean"] = not (report["missing"] or report["broken"]
                           or (report["unpinned"] and not repair))
    return report


async def _replace_pin_node(service: RecordService, old: str, keep: list[str]) -> bool:
    """Pin a node listing only ``keep`` (if any), then unpin ``old``."""
    kubo = service.kubo
    if keep:
        block = pin_nodes.pin_block(service.sealer, keep)
        await kubo.put_blocks([block], pin=True)
    return await kubo.pin_rm(old)


async def _node(service: RecordService, cid: str) -> dict[str, Any] | None:
    if not await service.kubo.has_block(cid):
        return None
    try:
        return await service.kubo.dag_get(cid)
    except MediconError:
        return None


async def _fate(service: RecordService, cid: str, node: dict[str, Any], by_pseudonym: dict[str, str],
                depth: int = 0) -> str:
    """Whether a record node the index did not hold (when it was read) is committed by now,
    can never be (an orphan), or may still be (its position is free)."""
    heads = service.storage.heads
    seq = node.get("seq")
    if not isinstance(seq, int) or seq < 0:
        return PENDING
    episode_id = by_pseudonym.get(node.get("episode"))
    if episode_id is None:  # an episode opened since the list was read, or never opened
        by_pseudonym.update({service.sealer.episode_pseudonym(e.id): e.id for e in await heads.episodes()})
        episode_id = by_pseudonym.get(node.get("episode"))
        if episode_id is None:
            return PENDING
    episode: Episode | None = await heads.get_episode(episode_id)
    if episode is None:
        return PENDING
    if episode.length > seq:  # the position is taken, for good: by this node or by another
        taken = await heads.history(episode_id, seq - 1, 1)
        return COMMITTED if taken and taken[0].cid == cid else ORPHAN
    prev = node.get("prev")
    prev = prev.get("/") if isinstance(prev, dict) else prev
    if episode.length == seq and episode.status == "open":
        # Its append may still move the head (it expects exactly this one); otherwise no append
        # can ever place it, since heads only move forward.
        return PENDING if prev == episode.head else ORPHAN
    if episode.length == seq:  # closed before this node could be appended
        return ORPHAN
    # Beyond the episode's end: chained on a record not committed yet, whose fate it shares
    # (once that one is an orphan, nothing can ever link to this one's position).
    if depth >= MAX_CHAIN or not isinstance(prev, str) or await heads.record(prev) is not None:
        return PENDING
    before = await _node(service, prev)
    if before is None or not await service.sealer.is_record_node(before):
        return PENDING
    return ORPHAN if await _fate(service, prev, before, by_pseudonym, depth + 1) == ORPHAN else PENDING
