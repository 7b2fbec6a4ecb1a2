"""``/ipfs/…`` and ``/ipns/…``: Kubo's HTTP gateway, read-only, authorized like ``cat`` (or like
``dag/get`` for raw blocks and CARs). A record reads back as its JSON and a sealed attachment
as its plaintext, unless raw blocks or CARs are asked for.

Only what the gateway understood goes on to Kubo: the path, the query parameters of the
gateway specification (each checked), and the request headers that select a representation.
"""

from __future__ import annotations

import re

from aiohttp import web
from yarl import URL

from ..core.service import CONTENT, STRUCTURE
from ..errors import Invalid, NotFound
from . import attachments
from .appkeys import CONFIG, SERVICE
from .context import caller
from .errors import HTTPError
from .intercepts import sealed_blob, record_bytes
from .proxy import forward
from .rpccall import raw_query_pairs

# The query parameters of the IPFS HTTP gateway specification, and what each may be.
QUERY = {
    "format": re.compile(r"raw|car|tar|dag-json|dag-cbor|json|cbor|ipns-record"),
    "filename": re.compile(r"[^\x00-\x1f\x7f]{1,255}"),
    "download": re.compile(r"true|false"),
    "dag-scope": re.compile(r"block|entity|all"),
    "entity-bytes": re.compile(r"-?[0-9]{1,19}:(\*|-?[0-9]{1,19})"),
    "car-version": re.compile(r"1|2"),
    "car-order": re.compile(r"dfs|unk"),
    "car-dups": re.compile(r"y|n"),
}
# Request headers that select what Kubo sends; nothing else of the client's goes on.
HEADERS = ("Accept", "Range", "If-Range", "If-None-Match", "If-Match", "If-Modified-Since", "Cache-Control")


def check_gateway_request(request: web.Request) -> None:
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        raise HTTPError(405, f"{request.method} is not allowed on the HTTP gateway",
                        headers={"Allow": "GET, HEAD, OPTIONS"})
    if any(seg in (".", "..") for seg in request.path.split("/")):
        raise Invalid("dot segments are not allowed in gateway paths")
    for key, value in raw_query_pairs(request.rel_url.raw_query_string):
        pattern = QUERY.get(key)
        if pattern is None:
            raise Invalid(f"unknown gateway query parameter {key[:40]!r} (known: {', '.join(QUERY)})")
        if not pattern.fullmatch(value):
            raise Invalid(f"gateway query parameter {key!r} cannot be {value[:40]!r}")


def wants_ipld(request: web.Request) -> bool:
    """Raw blocks, CARs or IPLD codecs instead of deserialized content."""
    return "format" in request.query or "application/vnd.ipld" in request.headers.get("Accept", "")


def wants_car(request: web.Request) -> bool:
    return request.query.get("format") == "car" or "application/vnd.ipld.car" in request.headers.get("Accept", "")


async def require_local_block(request: web.Request, cid: str | None) -> None:
    """Kubo answers a CAR with 200 and its header before it looks for the blocks, so a CAR of
    content this node does not hold would be a 200 with nothing in it: check the block first."""
    if cid is None or not await request.app[SERVICE].kubo.has_block(cid):
        raise NotFound(f"{request.path[:200]} is not held by this node")


async def to_http_gateway(request: web.Request) -> web.StreamResponse:
    base = request.app[CONFIG].kubo.gateway_url.rstrip("/")
    headers = {name: request.headers[name] for name in HEADERS if name in request.headers}
    return await forward(request, URL(base + request.rel_url.raw_path_qs, encoded=True), headers=headers)


async def ipns_path(request: web.Request) -> web.StreamResponse:
    check_gateway_request(request)
    await request.app[SERVICE].authorize(caller(request), "raw:read", {"kind": "raw"})
    return await to_http_gateway(request)


async def ipfs_path(request: web.Request) -> web.StreamResponse:
    """``/ipfs/<cid>[/path]``: authorized for its root and for what the path ends at."""
    check_gateway_request(request)
    access = STRUCTURE if wants_ipld(request) else CONTENT
    [target] = await request.app[SERVICE].authorize_read(caller(request), access, [request.path])
    if request.method in ("GET", "HEAD") and access == CONTENT:
        blob = await sealed_blob(request, target.end)
        if blob is not None:
            try:
                return await attachments.serve(request, blob, rpc_cat=False)
            except attachments.NotSealed:
                return await to_http_gateway(request)
        data = await record_bytes(request, target.end)
        if data is not None:
            cid = target.end["cid"]
            etag = f'"{cid}.json"'
            headers = {"ETag": etag, "X-Ipfs-Path": f"/ipfs/{cid}", "Cache-Control": "private, no-store"}
            if request.headers.get("If-None-Match") == etag:
                return web.Response(status=304, headers=headers)
            return web.Response(body=data, content_type="application/json", headers=headers)
    if wants_car(request):
        await require_local_block(request, target.end_cid)
    return await to_http_gateway(request)
