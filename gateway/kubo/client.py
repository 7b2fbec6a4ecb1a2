"""The gateway's own calls to Kubo's RPC API (storing and reading records, pins, resolving).

One long-lived ``aiohttp.ClientSession`` per gateway (keep-alive, bounded timeouts); the HTTP
layer streams clients' requests through the same session. Failures become domain errors:
Kubo unreachable ``Unavailable``, Kubo silent ``TimedOut``, Kubo refusing a call ``KuboAnswer``,
Kubo's disk full ``StorageFull``.

A write is trusted only when Kubo's status is the write's: streamed commands (``dag/put``,
``add``) answer 200 before they commit and report a failure only in the ``X-Stream-Error``
trailer, which aiohttp never exposes. Record nodes are therefore encoded here and stored with
``block/put?pin=true``, which writes and pins before its only answer; what was written by a
streamed command is confirmed afterwards (``confirm_stored``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from typing import Any, AsyncGenerator, AsyncIterator, Protocol
from urllib.parse import quote, urlencode

import aiohttp
import ijson
from yarl import URL

from ..config import KuboConfig
from ..errors import MediconError, StorageFull, TimedOut, Unavailable
from . import car, ipld
from .cids import canonical

CHUNK = 1 << 18  # 256 KiB: read buffer for streams through the session
PINS_CHUNK = 1 << 14  # 16 KiB (~170 pins) of Kubo's list of pins read and parsed at a time


# How Kubo (Go's os package) words a full disk or an exhausted quota (ENOSPC, EDQUOT).
_DISK_FULL = ("no space left on device", "disk quota exceeded")
KUBO_FULL = "Kubo's repository is full (no space left on its disk): nothing was stored"
# CIDs per pin/ls confirmation call (the arguments travel in the URL).
CONFIRM_BATCH = 100


class KuboAnswer(Unavailable):
    """Kubo refused a call the gateway made on its own behalf (its message is passed on)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubo: {message}")
        self.kubo_status = status
        self.kubo_message = message


def is_disk_full(message: str) -> bool:
    """Whether Kubo's error message says its disk is full."""
    lowered = message.lower()
    return any(words in lowered for words in _DISK_FULL)


class KuboObserver(Protocol):
    """Told of every Kubo call (``gateway.metrics.Metrics`` is one): ``command`` is a command
    name or a fixed label, never a path; ``error`` is ``refused``, ``timeout`` or ``unreachable``."""

    def kubo_call(self, command: str, seconds: float, error: str | None = None) -> None: ...


class KuboClient:
    def __init__(self, session: aiohttp.ClientSession, config: KuboConfig,
                 observer: KuboObserver | None = None) -> None:
        self.session = session
        self.config = config
        self.observer = observer
        self._api = config.api_url.rstrip("/") + "/api/v0/"
        # Sent with every RPC call (never to Kubo's HTTP gateway port, which takes none).
        secret = config.rpc_secret()
        self.rpc_headers = {"Authorization": f"Bearer {secret}"} if secret else {}

    def observe(self, command: str, started: float, error: str | None = None) -> None:
        """Report a call begun at ``started`` (``time.perf_counter()``) to the observer, if any;
        the HTTP layer's streaming relay reports its calls through here too."""
        if self.observer is not None:
            self.observer.kubo_call(command, time.perf_counter() - started, error)

    @classmethod
    def open(cls, config: KuboConfig, observer: KuboObserver | None = None) -> "KuboClient":
        """A client with its own session; ``close`` it when done."""
        connector = aiohttp.TCPConnector(limit=config.max_connections, keepalive_timeout=30)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout,
                                        sock_read=config.read_timeout)
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=False,                # pass Kubo's bytes through exactly as sent
            cookie_jar=aiohttp.DummyCookieJar(),  # never share cookies between clients
            read_bufsize=CHUNK,
        )
        return cls(session, config, observer)

    async def close(self) -> None:
        await self.session.close()

    def rpc_url(self, command: str, params: list[tuple[str, str]]) -> URL:
        query = urlencode(params, quote_via=quote)
        return URL(self._api + quote(command) + ("?" + query if query else ""), encoded=True)

    async def call(self, command: str, params: list[tuple[str, str]], *,
                   data: bytes | None = None, files: list[bytes] | None = None) -> bytes:
        """One RPC call; ``data`` is sent as a one-file form, ``files`` as a form of one part
        each. Kubo's whole answer, or the domain error its status says."""
        headers = dict(self.rpc_headers)
        if data is not None:
            data, form_headers = one_file_form(data)
            headers.update(form_headers)
        elif files is not None:
            data, form_headers = files_form(files)
            headers.update(form_headers)
        async with self._answer(command, params, data=data, headers=headers) as resp:
            return await resp.read()

    @contextlib.asynccontextmanager
    async def _answer(self, command: str, params: list[tuple[str, str]], *, data: bytes | None = None,
                      headers: dict[str, str] | None = None,
                      read_bufsize: int | None = None) -> AsyncIterator[aiohttp.ClientResponse]:
        """Kubo's answer to one call, once its status says the call succeeded (the domain
        error it says otherwise); the call is observed when the caller is done reading."""
        started, error = time.perf_counter(), None
        try:
            async with self.session.post(self.rpc_url(command, params), data=data, read_bufsize=read_bufsize,
                                         headers=self.rpc_headers if headers is None else headers) as resp:
                if resp.status != 200:
                    error = "refused"
                    body = await resp.read()
                    try:
                        message = json.loads(body)["Message"]
                    except (ValueError, KeyError, TypeError):
                        message = body.decode(errors="replace").strip()[:300]
                    if is_disk_full(str(message)):
                        raise StorageFull(KUBO_FULL)
                    raise KuboAnswer(resp.status, str(message))
                yield resp
        except asyncio.TimeoutError:
            error = "timeout"
            raise TimedOut("Kubo did not answer in time") from None
        except aiohttp.ClientError as exc:
            error = "unreachable"
            raise Unavailable(f"Kubo is not reachable ({type(exc).__name__})") from None
        except MediconError:  # the answer, read, was not what it had to be
            error = error or "refused"
            raise
        finally:
            self.observe(command, started, error)

    async def version(self) -> str:
        return json.loads(await self.call("version", []))["Version"]

    async def put_block(self, block: bytes) -> str:
        """Store the dag-cbor ``block``, pinned recursively (without walking the links: what
        they point to is pinned already); return its CID. Kubo answers only after the block is
        written and pinned, so a 200 is the write; its disk full is ``StorageFull``, and nothing
        is pinned when it fails."""
        expected = ipld.cid_of(block)
        if await self.put_blocks([block], pin=True) != [expected]:
            raise Unavailable(f"Kubo did not confirm the block {expected}")
        return expected

    async def put_blocks(self, blocks: list[bytes], *, pin: bool) -> list[str]:
        """Store dag-cbor ``blocks`` in one ``block/put`` (one part each), pinned recursively
        without walking their links if ``pin``; the CIDs Kubo confirmed, in order. Kubo writes
        (and pins) the parts one after another and answers one line for each as it is done,
        so a line is that block's write: a failure on the first part is the status (a full disk
        ``StorageFull``), a failure on a later one ends the answer early (its message is only in
        a trailer) and the blocks after it are missing from the list."""
        params = [("cid-codec", "dag-cbor"), ("mhtype", "sha2-256"), ("pin", "true" if pin else "false")]
        body = await self.call("block/put", params, files=blocks)
        return [line["Key"] for line in _json_lines(body) if isinstance(line.get("Key"), str)]

    async def dag_get(self, cid: str) -> dict[str, Any]:
        body = await self.call("dag/get", [("arg", cid), ("output-codec", "dag-json")])
        return json.loads(body)

    async def record_node(self, cid: str) -> dict[str, Any]:
        """A node the gateway wrote: the raw block, hash-checked and decoded here (see
        ``ipld``), or ``dag/get`` for anything that decoder does not cover."""
        try:
            ipld.sha256_of(cid)
        except ipld.Unsupported:
            return await self.dag_get(cid)
        block = await self.call("block/get", [("arg", cid)])
        try:
            return ipld.decode(cid, block)
        except ipld.BlockMismatch as exc:
            raise Unavailable(str(exc)) from None
        except ipld.Unsupported:
            return await self.dag_get(cid)

    def chain_read(self, top: str) -> "ChainRead":
        """Record nodes down the ``prev`` links from ``top``, streamed by one ``dag/export``
        (see ``ChainRead``); use as ``async with``."""
        return ChainRead(self, top)

    async def record_chain(self, newest_first: list[str]) -> list[dict[str, Any]]:
        """The nodes of records linked one to the next by ``prev``, newest first, read in one
        ``dag/export`` instead of one call each: the nodes of the longest prefix the stream
        gave and the hashes confirmed (shorter when Kubo lacks a block, the chain is not what
        the caller thought, or the stream fails); the caller reads the rest one by one."""
        nodes: list[dict[str, Any]] = []
        if newest_first:
            async with self.chain_read(newest_first[0]) as chain:
                for cid in newest_first:
                    node = await chain.next(cid)
                    if node is None:
                        break
                    nodes.append(node)
        return nodes

    async def resolve_path(self, path: str) -> str | None:
        """The CID an ``/ipfs/<cid>/a/b`` path ends at (None if it does not resolve)."""
        try:
            body = await self.call("dag/resolve", [("arg", path)])
        except KuboAnswer:
            return None
        return json.loads(body)["Cid"]["/"]

    async def has_block(self, cid: str) -> bool:
        try:
            await self.call("block/stat", [("arg", cid), ("offline", "true")])
        except KuboAnswer:
            return False
        return True

    async def confirm_stored(self, cids: list[str], pinned: list[str], *, pin_type: str = "recursive") -> None:
        """Check, offline, that every one of ``cids`` is in Kubo's blockstore and every one of
        ``pinned`` is pinned (``pin_type``, recursively by default); ``Unavailable`` naming what
        is not. For writes whose answer was streamed, so that their 200 proved nothing.
        ``block/stat`` takes one CID a call (a few at a time here); ``pin/ls`` checks a batch
        before it answers, and its answer must still name every CID asked for."""
        gate = asyncio.Semaphore(8)

        async def stat(cid: str) -> None:
            async with gate:
                try:
                    body = await self.call("block/stat", [("arg", cid), ("offline", "true")])
                except KuboAnswer as err:
                    raise Unavailable(f"Kubo answered a write but does not hold {cid} "
                                      f"({err.kubo_message[:200]})") from None
            _require_all([cid], [line.get("Key") for line in _json_lines(body)], "hold")
        await asyncio.gather(*(stat(cid) for cid in cids))
        for start in range(0, len(pinned), CONFIRM_BATCH):
            batch = pinned[start:start + CONFIRM_BATCH]
            try:
                body = await self.call("pin/ls", [("type", pin_type), *(("arg", c) for c in batch)])
            except KuboAnswer as err:
                raise Unavailable(f"Kubo answered a write but did not pin it ({err.kubo_message[:200]})") from None
            _require_all(batch, [key for line in _json_lines(body) for key in line.get("Keys", {})], "pin")

    async def disk_free(self) -> int | None:
        """Free bytes on the disk of Kubo's repository, as Kubo reports it (``diag/sys``);
        None if it does not say. For telling why a write failed without a readable answer."""
        try:
            info = json.loads(await self.call("diag/sys", []))
            free = info["diskinfo"]["free_space"]
        except (MediconError, ValueError, KeyError, TypeError):
            return None
        return free if isinstance(free, int) else None

    async def pin_add(self, cid: str) -> None:
        await self.call("pin/add", [("arg", cid), ("recursive", "true")])

    async def pin_rm(self, cid: str) -> bool:
        """Remove the recursive pin of ``cid``; False if it was not pinned (someone else, such
        as ``check --repair``, removed it first)."""
        try:
            await self.call("pin/rm", [("arg", cid), ("recursive", "true")])
        except KuboAnswer as err:
            if "not pinned" in err.kubo_message:
                return False
            raise
        return True

    async def recursive_pins(self) -> AsyncIterator[str]:
        """Every recursive pin, as ``pin/ls`` lists them, one at a time: the answer (one JSON
        object, sent whole once Kubo has it all, so a failure is its status) is parsed as it
        arrives, never held whole; an answer cut short is ``Unavailable``, not a shorter list.
        (``pin/ls --stream`` would report a failure only in a trailer.)"""
        async with self._answer("pin/ls", [("type", "recursive")], read_bufsize=PINS_CHUNK) as resp:
            try:
                async for cid, _ in ijson.kvitems_async(resp.content, "Keys", buf_size=PINS_CHUNK):
                    yield cid
            except ijson.JSONError:
                raise Unavailable("Kubo's list of pins was cut short or malformed") from None

    async def pinned_among(self, cids: list[str]) -> set[str]:
        """Which of ``cids`` are pinned recursively: one ``pin/ls`` per hundred while they all
        are (the usual case); Kubo fails the call at the first that is not, so a failing batch
        is halved until each unpinned CID is found."""
        pinned: set[str] = set()
        for start in range(0, len(cids), CONFIRM_BATCH):
            pinned |= await self._pinned_of(cids[start:start + CONFIRM_BATCH])
        return pinned

    async def _pinned_of(self, cids: list[str]) -> set[str]:
        if not cids:
            return set()
        try:
            body = await self.call("pin/ls", [("type", "recursive"), *(("arg", c) for c in cids)])
        except KuboAnswer as err:
            if "not pinned" not in err.kubo_message:
                raise
            if len(cids) == 1:
                return set()
            half = len(cids) // 2
            return await self._pinned_of(cids[:half]) | await self._pinned_of(cids[half:])
        named = {canonical(key) for line in _json_lines(body) for key in line.get("Keys", {})} - {None}
        return {cid for cid in cids if canonical(cid) in named}


def _json_lines(body: bytes) -> list[dict[str, Any]]:
    out = []
    for line in body.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out


def _require_all(asked: list[str], answered: list[Any], what: str) -> None:
    named = {canonical(c) for c in answered if isinstance(c, str)}
    missing = [c for c in asked if canonical(c) not in named]
    if missing:
        raise Unavailable(f"Kubo answered a write but did not {what} {missing[0]}"
                          + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))


def one_file_form(data: bytes) -> tuple[bytes, dict[str, str]]:
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


def files_form(files: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """``files`` as a multipart/form-data body of one part each (``block/put`` of several
    blocks), with a random boundary no part contains."""
    boundary = secrets.token_hex(16)
    while any(boundary.encode() in data for data in files):
        boundary = secrets.token_hex(16)
    mark = b"--" + boundary.encode()
    head = (b'\r\nContent-Disposition: form-data; name="file"; filename="data"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n")
    body = b"".join(part for data in files for part in (mark, head, data, b"\r\n")) + mark + b"--\r\n"
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


class ChainRead:
    """A chain of record nodes read newest first from one ``dag/export``: Kubo walks from the
    top record down its ``prev`` links (a record node has no other link) and streams the
    blocks in that order, so the next block of the stream is the next record down.

    ``next(cid)`` is believed only when the stream's next block hashes to ``cid`` (the CID
    the index, or the record above, names for that place); otherwise — the stream ended, Kubo
    lacks the block, the chain is not what the caller expected, or the block is outside what
    ``ipld`` decodes — it is None, the stream is dropped, and the caller reads that record and
    the rest one by one. Leaving the ``async with`` closes the connection: Kubo would
    otherwise go on to the episode's first record."""

    def __init__(self, client: KuboClient, top: str) -> None:
        self._client, self._failure = client, None
        self._blocks: AsyncGenerator[bytes, None] | None = self._stream(top)
        self._started: float | None = None  # the call is made at the first ``next``

    async def _stream(self, top: str) -> AsyncGenerator[bytes, None]:
        """The blocks of ``dag/export`` from ``top`` (offline: never a search of the network)
        as they arrive; ends quietly on any failure (its kind kept for the call's metrics).
        Closing the generator closes the connection, which stops Kubo's walk."""
        client = self._client
        url = client.rpc_url("dag/export", [("arg", top), ("offline", "true")])
        try:
            async with client.session.post(url, headers=client.rpc_headers) as resp:
                if resp.status != 200:
                    self._failure = "refused"
                    return
                try:
                    async for _, block in car.blocks(resp.content):
                        yield block
                finally:
                    resp.close()
        except car.CarError:
            self._failure = "refused"
        except asyncio.TimeoutError:
            self._failure = "timeout"
        except aiohttp.ClientError:
            self._failure = "unreachable"

    async def next(self, cid: str) -> dict[str, Any] | None:
        if self._blocks is None:
            return None
        if self._started is None:
            self._started = time.perf_counter()
        try:
            return ipld.decode(cid, await anext(self._blocks))
        except (StopAsyncIteration, ipld.BlockMismatch, ipld.Unsupported):
            await self.close()
            return None

    async def close(self) -> None:
        if self._blocks is not None:
            blocks, self._blocks = self._blocks, None
            await blocks.aclose()
            if self._started is not None:
                self._client.observe("dag/export", self._started, self._failure)

    async def __aenter__(self) -> "ChainRead":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
