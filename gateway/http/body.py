"""Reading request bodies: every reader goes through ``body_read``, so the stall timeout and the
size limit hold on every door whatever the framing."""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from aiohttp import web

from ..errors import TooLarge
from .appkeys import CONFIG
from .errors import HTTPError

T = TypeVar("T")
CHUNK = 1 << 18  # 256 KiB: large enough for throughput, small enough to keep memory flat


async def read_body_chunk(request: web.Request, size: int = CHUNK) -> bytes:
    """Up to ``size`` bytes of the request body (b"" at its end). A client that stays silent
    longer than ``server.body_timeout`` (one byte a second is silence too, for long) gets 408."""
    return await body_read(request, request.content.read(size))


async def body_read(request: web.Request, read: Awaitable[T]) -> T:
    """``await read`` (a read of the request body), or 408 if the client stalls past
    ``server.body_timeout``, or ``TooLarge`` once the body has grown past
    ``server.max_body_size`` (aiohttp counts the bytes as they arrive, after chunked decoding),
    before any more of it is passed on."""
    limit = request.app[CONFIG].server.body_timeout
    try:
        async with asyncio.timeout(limit):
            got = await read
    except TimeoutError:
        raise HTTPError(408, f"the request body stalled for more than {limit:g}s") from None
    if request.content.total_bytes > request.app[CONFIG].server.max_body_size:
        raise body_too_large(request)
    return got


def body_too_large(request: web.Request) -> TooLarge:
    return TooLarge(f"request bodies are limited to {request.app[CONFIG].server.max_body_size} bytes")


def check_body_size(request: web.Request) -> None:
    """``TooLarge`` at once for a body announced (``Content-Length``) past
    ``server.max_body_size``: not a byte of it is read, and Kubo is not contacted."""
    if request.content_length is not None and request.content_length > request.app[CONFIG].server.max_body_size:
        raise body_too_large(request)
