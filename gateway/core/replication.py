"""Replication of records to other Kubo nodes, through the IPFS Pinning Service API.

A record is acknowledged only once it is pinned on ``records.replicas`` nodes: this gateway's
own Kubo (where the append stored and pinned it), and ``replicas - 1`` of the services in
``records.replica_services`` reporting it ``pinned``. Each service is any implementation of
the Pinning Service API (https://ipfs.github.io/pinning-services-api-spec/) — the gateway of
another site serves one for its own node at ``/pinning/v1`` (``gateway.core.pinning``), and an
institution's existing pinning service works the same way. What a service receives is a CID of
a sealed block, this node's addresses as ``origins`` to fetch it from (by bitswap), and a fixed
name: never a patient's data or identifier.

``Replication.ensure(blocks)`` is the one call the append path makes, once per batch of stored
records (CID → block), after they are stored and pinned locally and before any head moves. It
asks every configured service at once (``POST /pins`` per CID), polls those not yet pinned
(``GET /pins/{requestid}``, backing off from 20 ms to 500 ms), and returns as soon as
``replicas - 1`` services report every CID pinned. It raises — and the append is not
acknowledged — when that can no longer happen (``NotReplicated``, 503: a service unreachable,
refusing, or reporting ``failed``) or has not happened within ``records.replica_timeout``
(``TimedOut``, 504). Requests already sent stay with the services (a pin that completes later
is an orphan there, which ``check --repair`` at that site removes).

A service that says in a ``PinStatus``'s ``info`` that it takes blocks (``TAKES_BLOCKS``: another
site's gateway does) gets each later record's block with its request, in the Pin object's
``BLOCK_FIELD`` (base64, up to ``MAX_PUSHED_BLOCK`` bytes): it checks the bytes against the CID
and pins them without fetching them by bitswap, which sends a peer at most one message per
20 ms. Any other service gets the spec's Pin object only, and fetches from ``origins``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..config import ConfigError, RecordsConfig, ReplicaService
from ..errors import MediconError, NotReplicated, TimedOut
from ..kubo.cids import canonical
from ..kubo.client import KuboClient

log = logging.getLogger(__name__)

PIN_NAME = "medicon-gateway record"
STATUSES = ("queued", "pinning", "pinned", "failed")
MAX_CIDS_PER_QUERY = 10   # the spec's bound on ?cid= of GET /pins
POST_CONCURRENCY = 16     # POST /pins in flight per service
ORIGINS_TTL = 60.0        # seconds this node's own addresses are reused before asking Kubo again
# The Pin object's extension field carrying the block (base64), and the PinStatus ``info`` entry
# with which a service says it takes it; larger blocks are fetched by the service over bitswap.
BLOCK_FIELD = "medicon_block"
TAKES_BLOCKS = ("medicon_blocks", "accepted")
MAX_PUSHED_BLOCK = 32 * 1024


class ReplicaError(MediconError):
    """One service did not (or cannot) pin what it was asked to."""


@dataclass
class RemotePins:
    """A client of one Pinning Service API endpoint."""

    name: str
    endpoint: str
    session: aiohttp.ClientSession
    token: str

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _call(self, method: str, path: str, *, params: list[tuple[str, str]] | None = None,
                    body: dict[str, Any] | None = None) -> Any:
        url = self.endpoint.rstrip("/") + path
        try:
            async with self.session.request(method, url, params=params, json=body, headers=self._headers) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise ReplicaError(f"replica service {self.name!r} answered {resp.status}: {_reason(text)}")
                return json.loads(text) if text.strip() else None
        except asyncio.TimeoutError:
            raise ReplicaError(f"replica service {self.name!r} did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise ReplicaError(f"replica service {self.name!r} is unreachable ({type(exc).__name__})") from None
        except ValueError:
            raise ReplicaError(f"replica service {self.name!r} answered something that is not JSON") from None

    async def add(self, cid: str, origins: list[str], block: bytes | None = None) -> dict[str, Any]:
        """``POST /pins``: ask the service to pin ``cid`` (sending ``block``, its bytes, if
        given); its ``PinStatus``."""
        body: dict[str, Any] = {"cid": cid, "name": PIN_NAME, "meta": {"app": "medicon-gateway"}}
        if origins:
            body["origins"] = origins
        if block is not None:
            body[BLOCK_FIELD] = base64.b64encode(block).decode("ascii")
        return _pin_status(self.name, await self._call("POST", "/pins", body=body), cid)

    async def status(self, requestid: str, cid: str) -> dict[str, Any]:
        """``GET /pins/{requestid}``."""
        return _pin_status(self.name, await self._call("GET", f"/pins/{requestid}"), cid)

    async def pinned(self, cids: list[str]) -> set[str]:
        """Which of ``cids`` the service reports pinned (``GET /pins?cid=…&status=pinned``, ten
        CIDs a query), in canonical form."""
        found: set[str] = set()
        for start in range(0, len(cids), MAX_CIDS_PER_QUERY):
            part = cids[start:start + MAX_CIDS_PER_QUERY]
            answer = await self._call("GET", "/pins", params=[("cid", ",".join(part)), ("status", "pinned"),
                                                              ("limit", "1000")])
            results = answer.get("results") if isinstance(answer, dict) else None
            if not isinstance(results, list):
                raise ReplicaError(f"replica service {self.name!r} answered a listing without results")
            for item in results:
                if isinstance(item, dict) and item.get("status") == "pinned" and isinstance(item.get("pin"), dict):
                    found.add(canonical(str(item["pin"].get("cid"))) or "")
        return found & {canonical(c) or c for c in cids}


def _reason(text: str) -> str:
    """The spec's ``Failure`` (``{"error": {"reason", "details"}}``) in a few words."""
    try:
        error = json.loads(text)["error"]
        return f"{error.get('reason')}: {error.get('details', '')}"[:300]
    except (ValueError, KeyError, TypeError):
        return text.strip()[:200] or "(no body)"


def _pin_status(service: str, answer: Any, cid: str) -> dict[str, Any]:
    """A ``PinStatus`` about ``cid``, or ``ReplicaError``."""
    if not (isinstance(answer, dict) and isinstance(answer.get("requestid"), str) and answer["requestid"]
            and answer.get("status") in STATUSES and isinstance(answer.get("pin"), dict)):
        raise ReplicaError(f"replica service {service!r} answered something that is not a PinStatus")
    if canonical(str(answer["pin"].get("cid"))) != canonical(cid):
        raise ReplicaError(f"replica service {service!r} answered about another CID")
    return answer


class Replication:
    """What ``records.replicas`` asks of every append, and what ``check`` asks of the replicas."""

    def __init__(self, records: RecordsConfig, kubo: KuboClient | None) -> None:
        self.replicas = records.replicas
        self.timeout = records.replica_timeout
        self.kubo = kubo
        needed = self.replicas - 1
        if needed > len(records.replica_services):
            raise ConfigError(f"config key 'records.replicas' is {self.replicas}: the gateway's own Kubo and "
                              f"{needed} replica service(s), but records.replica_services names "
                              f"{len(records.replica_services)}")
        names = [s.name for s in records.replica_services]
        if len(set(names)) != len(names):
            raise ConfigError("config key 'records.replica_services': two services have the same name")
        self._configured: tuple[ReplicaService, ...] = records.replica_services
        self._tokens = [s.access_token() for s in records.replica_services]  # a missing key_file stops the start
        self._session: aiohttp.ClientSession | None = None
        self._origins: tuple[float, list[str]] = (0.0, [])
        self._taking_blocks: set[str] = set()  # services whose answers said they take blocks

    @classmethod
    def disabled(cls) -> "Replication":
        """No replication (a service built without ``RecordService.open``)."""
        return cls(RecordsConfig(), None)

    @property
    def services(self) -> list[RemotePins]:
        if self._session is None:
            if not self._configured:
                return []
            # Requests are bounded by the replica timeout; connections by a few seconds.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout, sock_connect=min(5.0, self.timeout)),
                cookie_jar=aiohttp.DummyCookieJar())
        return [RemotePins(s.name, s.endpoint, self._session, token)
                for s, token in zip(self._configured, self._tokens)]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def origins(self) -> list[str]:
        """This node's own addresses (``/…/p2p/<peer id>``), for the services to fetch from:
        Kubo's ``id``, reused for a minute; none if Kubo does not say."""
        at, addresses = self._origins
        if time.monotonic() - at < ORIGINS_TTL or self.kubo is None:
            return addresses
        try:
            answer = json.loads(await self.kubo.call("id", []))
            addresses = [a for a in answer.get("Addresses") or [] if isinstance(a, str) and "/p2p/" in a][:20]
        except (MediconError, ValueError, AttributeError):
            addresses = []
        self._origins = (time.monotonic(), addresses)
        return addresses

    async def ensure(self, blocks: dict[str, bytes], after: dict[str, str] | None = None) -> None:
        """Return once ``records.replicas - 1`` services report every CID of ``blocks`` (CID →
        its bytes) pinned; ``NotReplicated`` (503) when they cannot, ``TimedOut`` (504) past the
        timeout. The blocks must already be stored and pinned on this gateway's Kubo (their
        origin). ``after`` maps a CID to the one of ``blocks`` it is chained on (a record's
        ``prev`` written in the same batch): a service sent blocks is asked for it only once it
        answered for that one."""
        needed = self.replicas - 1
        if needed <= 0 or not blocks:
            return
        origins = await self.origins()
        deadline = time.monotonic() + self.timeout
        services = self.services
        tasks = {asyncio.ensure_future(self._replicate(s, blocks, origins, deadline, after or {})): s.name
                 for s in services}
        done, problems = 0, []
        try:
            for finished in asyncio.as_completed(list(tasks)):
                try:
                    await finished
                    done += 1
                except ReplicaError as err:
                    problems.append(err.message)
                if done >= needed or len(problems) > len(services) - needed:
                    break
        finally:
            for task in tasks:
                task.cancel()
        if done >= needed:
            return
        message = (f"not acknowledged: pinned on {1 + done} of the {self.replicas} nodes records.replicas "
                   f"requires ({'; '.join(problems)})")
        if any("did not report" in p or "did not answer" in p for p in problems):
            raise TimedOut(message, retry_after=1)
        raise NotReplicated(message, retry_after=1)

    async def _replicate(self, service: RemotePins, blocks: dict[str, bytes | None], origins: list[str],
                         deadline: float, after: dict[str, str]) -> None:
        """Pin every CID of ``blocks`` on ``service``, sending its bytes (where given and the
        service takes them). A block is sent once the service answered for the one it is
        chained on (``after``): sent together, the record's request could be worked on before
        its ``prev`` is pinned there, and the service would then pin it by walking the whole
        chain below it (``pin/add``), fetching what it lacks by bitswap."""
        gate = asyncio.Semaphore(POST_CONCURRENCY)
        pushing = service.name in self._taking_blocks

        async def add(cid: str, before: asyncio.Future | None) -> dict[str, Any]:
            if before is not None:
                await before
            block = blocks[cid] if service.name in self._taking_blocks else None
            async with gate:
                status = await service.add(cid, origins, block if block and len(block) <= MAX_PUSHED_BLOCK else None)
            info = status.get("info")
            if isinstance(info, dict) and info.get(TAKES_BLOCKS[0]) == TAKES_BLOCKS[1]:
                self._taking_blocks.add(service.name)
            else:  # a service replaced by one that does not say so gets the spec's Pin object again
                self._taking_blocks.discard(service.name)
            return status
        posts: dict[str, asyncio.Future] = {}
        for cid in blocks:
            posts[cid] = asyncio.ensure_future(add(cid, posts.get(after.get(cid)) if pushing else None))
        waiting = {}
        for cid, status in zip(blocks, await asyncio.gather(*posts.values())):
            _raise_if_failed(service.name, status)
            if status["status"] != "pinned":
                waiting[status["requestid"]] = cid
        delay = 0.02
        while waiting:
            if time.monotonic() + delay > deadline:
                raise ReplicaError(f"replica service {service.name!r} did not report {len(waiting)} CID(s) "
                                   f"pinned within {self.timeout:g} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            for requestid, cid in list(waiting.items()):
                status = await service.status(requestid, cid)
                _raise_if_failed(service.name, status)
                if status["status"] == "pinned":
                    del waiting[requestid]

    async def report(self, cids: list[str]) -> dict[str, dict[str, Any]]:
        """For ``check``: per service, which of ``cids`` it reports pinned, or why it cannot say."""
        out: dict[str, dict[str, Any]] = {}
        for service in self.services:
            try:
                out[service.name] = {"pinned": await service.pinned(cids), "error": None}
            except ReplicaError as err:
                out[service.name] = {"pinned": set(), "error": err.message}
        return out

    async def repair(self, name: str, cids: list[str]) -> str | None:
        """Ask the service ``name`` to pin ``cids`` and wait for it (``check --repair``); the
        problem, if it did not."""
        service = next(s for s in self.services if s.name == name)
        try:
            await self._replicate(service, dict.fromkeys(cids), await self.origins(), time.monotonic() + self.timeout, {})
        except ReplicaError as err:
            return err.message
        return None


def _raise_if_failed(service: str, status: dict[str, Any]) -> None:
    if status["status"] == "failed":
        details = status.get("info", {}).get("status_details") if isinstance(status.get("info"), dict) else None
        raise ReplicaError(f"replica service {service!r} failed to pin {status['pin'].get('cid')}"
                           + (f": {str(details)[:200]}" if details else ""))
