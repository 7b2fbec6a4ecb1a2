"""Calls the gateway makes to Kubo on its own behalf (storing and reading records, pins).

Kubo's error answers become ``GatewayError``: a refused block is the client's problem (400),
Kubo unreachable is a 502, Kubo silent a 504 — the same mapping as the proxy.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from .errors import GatewayError


class Kubo:
    def __init__(self, session: aiohttp.ClientSession, api_url: str) -> None:
        self._session = session
        self._api = api_url.rstrip("/") + "/api/v0/"

    async def _call(self, command: str, params: list[tuple[str, str]], *,
                    data: bytes | None = None) -> bytes:
        form = None
        if data is not None:
            form = aiohttp.FormData()
            form.add_field("file", data, filename="data", content_type="application/octet-stream")
        try:
            async with self._session.post(self._api + command, params=params, data=form) as resp:
                body = await resp.read()
                if resp.status != 200:
                    try:
                        message = json.loads(body)["Message"]
                    except (ValueError, KeyError, TypeError):
                        message = body.decode(errors="replace").strip()[:300]
                    raise KuboAnswer(resp.status, message)
                return body
        except asyncio.TimeoutError:
            raise GatewayError(504, "Kubo did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise GatewayError(502, f"Kubo is not reachable ({type(exc).__name__})") from None

    async def dag_put(self, node: dict[str, Any], *, pin: bool) -> str:
        """Store ``node`` (dag-json: links as ``{"/": cid}``) as dag-cbor; return its CID."""
        body = await self._call("dag/put", [("store-codec", "dag-cbor"), ("input-codec", "dag-json"),
                                            ("pin", "true" if pin else "false")],
                                data=json.dumps(node, separators=(",", ":")).encode())
        return json.loads(body)["Cid"]["/"]

    async def dag_get(self, cid: str) -> dict[str, Any]:
        body = await self._call("dag/get", [("arg", cid), ("output-codec", "dag-json")])
        return json.loads(body)

    async def resolve_path(self, path: str) -> str | None:
        """The CID an ``/ipfs/<cid>/a/b`` path ends at (None if it does not resolve)."""
        try:
            body = await self._call("dag/resolve", [("arg", path)])
        except KuboAnswer:
            return None
        return json.loads(body)["Cid"]["/"]

    async def has_block(self, cid: str) -> bool:
        try:
            await self._call("block/stat", [("arg", cid), ("offline", "true")])
        except KuboAnswer:
            return False
        return True

    async def pin_add(self, cid: str) -> None:
        await self._call("pin/add", [("arg", cid), ("recursive", "true")])

    async def pin_rm(self, cid: str) -> None:
        await self._call("pin/rm", [("arg", cid), ("recursive", "true")])

    async def pin_update(self, old: str, new: str, *, unpin: bool) -> None:
        """Pin ``new`` recursively by the difference from the pinned ``old`` (cheap for chains)."""
        await self._call("pin/update", [("arg", old), ("arg", new), ("unpin", "true" if unpin else "false")])

    async def recursive_pins(self) -> set[str]:
        body = await self._call("pin/ls", [("type", "recursive")])
        return set(json.loads(body).get("Keys", {}))

    async def pinned(self, cid: str) -> bool:
        try:
            await self._call("pin/ls", [("arg", cid), ("type", "recursive")])
        except KuboAnswer:
            return False
        return True


class KuboAnswer(GatewayError):
    """Kubo refused a call the gateway made (its message is passed on)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(400 if status < 500 else 502, f"Kubo: {message}")
        self.kubo_status = status
