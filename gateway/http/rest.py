"""The gateway's own REST API, ``/medicon/v1``: episodes, records, history and verification.

Errors are ``{"error": {"status": n, "message": "...", ...}}`` (``Error`` in the OpenAPI
document served at ``/medicon/v1/openapi.json``).
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import web

from ..core import strictjson
from ..core.exactjson import Raw, render
from ..core.records import EPISODE_OPENED, ChainConflict, ClientRecord
from ..errors import Invalid, NotFound, TooLarge
from ..storage.model import Episode
from . import commands
from .appkeys import CONFIG, SERVICE
from .body import body_read
from .context import caller
from .intercepts import idempotency_key

OPENAPI = Path(__file__).with_name("openapi.json")
routes = web.RouteTableDef()
PREFIX = "/medicon/v1"
MAX_PAGE = 500
# ``limit`` and ``cursor`` as the OpenAPI document has them (ASCII digits, optional minus), and
# small enough for the head store's 64-bit integers.
_QUERY_INT = re.compile(r"-?[0-9]{1,18}")


async def _json_body(request: web.Request) -> ClientRecord:
    """The request's record: its JSON text, kept as sent, and its parsed value."""
    limit = request.app[CONFIG].records.max_record_size
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"a record is at most {limit} bytes of JSON")
    data = bytearray()
    while len(data) <= limit and (chunk := await body_read(request, request.content.read(limit + 1 - len(data)))):
        data += chunk
    if len(data) > limit:
        raise TooLarge(f"a record is at most {limit} bytes of JSON")
    try:
        doc = ClientRecord.from_text(bytes(data))
    except strictjson.BadJSON as bad:
        raise Invalid(f"the request body must be a JSON object: {bad}") from None
    if not isinstance(doc.parsed, dict):
        raise Invalid("the request body must be a JSON object")
    return doc


def _json(body: Any, status: int = 200) -> web.Response:
    """A JSON answer in which records (``Raw``) are written byte for byte as stored."""
    return web.Response(text=render(body), status=status, content_type="application/json")


def _episode(ep: Episode) -> dict[str, Any]:
    return asdict(ep)


async def _append(request: web.Request, doc: ClientRecord) -> web.Response:
    try:
        appended = await request.app[SERVICE].append(doc, caller(request), idempotency_key(request))
    except ChainConflict as err:
        if err.episode is not None:
            err.details["current"] = _episode(err.episode)
        raise
    return _appended(appended)


def _appended(appended) -> web.Response:
    body = {"cid": appended.cid, "seq": appended.seq, "episode": _episode(appended.episode),
            "record": Raw(appended.record.text)}
    return _json(body, status=201 if appended.created else 200)


@routes.post(PREFIX + "/patients/{patient}/episodes")
async def open_episode(request: web.Request) -> web.Response:
    """Open an episode for a patient; the body is the episode-opened record without its envelope
    ids (``episode`` may be given; a new id is made otherwise, the same one for a retry with the
    same ``Idempotency-Key``)."""
    doc = await _json_body(request)
    fields = {"patient": request.match_info["patient"]}
    if "schema" not in doc:
        fields["schema"] = EPISODE_OPENED
    if "episode" not in doc:
        fields["episode"] = request.app[SERVICE].new_episode_id(caller(request), idempotency_key(request))
    return await _append(request, doc.with_fields(**fields))


@routes.get(PREFIX + "/patients/{patient}/episodes")
async def list_episodes(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status not in (None, "open", "closed"):
        raise Invalid("status must be 'open' or 'closed'")
    patient = request.match_info["patient"]
    episodes = await request.app[SERVICE].episodes_of(caller(request), patient, status)
    return web.json_response({"patient": patient, "episodes": [_episode(e) for e in episodes]})


@routes.post(PREFIX + "/episodes/{episode}/records")
async def append_record(request: web.Request) -> web.Response:
    """Append a record (encounter, amendment, episode-closed) to an episode."""
    doc = await _json_body(request)
    try:
        appended = await request.app[SERVICE].append_to(caller(request), request.match_info["episode"], doc,
                                                        idempotency_key(request))
    except ChainConflict as err:
        if err.episode is not None:
            err.details["current"] = _episode(err.episode)
        raise
    return _appended(appended)


@routes.get(PREFIX + "/episodes/{episode}")
async def get_episode(request: web.Request) -> web.Response:
    episode = await request.app[SERVICE].episode_for(caller(request), request.match_info["episode"], "chain:read")
    return web.json_response(_episode(episode))


@routes.get(PREFIX + "/episodes/{episode}/history")
async def history(request: web.Request) -> web.Response:
    """Records in chronological order; ``cursor`` is the ``next`` of the previous page."""
    limit, after = request.query.get("limit", "50"), request.query.get("cursor", "-1")
    if not (_QUERY_INT.fullmatch(limit) and _QUERY_INT.fullmatch(after)):
        raise Invalid("limit and cursor must be integers of at most 18 digits")
    limit, after = int(limit), int(after)
    if not 1 <= limit <= MAX_PAGE:
        raise Invalid(f"limit must be between 1 and {MAX_PAGE}")
    episode, rows, bodies = await request.app[SERVICE].history(caller(request), request.match_info["episode"],
                                                               after, limit)
    records = [{"cid": r.cid, "seq": r.seq, "record": Raw(body.text)} for r, body in zip(rows, bodies)]
    more = bool(rows) and rows[-1].seq < episode.length - 1
    return _json({"episode": _episode(episode), "records": records,
                  "next": str(rows[-1].seq) if more else None})


@routes.get(PREFIX + "/records/{cid}")
async def get_record(request: web.Request) -> web.Response:
    cid = request.match_info["cid"]
    indexed, record = await request.app[SERVICE].record_for(caller(request), cid)
    return _json({"cid": indexed.cid, "episode": indexed.episode, "seq": indexed.seq,
                  "record": Raw(record.text)})


@routes.get(PREFIX + "/episodes/{episode}/verify")
async def verify(request: web.Request) -> web.Response:
    head = request.query.get("head")
    return web.json_response(await request.app[SERVICE].verify(caller(request), request.match_info["episode"], head))


@routes.get(PREFIX + "/schemas")
async def schemas(request: web.Request) -> web.Response:
    """The record kinds; with ``full=1`` also every loaded schema document by ``$id`` (the
    abstract ones too, so a client can resolve the kinds' ``$ref``s, e.g. to build a form)."""
    service = request.app[SERVICE]
    await service.authorize(caller(request), "node:info")
    full = request.query.get("full", "0")
    if full not in ("0", "1"):
        raise Invalid("full must be 0 or 1")
    body: dict[str, Any] = {"kinds": service.schemas.kinds()}
    if full == "1":
        body["schemas"] = service.schemas.documents()
    return web.json_response(body)


@routes.get(PREFIX + "/whoami")
async def whoami(request: web.Request) -> web.Response:
    """The caller as the gateway sees it (principal id, role, scope), so a client such as the
    timeline UI knows what to show; never the credential itself."""
    await request.app[SERVICE].authorize(caller(request), "node:info")
    who = caller(request).principal
    return web.json_response({
        "principal": who.id, "role": who.role,
        "patients": None if who.patients is None else sorted(who.patients),
        "episodes": None if who.episodes is None else sorted(who.episodes),
    })


@routes.get(PREFIX + "/plugins")
async def loaded_plugins(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    await service.authorize(caller(request), "node:info")
    return web.json_response({"plugins": service.plugins.describe()})


@routes.get(PREFIX + "/commands")
async def rpc_commands(request: web.Request) -> web.Response:
    """The RPC command table: what the gateway forwards, intercepts or refuses, and the options
    and arguments it takes from a client."""
    await request.app[SERVICE].authorize(caller(request), "node:info")
    return web.json_response({"commands": commands.describe()})


@routes.get(PREFIX + "/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    await request.app[SERVICE].authorize(caller(request), "node:info")
    return web.Response(text=OPENAPI.read_text(), content_type="application/json")


@routes.route("*", PREFIX + "/{tail:.*}")
async def not_found(request: web.Request) -> web.Response:
    raise NotFound(f"no such endpoint: {request.method} {request.path}")
