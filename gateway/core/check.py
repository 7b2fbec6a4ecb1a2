"""``medicon-gateway check``: compare the head store with Kubo after a crash or an incident.

Every indexed record must be in Kubo and pinned (the gateway pins each record recursively as
it stores it), every chain verifying. Episode after episode, the chain is walked in one stream
from Kubo (``verify_episode``), then the episode's records are checked a page at a time; a
record whose block the walk read needs no second look in Kubo's blockstore. Then Kubo's pins
are read as they arrive, and pins of record nodes the index does not hold are examined one by
one: a node
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

from typing import Any, AsyncIterator, Callable

from ..config import Config
from ..errors import MediconError
from ..kubo import ipld
from ..storage.model import Episode, FhirEntry, IndexedRecord
from .fhir_facade import FhirFacade
from .records import ClientRecord
from .service import RecordService

ORPHAN, COMMITTED, PENDING = "orphan", "committed", "pending"
PAGE = 500  # indexed records checked at a time (an episode's, page after page); pins looked up at a time


# ``progress(phase, done, total)``: told as each phase (``records``: the episodes walked and
# their records checked; ``pins``: pinned record nodes the index does not hold) starts and
# after each step, so a command can show how far it got; the core prints nothing.
Progress = Callable[[str, int, int], None]


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


async def check(config: Config, *, repair: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    async with RecordService.open(config) as service:
        return await check_service(service, repair=repair, progress=progress)


async def check_service(service: RecordService, *, repair: bool = False,
                        progress: Progress | None = None) -> dict[str, Any]:
    """The episodes one after another (in the order of their ids, read a page at a time), each
    walked and then its records checked a page at a time; then the pins. What it holds grows
    with the longest episode and with what it finds wrong, not with the number of records or
    episodes."""
    progress = progress or _no_progress
    report: dict[str, Any] = {"episodes": 0, "records": 0, "missing": [],
                              "unpinned": [], "broken": [], "orphans": [], "pending": [], "unindexed": [],
                              "repaired": []}
    fhir = _FhirIndexCheck(service) if service.plugins.pm.get_plugin("fhir_index") is not None else None
    replication = service.replication
    replicas = _ReplicaCheck(service, repair) if replication.replicas > 1 or replication.services else None
    total = await service.storage.heads.record_count()
    progress("records", 0, total)
    async for episode in _episodes(service):
        report["episodes"] += 1
        # (an episode opened since the count can take the pass past it)
        await _check_episode(service, episode, report, repair, fhir, replicas,
                             lambda: progress("records", report["records"], max(total, report["records"])))
    await _check_pins(service, report, repair, progress)
    report["clean"] = not (report["missing"] or report["broken"]
                           or ((report["unpinned"] or report["unindexed"]) and not repair))
    if replicas is not None:
        report["replicas"] = replicas.report()
        report["clean"] = report["clean"] and not report["replicas"]["under_replicated"]
    return report


async def _episodes(service: RecordService) -> AsyncIterator[Episode]:
    """Every episode, in the order of their ids, read a page at a time."""
    after = ""
    while page := await service.storage.heads.episodes_after(after, PAGE):
        for episode in page:
            yield episode
        after = page[-1].id


async def _check_episode(service: RecordService, episode: Episode, report: dict[str, Any], repair: bool,
                         fhir: "_FhirIndexCheck | None", replicas: "_ReplicaCheck | None",
                         advanced: Callable[[], None]) -> None:
    """Walk the episode from the head it had when the check read it (``verify_episode``: one
    stream from Kubo), then check its indexed records up to that head, a page at a time:
    each in Kubo (a block the walk read needs no second look), pinned, FHIR-indexed and
    replicated. Pins are asked for after the page was read from the index: a record indexed
    was pinned before its head moved, so it is pinned unless its pin was removed since."""
    in_blockstore: set[str] = set()  # the blocks the walk read from Kubo's blockstore
    verdict = await service.verify_episode(episode, streamed=in_blockstore, opened=fhir.look if fhir else None)
    if not verdict["ok"]:
        report["broken"].append(verdict)
    kubo, last = service.kubo, -1
    while last + 1 < episode.length:
        page = await service.storage.heads.history(episode.id, last, min(PAGE, episode.length - 1 - last))
        if not page:
            break
        last = page[-1].seq
        present = []
        for record in page:
            if record.cid in in_blockstore or await kubo.has_block(record.cid):
                present.append(record)
            else:
                report["missing"].append({"cid": record.cid, "episode": record.episode, "seq": record.seq})
        pinned = await kubo.pinned_among([record.cid for record in present])
        for record in present:
            if record.cid not in pinned:
                report["unpinned"].append(record.cid)
                if repair:
                    await kubo.pin_add(record.cid)
                    report["repaired"].append({"pinned": record.cid})
                    pinned.add(record.cid)
        if fhir is not None:
            await fhir.check(page, report, repair)
        if replicas is not None:
            await replicas.check(page, pinned)
        report["records"] += len(page)
        advanced()
    if fhir is not None:
        fhir.forget()


async def _check_pins(service: RecordService, report: dict[str, Any], repair: bool, progress: Progress) -> None:
    """Pinned record nodes the index does not hold, examined one by one (``_fate``). Kubo's
    list of pins is read as it arrives and looked up in the index a page at a time; only
    record nodes (dag-cbor, sha2-256) are examined: attachments and raw data are pinned by
    their owners."""
    heads, unindexed, page = service.storage.heads, [], []

    async def look_up() -> None:
        held = await heads.indexed_among(page)
        unindexed.extend(pin for pin in page if pin not in held)
        page.clear()
    async for pin in service.kubo.recursive_pins():
        if pin.startswith("bafyrei"):
            page.append(pin)
            if len(page) == PAGE:
                await look_up()
    await look_up()
    unindexed.sort()
    progress("pins", 0, len(unindexed))
    nodes: dict[str, dict[str, Any]] = {}  # the pins that are record nodes of this deployment: their position
    for done, pin in enumerate(unindexed, 1):
        node = await _own_record_node(service, pin)
        if node is not None:
            pseudonym = node.get("episode")
            nodes[pin] = {"episode": pseudonym if isinstance(pseudonym, str) else None, "seq": node.get("seq"),
                          "prev": ipld.link_target(node.get("prev"))}
        progress("pins", done, len(unindexed))
    episode_of = await _episodes_named(service, list(nodes.values()))
    for pin, node in nodes.items():
        fate = await _fate(service, pin, node, episode_of.get(node["episode"]))
        if fate == PENDING:
            report["pending"].append(pin)
        elif fate == ORPHAN:
            report["orphans"].append(pin)
            if repair and await service.kubo.pin_rm(pin):
                report["repaired"].append({"unpinned": pin})


async def _episodes_named(service: RecordService, nodes: list[dict[str, Any]]) -> dict[str, str]:
    """The episode ids behind the nodes' episode pseudonyms (those of episodes in the index):
    a node's ``prev``, if indexed, names its episode; the rest (openings, whose ``prev`` is
    null) take one pass over the episodes for all of them, read after the nodes were."""
    heads, sealer = service.storage.heads, service.sealer
    named: dict[str, str] = {}
    wanted = {node["episode"] for node in nodes} - {None}
    for node in nodes:
        if node["episode"] in wanted and isinstance(node["prev"], str):
            below = await heads.record(node["prev"])
            if below is not None and sealer.episode_pseudonym(below.episode) == node["episode"]:
                named[node["episode"]] = below.episode
                wanted.discard(node["episode"])
    if wanted:
        async for episode in _episodes(service):
            pseudonym = sealer.episode_pseudonym(episode.id)
            if pseudonym in wanted:
                named[pseudonym] = episode.id
                wanted.discard(pseudonym)
                if not wanted:
                    break
    return named


class _ReplicaCheck:
    """Which nodes hold each indexed record, a page of records at a time: this one and the
    replica services that report it pinned; the records held by fewer than
    ``records.replicas`` (after ``repair``, if asked: the services lacking them pin them)."""

    def __init__(self, service: RecordService, repair: bool) -> None:
        self.replication, self.repair = service.replication, repair
        self.services = {s.name: {"pinned": 0, "missing": 0, "error": None} for s in self.replication.services}
        self.repaired: dict[str, list[str]] = {}
        self.under_replicated: list[dict[str, Any]] = []

    async def check(self, page: list[IndexedRecord], pinned_here: set[str]) -> None:
        replicas, cids = self.replication.replicas, [r.cid for r in page]
        answers = await self.replication.report(cids)

        def where(cid: str) -> list[str]:
            return (["local"] if cid in pinned_here else []) + [n for n, a in answers.items() if cid in a["pinned"]]
        under = [r for r in page if len(where(r.cid)) < replicas]
        if self.repair and under:
            for name, answer in answers.items():
                lacking = [r.cid for r in under if r.cid not in answer["pinned"]]
                if lacking and await self.replication.repair(name, lacking) is None:
                    answer["pinned"] |= set(lacking)
                    self.repaired.setdefault(name, []).extend(lacking)
        for name, answer in answers.items():
            held = self.services.setdefault(name, {"pinned": 0, "missing": 0, "error": None})
            held["pinned"] += len(answer["pinned"])
            held["missing"] += len(cids) - len(answer["pinned"])
            held["error"] = held["error"] or answer["error"]
        self.under_replicated += [{"cid": r.cid, "episode": r.episode, "seq": r.seq, "pinned_on": where(r.cid)}
                                  for r in under if len(where(r.cid)) < replicas]

    def report(self) -> dict[str, Any]:
        return {"replicas": self.replication.replicas, "services": self.services, "repaired": self.repaired,
                "under_replicated": self.under_replicated}


class _FhirIndexCheck:
    """Records whose embedded FHIR resources the search index lacks, an episode at a time.
    The walk hands it every record it opened (``look``), so a record is read and decrypted
    once per check; ``check`` reads the records of a page no walk opened (below a break, or
    erased), then reports — and on repair indexes — what is lacking, in the episode's order
    (the index numbers a resource's versions in the order they are added)."""

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

    async def check(self, page: list[IndexedRecord], report: dict[str, Any], repair: bool) -> None:
        service, rest = self.service, [r for r in page if r.cid not in self.looked_at]
        nodes = await service.chain_nodes(rest) if rest else {}  # read a chain at a time
        for record in rest:
            try:  # records that cannot be read are reported above, or erased
                await self.look(record.cid, await service.read_indexed(record.cid, nodes.get(record.cid)))
            except MediconError:
                pass
        for record in page:
            lacking = self.lacking.pop(record.cid, None)
            if lacking:
                report["unindexed"].append(record.cid)
                if repair:
                    await service.storage.fhir.add(lacking)
                    report["repaired"].append({"indexed": record.cid})

    def forget(self) -> None:
        """The episode is done: what the walk opened of it is not needed any more."""
        self.looked_at.clear()
        self.lacking.clear()


async def _own_record_node(service: RecordService, cid: str) -> dict[str, Any] | None:
    try:
        node = await service.kubo.dag_get(cid)
    except MediconError:
        return None
    return node if await service.sealer.is_record_node(node) else None


async def _fate(service: RecordService, cid: str, node: dict[str, Any], episode_id: str | None) -> str:
    """Whether a pinned record node the index did not hold (when it was read) is committed by
    now, can never be (an orphan), or may still be (its position is free). ``node``: its
    ``seq``, ``prev`` and episode pseudonym; ``episode_id``: the indexed episode that pseudonym
    names, if any."""
    heads = service.storage.heads
    seq = node["seq"]
    if not isinstance(seq, int) or seq < 0:
        return PENDING
    if episode_id is None:  # an episode not opened yet, or never
        return PENDING
    episode: Episode | None = await heads.get_episode(episode_id)
    if episode is None:
        return PENDING
    if episode.length > seq:  # the position is taken, for good: by this node or by another
        taken = await heads.history(episode_id, seq - 1, 1)
        return COMMITTED if taken and taken[0].cid == cid else ORPHAN
    if episode.length == seq and episode.status == "open":
        # Its append may still move the head (it expects exactly this one); otherwise no append
        # can ever place it, since heads only move forward.
        return PENDING if node["prev"] == episode.head else ORPHAN
    if episode.length == seq:  # closed before this node could be appended
        return ORPHAN
    return PENDING  # beyond the episode's end: not a node this index ever expected
