"""Append-only episodes: validate → chain → store in Kubo and pin → move the head → answer.

Every write of a record, whichever door it came in by (``/api/v0/add``, ``/api/v0/dag/put``,
the REST API), goes through ``append``. Reads of records go through ``read``; ``verify`` walks
an episode in Kubo from its head and re-checks every link, schema and sequence number.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import weakref
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import crypto, plugins, protect
from .appkeys import CONFIG, KUBO, PLUGINS, SCHEMAS, STORE
from .errors import GatewayError
from .store import Episode, IndexedRecord, StoreConflict

log = logging.getLogger(__name__)

EPISODE_OPENED = "https://medicon.example/schemas/episode-opened/v1"
EPISODE_CLOSED = "https://medicon.example/schemas/episode-closed/v1"
# Every version of the kinds that open and close an episode (v2: FHIR-shaped bodies).
OPENING_KINDS = frozenset({EPISODE_OPENED, "https://medicon.example/schemas/episode-opened/v2"})
CLOSING_KINDS = frozenset({EPISODE_CLOSED, "https://medicon.example/schemas/episode-closed/v2"})


class RecordInvalid(GatewayError):
    """The record breaks its schema or a plugin rule: 400, each problem named by JSON pointer."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(400, "invalid record: " + "; ".join(problems))
        self.problems = problems


class ChainConflict(GatewayError):
    """The append does not fit the episode as it stands: 409, with the current head."""

    def __init__(self, message: str, episode: Episode | None) -> None:
        if episode is not None:
            message += f" (current head {episode.head}, length {episode.length}, {episode.status})"
        super().__init__(409, message)
        self.episode = episode


@dataclass(frozen=True)
class Appended:
    cid: str
    episode: Episode
    record: dict[str, Any]
    created: bool           # False: the exact same record was already appended (idempotent retry)

    @property
    def seq(self) -> int:
        return self.record["seq"]


def is_record_candidate(doc: Any) -> bool:
    """A JSON document that claims to be a record: an object naming a schema and an episode or
    patient. Other JSON is a blob like any file."""
    return isinstance(doc, dict) and "schema" in doc and ("episode" in doc or "patient" in doc)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _timestamp(value: str) -> dt.datetime:
    """An RFC 3339 time (validated by the schema). A leap second (``:60``), which Python's
    datetime cannot hold, counts as the last instant of its minute."""
    text = value.replace("Z", "+00:00").replace("z", "+00:00")
    leap = len(text) > 19 and text[17:19] == "60"
    if leap:
        text = text[:17] + "59" + text[19:]
    stamp = dt.datetime.fromisoformat(text)
    return stamp.replace(microsecond=999999) if leap else stamp


def _dag_json_problems(value: Any, pointer: str = "") -> list[str]:
    """dag-json gives a map with the key "/" a meaning of its own (a link or bytes)."""
    if isinstance(value, dict):
        out = [f"{pointer}/~1: the key \"/\" is reserved by IPLD"] if "/" in value else []
        for key, item in value.items():
            out += _dag_json_problems(item, f"{pointer}/{str(key).replace('~', '~0').replace('/', '~1')}")
        return out
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _dag_json_problems(item, f"{pointer}/{i}")]
    return []


async def validate(app: web.Application, record: dict[str, Any], episode: Episode | None,
                   *, schema: bool = True, with_plugins: bool = True) -> None:
    """JSON Schema first, then every plugin's rules; all problems reported together."""
    problems = []
    if schema:
        problems += [str(v) for v in app[SCHEMAS].validate(record)]
        problems += _dag_json_problems(record.get("body"), "/body")
    if not problems and with_plugins:
        for plugin, found in await plugins.call(app[PLUGINS], "medicon_validate_record", record=record,
                                                schema_id=record["schema"], episode=episode):
            for item in found:
                pointer, message = item if isinstance(item, tuple) else ("", item)
                problems.append(f"{pointer or '/'}: {message} (plugin {plugin})")
    if problems:
        raise RecordInvalid(problems)


def normalise(doc: dict[str, Any]) -> dict[str, Any]:
    """A record as written by a client: ``prev`` may arrive as an IPLD link ``{"/": cid}``."""
    prev = doc.get("prev")
    if isinstance(prev, dict) and set(prev) == {"/"}:
        doc = {**doc, "prev": prev["/"]}
    return doc


class EpisodeLocks:
    """One lock per episode, so appends to the same episode in this process queue instead of
    colliding; the head store's compare-and-swap still guards against other processes."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def __call__(self, episode: str) -> asyncio.Lock:
        lock = self._locks.get(episode)
        if lock is None:
            lock = self._locks[episode] = asyncio.Lock()
        return lock


LOCKS = web.AppKey("episode_locks", EpisodeLocks)
POLICIES = web.AppKey("chain_policies", dict)


def policy_for(app: web.Application, schema_id: str):
    cfg = app[CONFIG].records
    return app[POLICIES][cfg.chain_policy_by_schema.get(schema_id, cfg.chain_policy)]


def request_digest(record: dict[str, Any], signer: str) -> str:
    """What identifies one append: the record as the client sent it, and who sent it."""
    return hashlib.sha256(crypto.canonical_json({"record": record, "signer": signer})).hexdigest()


async def _retried(app: web.Application, record: dict[str, Any], digest: str,
                   key: str | None) -> IndexedRecord | None:
    """The earlier append this request repeats, if it is a retry after a lost answer: the same
    Idempotency-Key (with the same request), or the same record naming its ``prev``/``seq``
    (which a client only sends again when it did not hear back)."""
    store = app[STORE]
    if key is not None:
        earlier = await store.record_by_key(key)
        if earlier is not None and earlier.digest != digest:
            raise GatewayError(422, "this Idempotency-Key was used for a different request")
        return earlier
    if "prev" in record or "seq" in record:
        return await store.record_by_digest(record["episode"], digest)
    return None


async def append(app: web.Application, doc: Any, signer: str,
                 idempotency_key: str | None = None) -> Appended:
    """Append one record to its episode, signed as written by ``signer`` (the authenticated
    principal). Raises ``RecordInvalid`` (400) or ``ChainConflict`` (409). A retry of an append
    that succeeded returns the original (``created`` False) instead of a duplicate or a 409."""
    if not isinstance(doc, dict):
        raise RecordInvalid(["/: a record is a JSON object"])
    record = normalise(doc)
    # Schema checks that do not depend on the episode come first, before any lock is taken.
    await validate(app, record, None, with_plugins=False)
    store = app[STORE]
    digest = request_digest(record, signer)
    key = f"{signer}\n{idempotency_key}" if idempotency_key else None
    async with app[LOCKS](record["episode"]):
        earlier = await _retried(app, record, digest, key)
        if earlier is not None:
            current = await store.get_episode(earlier.episode)
            return Appended(earlier.cid, current, await read(app, earlier.cid), created=False)
        episode = await store.get_episode(record["episode"])
        record = _chain(app, record, episode)
        # The schema passed above; _chain only set prev (a head CID), seq and recorded_at.
        await validate(app, record, episode, schema=False)
        kubo = app[KUBO]
        # Stored and pinned (recursively: the record and the chain under it) in one call, before
        # the head moves, so an acknowledged record is never unpinned. One pin per record costs
        # Kubo the same whatever the episode's length (moving one pin with the head does not).
        cid = await kubo.dag_put(await protect.to_node(app, record, signer), pin=True)
        indexed = IndexedRecord(cid, record["episode"], record["patient"], record["seq"],
                                record["schema"], record["recorded_at"], digest, key)
        try:
            if episode is None:
                moved = await store.create_episode(indexed)
            else:
                moved = await store.append(indexed, expected_head=episode.head,
                                           closes=record["schema"] in CLOSING_KINDS)
        except StoreConflict as conflict:
            if await store.record(cid) is None:  # never unpin an acknowledged record
                await kubo.pin_rm(cid)
            raise ChainConflict(f"episode {record['episode']!r} changed under this append",
                                conflict.current) from None
    await _committed(app, record, cid, moved)
    return Appended(cid, moved, record, created=True)


def _chain(app: web.Application, record: dict[str, Any], episode: Episode | None) -> dict[str, Any]:
    """Decide ``prev``, ``seq`` and ``recorded_at`` against the episode as it stands."""
    opening = record["schema"] in OPENING_KINDS
    given_prev = record.get("prev")
    if opening:
        if episode is not None:
            raise ChainConflict(f"episode {record['episode']!r} already exists", episode)
        prev, seq, last = None, 0, None
    else:
        if episode is None:
            raise ChainConflict(f"episode {record['episode']!r} does not exist; open it first", None)
        if episode.status != "open":
            raise ChainConflict(f"episode {record['episode']!r} is closed", episode)
        if record["patient"] != episode.patient:
            raise ChainConflict(f"episode {record['episode']!r} belongs to another patient", None)
        policy = policy_for(app, record["schema"])
        try:
            prev = policy(given_prev, episode.head)
        except GatewayError as err:
            if err.status != 409:
                raise
            raise ChainConflict(err.message, episode) from None
        except Exception as exc:
            log.exception("chain policy %s failed", policy)
            raise GatewayError(500, f"chain policy {policy.__module__}.{policy.__name__} failed: "
                               f"{type(exc).__name__}") from None
        if prev != episode.head:  # a policy may refuse an append, never fork the chain
            raise GatewayError(500, f"chain policy {policy.__module__}.{policy.__name__} linked "
                               f"{prev!r} instead of the head")
        seq, last = episode.length, episode.last_recorded_at
    if "seq" in record and record["seq"] != seq:
        raise ChainConflict(f"seq {record['seq']} is not the next position {seq}", episode)
    recorded_at = record.get("recorded_at") or now()
    if last is not None and _timestamp(recorded_at) < _timestamp(last):
        raise ChainConflict(f"recorded_at {recorded_at} is before the episode's last record ({last})", episode)
    return {**record, "prev": prev, "seq": seq, "recorded_at": recorded_at}


async def _committed(app: web.Application, record: dict[str, Any], cid: str, episode: Episode) -> None:
    try:
        await plugins.call(app[PLUGINS], "medicon_record_committed", record=record, cid=cid, episode=episode)
    except GatewayError as err:  # never undoes the append
        log.error("record_committed hook failed for %s: %s", cid, err.message)


async def read(app: web.Application, cid: str) -> dict[str, Any] | None:
    """The record stored as ``cid`` (decrypted, signature checked), or None if the gateway did
    not write it."""
    if await app[STORE].record(cid) is None:
        return None
    return await read_indexed(app, cid)


async def read_indexed(app: web.Application, cid: str) -> dict[str, Any]:
    """The record stored as ``cid``, which the caller found in the gateway's index."""
    node = await app[KUBO].record_node(cid)
    _require_signed(cid, protect.signature_ok(app, node))
    return (await protect.from_node(app, node))[0]


def _require_signed(cid: str, signed: bool) -> None:
    if not signed:
        raise GatewayError(502, f"record {cid} does not carry this gateway's signature")


async def read_many(app: web.Application, cids: list[str], concurrency: int = 16) -> list[dict[str, Any]]:
    """Indexed records in the order given: fetched from Kubo ``concurrency`` at a time (a page
    of history costs a few round trips of latency, not one per record), signatures checked in
    two threads at once (Ed25519 releases the GIL), then opened."""
    gate = asyncio.Semaphore(concurrency)

    async def fetch(cid: str) -> dict[str, Any]:
        async with gate:
            return await app[KUBO].record_node(cid)
    nodes = list(await asyncio.gather(*(fetch(cid) for cid in cids)))

    def check(part: list[dict[str, Any]]) -> list[bool]:
        return [protect.signature_ok(app, node) for node in part]
    half = (len(nodes) + 1) // 2
    verdicts = [ok for part in await asyncio.gather(asyncio.to_thread(check, nodes[:half]),
                                                    asyncio.to_thread(check, nodes[half:])) for ok in part]
    for cid, ok in zip(cids, verdicts):
        _require_signed(cid, ok)
    return [(await protect.from_node(app, node))[0] for node in nodes]


async def verify(app: web.Application, episode_id: str, head: str | None = None) -> dict[str, Any]:
    """Walk the episode in Kubo from its head (or from ``head``, a CID claimed to extend it)
    to its first record and report the first break: a missing block, a bad signature, a record
    that fails its schema, or links, sequence numbers or times out of order."""
    store, kubo = app[STORE], app[KUBO]
    episode = await store.get_episode(episode_id)
    if episode is None:
        raise GatewayError(404, f"episode {episode_id!r} is unknown")
    cid = head or episode.head
    checked, erased, expected_seq, later_time = 0, False, None, None
    pseudonym = protect.keyring(app).pseudonym(protect.PSEUDONYM_EPISODE, episode_id)

    def report(problem: str | None) -> dict[str, Any]:
        brk = None if problem is None else {"cid": cid, "seq": expected_seq, "problem": problem}
        return {"episode": episode_id, "ok": problem is None, "length": episode.length,
                "checked": checked, "erased": erased, "break": brk}

    while cid is not None:
        try:
            node = await kubo.dag_get(cid)
        except GatewayError as err:
            return report(f"the block cannot be read from Kubo: {err.message}")
        if not protect.signature_ok(app, node):
            return report("the signature does not verify: the block was not written by this gateway")
        if expected_seq is None:
            expected_seq = node.get("seq")
        if node.get("seq") != expected_seq or not isinstance(expected_seq, int):
            return report(f"seq {node.get('seq')} where {expected_seq} was expected")
        if node.get("episode") != pseudonym:
            return report("the block belongs to another episode")
        indexed = await store.record(cid)
        if head is None and (indexed is None or indexed.seq != expected_seq or indexed.episode != episode_id):
            return report("the chain reaches a block the index does not hold at this position")
        prev = node.get("prev")
        prev = prev.get("/") if isinstance(prev, dict) else prev
        if (expected_seq == 0) != (prev is None):
            return report("prev must be null exactly at seq 0")
        if expected_seq == 0 and node.get("schema") not in OPENING_KINDS:
            return report("the first record of an episode must open it")
        try:
            record, _ = await protect.from_node(app, node)
        except protect.RecordErased:
            erased = True
        except GatewayError as err:
            return report(err.message)
        else:
            problems = [str(v) for v in app[SCHEMAS].validate(record)]
            if problems:
                return report("schema: " + "; ".join(problems))
            if (record.get("seq"), record.get("prev"), record.get("episode"), record.get("schema")) != (
                    expected_seq, prev, episode_id, node.get("schema")):
                return report("the sealed record disagrees with the block's clear metadata")
            if record.get("patient") != episode.patient:
                return report("the record names another patient")
            stamp = _timestamp(record["recorded_at"])
            if later_time is not None and stamp > later_time:
                return report("recorded_at goes backwards")
            later_time = stamp
        checked += 1
        cid, expected_seq = prev, expected_seq - 1
    if head is not None and checked and expected_seq != -1:
        return report("the chain does not reach the episode's first record")
    return report(None)
