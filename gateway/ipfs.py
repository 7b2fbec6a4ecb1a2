"""Calls the gateway makes to Kubo on its own behalf (storing and reading records, pins).

Kubo's error answers become ``GatewayError``: a refused block is the client's problem (400),
Kubo unreachable is a 502, Kubo silent a 504 — the same mapping as the proxy.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from yarl import URL

from . import ipld
from .errors import GatewayError


class Kubo:
    def __init__(self, session: aiohttp.ClientSession, api_url: str) -> None:
        self._session = session
        self._api = api_url.rstrip("/") + "/api/v0/"

    async def _call(self, command: str, params: list[tuple[str, str]], *,
                    data: bytes | None = None) -> bytes:
        headers = None
        if data is not None:
            data, headers = _one_file_form(data)
        url = URL(self._api + command + "?" + urlencode(params, quote_via=quote), encoded=True)
        try:
            async with self._session.post(url, data=data, headers=headers) as resp:
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

    async def record_node(self, cid: str) -> dict[str, Any]:
        """A node the gateway wrote: the raw block, hash-checked and decoded here (see
        ``ipld``), or ``dag/get`` for anything that decoder does not cover."""
        try:
            ipld.sha256_of(cid)
        except ipld.Unsupported:
            return await self.dag_get(cid)
        block = await self._call("block/get", [("arg", cid)])
        try:
            return ipld.decode(cid, block)
        except ipld.BlockMismatch as exc:
            raise GatewayError(502, str(exc)) from None
        except ipld.Unsupported:
            return await self.dag_get(cid)

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

    async def recursive_pins(self) -> set[str]:
        body = await self._call("pin/ls", [("type", "recursive")])
        return set(json.loads(body).get("Keys", {}))


def _one_file_form(data: bytes) -> tuple[bytes, dict[str, str]]:
    """``data`` as the one-file multipart/form-data body Kubo reads, built in one go (the
    gateway's own small writes; a FormData writer costs more than the request). The boundary
    is random, so no content can be made to contain it."""
    boundary = secrets.token_hex(16)
    while boundary.encode() in data:
        boundary = secrets.token_hex(16)
    body = b"".join((b"--", boundary.encode(), b'\r\nContent-Disposition: form-data; name="file"; '
                     b'filename="data"\r\nContent-Type: application/octet-stream\r\n\r\n', data,
                     b"\r\n--", boundary.encode(), b"--\r\n"))
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


class KuboAnswer(GatewayError):
    """Kubo refused a call the gateway made (its message is passed on)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(400 if status < 500 else 502, f"Kubo: {message}")
        self.kubo_status = status
