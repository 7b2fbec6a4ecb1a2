"""Where records enter and leave through Kubo's own API: the intercepted ``add``, ``dag/put``,
``cat`` and ``get``.

A JSON document that claims to be a record (an object naming a ``schema`` and an episode or
patient) is appended by the record service and never reaches Kubo as a file; anything else
passes to Kubo as a blob, streamed (sealed first when it belongs to a patient).
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

from ..core import strictjson
from ..core.records import is_record_candidate
from ..core.service import root_of
from ..errors import Invalid, MediconError, TooLarge
from ..security import crypto
from ..storage.model import Blob
from . import attachments, proxy
from .appkeys import CONFIG, SERVICE
from .body import CHUNK, body_read
from .context import caller
from .rpccall import Resolved, flag
from .rpccall import options as parse_options

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
        raise Invalid("Idempotency-Key must be 1 to 255 printable ASCII characters")
    return key


def _malformed(exc: BaseException) -> Invalid:
    why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return Invalid(f"malformed multipart body: {why}")


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
        part = await body_read(request, reader.next())
    except _FRAMING_ERRORS as exc:
        raise _malformed(exc) from None
    if part is not None and not isinstance(part, aiohttp.BodyPartReader):
        raise Invalid("malformed multipart body: nested multipart parts are not supported")
    return part


async def _require_form(request: web.Request, resolved: Resolved) -> None:
    """Kubo reads files only from a multipart/form-data body: refuse anything else here, in
    Kubo's error shape, rather than relay Kubo's plain-text refusal."""
    if request.content_type != "multipart/form-data":
        await request.app[SERVICE].authorize(caller(request), "raw:write", {"kind": "raw"})
        raise Invalid(f"{resolved.command} takes a multipart/form-data body, not {request.content_type[:100]!r}")


async def _read_chunk(request: web.Request, part: aiohttp.BodyPartReader, size: int) -> bytes:
    try:
        return await body_read(request, part.read_chunk(size))
    except _FRAMING_ERRORS as exc:
        raise _malformed(exc) from None


def options(request: web.Request, resolved: Resolved) -> dict[str, list[str]]:
    return parse_options(request.query_string, resolved.path_arg)


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
        if is_record_candidate(lenient):
            raise Invalid(f"invalid record: {bad}") from None
        return None
    return doc if is_record_candidate(doc) else None


def _record_in(head: bytes, complete: bool, limit: int) -> Any:
    """The record a part holds, or None for a blob. A part too big to be read whole (over
    ``limit``) whose start claims to be a record is refused (413), never stored as a blob."""
    if complete:
        return _json_record(head)
    if strictjson.looks_like_json_object(head) and is_record_candidate(
            dict.fromkeys(strictjson.top_level_keys(head))):
        raise TooLarge(f"a record is at most {limit} bytes of JSON")
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


def attachment_patient(request: web.Request) -> str | None:
    """The patient an attachment belongs to: the ``X-Medicon-Patient`` header, or the one
    patient the caller's credentials are scoped to (so the Kubo CLI needs no extra header)."""
    named = request.headers.get("X-Medicon-Patient")
    if named:
        if not _IDENTIFIER.fullmatch(named):
            raise Invalid("X-Medicon-Patient must be a patient identifier (1 to 128 of A-Z a-z 0-9 . _ : -)")
        return named
    scope = caller(request).principal.patients
    if scope is not None and len(scope) == 1:
        return next(iter(scope))
    return None


def _boundary(request: web.Request) -> str:
    return parse_mimetype(request.headers["Content-Type"]).parameters["boundary"]


def _filename(part: aiohttp.BodyPartReader) -> str:
    return unquote_plus(part.filename or part.name or "")


# --- add -------------------------------------------------------------------------------------

async def add(request: web.Request, resolved: Resolved) -> web.StreamResponse:
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
                raise Invalid("add needs at least one file part in the multipart body")
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
        raise Invalid("records cannot be hashed without being appended (only-hash)")
    if flag(opts, "wrap-with-directory"):
        raise Invalid("records are not wrapped in a directory (wrap-with-directory)")
    cfg = request.app[CONFIG].records
    while (part := await _next_part(request, reader)) is not None:
        if _is_directory(part):
            continue
        head, complete = await _peek(request, part, cfg.max_record_size)
        doc = _record_in(head, complete, cfg.max_record_size)
        if doc is None:
            raise Invalid(MIXED)
        docs.append((_filename(part), doc, len(head)))
        if len(docs) > cfg.max_parts:
            raise Invalid(f"at most {cfg.max_parts} records in one add")
    appended = await request.app[SERVICE].append_all([(name, doc) for name, doc, _ in docs], caller(request),
                                                     idempotency_key(request))
    lines = [{"Name": name or done.cid, "Hash": done.cid, "Size": str(size)}
             for (name, _, size), done in zip(docs, appended)]
    body = "".join(json.dumps(line) + "\n" for line in lines)
    return web.Response(text=body, content_type="application/json", headers={"X-Chunked-Output": "1"})


async def _forward_parts(request: web.Request, resolved: Resolved, reader: aiohttp.MultipartReader,
                         boundary: str, held: list, first: aiohttp.BodyPartReader | None,
                         head: bytes, complete: bool) -> web.StreamResponse:
    """Stream a blob add to Kubo, re-framing the parts as they are read; a record found among
    the files stops the upload before its bytes are sent."""
    limit = request.app[CONFIG].records.max_record_size
    failed: list[MediconError] = []
    delimiter = f"--{boundary}\r\n".encode()
    patient = attachment_patient(request)
    service = request.app[SERVICE]
    if patient is None:
        await service.authorize(caller(request), "raw:write", {"kind": "raw"})
    else:
        await service.authorize(caller(request), "blob:write", {"kind": "blob", "patient": patient})
    sealing = patient is not None and request.app[CONFIG].security.encrypt
    if sealing:
        dek_id, dek = await service.keys.data_key_for_patient(patient)
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
            await service.add_attachments([Blob(cid, patient, sealing, types.get(name)) for name, cid in added])

    async def content(part: aiohttp.BodyPartReader, start: bytes, whole: bool) -> AsyncIterator[bytes]:
        if start:
            yield start
        if not whole:
            while chunk := await _read_chunk(request, part, CHUNK):
                yield chunk

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in reframed():
                yield chunk
        except MediconError as err:  # bad framing or a record met mid-stream: the answer
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
                    failed.append(Invalid(MIXED))
                    raise failed[0]
        yield f"--{boundary}--\r\n".encode()

    return await proxy.forward_rpc(request, resolved, body=body(), failed_body=failed, tap=tap, finish=finish)


# --- dag/put ---------------------------------------------------------------------------------

async def dag_put(request: web.Request, resolved: Resolved) -> web.StreamResponse:
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
                raise TooLarge(f"dag/put bodies through the gateway are limited to {4 * limit} bytes")
        parts.append((part.headers, bytes(data)))
    if not parts:
        raise Invalid("dag/put needs a part in the multipart body: the node to put")
    if len(parts) == 1 and codec in ("dag-json", "json"):
        doc = _json_record(parts[0][1])
        if doc is not None:
            if len(parts[0][1]) > limit:
                raise TooLarge(f"a record is at most {limit} bytes of JSON")
            appended = await request.app[SERVICE].append(doc, caller(request), idempotency_key(request))
            return web.Response(text=json.dumps({"Cid": {"/": appended.cid}}) + "\n",
                                content_type="application/json", headers={"X-Chunked-Output": "1"})
    if any(_json_record(data) is not None for _, data in parts):
        raise Invalid("put one record per dag/put, encoded as dag-json")
    await request.app[SERVICE].authorize(caller(request), "raw:write", {"kind": "raw"})
    delimiter = f"--{boundary}\r\n".encode()
    body = b"".join(delimiter + _part_head(h) + data + b"\r\n" for h, data in parts)
    return await proxy.forward_rpc(request, resolved, body=body + f"--{boundary}--\r\n".encode())


# --- reads -----------------------------------------------------------------------------------

async def sealed_blob(request: web.Request, arg: str) -> Blob | None:
    """The sealed attachment an argument (``<cid>``, ``/ipfs/<cid>/path``) ends at, if any."""
    service = request.app[SERVICE]
    root, has_path = root_of(arg)
    if root is None:
        return None
    cid = root
    if has_path:
        cid = await service.kubo.resolve_path(arg if arg.startswith("/") else "/ipfs/" + arg)
        if cid is None:
            return None
    blob = await service.attachment(cid)
    return blob if blob is not None and blob.encrypted else None


async def get(request: web.Request, resolved: Resolved) -> web.StreamResponse:
    """``get``: Kubo's tar of what the arguments name; a sealed attachment would be a tar of
    ciphertext, so it is refused with what works instead."""
    for arg in options(request, resolved).get("arg", []):
        if await sealed_blob(request, arg) is not None:
            raise Invalid("a sealed attachment is read with `cat` or /ipfs/<cid>, not `get`")
    return await proxy.forward_rpc(request, resolved)


def bare_cid(arg: str) -> str | None:
    path = arg.removeprefix("/ipfs/").strip("/")
    return path if path and "/" not in path else None


async def record_bytes(request: web.Request, cid: str | None) -> bytes | None:
    """The JSON of the record ``cid`` names (the caller was authorized), or None if the
    gateway did not write it."""
    if cid is None:
        return None
    record = await request.app[SERVICE].read(cid)
    if record is None:
        return None
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()


async def cat(request: web.Request, resolved: Resolved) -> web.StreamResponse:
    """``cat`` of a record CID returns the record as JSON (it is stored as dag-cbor, which
    Kubo's ``cat`` cannot read); a sealed attachment its plaintext; everything else is Kubo's."""
    opts = options(request, resolved)
    args = opts.get("arg") or []
    # read as Kubo reads them (Go's ParseInt into an int64), so what is checked is what is run
    given = {name: (opts.get(name) or [None])[0] for name in ("offset", "length")}
    if any(v is not None and not _INT64.fullmatch(v) for v in given.values()):
        raise Invalid("offset and length must be integers")
    offset, length = int(given["offset"] or 0), int(given["length"] or -1)
    if not (-(2**63) <= offset < 2**63 and -(2**63) <= length < 2**63):
        raise Invalid("offset and length must fit in 64 bits")
    if offset < 0:
        raise Invalid("offset must be >= 0")
    if given["length"] is not None and length < 0:
        raise Invalid("length must be >= 0")
    if len(args) == 1:
        blob = await sealed_blob(request, args[0])
        if blob is not None:
            return await attachments.serve(request, blob, rpc_cat=True, offset=offset, length=length)
    data = await record_bytes(request, bare_cid(args[0])) if len(args) == 1 else None
    if data is None:
        return await proxy.forward_rpc(request, resolved)
    data = data[offset:] if length < 0 else data[offset:offset + length]
    return web.Response(body=data, content_type="text/plain",
                        headers={"X-Stream-Output": "1", "X-Content-Length": str(len(data))})
