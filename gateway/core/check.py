"""``medicon-gateway check``: compare the head store with Kubo after a crash or an incident.

Every indexed record must be in Kubo and pinned (the gateway pins each record recursively as
it stores it), every chain verifying. Pins of record nodes the index does not know are
reported as orphans: a record stored and pinned by an append that crashed before its head
moved (never acknowledged). ``--repair`` re-pins unpinned records and removes orphan pins.
Runs on the record service alone: no web server.
"""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..errors import MediconError
from .service import RecordService


async def check(config: Config, *, repair: bool = False) -> dict[str, Any]:
    async with RecordService.open(config) as service:
        return await check_service(service, repair=repair)


async def check_service(service: RecordService, *, repair: bool = False) -> dict[str, Any]:
    heads, kubo = service.storage.heads, service.kubo
    episodes = await heads.episodes()
    records = await heads.all_records()
    pins = await kubo.recursive_pins()
    report: dict[str, Any] = {"episodes": len(episodes), "records": len(records), "missing": [],
                              "unpinned": [], "broken": [], "orphans": [], "repaired": []}
    for record in records:
        if not await kubo.has_block(record.cid):
            report["missing"].append({"cid": record.cid, "episode": record.episode, "seq": record.seq})
        elif record.cid not in pins:
            report["unpinned"].append(record.cid)
            if repair:
                await kubo.pin_add(record.cid)
                report["repaired"].append({"pinned": record.cid})
    for episode in episodes:
        verdict = await service.verify_episode(episode)
        if not verdict["ok"]:
            report["broken"].append(verdict)
    indexed = {r.cid for r in records}
    for pin in sorted(pins - indexed):
        if not pin.startswith("bafyrei") or not await _is_record_node(service, pin):
            continue  # attachments and raw data pinned by their owners
        report["orphans"].append(pin)
        if repair:
            await kubo.pin_rm(pin)
            report["repaired"].append({"unpinned": pin})
    report["clean"] = not (report["missing"] or report["broken"]
                           or (report["unpinned"] and not repair))
    return report


async def _is_record_node(service: RecordService, cid: str) -> bool:
    try:
        node = await service.kubo.dag_get(cid)
    except MediconError:
        return False
    return await service.sealer.is_record_node(node)
