"""Where records enter and leave through Kubo's own API: intercepted ``add``, ``dag/put`` and
``cat``, and record CIDs on ``/ipfs/<cid>``.

A JSON document that claims to be a record (an object naming a ``schema`` and an episode or
patient) is appended through ``chain.append`` and never reaches Kubo as a file; anything else
passes to Kubo as a blob, streamed.
"""

from __future__ import annotations

import json
import re
from typing import Any, AsyncIterator
from urllib.parse import unquote_plus

import aiohttp
from aiohttp import web
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import HttpProcessingError
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
# What aiohttp's multipart reader raises on broken framing (no or bad boundary, a body cut
# short, part headers too long or malformed): the client's fault, so a 400, never a 500.
_FRAMING_ERRORS = (ValueError, AssertionError, RuntimeError, LookupError, HttpProcessingError)
_INT64 = re.compile(r"[+-]?[0-9]{1,19}")
# An Idempotency-Key is a structured-field string: printable ASCII (and kept to a sane length)
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
# The identifier grammar of records (schemas/record/common-v1.json#/$defs/identifier).
_IDENTIFIER = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def idempotency_key(request: web.Request) -> str | None:
    """The request's ``Idempotency-Key``, if any; 400 unless it is 1 to 255 printable ASCII
    characters (the head store keeps it as text, and a key past ASCII cannot be stored)."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise GatewayError(400, "Idempotency-Key must be 1 to 255 printable ASCII characters")
    return key


def _malformed(exc: BaseException) -> GatewayError:
    why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return GatewayError(400, f"malformed multipart body: {why}")


async def _open_multipart(request: web.Request) -> tuple[aiohttp.MultipartReader, str]:
    """The body's multipart reader and its boundary; 400 if the Content-Type has none usable."""
    try:
        reader = await request.multipart()
        return reader, _boundary(request)
    except _FRAMING_ERRORS as exc:
        raise _malformed(exc) from None


async def _next_part(request: web.Request, reader: aiohttp.MultipartReader) -> aiohttp.BodyPartReader | None:
    """The next part, or None after the last; 400 for broken framing or a nested multipart."""
    try:
        part = await proxy.body_read(request, reader.next())
    except _FRAMING_ERRORS as exc:
        raise _malformed(exc) from None
    if part is not None and not isinstance(part, aiohttp.BodyPartReader):
        raise GatewayError(400, "malformed multipart body: nested multipart parts are not supported")
    return part


async def _require_form(request: web.Request, resolved: Resolved) -> None:
    """Kubo reads files only from a multipart/form-data body: refuse anything else here, in
    Kubo's error shape, rather than relay Kubo's plain-text refusal."""
    if request.content_type != "multipart/form-data":
        await auth.authorize(request, "raw:write", {"kind": "raw"})
        raise GatewayError(400, f"{resolved.command} takes a multipart/form-data body, "
                                f"not {request.content_type[:100]!r}")


async def _read_chunk(request: web.Request, part: aiohttp.BodyPartReader, size: int) -> bytes:
    try:
        return await proxy.body_read(request, part.read_chunk(size))
    except _FRAMING_ERRORS as exc:
        raise _malformed(exc) from None


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
        except (ValueError, RecursionError):  # not UTF-8, too deep, or not JSON at all
            keys = strictjson.top_level_keys(data)
            lenient = dict.fromkeys(keys)
        if chain.is_record_candidate(lenient):
            raise GatewayError(400, f"invalid record: {bad}") from None
        return None
    return doc if chain.is_record_candidate(doc) else None


def _record_in(head: bytes, complete: bool, limit: int) -> Any:
    """The record a part holds, or None for a blob. A part too big to be read whole (over
    ``limit``) whose start claims to be a record is refused (413), never stored as a blob."""
    if complete:
        return _json_record(head)
    if strictjson.looks_like_json_object(head) and chain.is_record_candidate(
            dict.fromkeys(strictjson.top_level_keys(head))):
        raise GatewayError(413, f"a record is at most {limit} bytes of JSON")
    return None


def _part_head(headers: CIMultiDictProxy[str]) -> bytes:
    return b"".join(f"{k}: {v}\r\n".encode("utf-8", "surrogateescape") for k, v in headers.items()) + b"\r\n"


def _is_directory(part: aiohttp.BodyPartReader) -> bool:
    return part.headers.get("Content-Type", "").startswith("application/x-directory")


def _is_structural(part: aiohttp.BodyPartReader) -> bool:
    """Directories and symlinks: their bodies are structure, not content to seal."""
    return _is_directory(part) or part.headers.get("Content-Type", "").startswith("application/symlink")


async def _peek(request: web.Request, part: aiohttp.BodyPartReader, limit: int) -> tuple[bytes, bool]:
    """Read the start of a part: all of it if it may be a record (JSON object, at most
    ``limit`` bytes), else just enough to know it is not. Returns (bytes, complete)."""
    buf = bytearray()
    while True:
        chunk = await _read_chunk(request, part, PEEK)
        if not chunk:
            return bytes(buf), True
        buf += chunk
        start = bytes(buf).lstrip()[:1]
        if (start and start != b"{") or len(buf) > limit:
            return bytes(buf), False


def record_resource(doc: dict[str, Any]) -> dict[str, Any]:
    """What a record claims to be, for authorization before its schema is checked: a patient
    or episode that is not a string (an invalid record, refused later) is passed as its JSON
    text, so scopes and audit pseudonyms only ever see strings."""
    def named(value: Any) -> str | None:
        return value if value is None or isinstance(value, str) else json.dumps(value, sort_keys=True)
    return {"kind": "record", "patient": named(doc.get("patient")), "episode": named(doc.get("episode"))}


def attachment_patient(request: web.Request) -> str | None:
    """The patient an attachment belongs to: the ``X-Medicon-Patient`` header, or the one
    patient the caller's credentials are scoped to (so the Kubo CLI needs no extra header)."""
    named = request.headers.get("X-Medicon-Patient")
    if named:
        if not _IDENTIFIER.fullmatch(named):
            raise GatewayError(400, "X-Medicon-Patient must be a patient identifier "
                                    "(1 to 128 of A-Z a-z 0-9 . _ : -)")
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
    await _require_form(request, resolved)
    limit = request.app[CONFIG].records.max_record_size
    # same framing as the client's, so its Content-Type stays valid
    reader, boundary = await _open_multipart(request)
    held: list[aiohttp.BodyPartReader] = []  # directory parts seen before the first file
    while True:
        part = await _next_part(request, reader)
        if part is None:
            if not held:
                raise GatewayError(400, "add needs at least one file part in the multipart body")
            # only directories: Kubo answers that as it would
            return await _forward_parts(request, resolved, reader, boundary, held, None, b"", True)
        if _is_directory(part):
            held.append(part)
            continue
        head, complete = await _peek(request, part, limit)
        doc = _record_in(head, complete, limit)
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
    while (part := await _next_part(request, reader)) is not None:
        if _is_directory(part):
            continue
        head, complete = await _peek(request, part, cfg.max_record_size)
        doc = _record_in(head, complete, cfg.max_record_size)
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
    key = idempotency_key(request)
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
            while chunk := await _read_chunk(request, part, proxy.CHUNK):
                yield chunk

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in reframed():
                yield chunk
        except GatewayError as err:  # bad framing or a record met mid-stream: the answer
            if not failed:
                failed.append(err)
            raise

    async def reframed() -> AsyncIterator[bytes]:
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
            while (part := await _next_part(request, reader)) is not None and _is_structural(part):
                yield delimiter + _part_head(part.headers) + b"\r\n"
            if part is not None:
                start, whole = await _peek(request, part, limit)
                if _record_in(start, whole, limit) is not None:
                    failed.append(GatewayError(400, MIXED))
                    raise failed[0]
        yield f"--{boundary}--\r\n".encode()

    return await proxy.forward_rpc(request, resolved, body=body(), failed_body=failed, tap=tap, finish=finish)


# --- dag/put ---------------------------------------------------------------------------------

async def intercept_dag_put(request: web.Request, resolved: Resolved) -> web.StreamResponse:
    """``dag/put``: a record is appended (answer ``{"Cid": {"/": cid}}``); other nodes go to Kubo."""
    await _require_form(request, resolved)
    opts = options(request, resolved)
    codec = (opts.get("input-codec") or ["dag-json"])[0]
    limit = request.app[CONFIG].records.max_record_size
    reader, boundary = await _open_multipart(request)
    parts: list[tuple[CIMultiDictProxy[str], bytes]] = []
    total = 0
    while (part := await _next_part(request, reader)) is not None:
        data = bytearray()
        while chunk := await _read_chunk(request, part, PEEK):
            data += chunk
            total += len(chunk)
            if total > 4 * limit:
                raise GatewayError(413, f"dag/put bodies through the gateway are limited to {4 * limit} bytes")
        parts.append((part.headers, bytes(data)))
    if not parts:
        raise GatewayError(400, "dag/put needs a part in the multipart body: the node to put")
    if len(parts) == 1 and codec in ("dag-json", "json"):
        doc = _json_record(parts[0][1])
        if doc is not None:
            if len(parts[0][1]) > limit:
                raise GatewayError(413, f"a record is at most {limit} bytes of JSON")
            await auth.authorize(request, "record:write", record_resource(doc))
            appended = await chain.append(request.app, doc, auth.principal(request).id,
                                          idempotency_key(request))
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
    # read as Kubo reads them (Go's ParseInt into an int64), so what is checked is what is run
    given = {name: (opts.get(name) or [None])[0] for name in ("offset", "length")}
    if any(v is not None and not _INT64.fullmatch(v) for v in given.values()):
        raise GatewayError(400, "offset and length must be integers")
    offset, length = int(given["offset"] or 0), int(given["length"] or -1)
    if not (-(2**63) <= offset < 2**63 and -(2**63) <= length < 2**63):
        raise GatewayError(400, "offset and length must fit in 64 bits")
    if offset < 0:
        raise GatewayError(400, "offset must be >= 0")
    if given["length"] is not None and length < 0:
        raise GatewayError(400, "length must be >= 0")
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
