"""``medicon-gateway check``: compare the head store with Kubo after a crash or an incident.

Every indexed record must be in Kubo and pinned (the gateway pins each record recursively as
it stores it), every chain verifying. The chains are walked first, each in one stream from Kubo
(``verify_episode``); a record whose block that walk read needs no second look in Kubo's
blockstore. Pins of record nodes the index does not hold are examined one by one: a node
stored by an append whose head never moved (a crash, a lost compare-and-swap whose clean-up
failed) is an orphan, never acknowledged. ``--repair`` re-pins unpinned records and removes
orphan pins. Runs on the record service alone: no web server.

Safe while gateways write. An append stores and pins its node *before* it moves the head, so
a pinned node the index does not hold may be one an append is about to commit; a snapshot of
the pins and the index cannot tell the two apart. What can: the node names its position in its
episode (``seq``, and ``prev``, the head it expects), and a position, once taken, is taken for
good (heads only move forward, by compare-and-swap). So a node is an orphan only when the
episode's record at its ``seq`` is another one, or the episode is closed before it; a node
whose position is still free (the episode's next one, or an opening whose episode is not there
yet) is reported as ``pending`` and left alone, to be decided by a later run.

With ``records.replicas`` above 1 (or replica services configured), every indexed record must
also be pinned on that many nodes: this gateway's own, and the replica services reporting it
``pinned`` (asked through the Pinning Service API, ten CIDs a query). ``replicas`` in the report
says what each service holds and which records are under-replicated; ``--repair`` asks the
services that lack a record to pin it (fetched from whichever node of the swarm has it).

With the ``fhir_index`` plugin loaded, every FHIR resource a record embeds must be in the FHIR
search index (the plugin indexes on commit, and a failure there never undoes the append):
records missing from it are ``unindexed``, and ``--repair`` indexes them.
"""

from __future__ import annotations

from typing import Any, Callable

from ..config import Config
from ..errors import MediconError
from ..storage.model import Episode, FhirEntry, IndexedRecord
from .fhir_facade import FhirFacade
from .records import ClientRecord
from .service import RecordService

ORPHAN, COMMITTED, PENDING = "orphan", "committed", "pending"
CHAIN_AHEAD = 500  # records the FHIR index check reads ahead, a chain at a time (those no walk opened)


# ``progress(phase, done, total)``: told as each phase (``records``, ``episodes``, ``pins``,
# ``index``)
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
                              "unpinned": [], "broken": [], "orphans": [], "pending": [], "unindexed": [],
                              "repaired": []}
    in_blockstore: set[str] = set()  # the blocks the chain walks read from Kubo's blockstore
    fhir = _FhirIndexCheck(service) if service.plugins.pm.get_plugin("fhir_index") is not None else None
    progress("episodes", 0, len(episodes))
    for done, episode in enumerate(episodes, 1):
        verdict = await service.verify_episode(episode, streamed=in_blockstore, opened=fhir.look if fhir else None)
        if not verdict["ok"]:
            report["broken"].append(verdict)
        progress("episodes", done, len(episodes))
    progress("records", 0, len(records))
    for done, record in enumerate(records, 1):
        if record.cid not in in_blockstore and not await kubo.has_block(record.cid):
            report["missing"].append({"cid": record.cid, "episode": record.episode, "seq": record.seq})
        elif record.cid not in pins:
            report["unpinned"].append(record.cid)
            if repair:
                await kubo.pin_add(record.cid)
                report["repaired"].append({"pinned": record.cid})
        progress("records", done, len(records))
    indexed = {r.cid for r in records}
    by_pseudonym = {service.sealer.episode_pseudonym(e.id): e.id for e in episodes}
    unindexed = sorted(pins - indexed)
    progress("pins", 0, len(unindexed))
    for done, pin in enumerate(unindexed, 1):
        # Only record nodes (dag-cbor, sha2-256): attachments and raw data are pinned by their owners.
        node = await _own_record_node(service, pin) if pin.startswith("bafyrei") else None
        if node is not None:
            fate = await _fate(service, pin, node, by_pseudonym)
            if fate == PENDING:
                report["pending"].append(pin)
            elif fate == ORPHAN:
                report["orphans"].append(pin)
                if repair and await kubo.pin_rm(pin):
                    report["repaired"].append({"unpinned": pin})
        progress("pins", done, len(unindexed))
    if fhir is not None:
        await fhir.finish(records, report, repair, progress)
    report["clean"] = not (report["missing"] or report["broken"]
                           or ((report["unpinned"] or report["unindexed"]) and not repair))
    replication = service.replication
    if replication.replicas > 1 or replication.services:
        pinned_here = pins | {r["pinned"] for r in report["repaired"] if "pinned" in r}
        report["replicas"] = await _replicas(service, records, pinned_here, repair, progress)
        report["clean"] = report["clean"] and not report["replicas"]["under_replicated"]
    return report


async def _replicas(service: RecordService, records: list, pinned_here: set[str], repair: bool,
                    progress: Progress) -> dict[str, Any]:
    """Which nodes hold each indexed record: this one and the replica services that report it
    pinned; the records held by fewer than ``records.replicas`` (after ``repair``, if asked)."""
    replication = service.replication
    cids = [r.cid for r in records]
    progress("replicas", 0, len(replication.services))
    answers = await replication.report(cids)
    progress("replicas", len(answers), len(replication.services))

    def where(cid: str) -> list[str]:
        return (["local"] if cid in pinned_here else []) + [n for n, a in answers.items() if cid in a["pinned"]]
    under = {r.cid: r for r in records if len(where(r.cid)) < replication.replicas}
    repaired: dict[str, list[str]] = {}
    if repair and under:
        for name, answer in answers.items():
            lacking = [cid for cid in under if cid not in answer["pinned"]]
            if lacking and await replication.repair(name, lacking) is None:
                answer["pinned"] |= set(lacking)
                repaired[name] = lacking
    services = {name: {"pinned": len(a["pinned"]), "missing": len(cids) - len(a["pinned"]), "error": a["error"]}
                for name, a in answers.items()}
    return {"replicas": replication.replicas, "services": services, "repaired": repaired,
            "under_replicated": [{"cid": cid, "episode": r.episode, "seq": r.seq, "pinned_on": where(cid)}
                                 for cid, r in under.items() if len(where(cid)) < replication.replicas]}


class _FhirIndexCheck:
    """Records whose embedded FHIR resources the search index lacks. The chain walks hand it
    every record they opened (``look``), so a record is read and decrypted once per check;
    ``finish`` reads the records no walk opened (below a break, or appended since the walk),
    then reports — and on repair indexes — what is lacking, in the order of the episodes (the
    index numbers a resource's versions in the order they are added)."""

    def __init__(self, service: RecordService) -> None:
        self.service = service
        self.facade = FhirFacade(service)
        self.looked_at: set[str] = set()
        self.lacking: dict[str, list[FhirEntry]] = {}

    async def look(self, cid: str, record: ClientRecord) -> None:
        self.looked_at.add(cid)
        have = await self.service.storage.fhir.pointers(cid)
        lacking = [e for e in self.facade.entries(record, cid) if e.pointer not in have]
        if lacking:
            self.lacking[cid] = lacking

    async def finish(self, records: list[IndexedRecord], report: dict[str, Any], repair: bool,
                     progress: Progress) -> None:
        service, rest = self.service, [r for r in records if r.cid not in self.looked_at]
        progress("index", 0, len(rest))
        nodes: dict[str, dict[str, Any]] = {}  # read ahead down the episodes' chains, 500 records at a time
        for done, record in enumerate(rest, 1):
            if (done - 1) % CHAIN_AHEAD == 0:
                nodes = await service.chain_nodes(rest[done - 1:done - 1 + CHAIN_AHEAD])
            try:  # records that cannot be read are reported above, or erased
                await self.look(record.cid, await service.read_indexed(record.cid, nodes.get(record.cid)))
            except MediconError:
                pass
            progress("index", done, len(rest))
        for record in records:
            lacking = self.lacking.get(record.cid)
            if lacking:
                report["unindexed"].append(record.cid)
                if repair:
                    await service.storage.fhir.add(lacking)
                    report["repaired"].append({"indexed": record.cid})


async def _own_record_node(service: RecordService, cid: str) -> dict[str, Any] | None:
    try:
        node = await service.kubo.dag_get(cid)
    except MediconError:
        return None
    return node if await service.sealer.is_record_node(node) else None


async def _fate(service: RecordService, cid: str, node: dict[str, Any], by_pseudonym: dict[str, str]) -> str:
    """Whether a pinned record node the index did not hold (when it was read) is committed by
    now, can never be (an orphan), or may still be (its position is free)."""
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
    if episode.length == seq and episode.status == "open":
        prev = node.get("prev")
        prev = prev.get("/") if isinstance(prev, dict) else prev
        # Its append may still move the head (it expects exactly this one); otherwise no append
        # can ever place it, since heads only move forward.
        return PENDING if prev == episode.head else ORPHAN
    if episode.length == seq:  # closed before this node could be appended
        return ORPHAN
    return PENDING  # beyond the episode's end: not a node this index ever expected
