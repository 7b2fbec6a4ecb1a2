"""Where records enter and leave through Kubo's own API: intercepted ``add``, ``dag/put`` and
``cat``, and record CIDs on ``/ipfs/<cid>``.

A JSON document that claims to be a record (an object naming a ``schema`` and an episode or
patient) is appended through ``chain.append`` and never reaches Kubo as a file; anything else
passes to Kubo as a blob, streamed.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator
from urllib.parse import unquote_plus

import aiohttp
from aiohttp import web
from aiohttp.helpers import parse_mimetype
from multidict import CIMultiDictProxy

from . import attachments, auth, chain, commands, crypto, protect, proxy, strictjson
from .commands import flag
from .appkeys import CONFIG, KUBO, STORE
from .commands import Resolved
from .errors import GatewayError
from .keyring import KeyShredded
from .store import Blob

PEEK = 64 * 1024
MIXED = ("records and other files cannot be added together: add attachments in a separate request")


def options(request: web.Request, resolved: Resolved) -> dict[str, list[str]]:
    return commands.options(request.query_string, resolved.path_arg)


def _json_record(data: bytes) -> Any:
    """The document if ``data`` is JSON claiming to be a record, else None (a blob).

    JSON that claims to be a record but is ambiguous (duplicate keys, NaN, overflowing numbers,
    deep nesting) is refused with 400, never stored as a blob instead."""
    if not strictjson.looks_like_json_object(data):
        return None
    try:
        doc = strictjson.loads(data)
    except strictjson.BadJSON as bad:
        try:
            lenient = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if chain.is_record_candidate(lenient):
            raise GatewayError(400, f"invalid record: {bad}") from None
        return None
    return doc if chain.is_record_candidate(doc) else None


def _part_head(headers: CIMultiDictProxy[str]) -> bytes:
    return b"".join(f"{k}: {v}\r\n".encode("utf-8", "surrogateescape") for k, v in headers.items()) + b"\r\n"


def _is_directory(part: aiohttp.BodyPartReader) -> bool:
    return part.headers.get("Content-Type", "").startswith("application/x-directory")


def _is_structural(part: aiohttp.BodyPartReader) -> bool:
    """Directories and symlinks: their bodies are structure, not content to seal."""
    return _is_directory(part) or part.headers.get("Content-Type", "").startswith("application/symlink")


async def _peek(part: aiohttp.BodyPartReader, limit: int) -> tuple[bytes, bool]:
    """Read the start of a part: all of it if it may be a record (JSON object, at most
    ``limit`` bytes), else just enough to know it is not. Returns (bytes, complete)."""
    buf = bytearray()
    while True:
        chunk = await part.read_chunk(PEEK)
        if not chunk:
            return bytes(buf), True
        buf += chunk
        start = bytes(buf).lstrip()[:1]
        if (start and start != b"{") or len(buf) > limit:
            return bytes(buf), False


def record_resource(doc: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "record", "patient": doc.get("patient"), "episode": doc.get("episode")}


def attachment_patient(request: web.Request) -> str | None:
    """The patient an attachment belongs to: the ``X-Medicon-Patient`` header, or the one
    patient the caller's credentials are scoped to (so the Kubo CLI needs no extra header)."""
    named = request.headers.get("X-Medicon-Patient")
    if named:
        return named
    scope = auth.principal(request).patients
    if scope is not None and len(scope) == 1:
        return next(iter(scope))
    return None


def _boundary(request: web.Request) -> str:
    return parse_mimetype(request.headers["Content-Type"]).parameters["boundary"]


def _filename(part: aiohttp.BodyPartReader) -> str:
    return unquote_plus(part.filename or part.name or "")


# --- add -------------------------------------------------------------------------------------

async def intercept_add(request: web.Request, resolved: Resolved) -> web.StreamResponse:
    """``add``: records are appended (all validated before any is); other files stream to Kubo."""
    if not request.content_type.startswith("multipart/"):
        await auth.authorize(request, "raw:write", {"kind": "raw"})
        return await proxy.forward_rpc(request, resolved)
    limit = request.app[CONFIG].records.max_record_size
    reader = await request.multipart()
    boundary = _boundary(request)  # same framing as the client's, so its Content-Type stays valid
    held: list[aiohttp.BodyPartReader] = []  # directory parts seen before the first file
    while True:
        part = await reader.next()
        if part is None:
            # only directories (or nothing): Kubo answers that as it would
            return await _forward_parts(request, resolved, reader, boundary, held, None, b"", True)
        if _is_directory(part):
            held.append(part)
            continue
        head, complete = await _peek(part, limit)
        doc = _json_record(head) if complete else None
        if doc is None:
            return await _forward_parts(request, resolved, reader, boundary, held, part, head, complete)
        return await _add_records(request, resolved, reader, [(_filename(part), doc, len(head))])


async def _add_records(request: web.Request, resolved: Resolved, reader: aiohttp.MultipartReader,
                       docs: list[tuple[str, Any, int]]) -> web.StreamResponse:
    opts = options(request, resolved)
    if flag(opts, "only-hash"):
        raise GatewayError(400, "records cannot be hashed without being appended (only-hash)")
    if flag(opts, "wrap-with-directory"):
        raise GatewayError(400, "records are not wrapped in a directory (wrap-with-directory)")
    cfg = request.app[CONFIG].records
    while (part := await reader.next()) is not None:
        if _is_directory(part):
            continue
        head, complete = await _peek(part, cfg.max_record_size)
        doc = _json_record(head) if complete else None
        if doc is None:
            raise GatewayError(400, MIXED)
        docs.append((_filename(part), doc, len(head)))
        if len(docs) > cfg.max_parts:
            raise GatewayError(400, f"at most {cfg.max_parts} records in one add")
    for _, doc, _ in docs:
        await auth.authorize(request, "record:write", record_resource(doc))
    # All-or-nothing: every record is checked against its schema before the first is appended.
    problems = []
    for name, doc, _ in docs:
        try:
            await chain.validate(request.app, chain.normalise(doc), None, with_plugins=False)
        except chain.RecordInvalid as err:
            problems.append(f"{name or 'record'}: {err.message}" if len(docs) > 1 else err.message)
    if problems:
        raise GatewayError(400, "; ".join(problems), details={"problems": problems})
    lines, done = [], []
    key = request.headers.get("Idempotency-Key")
    for index, (name, doc, size) in enumerate(docs):
        try:
            appended = await chain.append(request.app, doc, auth.principal(request).id,
                                          f"{key}#{index}" if key else None)
        except GatewayError as err:
            if done:
                err = GatewayError(err.status, f"{err.message}; records already appended: {', '.join(done)}",
                                   details=err.details)
            raise err from None
        done.append(appended.cid)
        lines.append({"Name": name or appended.cid, "Hash": appended.cid, "Size": str(size)})
    body = "".join(json.dumps(line) + "\n" for line in lines)
    return web.Response(text=body, content_type="application/json", headers={"X-Chunked-Output": "1"})


async def _forward_parts(request: web.Request, resolved: Resolved, reader: aiohttp.MultipartReader,
                         boundary: str, held: list, first: aiohttp.BodyPartReader | None,
                         head: bytes, complete: bool) -> web.StreamResponse:
    """Stream a blob add to Kubo, re-framing the parts as they are read; a record found among
    the files stops the upload before its bytes are sent."""
    limit = request.app[CONFIG].records.max_record_size
    failed: list[GatewayError] = []
    delimiter = f"--{boundary}\r\n".encode()
    patient = attachment_patient(request)
    if patient is None:
        await auth.authorize(request, "raw:write", {"kind": "raw"})
    else:
        await auth.authorize(request, "blob:write", {"kind": "blob", "patient": patient})
    sealing = patient is not None and request.app[CONFIG].security.encrypt
    if sealing:
        try:
            dek_id, dek = protect.keyring(request.app).data_key_for_patient(patient)
        except KeyShredded:
            raise protect.RecordErased() from None
    added: list[tuple[str, str]] = []  # (Name, Hash) of every file and directory Kubo added
    types: dict[str, str] = {}         # Name -> the client's Content-Type of that file
    pending = bytearray()

    def tap(chunk: bytes) -> None:  # Kubo's NDJSON answer: collect every CID it added
        pending.extend(chunk)
        *lines, rest = bytes(pending).split(b"\n")
        pending[:] = rest
        for line in lines:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and isinstance(item.get("Hash"), str):
                added.append((str(item.get("Name", "")), item["Hash"]))

    async def finish() -> None:
        if patient is not None and added and not flag(options(request, resolved), "only-hash"):
            await request.app[STORE].add_blobs([Blob(cid, patient, sealing, types.get(name))
                                                for name, cid in added])

    async def content(part: aiohttp.BodyPartReader, start: bytes, whole: bool) -> AsyncIterator[bytes]:
        if start:
            yield start
        if not whole:
            while chunk := await part.read_chunk(proxy.CHUNK):
                yield chunk

    async def body() -> AsyncIterator[bytes]:
        for part in held:
            yield delimiter + _part_head(part.headers) + b"\r\n"
        part, start, whole = first, head, complete
        while part is not None:
            yield delimiter + _part_head(part.headers)
            stream = content(part, start, whole)
            if sealing and not _is_structural(part):
                types[_filename(part)] = part.headers.get("Content-Type", "application/octet-stream")
                stream = crypto.encrypt_stream(stream, dek, dek_id)
            async for chunk in stream:
                yield chunk
            yield b"\r\n"
            while (part := await reader.next()) is not None and _is_structural(part):
                yield delimiter + _part_head(part.headers) + b"\r\n"
            if part is not None:
                start, whole = await _peek(part, limit)
                if whole and _json_record(start) is not None:
                    failed.append(GatewayError(400, MIXED))
                    raise failed[0]
        yield f"--{boundary}--\r\n".encode()

    return await proxy.forward_rpc(request, resolved, body=body(), failed_body=failed, tap=tap, finish=finish)


# --- dag/put ---------------------------------------------------------------------------------

async def intercept_dag_put(request: web.Request, resolved: Resolved) -> web.StreamResponse:
    """``dag/put``: a record is appended (answer ``{"Cid": {"/": cid}}``); other nodes go to Kubo."""
    if not request.content_type.startswith("multipart/"):
        await auth.authorize(request, "raw:write", {"kind": "raw"})
        return await proxy.forward_rpc(request, resolved)
    opts = options(request, resolved)
    codec = (opts.get("input-codec") or ["dag-json"])[0]
    limit = request.app[CONFIG].records.max_record_size
    reader = await request.multipart()
    boundary = _boundary(request)
    parts: list[tuple[CIMultiDictProxy[str], bytes]] = []
    total = 0
    while (part := await reader.next()) is not None:
        data = bytearray()
        while chunk := await part.read_chunk(PEEK):
            data += chunk
            total += len(chunk)
            if total > 4 * limit:
                raise GatewayError(413, f"dag/put bodies through the gateway are limited to {4 * limit} bytes")
        parts.append((part.headers, bytes(data)))
    if len(parts) == 1 and codec in ("dag-json", "json"):
        doc = _json_record(parts[0][1])
        if doc is not None:
            await auth.authorize(request, "record:write", record_resource(doc))
            appended = await chain.append(request.app, doc, auth.principal(request).id,
                                          request.headers.get("Idempotency-Key"))
            return web.Response(text=json.dumps({"Cid": {"/": appended.cid}}) + "\n",
                                content_type="application/json", headers={"X-Chunked-Output": "1"})
    if any(_json_record(data) is not None for _, data in parts):
        raise GatewayError(400, "put one record per dag/put, encoded as dag-json")
    await auth.authorize(request, "raw:write", {"kind": "raw"})
    delimiter = f"--{boundary}\r\n".encode()
    body = b"".join(delimiter + _part_head(h) + data + b"\r\n" for h, data in parts)
    return await proxy.forward_rpc(request, resolved, body=body + f"--{boundary}--\r\n".encode())


# --- reads -----------------------------------------------------------------------------------

async def sealed_blob(app: web.Application, arg: str) -> Blob | None:
    """The sealed attachment an argument (``<cid>``, ``/ipfs/<cid>/path``) ends at, if any."""
    root, has_path = auth.root_of(arg)
    if root is None:
        return None
    cid = root
    if has_path:
        cid = await app[KUBO].resolve_path(arg if arg.startswith("/") else "/ipfs/" + arg)
        if cid is None:
            return None
    blob = await app[STORE].blob(cid)
    return blob if blob is not None and blob.encrypted else None


async def refuse_get_of_sealed(app: web.Application, args: list[str]) -> None:
    for arg in args:
        if await sealed_blob(app, arg) is not None:
            raise GatewayError(400, "a sealed attachment is read with `cat` or /ipfs/<cid>, not `get`")


def _bare_cid(arg: str) -> str | None:
    path = arg.removeprefix("/ipfs/").strip("/")
    return path if path and "/" not in path else None


async def _record_bytes(app: web.Application, cid: str | None) -> bytes | None:
    if cid is None or await app[STORE].record(cid) is None:
        return None
    record = await chain.read(app, cid)
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()


async def intercept_cat(request: web.Request, resolved: Resolved) -> web.StreamResponse:
    """``cat`` of a record CID returns the record as JSON (it is stored as dag-cbor, which
    Kubo's ``cat`` cannot read); everything else is Kubo's ``cat``."""
    opts = options(request, resolved)
    args = opts.get("arg") or []
    try:
        offset = int((opts.get("offset") or ["0"])[0])
        length = int((opts.get("length") or ["-1"])[0])
    except ValueError:
        raise GatewayError(400, "offset and length must be integers") from None
    if offset < 0:
        raise GatewayError(400, "offset must be >= 0")
    if len(args) == 1:
        blob = await sealed_blob(request.app, args[0])
        if blob is not None:
            return await attachments.serve(request, blob, rpc_cat=True, offset=offset, length=length)
    data = await _record_bytes(request.app, _bare_cid(args[0])) if len(args) == 1 else None
    if data is None:
        return await proxy.forward_rpc(request, resolved)
    data = data[offset:] if length < 0 else data[offset:offset + length]
    return web.Response(body=data, content_type="text/plain",
                        headers={"X-Stream-Output": "1", "X-Content-Length": str(len(data))})


async def ipfs_path(request: web.Request) -> web.StreamResponse:
    """``/ipfs/<cid>`` of a record returns it as JSON unless raw blocks or CARs are asked for."""
    proxy.check_gateway_request(request)
    resource = await proxy.authorize_gateway(request)
    if request.method in ("GET", "HEAD") and not proxy.wants_ipld(request) and resource["kind"] == "blob":
        blob = await sealed_blob(request.app, request.path)
        if blob is not None:
            return await attachments.serve(request, blob, rpc_cat=False)
    cid = _bare_cid(request.path)
    if request.method in ("GET", "HEAD") and not proxy.wants_ipld(request) and resource["kind"] == "record":
        data = await _record_bytes(request.app, cid)
        if data is not None:
            etag = f'"{cid}.json"'
            headers = {"ETag": etag, "X-Ipfs-Path": f"/ipfs/{cid}", "Cache-Control": "private, no-store"}
            if request.headers.get("If-None-Match") == etag:
                return web.Response(status=304, headers=headers)
            return web.Response(body=data, content_type="application/json", headers=headers)
    return await proxy.to_http_gateway(request)


INTERCEPTED = {"add": intercept_add, "dag/put": intercept_dag_put, "cat": intercept_cat}
