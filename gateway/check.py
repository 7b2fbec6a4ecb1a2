"""``medicon-gateway check``: compare the head store with Kubo after a crash or an incident.

Every indexed record must be in Kubo and pinned (the gateway pins each record recursively as
it stores it), every chain verifying. Pins of record nodes the index does not know are
reported as orphans: a record stored and pinned by an append that crashed before its head
moved (never acknowledged). ``--repair`` re-pins unpinned records and removes orphan pins.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import chain, protect
from .app import create_app
from .appkeys import KUBO, STORE
from .config import Config
from .errors import GatewayError


async def check(config: Config, *, repair: bool = False) -> dict[str, Any]:
    app = create_app(config)
    runner = web.AppRunner(app)
    await runner.setup()  # runs the startup contexts: keys, Kubo session, head store, schemas
    try:
        return await _check(app, repair)
    finally:
        await runner.cleanup()


async def _check(app: web.Application, repair: bool) -> dict[str, Any]:
    store, kubo = app[STORE], app[KUBO]
    episodes = await store.episodes()
    records = await store.all_records()
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
        verdict = await chain.verify(app, episode.id)
        if not verdict["ok"]:
            report["broken"].append(verdict)
    indexed = {r.cid for r in records}
    for pin in sorted(pins - indexed):
        if not pin.startswith("bafyrei") or not await _is_record_node(app, pin):
            continue  # attachments and raw data pinned by their owners
        report["orphans"].append(pin)
        if repair:
            await kubo.pin_rm(pin)
            report["repaired"].append({"unpinned": pin})
    report["clean"] = not (report["missing"] or report["broken"]
                           or (report["unpinned"] and not repair))
    return report


async def _is_record_node(app: web.Application, cid: str) -> bool:
    try:
        node = await app[KUBO].dag_get(cid)
    except GatewayError:
        return False
    return isinstance(node, dict) and node.get("v") == protect.NODE_VERSION and protect.signature_ok(app, node)
