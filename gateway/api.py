"""The gateway's own REST API, ``/medicon/v1``: episodes, records, history and verification.

Errors are ``{"error": {"status": n, "message": "...", ...}}`` (``Error`` in the OpenAPI
document served at ``/medicon/v1/openapi.json``).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import web

from . import auth, chain, plugins, proxy, records, strictjson
from .appkeys import CONFIG, PLUGINS, SCHEMAS, STORE
from .errors import GatewayError
from .store import Episode

OPENAPI = Path(__file__).with_name("openapi.json")
routes = web.RouteTableDef()
PREFIX = "/medicon/v1"
MAX_PAGE = 500
# ``limit`` and ``cursor`` as the OpenAPI document has them (ASCII digits, optional minus), and
# small enough for the head store's 64-bit integers.
_QUERY_INT = re.compile(r"-?[0-9]{1,18}")


async def _json_body(request: web.Request) -> dict[str, Any]:
    limit = request.app[CONFIG].records.max_record_size
    if request.content_length is not None and request.content_length > limit:
        raise GatewayError(413, f"a record is at most {limit} bytes of JSON")
    data = bytearray()
    while len(data) <= limit and (chunk := await proxy.body_read(request, request.content.read(limit + 1 - len(data)))):
        data += chunk
    if len(data) > limit:
        raise GatewayError(413, f"a record is at most {limit} bytes of JSON")
    try:
        doc = strictjson.loads(bytes(data))
    except strictjson.BadJSON as bad:
        raise GatewayError(400, f"the request body must be a JSON object: {bad}") from None
    if not isinstance(doc, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    return doc


def _episode(ep: Episode) -> dict[str, Any]:
    return asdict(ep)


def _conflict_details(err: GatewayError) -> GatewayError:
    if isinstance(err, chain.ChainConflict) and err.episode is not None:
        err.details["current"] = _episode(err.episode)
    if isinstance(err, chain.RecordInvalid):
        err.details["problems"] = err.problems
    return err


async def _append(request: web.Request, doc: dict[str, Any]) -> web.Response:
    try:
        appended = await chain.append(request.app, doc, auth.principal(request).id,
                                       records.idempotency_key(request))
    except GatewayError as err:
        raise _conflict_details(err) from None
    body = {"cid": appended.cid, "seq": appended.seq, "episode": _episode(appended.episode),
            "record": appended.record}
    return web.json_response(body, status=201 if appended.created else 200)


@routes.post(PREFIX + "/patients/{patient}/episodes")
async def open_episode(request: web.Request) -> web.Response:
    """Open an episode for a patient; the body is the episode-opened record without its envelope
    ids (``episode`` may be given; a new id is made otherwise)."""
    doc = await _json_body(request)
    doc.setdefault("schema", chain.EPISODE_OPENED)
    doc["patient"] = request.match_info["patient"]
    doc.setdefault("episode", f"ep-{uuid.uuid4().hex}")
    await auth.authorize(request, "record:write", records.record_resource(doc))
    return await _append(request, doc)


@routes.get(PREFIX + "/patients/{patient}/episodes")
async def list_episodes(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status not in (None, "open", "closed"):
        raise GatewayError(400, "status must be 'open' or 'closed'")
    patient = request.match_info["patient"]
    await auth.authorize(request, "chain:read", {"kind": "patient", "patient": patient})
    episodes = await request.app[STORE].list_episodes(patient, status)
    return web.json_response({"patient": patient, "episodes": [_episode(e) for e in episodes]})


async def _known_episode(request: web.Request, action: str) -> Episode:
    """The episode named in the path, once the caller may ``action`` it."""
    episode = await request.app[STORE].get_episode(request.match_info["episode"])
    if episode is None:
        raise GatewayError(404, f"episode {request.match_info['episode']!r} is unknown")
    await auth.authorize(request, action, {"kind": "episode", "patient": episode.patient, "episode": episode.id})
    return episode


@routes.post(PREFIX + "/episodes/{episode}/records")
async def append_record(request: web.Request) -> web.Response:
    """Append a record (encounter, amendment, episode-closed) to an episode."""
    episode = await _known_episode(request, "record:write")
    doc = await _json_body(request)
    for key in ("patient", "episode"):
        if key in doc and doc[key] != getattr(episode, "patient" if key == "patient" else "id"):
            raise GatewayError(400, f"the record's {key} does not match the episode")
    doc["patient"], doc["episode"] = episode.patient, episode.id
    return await _append(request, doc)


@routes.get(PREFIX + "/episodes/{episode}")
async def get_episode(request: web.Request) -> web.Response:
    return web.json_response(_episode(await _known_episode(request, "chain:read")))


@routes.get(PREFIX + "/episodes/{episode}/history")
async def history(request: web.Request) -> web.Response:
    """Records in chronological order; ``cursor`` is the ``next`` of the previous page."""
    episode = await _known_episode(request, "record:read")
    limit, after = request.query.get("limit", "50"), request.query.get("cursor", "-1")
    if not (_QUERY_INT.fullmatch(limit) and _QUERY_INT.fullmatch(after)):
        raise GatewayError(400, "limit and cursor must be integers of at most 18 digits")
    limit, after = int(limit), int(after)
    if not 1 <= limit <= MAX_PAGE:
        raise GatewayError(400, f"limit must be between 1 and {MAX_PAGE}")
    rows = await request.app[STORE].history(episode.id, after, limit)
    bodies = await chain.read_many(request.app, [r.cid for r in rows])
    records = [{"cid": r.cid, "seq": r.seq, "record": body} for r, body in zip(rows, bodies)]
    more = bool(rows) and rows[-1].seq < episode.length - 1
    return web.json_response({"episode": _episode(episode), "records": records,
                              "next": str(rows[-1].seq) if more else None})


@routes.get(PREFIX + "/records/{cid}")
async def get_record(request: web.Request) -> web.Response:
    cid = request.match_info["cid"]
    indexed = await request.app[STORE].record(cid)
    if indexed is None:
        raise GatewayError(404, f"no record {cid!r} was written through this gateway")
    await auth.authorize(request, "record:read", {"kind": "record", "cid": cid, "patient": indexed.patient,
                                                  "episode": indexed.episode})
    return web.json_response({"cid": cid, "episode": indexed.episode, "seq": indexed.seq,
                              "record": await chain.read(request.app, cid)})


@routes.get(PREFIX + "/episodes/{episode}/verify")
async def verify(request: web.Request) -> web.Response:
    await _known_episode(request, "verify")
    head = request.query.get("head")
    return web.json_response(await chain.verify(request.app, request.match_info["episode"], head))


@routes.get(PREFIX + "/schemas")
async def schemas(request: web.Request) -> web.Response:
    """The record kinds; with ``full=1`` also every loaded schema document by ``$id`` (the
    abstract ones too, so a client can resolve the kinds' ``$ref``s, e.g. to build a form)."""
    await auth.authorize(request, "node:info")
    full = request.query.get("full", "0")
    if full not in ("0", "1"):
        raise GatewayError(400, "full must be 0 or 1")
    registry = request.app[SCHEMAS]
    body: dict[str, Any] = {"kinds": registry.kinds()}
    if full == "1":
        body["schemas"] = registry.documents()
    return web.json_response(body)


@routes.get(PREFIX + "/whoami")
async def whoami(request: web.Request) -> web.Response:
    """The caller as the gateway sees it (principal id, role, scope), so a client such as the
    timeline UI knows what to show; never the credential itself."""
    await auth.authorize(request, "node:info")
    who = auth.principal(request)
    return web.json_response({
        "principal": who.id, "role": who.role,
        "patients": None if who.patients is None else sorted(who.patients),
        "episodes": None if who.episodes is None else sorted(who.episodes),
    })


@routes.get(PREFIX + "/plugins")
async def loaded_plugins(request: web.Request) -> web.Response:
    await auth.authorize(request, "node:info")
    return web.json_response({"plugins": plugins.describe(request.app[PLUGINS])})


@routes.get(PREFIX + "/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    await auth.authorize(request, "node:info")
    return web.Response(text=OPENAPI.read_text(), content_type="application/json")


@routes.route("*", PREFIX + "/{tail:.*}")
async def not_found(request: web.Request) -> web.Response:
    raise GatewayError(404, f"no such endpoint: {request.method} {request.path}")
