"""Raw writes (blocks, CARs, pins outside the record chains) with their results confirmed.

Kubo streams the answer of these commands: its 200 goes out before the work is done, and a
failure after it (a full disk, a block it could not fetch) is only in an HTTP trailer, which
clients reading through a proxy never see. So the gateway reads Kubo's answer as it passes,
and before the client's answer completes it checks in Kubo that what was answered is stored
(and pinned, where the command pins). What cannot be confirmed cuts the client's answer off:
it never looks like a finished write.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ..errors import Unavailable
from . import proxy
from .appkeys import SERVICE
from .multipart import reframed_files
from .rpccall import Call


class JsonLines:
    """Kubo's answer (one JSON value a line) collected as it streams to the client: a ``tap``."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._pending = bytearray()

    def __call__(self, chunk: bytes) -> None:
        self._pending.extend(chunk)
        *lines, rest = bytes(self._pending).split(b"\n")
        self._pending[:] = rest
        for line in lines:
            try:
                self.items.append(json.loads(line))
            except ValueError:
                pass

    def values(self, key: str) -> list[Any]:
        return [item[key] for item in self.items if isinstance(item, dict) and key in item]


def link_of(value: Any) -> str | None:
    """``{"/": cid}`` as Kubo writes a CID in JSON."""
    return value.get("/") if isinstance(value, dict) and isinstance(value.get("/"), str) else None


async def block_put(request: web.Request, call: Call) -> web.StreamResponse:
    """Every block answered is stored (and pinned if ``pin``), and one answered for each part."""
    parts: list[object] = []
    body, content_type = await reframed_files(request, call.command, seen=parts)
    answer = JsonLines()

    async def finish() -> None:
        keys = [k for k in answer.values("Key") if isinstance(k, str)]
        if len(keys) < len(parts):
            raise Unavailable(f"Kubo's answer to block/put ended after {len(keys)} of {len(parts)} blocks")
        await request.app[SERVICE].kubo.confirm_stored(keys, keys if call.flag("pin") else [])

    return await proxy.forward_rpc(request, call, body=body, headers={"Content-Type": content_type},
                                   tap=answer, finish=finish)


async def dag_import(request: web.Request, call: Call) -> web.StreamResponse:
    """Every root Kubo answers is stored, and pinned unless Kubo said why it could not pin it.
    With ``silent`` the gateway still reads the roots (and does not pass them on)."""
    silent = call.flag("silent")
    call.options["silent"] = False
    answer = JsonLines()

    async def finish() -> None:
        roots = [r for r in answer.values("Root") if isinstance(r, dict)]
        cids = [cid for cid in (link_of(r.get("Cid")) for r in roots) if cid]
        if len(cids) < len(roots):
            raise Unavailable("Kubo's answer to dag/import named a root the gateway could not read")
        pinned = [link_of(r.get("Cid")) for r in roots if not r.get("PinErrorMsg")]
        await request.app[SERVICE].kubo.confirm_stored(cids, [c for c in pinned if c] if call.options.get(
            "pin-roots", True) else [])

    return await proxy.forward_rpc(request, call, tap=answer, finish=finish,
                                   transform=_Silenced() if silent else None)


class _Silenced:
    """Nothing of Kubo's answer for a ``silent`` client (the gateway still reads it)."""

    def __call__(self, chunk: bytes) -> bytes:
        return b""


async def pin_add(request: web.Request, call: Call) -> web.StreamResponse:
    """The answer must end with the pins, each confirmed in Kubo: with ``progress`` Kubo has
    streamed for a while before it knows whether the pin will succeed."""
    answer = JsonLines()

    async def finish() -> None:
        pins = [p for line in answer.values("Pins") if isinstance(line, list) for p in line if isinstance(p, str)]
        if len(pins) < len(call.args):
            raise Unavailable(f"Kubo's answer to pin/add ended with {len(pins)} of {len(call.args)} pins")
        recursive = call.options.get("recursive", True)
        await request.app[SERVICE].kubo.confirm_stored(pins, pins, pin_type="recursive" if recursive else "direct")

    return await proxy.forward_rpc(request, call, tap=answer, finish=finish)
