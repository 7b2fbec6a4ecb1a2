"""Multipart bodies of the commands that read files (``add``, ``dag/put``, ``block/put``…),
read part by part and re-framed for Kubo.

Kubo reads more from a part's headers than its bytes: a ``filename`` with ``/`` makes
directories, ``Abspath`` headers make filestore and urlstore references, the form name carries
mode and mtime. So no part header is passed on as sent: each part Kubo gets has a fresh
boundary, a ``Content-Disposition`` rebuilt from the file name the gateway read, one of three
content types (file, directory, symlink), and nothing else.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import parse_qsl, quote_plus, unquote_plus

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..errors import Invalid
from .body import CHUNK, body_read

# What aiohttp's multipart reader raises on broken framing (no or bad boundary, a body cut
# short, part headers too long or malformed): the client's fault, so a 400, never a 500.
FRAMING_ERRORS = (ValueError, AssertionError, RuntimeError, LookupError, HttpProcessingError)
DIRECTORY = "application/x-directory"
SYMLINK = "application/symlink"
FILE = "application/octet-stream"
# What Kubo reads from a form name's query (``file?mode=0644&mtime=...``): digits only.
_FORM_METADATA = {"mode": re.compile(r"[0-7]{1,12}"), "mtime": re.compile(r"-?[0-9]{1,19}"),
                  "mtime-nsecs": re.compile(r"[0-9]{1,9}")}


def malformed(exc: BaseException) -> Invalid:
    why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return Invalid(f"malformed multipart body: {why}")


async def open_multipart(request: web.Request, command: str) -> aiohttp.MultipartReader:
    """The body's multipart reader; 400 unless it is ``multipart/form-data`` with a boundary."""
    if request.content_type != "multipart/form-data":
        raise Invalid(f"{command} takes a multipart/form-data body, not {request.content_type[:100]!r}")
    try:
        return await request.multipart()
    except FRAMING_ERRORS as exc:
        raise malformed(exc) from None


async def next_part(request: web.Request, reader: aiohttp.MultipartReader) -> aiohttp.BodyPartReader | None:
    """The next part, or None after the last; 400 for broken framing or a nested multipart."""
    try:
        part = await body_read(request, reader.next())
    except FRAMING_ERRORS as exc:
        raise malformed(exc) from None
    if part is not None and not isinstance(part, aiohttp.BodyPartReader):
        raise Invalid("malformed multipart body: nested multipart parts are not supported")
    return part


async def read_chunk(request: web.Request, part: aiohttp.BodyPartReader, size: int = CHUNK) -> bytes:
    try:
        return await body_read(request, part.read_chunk(size))
    except FRAMING_ERRORS as exc:
        raise malformed(exc) from None


@dataclass(frozen=True)
class PartInfo:
    """What Kubo would make of a part: a file, a directory or a symlink, at a path, with the
    mode and mtime its form name carries."""

    kind: str          # FILE, DIRECTORY or SYMLINK
    filename: str      # as Kubo reads it (URL-unescaped); "" when the part has none
    metadata: str      # the validated ``?mode=…`` of the form name, or ""


def part_info(part: aiohttp.BodyPartReader) -> PartInfo:
    if not part.headers.get("Content-Disposition", "").lower().startswith("form-data"):
        raise Invalid("malformed multipart body: every part needs Content-Disposition: form-data")
    ctype = part.headers.get("Content-Type", "").split(";")[0].strip().lower()
    kind = DIRECTORY if ctype in (DIRECTORY, "multipart/form-data") else SYMLINK if ctype == SYMLINK else FILE
    filename = unquote_plus(part.filename or "")
    name = part.name or ""
    _, _, query = name.partition("?")
    metadata = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        pattern = _FORM_METADATA.get(key)
        if pattern is None or not pattern.fullmatch(value):
            raise Invalid(f"a multipart form name carries {key[:30]!r}: only mode, mtime and mtime-nsecs are read")
        metadata.append(f"{key}={value}")
    return PartInfo(kind, filename, "&".join(metadata))


def new_boundary() -> str:
    return "medicon" + secrets.token_hex(16)


def part_head(boundary: str, info: PartInfo, *, filename: str | None = None) -> bytes:
    """The delimiter and headers of a part as Kubo gets it: rebuilt, never copied."""
    name = "file" + (f"?{info.metadata}" if info.metadata else "")
    shown = info.filename if filename is None else filename
    disposition = f'form-data; name="{name}"' + (f'; filename="{quote_plus(shown, safe="")}"' if shown else "")
    return (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
            f"Content-Type: {info.kind}\r\n\r\n").encode()


def closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode()


async def part_bytes(request: web.Request, part: aiohttp.BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await read_chunk(request, part):
        yield chunk


async def reframed_files(request: web.Request, command: str,
                         seen: list | None = None) -> tuple[AsyncIterator[bytes], str]:
    """A command's whole multipart body re-framed for Kubo (``block/put``, ``dag/import``,
    ``multibase``): every part streamed with rebuilt headers. Returns (body, Content-Type);
    each part's ``PartInfo`` is appended to ``seen`` as it goes to Kubo."""
    reader = await open_multipart(request, command)
    boundary = new_boundary()

    async def body() -> AsyncIterator[bytes]:
        while (part := await next_part(request, reader)) is not None:
            info = part_info(part)
            if seen is not None:
                seen.append(info)
            yield part_head(boundary, info)
            async for chunk in part_bytes(request, part):
                yield chunk
            yield b"\r\n"
        yield closing(boundary)

    return body(), f"multipart/form-data; boundary={boundary}"
