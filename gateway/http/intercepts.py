"""Where records enter and leave through Kubo's own API: the intercepted ``add``, ``dag/put``,
``cat``, ``get``, and the pin commands that must not unpin what the gateway pinned.

A JSON (or CBOR) document that claims to be a record (an object naming a ``schema`` and an
episode or patient) is appended by the record service and never reaches Kubo as data; anything
else passes to Kubo, re-framed part by part (``multipart``), and an attachment of a patient is
sealed on its way, its file names replaced so that no patient-supplied string reaches Kubo.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, AsyncIterator

import aiohttp
import cbor2
from aiohttp import web
from multiformats import CID

from ..core import strictjson
from ..core.records import ClientRecord, is_record_candidate
from ..errors import Invalid, MediconError, StorageFull, TooLarge, Unavailable
from ..kubo.client import KUBO_FULL
from ..security import crypto
from ..storage.model import Blob
from . import attachments, proxy
from .appkeys import CONFIG, SERVICE
from .context import READ_TARGETS, caller
from .multipart import (DIRECTORY, FILE, PartInfo, closing, new_boundary, next_part, open_multipart,
                        part_bytes, part_head, part_info, read_chunk)
from .raw_writes import JsonLines, link_of
from .rpccall import Call

log = logging.getLogger(__name__)

PEEK = 64 * 1024
# Free space on Kubo's disk below which (beyond what an add was sending) a cut-off add is taken
# as Kubo's disk being full.
MIN_FREE = 4 * 1024 * 1024
MIXED = "records and other files cannot be added together: add attachments in a separate request"
# An Idempotency-Key is a structured-field string: printable ASCII (and kept to a sane length)
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
# The identifier grammar of records (schemas/record/common-v1.json#/$defs/identifier).
_IDENTIFIER = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# dag/put input codecs the gateway reads (by name or number, as Kubo takes them).
_CODECS = {"dag-json": "dag-json", "0x0129": "dag-json", "json": "json", "0x0200": "json",
           "dag-cbor": "dag-cbor", "0x71": "dag-cbor", "cbor": "cbor", "0x51": "cbor", "raw": "raw", "0x55": "raw"}


def idempotency_key(request: web.Request) -> str | None:
    """The request's ``Idempotency-Key``, if any; 400 unless it is 1 to 255 printable ASCII
    characters (the head store keeps it as text, and a key past ASCII cannot be stored)."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise Invalid("Idempotency-Key must be 1 to 255 printable ASCII characters")
    return key


# --- what is a record ----------------------------------------------------------------------------

def json_record(data: bytes) -> ClientRecord | None:
    """The record if ``data`` is JSON claiming to be a record (its text kept as sent), else
    None (a blob).

    JSON that claims to be a record but is ambiguous (duplicate keys, NaN, overflowing numbers,
    deep nesting) is refused with 400, never stored as a blob instead."""
    if not strictjson.looks_like_json_object(data):
        return None
    try:
        doc = ClientRecord.from_text(data)
    except strictjson.BadJSON as bad:
        try:
            lenient = json.loads(data)
        except (ValueError, RecursionError):  # not UTF-8, too deep, or not JSON at all
            lenient = dict.fromkeys(strictjson.top_level_keys(data))
        if is_record_candidate(lenient):
            raise Invalid(f"invalid record: {bad}") from None
        return None
    return doc if is_record_candidate(doc.parsed) else None


def _from_cbor(value: Any, depth: int = 0) -> Any:
    """A CBOR value in JSON's data model: a record holds no bytes and no tags but its ``prev``
    link (tag 42), which becomes ``{"/": cid}`` as in dag-json."""
    if depth > strictjson.MAX_DEPTH:
        raise Invalid(f"invalid record: nested deeper than {strictjson.MAX_DEPTH} levels")
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise Invalid("invalid record: a CBOR map key that is not a string")
        return {k: _from_cbor(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_cbor(v, depth + 1) for v in value]
    if isinstance(value, cbor2.CBORTag) and value.tag == 42 and isinstance(value.value, bytes):
        try:
            cid = CID.decode(value.value[1:]) if value.value[:1] == b"\x00" else None
        except Exception:
            cid = None
        if cid is None:
            raise Invalid("invalid record: a link that is not a CID")
        return {"/": str(cid.set(base="base32"))}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise Invalid(f"invalid record: a CBOR {type(value).__name__} has no place in a record")


def cbor_record(data: bytes) -> ClientRecord | None:
    """The record if ``data`` is CBOR claiming to be a record, else None. CBOR has no text
    form: the record's text is its value written out as JSON (keys in the CBOR map's order)."""
    try:
        value = cbor2.loads(data)
    except Exception:
        return None  # not CBOR: Kubo will say so
    if not (isinstance(value, dict) and is_record_candidate({k: None for k in value if isinstance(k, str)})):
        return None
    doc = _from_cbor(value)
    try:  # the same strict rules as JSON records (64-bit integers, finite numbers, strings)
        return ClientRecord.from_text(json.dumps(doc, allow_nan=False, ensure_ascii=False, separators=(",", ":")))
    except (strictjson.BadJSON, ValueError) as bad:
        raise Invalid(f"invalid record: {bad}") from None


def _record_in(head: bytes, complete: bool, limit: int) -> Any:
    """The record a part holds, or None for a blob. A part too big to be read whole (over
    ``limit``) whose start claims to be a record is refused (413), never stored as a blob."""
    if complete:
        return json_record(head)
    if strictjson.looks_like_json_object(head) and is_record_candidate(
            dict.fromkeys(strictjson.top_level_keys(head))):
        raise TooLarge(f"a record is at most {limit} bytes of JSON")
    return None


async def _peek(request: web.Request, part: aiohttp.BodyPartReader, limit: int) -> tuple[bytes, bool]:
    """Read the start of a part: all of it if it may be a record (JSON object, at most
    ``limit`` bytes), else just enough to know it is not. Returns (bytes, complete)."""
    buf = bytearray()
    while True:
        chunk = await read_chunk(request, part, PEEK)
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


# --- add -----------------------------------------------------------------------------------------

async def add(request: web.Request, call: Call) -> web.StreamResponse:
    """``add``: records are appended (all validated before any is); other files stream to Kubo."""
    reader = await open_multipart(request, "add")
    limit = request.app[CONFIG].records.max_record_size
    held: list[PartInfo] = []  # directory parts seen before the first file
    while True:
        part = await next_part(request, reader)
        if part is None:
            if not held:
                raise Invalid("add needs at least one file part in the multipart body")
            return await _add_files(request, call, reader, held, None, None, b"", True)
        info = part_info(part)
        if info.kind == DIRECTORY:
            held.append(info)
            continue
        head, complete = await _peek(request, part, limit)
        doc = _record_in(head, complete, limit) if info.kind == FILE else None
        if doc is None:
            return await _add_files(request, call, reader, held, part, info, head, complete)
        return await _add_records(request, call, reader, [(info.filename, doc, len(head))])


async def _add_records(request: web.Request, call: Call, reader: aiohttp.MultipartReader,
                       docs: list[tuple[str, Any, int]]) -> web.StreamResponse:
    if call.flag("only-hash"):
        raise Invalid("records cannot be hashed without being appended (only-hash)")
    if call.flag("wrap-with-directory"):
        raise Invalid("records are not wrapped in a directory (wrap-with-directory)")
    if "pin-name" in call.options or call.options.get("pin") is False:
        raise Invalid("records are pinned by the gateway (pin, pin-name)")
    cfg = request.app[CONFIG].records
    while (part := await next_part(request, reader)) is not None:
        info = part_info(part)
        if info.kind == DIRECTORY:
            continue
        head, complete = await _peek(request, part, cfg.max_record_size)
        doc = _record_in(head, complete, cfg.max_record_size) if info.kind == FILE else None
        if doc is None:
            raise Invalid(MIXED)
        docs.append((info.filename, doc, len(head)))
        if len(docs) > cfg.max_parts:
            raise Invalid(f"at most {cfg.max_parts} records in one add")
    appended = await request.app[SERVICE].append_all([(name, doc) for name, doc, _ in docs], caller(request),
                                                     idempotency_key(request))
    lines = [{"Name": name or done.cid, "Hash": done.cid, "Size": str(size)}
             for (name, _, size), done in zip(docs, appended)]
    body = "".join(json.dumps(line) + "\n" for line in lines)
    return web.Response(text=body, content_type="application/json", headers={"X-Chunked-Output": "1"})


class _Names:
    """Kubo's NDJSON answer to an ``add``: every (Name, Hash) it added, and — for a sealed
    attachment, whose parts reached Kubo under neutral names — the client's names put back."""

    def __init__(self, names: dict[str, str], *, silent: bool = False) -> None:
        self._names = names
        self._silent = silent  # the client asked for no result lines; Kubo sends them to the gateway
        self._tapped = bytearray()
        self._pending = bytearray()
        self.added: list[tuple[str, str]] = []

    def tap(self, chunk: bytes) -> None:
        self._tapped.extend(chunk)
        *lines, rest = bytes(self._tapped).split(b"\n")
        self._tapped[:] = rest
        for line in lines:
            item = _json_line(line)
            if isinstance(item, dict) and isinstance(item.get("Hash"), str):
                self.added.append((str(item.get("Name", "")), item["Hash"]))

    def __call__(self, chunk: bytes) -> bytes:
        self._pending.extend(chunk)
        *lines, rest = bytes(self._pending).split(b"\n")
        self._pending[:] = rest
        return b"".join(self._renamed(line) for line in lines)

    def flush(self) -> bytes:
        rest, self._pending = bytes(self._pending), bytearray()
        return self._renamed(rest) if rest else b""

    def _renamed(self, line: bytes) -> bytes:
        """A line of Kubo's answer as the client gets it (with its newline), or nothing."""
        item = _json_line(line)
        if self._silent and isinstance(item, dict) and "Hash" in item:
            return b""
        if isinstance(item, dict) and item.get("Name") in self._names:
            item["Name"] = self._names[item["Name"]]
            return json.dumps(item).encode() + b"\n"
        return line + b"\n"


def _json_line(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


async def _add_files(request: web.Request, call: Call, reader: aiohttp.MultipartReader, held: list[PartInfo],
                     first: aiohttp.BodyPartReader | None, first_info: PartInfo | None, head: bytes,
                     complete: bool) -> web.StreamResponse:
    """Stream a file add to Kubo, re-framing the parts as they are read; a record found among
    the files stops the upload before its bytes are sent. An attachment of a patient is
    sealed, and its file name replaced by its position (Kubo's answer gets the names back)."""
    service = request.app[SERVICE]
    limit = request.app[CONFIG].records.max_record_size
    patient = attachment_patient(request)
    if patient is None:
        await service.authorize(caller(request), "raw:write", {"kind": "raw"})
    else:
        await service.authorize(caller(request), "blob:write", {"kind": "blob", "patient": patient})
    sealing = patient is not None and request.app[CONFIG].security.encrypt
    if sealing:
        _refuse_clear_names(call, held, first_info)
        dek_id, dek = await service.keys.data_key_for_patient(patient)
    failed: list[MediconError] = []
    boundary = new_boundary()
    names: dict[str, str] = {}   # the neutral name a sealed part reached Kubo under -> the client's
    types: dict[str, str] = {}   # the name Kubo answers with -> the client's content type
    silent = call.flag("silent")
    if silent:  # the gateway needs Kubo's results to confirm the add; the client does not get them
        call.options["silent"] = False
    answer = _Names(names, silent=silent)
    entries = _TopLevel()

    sent = [0]  # bytes on their way to Kubo

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in reframed():
                sent[0] += len(chunk)
                yield chunk
        except MediconError as err:  # bad framing or a record met mid-stream: the answer
            if not failed:
                failed.append(err)
            raise

    async def content(part: aiohttp.BodyPartReader, start: bytes, whole: bool) -> AsyncIterator[bytes]:
        if start:
            yield start
        if not whole:
            async for chunk in part_bytes(request, part):
                yield chunk

    async def reframed() -> AsyncIterator[bytes]:
        for info in held:
            entries.count(info)
            yield part_head(boundary, info) + b"\r\n"
        part, info, start, whole = first, first_info, head, complete
        while part is not None:
            entries.count(info)
            stream = content(part, start, whole)
            shown = None
            if sealing:
                shown = str(len(names))
                names[shown] = info.filename
                types[shown] = part.headers.get("Content-Type", FILE).split(";")[0].strip()[:200] or FILE
                stream = crypto.encrypt_stream(stream, dek, dek_id)
            yield part_head(boundary, info, filename=shown)
            async for chunk in stream:
                yield chunk
            yield b"\r\n"
            part, info = await next_part(request, reader), None
            while part is not None:
                info = part_info(part)
                if sealing:
                    _refuse_clear_names(call, [], info)
                if info.kind != DIRECTORY:
                    break
                entries.count(info)
                yield part_head(boundary, info) + b"\r\n"
                part = await next_part(request, reader)
            if part is not None:
                start, whole = await _peek(request, part, limit)
                if info.kind == FILE and _record_in(start, whole, limit) is not None:
                    failed.append(Invalid(MIXED))
                    raise failed[0]
        yield closing(boundary)

    async def finish() -> None:
        """Before the client's answer completes: what Kubo answered is confirmed stored (and
        pinned), then indexed. Kubo's 200 came before its work was done, and a failure after
        it (a full disk) is only in a trailer the gateway cannot read."""
        if call.flag("only-hash"):
            return
        wrapped = call.flag("wrap-with-directory")
        roots = [cid for name, cid in answer.added if (name == "" if wrapped else "/" not in name)]
        expected = 1 if wrapped else entries.total
        try:
            if len(roots) < expected:
                raise Unavailable(f"Kubo's answer to add ended after {len(roots)} of {expected} entries: the add "
                                  "failed after Kubo had answered (its error, such as a full disk, is only in a "
                                  "trailer); nothing of it is acknowledged")
            # A root is written after everything under it, so a stored root is a complete DAG.
            await service.kubo.confirm_stored(roots, roots if call.options.get("pin", True) else [])
        except MediconError:
            if sealing:  # sealed bytes are unique to this add: its pins are nobody else's
                for cid in roots:
                    await _unpin_quietly(service, cid)
            elif roots:  # the same bytes may be pinned by others: an unpin could take their pin
                log.warning("add failed; %d root(s) it did write stay pinned (content-addressed, so "
                            "possibly pinned by others too)", len(roots))
            raise
        if patient is not None and answer.added:
            await service.add_attachments([Blob(cid, patient, sealing and name in types, types.get(name))
                                           for name, cid in answer.added])

    try:
        return await proxy.forward_rpc(request, call, body=body(), headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"}, failed_body=failed, tap=answer.tap,
            transform=answer if sealing or silent else None, finish=finish)
    except Unavailable:
        # Kubo cut the upload off without an answer the gateway could read: say why if its disk
        # has no room for what was being added (nothing of the add was acknowledged either way).
        if not failed:
            free = await service.kubo.disk_free()
            if free is not None and free < sent[0] + MIN_FREE:
                raise StorageFull(KUBO_FULL) from None
        raise


class _TopLevel:
    """How many top-level entries an add sends, as Kubo counts them (one result each): a file or
    directory at the top, a nameless part (stdin), or the first part below a top directory that
    was not declared (Kubo makes it)."""

    def __init__(self) -> None:
        self.total = 0
        self._seen: set[str] = set()

    def count(self, info: PartInfo | None) -> None:
        if info is None:
            return
        name = info.filename.strip("/")
        top = name.split("/")[0]
        if not name or "/" not in name:
            self.total += 1
        elif top not in self._seen:
            self.total += 1
        self._seen.add(top)


async def _unpin_quietly(service, cid: str) -> None:
    try:
        await service.kubo.pin_rm(cid)
    except MediconError as err:
        log.warning("attachment %s of a failed add stays pinned (%s)", cid, err.message)


def _refuse_clear_names(call: Call, held: list[PartInfo], info: PartInfo | None) -> None:
    """A sealed attachment's bytes are encrypted, but directory names, symlink targets, the
    wrapping directory and pin names would reach Kubo in clear: refused, with what works."""
    if call.flag("wrap-with-directory") or "pin-name" in call.options:
        raise Invalid("a patient's attachments are added without wrap-with-directory or pin-name: "
                      "names would reach IPFS in clear")
    if held or (info is not None and (info.kind != FILE or "/" in info.filename.strip("/"))):
        raise Invalid("a patient's attachments are added one file at a time, not as directories or "
                      "symlinks: their names would reach IPFS in clear")


# --- dag/put -------------------------------------------------------------------------------------

async def dag_put(request: web.Request, call: Call) -> web.StreamResponse:
    """``dag/put``: a record (as dag-json, json, dag-cbor or cbor) is appended (answer
    ``{"Cid": {"/": cid}}``); other nodes go to Kubo, re-framed."""
    given = call.options.get("input-codec", "dag-json")
    codec = _CODECS.get(given.lower())
    if codec is None:
        raise Invalid(f"input codec {given[:40]!r} is not accepted through the gateway "
                      f"(use dag-json, json, dag-cbor, cbor or raw)")
    reader = await open_multipart(request, "dag/put")
    limit = request.app[CONFIG].records.max_record_size
    parts: list[tuple[PartInfo, bytes]] = []
    total = 0
    while (part := await next_part(request, reader)) is not None:
        data = bytearray()
        while chunk := await read_chunk(request, part, PEEK):
            data += chunk
            total += len(chunk)
            if total > 4 * limit:
                raise TooLarge(f"dag/put bodies through the gateway are limited to {4 * limit} bytes")
        parts.append((part_info(part), bytes(data)))
    if not parts:
        raise Invalid("dag/put needs a part in the multipart body: the node to put")
    docs = [_node_record(codec, data) for _, data in parts]
    if any(doc is not None for doc in docs):
        if len(parts) != 1:
            raise Invalid("put one record per dag/put")
        if (_CODECS.get(call.options.get("store-codec", "dag-cbor").lower()) != "dag-cbor"
                or call.options.get("hash", "sha2-256").lower() != "sha2-256" or call.options.get("pin") is False):
            raise Invalid("a record is stored as the gateway stores records (dag-cbor, sha2-256, pinned): "
                          "leave out store-codec, hash and pin")
        if len(parts[0][1]) > limit:
            raise TooLarge(f"a record is at most {limit} bytes")
        appended = await request.app[SERVICE].append(docs[0], caller(request), idempotency_key(request))
        return web.Response(text=json.dumps({"Cid": {"/": appended.cid}}) + "\n",
                            content_type="application/json", headers={"X-Chunked-Output": "1"})
    service = request.app[SERVICE]
    await service.authorize(caller(request), "raw:write", {"kind": "raw"})
    boundary = new_boundary()
    body = b"".join(part_head(boundary, info) + data + b"\r\n" for info, data in parts) + closing(boundary)
    answer = JsonLines()

    async def finish() -> None:
        """Kubo answers each node's CID before it commits (and pins) them, and a failure after
        that is only in a trailer: before the client's answer completes, every node is
        confirmed stored (and pinned, if asked)."""
        answered = [cid for cid in map(link_of, answer.values("Cid")) if cid]
        if len(answered) < len(parts):
            raise Unavailable(f"Kubo's answer to dag/put ended after {len(answered)} of {len(parts)} nodes")
        await service.kubo.confirm_stored(answered, answered if call.flag("pin") else [])

    return await proxy.forward_rpc(request, call, body=body, tap=answer, finish=finish,
                                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def _node_record(codec: str, data: bytes) -> Any:
    if codec in ("dag-json", "json"):
        return json_record(data)
    if codec in ("dag-cbor", "cbor"):
        return cbor_record(data)
    if json_record(data) is not None or cbor_record(data) is not None:  # raw bytes of a record
        raise Invalid("a record is put with input-codec dag-json or dag-cbor, not as raw bytes")
    return None


# --- reads ---------------------------------------------------------------------------------------

async def sealed_blob(request: web.Request, resource: dict[str, Any]) -> Blob | None:
    if resource["kind"] != "blob":
        return None
    blob = await request.app[SERVICE].attachment(resource["cid"])
    return blob if blob is not None and blob.encrypted else None


async def get(request: web.Request, call: Call) -> web.StreamResponse:
    """``get``: Kubo's tar of what the argument names; a sealed attachment would be a tar of
    ciphertext, so it is refused with what works instead."""
    for target in request[READ_TARGETS]:
        if await sealed_blob(request, target.end) is not None:
            raise Invalid("a sealed attachment is read with `cat` or /ipfs/<cid>, not `get`")
    return await proxy.forward_rpc(request, call)


async def record_bytes(request: web.Request, resource: dict[str, Any]) -> bytes | None:
    """The JSON of the record ``resource`` names (the caller was authorized for it): its text
    as the client wrote it, with the gateway's envelope fields."""
    if resource["kind"] != "record":
        return None
    record = await request.app[SERVICE].read(resource["cid"])
    if record is None:
        return None
    return record.text.encode("utf-8")


async def cat(request: web.Request, call: Call) -> web.StreamResponse:
    """``cat`` of a record returns the record as JSON (it is stored as dag-cbor, which Kubo's
    ``cat`` cannot read); of a sealed attachment, its plaintext; anything else is Kubo's."""
    offset, length = call.options.get("offset", 0), call.options.get("length")
    if offset < 0:
        raise Invalid("offset must be >= 0")
    if length is not None and length < 0:
        raise Invalid("length must be >= 0")
    targets = request[READ_TARGETS]
    if len(targets) == 1:
        blob = await sealed_blob(request, targets[0].end)
        if blob is not None:
            try:
                return await attachments.serve(request, blob, rpc_cat=True, offset=offset,
                                               length=-1 if length is None else length)
            except attachments.NotSealed:
                return await proxy.forward_rpc(request, call)
        data = await record_bytes(request, targets[0].end)
        if data is not None:
            data = data[offset:] if length is None else data[offset:offset + length]
            return web.Response(body=data, content_type="text/plain",
                                headers={"X-Stream-Output": "1", "X-Content-Length": str(len(data))})
    return await proxy.forward_rpc(request, call)


# --- pins ----------------------------------------------------------------------------------------

async def pin_rm(request: web.Request, call: Call) -> web.StreamResponse:
    await request.app[SERVICE].protect_pins(call.args)
    return await proxy.forward_rpc(request, call)


async def pin_update(request: web.Request, call: Call) -> web.StreamResponse:
    """``pin/update`` unpins its first argument unless ``unpin=false``."""
    if call.options.get("unpin", True):
        await request.app[SERVICE].protect_pins(call.args[:1])
    return await proxy.forward_rpc(request, call)
