"""``medicon-gateway check``: compare the head store with Kubo after a crash or an incident.

Every indexed record must be in Kubo and pinned (the gateway pins each record recursively as
it stores it), every chain verifying. Pins of record nodes the index does not know are
reported as orphans: a record stored and pinned by an append that crashed before its head
moved (never acknowledged). ``--repair`` re-pins unpinned records and removes orphan pins.
Runs on the record service alone: no web server.
"""

from __future__ import annotations

from typing import Any, Callable

from ..config import Config
from ..errors import MediconError
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
                              "unpinned": [], "broken": [], "orphans": [], "repaired": []}
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
    report["clean"] = not (report["missing"] or report["broken"]
                           or (report["unpinned"] and not repair))
    return report


async def _is_record_node(service: RecordService, cid: str) -> bool:
    try:
        node = await service.kubo.dag_get(cid)
    except MediconError:
        return False
    return await service.sealer.is_record_node(node)
