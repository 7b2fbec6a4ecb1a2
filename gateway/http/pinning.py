"""``/pinning/v1``: the IPFS Pinning Service API, served for this gateway's Kubo node.

Endpoints as the spec names them (https://ipfs.github.io/pinning-services-api-spec/):
``GET/POST /pins``, ``GET/POST/DELETE /pins/{requestid}``; the access token is an API token of
the ``replicator`` role (``Authorization: Bearer mdc_…``, which Kubo's ``ipfs pin remote``
sends), scoped tokens refused. Errors are the spec's ``Failure``
(``{"error": {"reason", "details"}}``, rendered by ``http.errors``). The work is
``gateway.core.pinning``; this module reads requests and writes answers.
"""

from __future__ import annotations

import json
from typing import AsyncIterator

from aiohttp import web

from ..core import strictjson
from ..core.pinning import MATCHES, MAX_CIDS, MAX_LIMIT, MAX_NAME, PinningService, parse_time, statuses_of
from ..errors import Invalid, TooLarge
from .appkeys import SERVICE
from .body import body_read
from .context import caller

PREFIX = "/pinning/v1"
PINNING = web.AppKey("pinning", PinningService)
MAX_PIN_BODY = 64 * 1024  # a Pin object: a CID, a name, 20 origins, metadata
routes = web.RouteTableDef()


async def pinning_service(app: web.Application) -> AsyncIterator[None]:
    """A ``cleanup_ctx`` after the record service's: the pinning service of its Kubo node."""
    pinning = PinningService(app[SERVICE])
    pinning.start()
    app[PINNING] = pinning
    yield
    await pinning.close()


async def _pin_body(request: web.Request) -> object:
    if request.content_length is not None and request.content_length > MAX_PIN_BODY:
        raise TooLarge(f"a Pin object is at most {MAX_PIN_BODY} bytes")
    data = await body_read(request, request.content.read(MAX_PIN_BODY + 1))
    if len(data) > MAX_PIN_BODY:
        raise TooLarge(f"a Pin object is at most {MAX_PIN_BODY} bytes")
    try:
        return strictjson.loads(data)
    except strictjson.BadJSON as bad:
        raise Invalid(f"the body must be a JSON Pin object: {bad}") from None


def _values(request: web.Request, name: str) -> list[str]:
    return request.query.getall(name, [])


def _one(request: web.Request, name: str) -> str | None:
    values = _values(request, name)
    if len(values) > 1:
        raise Invalid(f"{name} may be given once")
    return values[0] if values else None


@routes.get(PREFIX + "/pins")
async def list_pins(request: web.Request) -> web.Response:
    cids = [c for v in _values(request, "cid") for c in v.split(",") if c] or None
    if cids is not None and len(cids) > MAX_CIDS:
        raise Invalid(f"cid names at most {MAX_CIDS} CIDs")
    name = _one(request, "name")
    if name is not None and len(name) > MAX_NAME:
        raise Invalid(f"name is at most {MAX_NAME} characters")
    match = _one(request, "match") or "exact"
    if match not in MATCHES:
        raise Invalid(f"match must be one of {', '.join(MATCHES)}")
    limit_text = _one(request, "limit") or "10"
    if not limit_text.isascii() or not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
        raise Invalid(f"limit must be an integer from 1 to {MAX_LIMIT}")
    before, after = _one(request, "before"), _one(request, "after")
    meta_text, meta = _one(request, "meta"), None
    if meta_text is not None:
        try:
            meta = json.loads(meta_text)
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise Invalid("meta must be a JSON object of strings")
    answer = await request.app[PINNING].list(
        caller(request), cids=cids, name=name, match=match, statuses=statuses_of(_values(request, "status")),
        before_us=parse_time(before, "before") if before is not None else None,
        after_us=parse_time(after, "after") if after is not None else None, meta=meta, limit=int(limit_text))
    return web.json_response(answer)


@routes.post(PREFIX + "/pins")
async def add_pin(request: web.Request) -> web.Response:
    return web.json_response(await request.app[PINNING].create(caller(request), await _pin_body(request)), status=202)


@routes.get(PREFIX + "/pins/{requestid}")
async def get_pin(request: web.Request) -> web.Response:
    return web.json_response(await request.app[PINNING].get(caller(request), request.match_info["requestid"]))


@routes.post(PREFIX + "/pins/{requestid}")
async def replace_pin(request: web.Request) -> web.Response:
    body = await _pin_body(request)
    answer = await request.app[PINNING].replace(caller(request), request.match_info["requestid"], body)
    return web.json_response(answer, status=202)


@routes.delete(PREFIX + "/pins/{requestid}")
async def delete_pin(request: web.Request) -> web.Response:
    await request.app[PINNING].delete(caller(request), request.match_info["requestid"])
    return web.Response(status=202)
