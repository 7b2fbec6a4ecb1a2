"""The IPFS Pinning Service API a gateway serves for its own Kubo node (the replicator role).

Spec: https://ipfs.github.io/pinning-services-api-spec/ (v1.0: ``GET/POST /pins``,
``GET/POST/DELETE /pins/{requestid}``, bearer tokens, ``PinStatus`` queued → pinning → pinned
or failed, ``origins`` and ``delegates``). Another site's gateway replicates every record
through it (``gateway.core.replication``); Kubo's own client (``ipfs pin remote``) works with it
as with any pinning service.

A pin request is stored (``storage.pins``: both backends), then worked on here:

* the node connects to the request's ``origins`` (the requester's Kubo) and fetches the root
  over bitswap; when every block the root links to is already pinned recursively on this node
  — the case of a record whose ``prev`` was replicated before it — the root is pinned by
  ``block/put?pin=true`` of the bytes just fetched, which costs the same whatever the length of
  the chain below it; otherwise by ``pin/add`` (which fetches and walks the whole DAG);
* a request may carry the block itself (``replication.BLOCK_FIELD``, base64, up to
  ``replication.MAX_PUSHED_BLOCK`` bytes: the extension another site's gateway uses once a
  ``PinStatus``'s ``info`` here said ``replication.TAKES_BLOCKS``); its bytes must hash to the
  CID, and when what it links to is pinned here it is pinned without a bitswap fetch at all;
* ``POST /pins`` waits up to ``POST_WAIT`` seconds for that, so a replica is usually
  ``pinned`` in its first answer; later the status is polled;
* a ``pinned`` status is confirmed against the node (``pin/ls``) whenever it is reported, so a
  pin removed behind the service's back reads ``failed``.

All replicator tokens share one account per node: any of them sees every request on the node
(the deployment's replicas), and a listing asked about specific CIDs also reports, as pinned,
the records and attachments the node's own gateway holds (they have no request: their writer
pinned them). Requests unfinished when a gateway stops are resumed by the next gateway of the
same node. Removing a request unpins its CID only when no other request holds it and the
gateway does not index it: pins of records belong to the gateway, as on ``/api/v0``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from ..errors import Forbidden, Invalid, MediconError, NotFound, Unavailable
from ..kubo import ipld
from ..kubo.cids import canonical, is_cid
from ..storage.model import PIN_STATUSES, PinRequest
from .access import Caller
from .replication import BLOCK_FIELD, MAX_PUSHED_BLOCK, TAKES_BLOCKS
from .service import RecordService

log = logging.getLogger(__name__)

ACTION = "replica:pin"
POST_WAIT = 5.0           # seconds POST /pins waits for the pin before answering its status
FETCH_TIMEOUT = "120s"    # Kubo's bound on fetching what a request names
MAX_WORKERS = 32          # pins worked on at once
CONNECT_TTL = 30.0        # seconds an origin peer, once connected, is not dialled again
NODE_PREFIX = "node-"     # requestid of a pin the node's own gateway holds (a record or attachment)
MAX_NAME, MAX_ORIGINS, MAX_DELEGATES, MAX_META = 255, 20, 20, 1000
MAX_CIDS, MAX_LIMIT = 10, 1000
MATCHES = ("exact", "iexact", "partial", "ipartial")


def rfc3339(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str, what: str) -> int:
    """An RFC 3339 date-time as µs since the epoch; ``Invalid`` naming ``what`` otherwise."""
    try:
        when = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise Invalid(f"{what} must be an RFC 3339 date-time such as 2026-01-02T03:04:05Z") from None
    if when.tzinfo is None:
        raise Invalid(f"{what} must name its time zone (Z or an offset)")
    return int(when.timestamp() * 1e6)


def read_pin(body: Any) -> tuple[str, str | None, tuple[str, ...], tuple[tuple[str, str], ...]]:
    """A ``Pin`` object (cid, name, origins, meta), checked as the spec bounds it."""
    if not isinstance(body, dict):
        raise Invalid("the body must be a Pin object: {\"cid\": …}")
    cid = body.get("cid")
    if not is_cid(cid):
        raise Invalid("Pin.cid must be a CID")
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME):
        raise Invalid(f"Pin.name must be a string of at most {MAX_NAME} characters")
    origins = body.get("origins", [])
    if not isinstance(origins, list) or len(origins) > MAX_ORIGINS or not all(
            isinstance(o, str) and o.startswith("/") and len(o) < 1000 for o in origins):
        raise Invalid(f"Pin.origins must be a list of at most {MAX_ORIGINS} multiaddrs")
    meta = body.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or len(meta) > MAX_META or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise Invalid(f"Pin.meta must map strings to strings (at most {MAX_META})")
    return cid, name, tuple(dict.fromkeys(origins)), tuple(sorted(meta.items()))


@dataclass(frozen=True)
class PushedBlock:
    """A block a Pin object carried, checked to be the dag-cbor block its CID names, and the
    CIDs it links to."""

    data: bytes
    links: tuple[str, ...]


def read_pushed_block(body: dict[str, Any], cid: str) -> PushedBlock | None:
    """The block a Pin object carries in ``BLOCK_FIELD`` (none if it carries none), checked to
    be the dag-cbor block ``cid`` names."""
    text = body.get(BLOCK_FIELD)
    if text is None:
        return None
    wrong = f"Pin.{BLOCK_FIELD} must be the base64 of the block the CID names, at most {MAX_PUSHED_BLOCK} bytes"
    if not isinstance(text, str) or len(text) > (MAX_PUSHED_BLOCK + 2) // 3 * 4:
        raise Invalid(wrong)
    try:
        block = base64.b64decode(text, validate=True)
        node = ipld.decode(cid, block)
    except (binascii.Error, ValueError):  # not base64, another block's bytes, not dag-cbor
        raise Invalid(wrong) from None
    return PushedBlock(block, tuple(_links(node)))


def _links(node: Any) -> list[str]:
    """The CIDs a decoded node (dag-json form) links to."""
    if isinstance(node, dict):
        if set(node) == {"/"} and isinstance(node["/"], str):
            return [node["/"]]
        return [link for value in node.values() for link in _links(value)]
    if isinstance(node, list):
        return [link for value in node for link in _links(value)]
    return []


class PinningService:
    """The pin objects of one gateway's Kubo node, and the work of pinning them."""

    def __init__(self, service: RecordService) -> None:
        self.service = service
        self.kubo = service.kubo
        self.store = service.storage.pins
        self._node: str | None = None
        self._delegates: tuple[float, list[str]] = (0.0, [])
        self._connected: dict[str, float] = {}
        self._workers = asyncio.Semaphore(MAX_WORKERS)
        self._tasks: set[asyncio.Task] = set()
        self._last_created = 0
        self._resumer: asyncio.Task | None = None

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Resume the requests a previous gateway of this node left unfinished, as soon as the
        node answers."""
        self._resumer = asyncio.get_running_loop().create_task(self._resume())

    async def close(self) -> None:
        for task in [self._resumer, *self._tasks]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in [self._resumer, *self._tasks] if t is not None), return_exceptions=True)

    async def _resume(self) -> None:
        while True:
            try:
                node = await self.node()
                for pin in await self.store.unfinished(node):
                    self._spawn(pin, None)
                return
            except MediconError as err:
                log.info("pinning service: waiting for Kubo to resume unfinished pins (%s)", err.message)
                await asyncio.sleep(2.0)

    # --- the node --------------------------------------------------------------------------------

    async def node(self) -> str:
        """The node's peer id (Kubo's ``id``), which scopes every request."""
        if self._node is None:
            await self._identify()
        return self._node

    async def _identify(self) -> None:
        answer = json.loads(await self.kubo.call("id", []))
        self._node = answer["ID"]
        addresses = [a for a in answer.get("Addresses") or [] if isinstance(a, str) and "/p2p/" in a]
        self._delegates = (time.monotonic(), addresses[:MAX_DELEGATES])

    async def delegates(self) -> list[str]:
        """Where a requester's node reaches this one (``/…/p2p/<peer id>``): at least one,
        as the spec requires."""
        at, addresses = self._delegates
        if time.monotonic() - at > 60 or not addresses:
            await self._identify()
            at, addresses = self._delegates
        return addresses or [f"/p2p/{self._node}"]

    # --- the API ---------------------------------------------------------------------------------

    async def authorize(self, caller: Caller) -> str:
        if self.store is None:
            raise Unavailable("this gateway's storage keeps no pin requests")
        await self.service.authorize(caller, ACTION, {"kind": "pins"})
        return await self.node()

    def _created(self) -> int:
        """Creation times are unique within a gateway (the spec pages by them)."""
        now = max(time.time_ns() // 1000, self._last_created + 1)
        self._last_created = now
        return now

    async def create(self, caller: Caller, body: Any, *, replaces: PinRequest | None = None) -> dict[str, Any]:
        node = await self.authorize(caller)
        cid, name, origins, meta = read_pin(body)
        pushed = read_pushed_block(body, cid)
        pin = PinRequest(secrets.token_hex(16), node, cid, "queued", self._created(), caller.principal.id,
                         name, origins, meta)
        work = asyncio.ensure_future(self._pin(pin, pushed))
        done, _ = await asyncio.wait({work}, timeout=POST_WAIT)
        if done:
            status, details = self._outcome(work)
            pin = _with(pin, status, details)
            await self.store.add(pin)
            if replaces is not None:
                await self._release(replaces)
        else:
            pin = _with(pin, "pinning", None)
            await self.store.add(pin)
            self._track(pin, work, replaces)
        return await self._status(pin)

    async def get(self, caller: Caller, requestid: str) -> dict[str, Any]:
        node = await self.authorize(caller)
        pin = await self._find(node, requestid)
        return (await self._confirmed([pin]))[0]

    async def replace(self, caller: Caller, requestid: str, body: Any) -> dict[str, Any]:
        node = await self.authorize(caller)
        read_pin(body)  # a bad body changes nothing
        old = await self._find(node, requestid)
        if old.requestid.startswith(NODE_PREFIX):
            raise Forbidden("this pin belongs to the gateway (a record or an attachment it holds)")
        await self.store.remove(node, requestid)
        return await self.create(caller, body, replaces=old)

    async def delete(self, caller: Caller, requestid: str) -> None:
        node = await self.authorize(caller)
        pin = await self._find(node, requestid)
        if pin.requestid.startswith(NODE_PREFIX):
            raise Forbidden("this pin belongs to the gateway (a record or an attachment it holds)")
        removed = await self.store.remove(node, requestid)
        if removed is not None:
            await self._release(removed)

    async def list(self, caller: Caller, *, cids: list[str] | None, name: str | None, match: str,
                   statuses: tuple[str, ...], before_us: int | None, after_us: int | None,
                   meta: dict[str, str] | None, limit: int) -> dict[str, Any]:
        node = await self.authorize(caller)
        wanted = [canonical(c) or c for c in cids] if cids else None
        asked = list(dict.fromkeys((cids or []) + (wanted or [])))
        count, pins = await self.store.find(node, cids=asked or None, name=name, match=match, statuses=statuses,
                                            before_us=before_us, after_us=after_us, meta=meta, limit=limit)
        results = await self._confirmed(pins)
        count -= len(pins) - len(results)
        if wanted and "pinned" in statuses and name is None and not meta:
            answered = {canonical(r["pin"]["cid"]) for r in results}
            held = [p for p in [await self._held(node, c) for c in wanted if c not in answered] if p is not None]
            held = [p for p in held if (before_us is None or p.created_us < before_us)
                    and (after_us is None or p.created_us > after_us)]
            extra = await self._confirmed(held)
            count += len(extra)
            results = sorted(results + extra, key=lambda r: r["created"], reverse=True)[:limit]
        return {"count": count, "results": results}

    async def _find(self, node: str, requestid: str) -> PinRequest:
        if requestid.startswith(NODE_PREFIX):
            pin = await self._held(node, requestid[len(NODE_PREFIX):])
        else:
            pin = await self.store.get(node, requestid)
        if pin is None:
            raise NotFound("no pin request with this requestid")
        return pin

    async def _held(self, node: str, cid: str) -> PinRequest | None:
        """A pin the node's own gateway holds (an indexed record or attachment), as a pin object."""
        resource = await self.service.resource_of(cid)
        if resource["kind"] not in ("record", "blob"):
            return None
        created = 0
        if resource["kind"] == "record":
            indexed = await self.service.storage.heads.record(resource["cid"])
            try:
                created = parse_time(indexed.recorded_at, "recorded_at") if indexed else 0
            except Invalid:
                created = 0
        return PinRequest(NODE_PREFIX + resource["cid"], node, resource["cid"], "pinned", created, "gateway",
                          None, (), (), "held by this node's gateway")

    async def _status(self, pin: PinRequest) -> dict[str, Any]:
        status: dict[str, Any] = {
            "requestid": pin.requestid, "status": pin.status, "created": rfc3339(pin.created_us),
            "pin": {"cid": pin.cid, **({"name": pin.name} if pin.name is not None else {}),
                    "origins": list(pin.origins), "meta": dict(pin.meta)},
            "delegates": await self.delegates(), "info": {TAKES_BLOCKS[0]: TAKES_BLOCKS[1]}}
        if pin.details:
            status["info"]["status_details"] = pin.details
        return status

    async def _confirmed(self, pins: list[PinRequest]) -> list[dict[str, Any]]:
        """The pins' statuses, every ``pinned`` one checked on the node now; a gateway-held pin
        no longer pinned is left out, a request's reads ``failed``."""
        pinned = await self._pinned_among([p.cid for p in pins if p.status == "pinned"])
        out = []
        for pin in pins:
            if pin.status == "pinned" and canonical(pin.cid) not in pinned:
                if pin.requestid.startswith(NODE_PREFIX):
                    continue
                pin = _with(pin, "failed", "the pin is no longer on the node")
            out.append(await self._status(pin))
        return out

    async def _pinned_among(self, cids: list[str]) -> set[str]:
        """Which of ``cids`` are pinned recursively on the node (canonical form)."""
        return {canonical(cid) for cid in await self.kubo.pinned_among(list(dict.fromkeys(cids)))}

    # --- the work --------------------------------------------------------------------------------

    def _spawn(self, pin: PinRequest, replaces: PinRequest | None) -> None:
        self._track(pin, asyncio.ensure_future(self._pin(pin)), replaces)

    def _track(self, pin: PinRequest, work: asyncio.Future, replaces: PinRequest | None) -> None:
        async def finish() -> None:
            try:
                await asyncio.wait({work})
            except asyncio.CancelledError:
                work.cancel()
                raise
            status, details = self._outcome(work)
            try:
                if await self.store.get(pin.node, pin.requestid) is not None:
                    await self.store.set_status(pin.node, pin.requestid, status, details)
                if replaces is not None:
                    await self._release(replaces)
            except MediconError as err:
                log.warning("pin request %s: its status could not be recorded (%s)", pin.requestid, err.message)
        task = asyncio.get_running_loop().create_task(finish())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _outcome(work: asyncio.Future) -> tuple[str, str | None]:
        if work.cancelled():
            return "failed", "cancelled"
        err = work.exception()
        if err is None:
            return "pinned", None
        message = err.message if isinstance(err, MediconError) else type(err).__name__
        return "failed", message[:500]

    async def _pin(self, pin: PinRequest, pushed: PushedBlock | None = None) -> None:
        """Pin ``pin.cid`` recursively on the node (its ``pushed`` block if the request carried
        it), fetching what is missing from its origins."""
        async with self._workers:
            if pushed is not None:
                block, links = pushed.data, list(pushed.links)
            else:
                await self._connect(pin.origins)
                block = await self.kubo.call("block/get", [("arg", pin.cid), ("timeout", FETCH_TIMEOUT)])
                try:
                    links = _links(ipld.decode(pin.cid, block))
                except (ipld.Unsupported, ipld.BlockMismatch):
                    links = None
            if links is not None and len(await self._pinned_among(links)) == len(set(map(canonical, links))):
                # Everything below is pinned here already: pin the root without walking the chain.
                key = json.loads(await self.kubo.call(
                    "block/put", [("cid-codec", "dag-cbor"), ("mhtype", "sha2-256"), ("pin", "true")],
                    data=block))["Key"]
                if canonical(key) == canonical(pin.cid):
                    return
            elif pushed is not None:
                # Stored unpinned first: pin/add below then fetches only what is missing under it.
                await self.kubo.call("block/put", [("cid-codec", "dag-cbor"), ("mhtype", "sha2-256")], data=block)
            await self._connect(pin.origins)
            await self.kubo.call("pin/add", [("arg", pin.cid), ("recursive", "true"), ("timeout", FETCH_TIMEOUT)])

    async def _connect(self, origins: tuple[str, ...]) -> None:
        """Dial the origins' peers (not recently dialled ones): the blocks are fetched from
        them by bitswap. Best effort: a peer already connected (peering) needs nothing."""
        now = time.monotonic()
        fresh = [o for o in origins if "/p2p/" in o and o.rsplit("/p2p/", 1)[1] != self._node
                 and now - self._connected.get(o.rsplit("/p2p/", 1)[1], 0.0) > CONNECT_TTL]
        if not fresh:
            return
        for origin in fresh:
            self._connected[origin.rsplit("/p2p/", 1)[1]] = now
        try:
            await self.kubo.call("swarm/connect", [("arg", o) for o in fresh] + [("timeout", "10s")])
        except MediconError as err:
            log.info("pinning service: could not dial every origin (%s)", err.message[:200])

    async def _release(self, pin: PinRequest) -> None:
        """Unpin a removed request's CID unless another request holds it or the gateway indexes it."""
        try:
            if await self.store.holders(pin.node, pin.cid):
                return
            if (await self.service.resource_of(pin.cid))["kind"] != "raw":
                return
            await self.kubo.pin_rm(pin.cid)
        except MediconError as err:
            log.warning("pin request %s removed; its CID could not be unpinned (%s)", pin.requestid, err.message)


def _with(pin: PinRequest, status: str, details: str | None) -> PinRequest:
    return replace(pin, status=status, details=details)


def statuses_of(values: list[str]) -> tuple[str, ...]:
    """``?status=`` (repeated or comma-separated); the spec's default: pinned only."""
    found = [s for v in values for s in v.split(",") if s]
    if not found:
        return ("pinned",)
    wrong = [s for s in found if s not in PIN_STATUSES]
    if wrong:
        raise Invalid(f"status must be one of {', '.join(PIN_STATUSES)}")
    return tuple(dict.fromkeys(found))
