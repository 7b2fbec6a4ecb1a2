"""``/ipfs/…`` and ``/ipns/…``: Kubo's HTTP gateway, read-only, authorized like ``cat`` (or like
``dag/get`` for raw blocks and CARs). A record CID reads back as the record's JSON and a sealed
attachment as its plaintext, unless raw blocks or CARs are asked for."""

from __future__ import annotations

from aiohttp import web
from yarl import URL

from ..core.service import CONTENT, STRUCTURE
from ..errors import Invalid
from . import attachments
from .appkeys import CONFIG, SERVICE
from .context import caller
from .errors import HTTPError
from .intercepts import bare_cid, record_bytes, sealed_blob
from .proxy import forward


def check_gateway_request(request: web.Request) -> None:
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        raise HTTPError(405, f"{request.method} is not allowed on the HTTP gateway",
                        headers={"Allow": "GET, HEAD, OPTIONS"})
    if any(seg in (".", "..") for seg in request.path.split("/")):
        raise Invalid("dot segments are not allowed in gateway paths")


def wants_ipld(request: web.Request) -> bool:
    """Raw blocks, CARs or IPLD codecs instead of deserialized content."""
    return "format" in request.query or "application/vnd.ipld" in request.headers.get("Accept", "")


async def authorize_gateway(request: web.Request) -> dict:
    """What an ``/ipfs`` or ``/ipns`` path names, once the caller may read it."""
    service = request.app[SERVICE]
    if request.path.startswith("/ipns/"):
        await service.authorize(caller(request), "raw:read", {"kind": "raw"})
        return {"kind": "raw"}
    access = STRUCTURE if wants_ipld(request) else CONTENT
    return (await service.authorize_read(caller(request), access, [request.path]))[0]


async def to_http_gateway(request: web.Request) -> web.StreamResponse:
    base = request.app[CONFIG].kubo.gateway_url.rstrip("/")
    return await forward(request, URL(base + request.raw_path, encoded=True))


async def ipns_path(request: web.Request) -> web.StreamResponse:
    check_gateway_request(request)
    await authorize_gateway(request)
    return await to_http_gateway(request)


async def ipfs_path(request: web.Request) -> web.StreamResponse:
    """``/ipfs/<cid>`` of a record returns it as JSON unless raw blocks or CARs are asked for."""
    check_gateway_request(request)
    resource = await authorize_gateway(request)
    deserialized = request.method in ("GET", "HEAD") and not wants_ipld(request)
    if deserialized and resource["kind"] == "blob":
        blob = await sealed_blob(request, request.path)
        if blob is not None:
            return await attachments.serve(request, blob, rpc_cat=False)
    cid = bare_cid(request.path)
    if deserialized and resource["kind"] == "record":
        data = await record_bytes(request, cid)
        if data is not None:
            etag = f'"{cid}.json"'
            headers = {"ETag": etag, "X-Ipfs-Path": f"/ipfs/{cid}", "Cache-Control": "private, no-store"}
            if request.headers.get("If-None-Match") == etag:
                return web.Response(status=304, headers=headers)
            return web.Response(body=data, content_type="application/json", headers=headers)
    return await to_http_gateway(request)
