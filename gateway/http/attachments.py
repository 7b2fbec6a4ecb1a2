"""Reading sealed attachments: Kubo holds only ciphertext; an authorized reader gets the
plaintext, whole or by byte range, and a range decrypts only the segments it needs.

The ciphertext is fetched from Kubo's HTTP gateway with ``Range`` requests: first the header
(segment size, data key id) and the total size, then exactly the segments covering the range.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp
from aiohttp import web

from ..core.access import settle_audits
from ..errors import NotFound, Unavailable
from ..security import crypto
from ..storage.model import Blob
from .appkeys import CONFIG, SERVICE
from .body import CHUNK
from .errors import HTTPError
from .proxy import abort

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


async def _get(app: web.Application, cid: str, first: int, last: int) -> aiohttp.ClientResponse:
    url = app[CONFIG].kubo.gateway_url.rstrip("/") + f"/ipfs/{cid}"
    try:
        resp = await app[SERVICE].kubo.session.get(url, headers={"Range": f"bytes={first}-{last}"})
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise Unavailable(f"Kubo is not reachable ({type(exc).__name__})") from None
    if resp.status not in (200, 206):
        resp.release()
        error = Unavailable if resp.status >= 500 else NotFound
        raise error(f"Kubo answered {resp.status} for the attachment")
    return resp


class NotSealed(Unavailable):
    """What the index marks as a sealed attachment holds no sealed blob: the directory an
    earlier version indexed around wrapped attachments. Served as Kubo serves it (a listing, or
    Kubo's own refusal): never a 5xx for a client's read, and no plaintext involved."""


async def _probe(app: web.Application, cid: str) -> tuple[crypto.BlobHeader, int]:
    """The blob's header and its total ciphertext size."""
    resp = await _get(app, cid, 0, crypto.HEADER_MAX_SIZE - 1)
    async with resp:
        data = await resp.read()
        total = int(resp.headers["Content-Range"].rsplit("/", 1)[1]) if resp.status == 206 else len(data)
    try:
        return crypto.parse_header(data), total
    except crypto.DecryptError:
        raise NotSealed("the attachment in Kubo is not a sealed blob of this gateway") from None


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one range an HTTP ``Range`` header asks for, clamped; None for the whole body."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None or (not match[1] and not match[2]):
        raise HTTPError(416, "only one byte range (bytes=a-b, a- or -n) is supported",
                        headers={"Content-Range": f"bytes */{size}"})
    if not match[1]:
        start, end = max(size - int(match[2]), 0), size - 1
    else:
        start, end = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
    if start >= size or start > end:
        raise HTTPError(416, "range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, end


async def serve(request: web.Request, blob: Blob, *, rpc_cat: bool,
                offset: int = 0, length: int = -1) -> web.StreamResponse:
    """Plaintext of a sealed attachment: for ``cat`` (Kubo's stream headers, ``offset`` and
    ``length``) or for ``/ipfs/<cid>`` (``Range``, ``HEAD``, the original content type)."""
    app = request.app
    header, total = await _probe(app, blob.cid)
    try:
        key = await app[SERVICE].keys.data_key(header.key_id)
    except KeyError:
        raise Unavailable("the attachment's data key is unknown to this gateway") from None
    try:
        size = crypto.plaintext_size(total, header)
    except crypto.DecryptError:
        raise Unavailable("the attachment in Kubo is truncated or altered") from None
    status, headers = 200, {"Cache-Control": "private, no-store"}
    if rpc_cat:
        start = min(offset, size)
        end = size - 1 if length < 0 else min(start + length, size) - 1
        headers |= {"X-Stream-Output": "1", "Content-Type": "text/plain"}
    else:
        wanted = _byte_range(request.headers.get("Range"), size)
        start, end = wanted or (0, size - 1)
        if wanted is not None:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers |= {"Accept-Ranges": "bytes", "ETag": f'"{blob.cid}.plain"',
                    "Content-Type": blob.content_type or "application/octet-stream",
                    "X-Ipfs-Path": f"/ipfs/{blob.cid}"}
    count = max(end - start + 1, 0)
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = count
    if rpc_cat:
        resp.headers["X-Content-Length"] = str(count)
    await settle_audits()  # the read's audit event is stored before its first byte goes out
    await resp.prepare(request)
    if request.method == "HEAD" or count == 0:
        await resp.write_eof()
        return resp
    offset_c, length_c, skip = crypto.ciphertext_range(header, start, end, total)
    upstream = await _get(app, blob.cid, offset_c, offset_c + length_c - 1)
    async with upstream:
        plain = crypto.decrypt_range(upstream.content.iter_chunked(CHUNK), header, key,
                                     start // header.segment_size, crypto.segment_count(total, header),
                                     skip, count)
        try:
            async for chunk in plain:
                await resp.write(chunk)
        except (crypto.DecryptError, ValueError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            abort(request, f"sealed attachment read failed: {type(exc).__name__}")
            return resp
    await resp.write_eof()
    return resp
