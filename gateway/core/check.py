"""``medicon-gateway check``: compare the head store with Kubo after a crash or an incident.

Every indexed record must be in Kubo and pinned (the gateway pins each record recursively as
it stores it), every chain verifying. Pins of record nodes the index does not know are
reported as orphans: a record stored and pinned by an append that crashed before its head
moved (never acknowledged). With the ``fhir_index`` plugin loaded, every FHIR resource a
record embeds must be in the FHIR search index (the plugin indexes on commit, and a failure
there never undoes the append): records missing from it are ``unindexed``. ``--repair``
re-pins unpinned records, removes orphan pins and indexes what the FHIR index lacks.
Runs on the record service alone: no web server.
"""

from __future__ import annotations

from typing import Any, Callable

from ..config import Config
from ..errors import MediconError
from .fhir_facade import FhirFacade
from .service import RecordService


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
    pins = await kubo.recursive_pins()
    report: dict[str, Any] = {"episodes": len(episodes), "records": len(records), "missing": [],
                              "unpinned": [], "broken": [], "orphans": [], "unindexed": [], "repaired": []}
    progress("records", 0, len(records))
    for done, record in enumerate(records, 1):
        if not await kubo.has_block(record.cid):
            report["missing"].append({"cid": record.cid, "episode": record.episode, "seq": record.seq})
        elif record.cid not in pins:
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
    indexed = {r.cid for r in records}
    unindexed = sorted(pins - indexed)
    progress("pins", 0, len(unindexed))
    for done, pin in enumerate(unindexed, 1):
        # Only record nodes: attachments and raw data are pinned by their owners.
        if pin.startswith("bafyrei") and await _is_record_node(service, pin):
            report["orphans"].append(pin)
            if repair:
                await kubo.pin_rm(pin)
                report["repaired"].append({"unpinned": pin})
        progress("pins", done, len(unindexed))
    if service.plugins.pm.get_plugin("fhir_index") is not None:
        await _check_fhir_index(service, records, report, repair, progress)
    report["clean"] = not (report["missing"] or report["broken"]
                           or ((report["unpinned"] or report["unindexed"]) and not repair))
    return report


async def _check_fhir_index(service: RecordService, records: list, report: dict[str, Any], repair: bool,
                            progress: Progress) -> None:
    """Records whose embedded FHIR resources the search index lacks (indexed on repair, in the
    order of their episodes). Records that cannot be read are reported above, or erased."""
    facade = FhirFacade(service)
    progress("index", 0, len(records))
    for done, record in enumerate(records, 1):
        try:
            stored = await service.read_indexed(record.cid)
        except MediconError:
            stored = None
        if stored is not None:
            have = await service.storage.fhir.pointers(record.cid)
            lacking = [e for e in facade.entries(stored, record.cid) if e.pointer not in have]
            if lacking:
                report["unindexed"].append(record.cid)
                if repair:
                    await service.storage.fhir.add(lacking)
                    report["repaired"].append({"indexed": record.cid})
        progress("index", done, len(records))


async def _is_record_node(service: RecordService, cid: str) -> bool:
    try:
        node = await service.kubo.dag_get(cid)
    except MediconError:
        return False
    return await service.sealer.is_record_node(node)
