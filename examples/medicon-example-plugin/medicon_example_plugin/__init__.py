"""Saint Example Hospital's plugin for the Medicon Gateway: what an institution adds, in one module.

* a record kind of its own, ``wound-assessment/v1`` (``schemas/``, via ``medicon_schema_dirs``);
* house rules JSON Schema cannot say (``medicon_validate_record``);
* a route, ``GET /medicon/example/v1/episodes/{episode}/wounds``: an episode's wound
  assessments with their area and whether the wound got worse (``medicon_register_routes``);
* a webhook: each committed wound assessment is announced to the hospital's wound-care system
  (``medicon_record_committed``), in the background so appends never wait for it.

Settings come from the environment, outside the gateway's own ``MEDICON_*`` namespace (which the
gateway's config loader reserves): ``EXAMPLE_WOUNDS_WEBHOOK_URL`` (none: no webhook) and
``EXAMPLE_WOUNDS_WEBHOOK_SECRET`` (signs each delivery with HMAC-SHA256).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.hookspecs import hookimpl
from gateway.http.appkeys import SERVICE
from gateway.http.context import caller

NAME = "medicon_example_plugin"  # the entry point's name: the plugin's name in /medicon/v1/plugins
WOUND = "https://st-example.hospital/schemas/wound-assessment/v1"
ROUTE = "/medicon/example/v1/episodes/{episode}/wounds"
SIGNATURE_HEADER = "X-Example-Signature"
PAGE = 500  # the gateway's largest history page

log = logging.getLogger(__name__)


# --- the record kind and its house rules --------------------------------------------------------

@hookimpl
def medicon_schema_dirs():
    return [Path(__file__).parent / "schemas"]


@hookimpl
def medicon_validate_record(record, schema_id):
    """Wound-care policy WC-12: length is the longest dimension, and a stage 4 wound is never
    recorded without a surgical review requested. Other kinds are none of this plugin's business."""
    if schema_id != WOUND:
        return []
    body, problems = record["body"], []
    if body["width_mm"] > body["length_mm"]:
        problems.append(("/body/width_mm", "must not exceed length_mm: length is the longest dimension (WC-12)"))
    if body["stage"] == 4 and not body.get("surgical_review", {}).get("requested"):
        problems.append(("/body/surgical_review", "a stage 4 wound needs a surgical review requested (WC-12)"))
    return problems


# --- the route ----------------------------------------------------------------------------------

async def wound_summary(request: web.Request) -> web.Response:
    """The episode's wound assessments in order. ``service.history`` authorizes the caller
    (``record:read`` on the episode, within their scope: out of scope is 404) before anything is
    read; a handler reading something the service does not guard calls
    ``service.authorize(caller(request), action, resource)`` first."""
    service = request.app[SERVICE]
    who = caller(request)
    episode_id = request.match_info["episode"]
    wounds, after, last_stage = [], -1, {}
    while True:
        episode, rows, records = await service.history(who, episode_id, after, PAGE)
        for row, record in zip(rows, records):
            if record["schema"] != WOUND:
                continue
            body = record["body"]
            site = body["site"]
            wounds.append({"cid": row.cid, "seq": row.seq, "recorded_at": record["recorded_at"], "site": site,
                           # numbers written with a fraction reach plugins as decimal.Decimal
                           "stage": body["stage"], "area_mm2": float(round(body["length_mm"] * body["width_mm"], 1)),
                           "worse": site in last_stage and body["stage"] > last_stage[site]})
            last_stage[site] = body["stage"]
        if len(rows) < PAGE:
            break
        after = rows[-1].seq
    return web.json_response({"episode": episode.id, "wounds": wounds})


@hookimpl
def medicon_register_routes():
    return [("GET", ROUTE, wound_summary)]


# --- the webhook --------------------------------------------------------------------------------

@dataclass
class Webhook:
    url: str
    secret: bytes | None
    session: aiohttp.ClientSession
    pending: set[asyncio.Task] = field(default_factory=set)

    def announce(self, event: dict) -> None:
        task = asyncio.create_task(self._deliver(event))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _deliver(self, event: dict) -> None:
        body = json.dumps(event, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        try:
            async with self.session.post(self.url, data=body, headers=headers) as resp:
                if resp.status >= 300:
                    log.warning("wound webhook answered %d for %s", resp.status, event["cid"])
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("wound webhook failed for %s: %s", event["cid"], type(exc).__name__)


@hookimpl
def medicon_startup(service):
    url = os.environ.get("EXAMPLE_WOUNDS_WEBHOOK_URL")
    if url:
        secret = os.environ.get("EXAMPLE_WOUNDS_WEBHOOK_SECRET")
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        service.resources[NAME] = Webhook(url, secret.encode() if secret else None, session)


@hookimpl
async def medicon_shutdown(service):
    webhook = service.resources.pop(NAME, None)
    if webhook is not None:
        await asyncio.gather(*webhook.pending, return_exceptions=True)  # deliver what was committed
        await webhook.session.close()


@hookimpl
def medicon_record_committed(record, cid, service):
    """A thin event: what happened and the record's CID, never the patient or the episode; the
    receiver reads the record through the gateway with a token of its own."""
    webhook = service.resources.get(NAME)
    if webhook is None or record["schema"] != WOUND:
        return
    webhook.announce({"event": "wound-assessment.committed", "cid": cid, "seq": record["seq"],
                      "stage": record["body"]["stage"], "recorded_at": record["recorded_at"]})
