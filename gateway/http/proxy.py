"""Streaming relay to Kubo's RPC API (``/api/v0``) and HTTP gateway (``/ipfs``, ``/ipns``).

What is sent was decided before it gets here: the URL, the few headers and the body are built
by ``rpc``, the intercepts and ``ipfs_gateway`` from what they parsed; nothing of the client's
request is copied. Bodies are never held in memory: the upload is pumped to Kubo while Kubo's
answer is pumped back, chunk by chunk, with backpressure on both sides. This module only moves
bytes and turns Kubo's failures into answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator, Callable, Mapping
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp import web
from yarl import URL

from ..core.access import settle_audits
from ..errors import Forbidden, Invalid, MediconError, TimedOut, Unavailable
from ..kubo.client import KUBO_FULL, is_disk_full
from .appkeys import CONFIG, SERVICE
from .errors import kubo_error
from .multipart import reframed_files
from .rpccall import Body, Call

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade",
})
# ``Content-Length`` is set from the streamed body; the trailer Kubo announces cannot be
# relayed by aiohttp (errors after the headers abort the connection instead).
DROP_RESPONSE = HOP_BY_HOP | {"content-length", "server", "set-cookie"}
USER_AGENT = "medicon-gateway"


def check_origin(request: web.Request) -> None:
    """Kubo's CSRF rule, applied for the gateway's own port.

    Kubo only trusts origins on its own API port, and the gateway never passes ``Origin`` or
    ``Referer`` on, so it must do the check itself.
    """
    allowed = request.app[CONFIG].server.allowed_origins
    origin = request.headers.get("Origin")
    referer = request.headers.get("Referer")
    if origin is not None:
        if origin not in allowed:
            raise Forbidden(f"origin {origin!r} is not allowed to use the RPC API")
    elif referer is not None:
        parts = urlsplit(referer)
        if f"{parts.scheme}://{parts.netloc}" not in allowed:
            raise Forbidden("referer is not an allowed origin for the RPC API")
    elif "mozilla" in request.headers.get("User-Agent", "").lower():
        raise Forbidden("browser requests to the RPC API must carry an allowed Origin")


async def _guarded(body: AsyncIterator[bytes], failed: list,
                   answering: list[aiohttp.ClientResponse]) -> AsyncIterator[bytes]:
    """``body`` on its way to Kubo. If it fails (a stall, a body past the limit, a broken
    multipart), the failure is recorded in ``failed`` and, if Kubo is already answering, its
    answer is failed too: Kubo would otherwise wait for the rest of the body, and the client for
    the rest of Kubo's answer. The upload is cut off, so Kubo never completes (or pins) it."""
    try:
        async for chunk in body:
            yield chunk
    except Exception as exc:
        if not failed:
            failed.append(exc if isinstance(exc, MediconError) else
                          Invalid(f"the request body could not be read: {type(exc).__name__}"))
        for upstream in answering:
            upstream.content.set_exception(failed[0])
        raise


def upstream_error(request: web.Request, exc: Exception) -> Exception:
    """Kubo unreachable → 502, Kubo silent → 504; anything else is not a Kubo fault."""
    if isinstance(exc, asyncio.TimeoutError):
        return TimedOut(f"Kubo did not answer within {request.app[CONFIG].kubo.read_timeout:g}s")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Unavailable("Kubo is not reachable")
    if isinstance(exc, aiohttp.ClientError):
        return Unavailable(f"Kubo connection failed: {type(exc).__name__}")
    return exc


def abort(request: web.Request, why: str) -> None:
    """Close the client connection without the final chunk, so a truncated stream is seen
    as a failed transfer and never as a complete one."""
    log.warning("aborting response to %s %s: %s", request.method, request.path.split("/", 3)[1:2], why)
    transport = request.transport
    if transport is not None:
        transport.abort()


async def forward(request: web.Request, url: URL, *, method: str | None = None,
                  headers: Mapping[str, str] | None = None, body=None, failed_body: list | None = None,
                  tap: Callable[[bytes], None] | None = None,
                  transform: Callable[[bytes], bytes] | None = None,
                  finish=None, exact_length: bool = False) -> web.StreamResponse:
    """Send ``method url`` (the client's method by default) to Kubo with ``headers`` and
    ``body`` (bytes or an async iterator the caller built), and stream Kubo's answer back.

    A ``MediconError`` put in ``failed_body`` by the body iterator before Kubo answered is the
    answer instead. ``tap(chunk)`` sees every chunk of Kubo's answer, ``transform(chunk)``
    rewrites it; ``await finish()`` runs after Kubo's last byte and before the client's, so
    what it records (the attachment index) is in place when the client sees the answer
    complete. With ``exact_length``, Kubo's ``X-Content-Length`` is the body's length, and a
    shorter stream (a failure Kubo reports only in a trailer) aborts the client's.
    """
    kubo = request.app[SERVICE].kubo
    sent_headers = {"User-Agent": USER_AGENT, **(headers or {})}
    failed_body = [] if failed_body is None else failed_body
    answering: list[aiohttp.ClientResponse] = []
    if body is not None and not isinstance(body, (bytes, bytearray)):
        body = _guarded(body, failed_body, answering)
    started = time.perf_counter()
    try:
        upstream = await kubo.session.request(method or request.method, url, headers=sent_headers, data=body,
                                              allow_redirects=False)
    except Exception as exc:
        if failed_body:
            kubo.observe(_kubo_label(url), started)
            raise failed_body[0] from None
        failure = upstream_error(request, exc)
        kubo.observe(_kubo_label(url), started, _failure_kind(failure))
        raise failure from None
    refused = upstream.status >= 400 and upstream.status != 416
    kubo.observe(_kubo_label(url), started, "refused" if refused else None)
    answering.append(upstream)
    try:
        return await _relay(request, upstream, tap, transform, finish, failed_body, exact_length)
    finally:
        if failed_body:
            upstream.close()  # never back to the pool: Kubo has half a request
        await _released(upstream)


async def _released(upstream: aiohttp.ClientResponse) -> None:
    """What leaving ``async with upstream`` does, except that an upload Kubo stopped reading
    (it answered early — an error such as a full disk — and closed) does not turn Kubo's
    answer into a failure of the gateway's own."""
    upstream.release()
    try:
        await upstream.wait_for_close()
    except (aiohttp.ClientError, OSError):
        upstream.close()


def _kubo_label(url: URL) -> str:
    """The metrics label of a relayed call: the command (the table's name, which ``rpc_url``
    put in the path) or which HTTP gateway namespace; never the rest of the path."""
    path = url.path
    if path.startswith("/api/v0/"):
        return path[len("/api/v0/"):]
    return "gateway:" + ("ipns" if path.startswith("/ipns/") else "ipfs")


def _failure_kind(failure: Exception) -> str | None:
    """How the call failed, for the metrics; None if it was not Kubo's failure."""
    if isinstance(failure, TimedOut):
        return "timeout"
    return "unreachable" if isinstance(failure, Unavailable) else None


ERROR_BODY_LIMIT = 64 * 1024


async def _kubo_error(upstream: aiohttp.ClientResponse) -> web.Response:
    """Kubo's error answer, in Kubo's JSON shape and with a status that says whose fault it is.

    Kubo's RPC answers every command error with 500 (its ``Code`` 0 means an ordinary error:
    a bad path, a missing link, content it does not have), and some refusals come as plain
    text. Code 0/1 errors are the request's (400); Code 2, Kubo's own failures, are a bad
    gateway (502); plain-text bodies are wrapped in the JSON shape.
    """
    raw = await upstream.content.read(ERROR_BODY_LIMIT)
    status = upstream.status
    try:
        body = json.loads(raw)
        message, code = str(body["Message"]), int(body.get("Code", 0))
    except (ValueError, KeyError, TypeError):
        message = raw.decode("utf-8", "replace").strip() or upstream.reason or "error"
        code = None
    if is_disk_full(message):  # a write refused for want of space: nothing was stored
        log.warning("Kubo's repository is full: %s", message[:300])
        return kubo_error(507, KUBO_FULL)
    if status == 500:
        status = 502 if code == 2 else 400
    return kubo_error(status, message[:2000], code=code if code is not None and status != 400 else None)


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse, tap, transform, finish,
                 failed_body: list, exact_length: bool) -> web.StreamResponse:
    if failed_body:  # the body failed before Kubo's headers were read: that is the answer
        raise failed_body[0]
    if upstream.status >= 400 and upstream.status not in (416,):
        return await _kubo_error(upstream)
    resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    for key, value in upstream.headers.items():
        if key.lower() not in DROP_RESPONSE:
            resp.headers.add(key, value)
    length = upstream.headers.get("Content-Length")
    if length is not None and length.isdigit() and transform is None:
        resp.content_length = int(length)
    expected = None
    if exact_length and upstream.headers.get("X-Stream-Output") == "1":
        announced = upstream.headers.get("X-Content-Length", "")
        expected = int(announced) if announced.isdigit() else None
    await settle_audits()  # the read's audit event is stored before its first byte goes out
    await resp.prepare(request)
    if request.method == "HEAD":
        await resp.write_eof()
        return resp
    sent = 0
    try:
        # Whatever Kubo has sent so far, as it comes: no waiting to fill (and copying into) a
        # chunk of a set size; aiohttp's read buffer (read_bufsize) still bounds the memory.
        async for chunk in upstream.content.iter_any():
            sent += len(chunk)
            if tap is not None:
                tap(chunk)
            if transform is not None:
                chunk = transform(chunk)
            await resp.write(chunk)
    except (aiohttp.ClientError, asyncio.TimeoutError, MediconError) as exc:
        abort(request, f"Kubo stream failed after {sent} bytes: {type(exc).__name__}")
        return resp
    if failed_body:
        abort(request, f"the request body failed: {failed_body[0].message}")
        return resp
    if expected is not None and sent != expected:
        abort(request, f"Kubo stream ended after {sent} of {expected} bytes")
        return resp
    if transform is not None and hasattr(transform, "flush"):
        await resp.write(transform.flush())
    if finish is not None:
        try:
            await finish()
        except Exception as exc:  # the client must not take an unconfirmed or unrecorded write as done
            why = exc.message if isinstance(exc, MediconError) else type(exc).__name__
            abort(request, f"could not confirm or record the result: {why}")
            return resp
    await resp.write_eof()
    return resp


def rpc_url(request: web.Request, call: Call, *, args: list[str] | None = None) -> URL:
    """Kubo's URL for a parsed call: the canonical command path and the rebuilt query."""
    base = URL(request.app[CONFIG].kubo.api_url)
    query = call.upstream_query(args=args)
    url = base.with_path("/api/v0/" + quote(call.command), encoded=True).with_query(None)
    return URL(str(url) + ("?" + query if query else ""), encoded=True)


async def forward_rpc(request: web.Request, call: Call, **kw) -> web.StreamResponse:
    """A served command: the rebuilt request to Kubo, its answer streamed back. A command that
    reads files gets the client's multipart body re-framed part by part (``multipart``)."""
    if call.entry.body is Body.FILES and "body" not in kw:
        kw["body"], content_type = await reframed_files(request, call.command)
        kw["headers"] = {"Content-Type": content_type}
    kw["headers"] = {**request.app[SERVICE].kubo.rpc_headers, **kw.get("headers", {})}
    return await forward(request, rpc_url(request, call), method="POST",
                         exact_length=call.entry.exact_length, **kw)
