"""The record service: the gateway's whole record model behind one object, with no HTTP in it.

Created once (``RecordService.open``) by whatever runs the gateway — the HTTP app's
``cleanup_ctx``, the ``check`` command, a test — it owns the storage, the Kubo client, the
key provider, the schemas, the plugins, the chain policies and the per-episode locks. Its
methods take the ``Caller`` and authorize it themselves before anything is read, decrypted or
written, and raise the domain errors of ``gateway.errors``; each door (``/api/v0``, ``/ipfs``,
``/medicon/v1``) only translates.

An append runs: authorize → validate (schema, then plugins) → link into the episode (chain
policy, under the episode's lock) → seal and sign → store and pin in Kubo → pinned on
``records.replicas`` nodes (``replication.ensure``) → move the head (compare-and-swap) →
``medicon_record_committed``. With ``records.pipeline`` on, the steps from sealing on
run in ``core.pipeline``: the next append to an episode is linked while earlier ones are on
their way, their blocks written to Kubo many to a call, heads moved in chain order.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

import pluggy

from ..config import Config, ConfigError
from ..errors import Conflict, Erased, Forbidden, IdempotencyKeyReused, Invalid, MediconError, NotFound, Unavailable
from ..kubo import ipld
from ..kubo.batcher import BlockWriter
from ..kubo.cids import canonical, is_cid
from ..kubo.client import KuboClient
from ..metrics import Metrics
from ..security.keys import KeyProvider, KeysForOneRead
from ..storage import Storage, open_storage
from ..storage.model import Blob, Episode, HeadMove, IndexedRecord, KeyTaken, StoreConflict
from . import chain
from .access import Authorizer, Caller, settle_audits, take_audits
from .fhir_validation import find_resources, validate_embedded
from .pipeline import Pending, Pipeline, Superseded
from .plugins import PluginHost, PluginLoadError, make_manager
from .replication import Replication
from .records import (CLOSING_KINDS, ENVELOPE_FIELDS, OPENING_KINDS, Appended, ChainConflict, ClientRecord,
                      RecordInvalid, claimed_resource, dag_json_problems, normalise, request_digest, timestamp)
from .schemas import DEFAULT_SCHEMA_DIR, SchemaError, SchemaRegistry
from .sealing import Sealer

log = logging.getLogger(__name__)

CONTENT = "content"      # plaintext of what an argument names (cat, get, /ipfs/<cid>)
STRUCTURE = "structure"  # blocks, links and DAGs (dag/get, block/get, refs, ?format=car)


def _counted(append):
    """Count an append method's outcomes on the service's metrics: records created or replayed,
    and conflicts (wherever in the append they are raised)."""
    @functools.wraps(append)
    async def counted(self: "RecordService", *args: Any, **kwargs: Any) -> Appended:
        try:
            appended = await append(self, *args, **kwargs)
        except Conflict:
            self.metrics.record_conflict()
            raise
        self.metrics.record_appended(appended.created)
        return appended
    return counted


@dataclass(frozen=True)
class ReadTarget:
    """An argument of a read, and what the gateway knows of its root and of the node its path
    ends at (``end`` is ``root`` when there is no path below the root)."""

    arg: str
    root: dict[str, Any]
    end: dict[str, Any]
    end_cid: str | None


class RecordService:
    def __init__(self, config: Config, storage: Storage, kubo: KuboClient, keys: KeyProvider,
                 plugins: PluginHost, schemas: SchemaRegistry, policies: dict[str, chain.Policy],
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        self.storage = storage
        self.kubo = kubo
        self.keys = keys
        self.plugins = plugins
        self.schemas = schemas
        self.policies = policies
        self.locks = chain.EpisodeLocks()
        self.key_locks = chain.EpisodeLocks()  # by (principal, Idempotency-Key)
        self.sealer = Sealer(keys, plugins, encrypt=config.security.encrypt)
        self.access = Authorizer(plugins, keys, self)
        # Plugins' own resources, opened in ``medicon_startup`` (by plugin name).
        self.resources: dict[str, Any] = {}
        # records.replicas: set by ``open``; none for a service built by hand.
        self.replication = Replication.disabled()
        # records.pipeline: record blocks go to Kubo many to a call, each batch pinned on
        # records.replicas nodes once Kubo confirmed it and before any of its heads moves.
        self.writer = BlockWriter(kubo, release=self._release,
                                  on_batch=self.metrics.commit_batch_observer("kubo"),
                                  after_write=lambda blocks, after: self.replication.ensure(blocks, after))
        self.pipeline = Pipeline(storage.heads, self.writer)

    # --- life cycle ------------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(cls, config: Config, pm: pluggy.PluginManager | None = None,
                   metrics: Metrics | None = None) -> AsyncIterator["RecordService"]:
        """Load plugins, keys, schemas and policies, open storage and the Kubo client, run the
        plugins' start-up hooks; undo it all on exit. A configuration that cannot work raises
        ``ConfigError`` here, before anything is served. Storage, Kubo client and service
        report to ``metrics`` (a fresh ``Metrics`` if not given)."""
        metrics = metrics if metrics is not None else Metrics()
        try:
            plugins = PluginHost(pm or make_manager(config.plugins.modules, trace=config.plugins.trace_hooks))
        except PluginLoadError as exc:
            raise ConfigError(str(exc)) from None
        keys = _key_provider(plugins, config)
        schemas = _schemas(plugins, config)
        policies = _policies(plugins, config)
        storage = await open_storage(config, metrics)
        kubo = KuboClient.open(config.kubo, observer=metrics)
        service = cls(config, storage, kubo, keys, plugins, schemas, policies, metrics)
        try:
            # --- replication (records.replicas): the append path calls replication.ensure ---
            service.replication = Replication(config.records, kubo)
            await plugins.call("medicon_startup", service=service)
            try:
                yield service
            finally:
                await plugins.call("medicon_shutdown", service=service)
        finally:
            await service.pipeline.close()  # every append in flight moved its head or failed
            await service.writer.close()  # and the pins of what failed are removed
            await service.replication.close()
            await kubo.close()
            await storage.close()

    # --- access --------------------------------------------------------------------------------

    async def authorize(self, caller: Caller, action: str, resource: dict[str, Any] | None = None) -> None:
        await self.access.authorize(caller, action, resource)

    async def resource_of(self, cid: str | None) -> dict[str, Any]:
        """What the gateway knows of ``cid``: a record (patient, episode), an attachment
        (patient), or nothing (a raw CID the gateway did not write)."""
        if cid is None:
            return {"kind": "raw"}
        key = canonical(cid) or cid
        # Both asked at once: a CID the gateway did not write (most reads through the RPC) is
        # looked up in both, and the two lookups' thread hops are a read's largest cost.
        record, blob = await asyncio.gather(self.storage.heads.record(key), self.attachment(cid))
        if record is not None:
            return {"kind": "record", "cid": key, "patient": record.patient, "episode": record.episode}
        if blob is not None:
            return {"kind": "blob", "cid": key, "patient": blob.patient}
        return {"kind": "raw", "cid": cid}

    async def target_of(self, arg: str) -> "ReadTarget":
        """What an argument (``<cid>``, ``/ipfs/<cid>/a/b``, ``/ipns/<name>``) names: its root
        and, when a path goes below the root, what the path ends at, resolved in Kubo."""
        cid, has_path = root_of(arg)
        root = await self.resource_of(cid)
        if not has_path or cid is None:
            return ReadTarget(arg, root, root, cid)
        end = await self.kubo.resolve_path(arg if arg.startswith("/") else "/ipfs/" + arg)
        return ReadTarget(arg, root, await self.resource_of(end) if end else {"kind": "raw"}, end)

    async def authorize_read(self, caller: Caller, access: str, args: list[str]) -> list["ReadTarget"]:
        """Authorize a read of every argument (``CONTENT`` or ``STRUCTURE``): its root, and what
        a path below the root ends at, whatever the root is — a directory or node the gateway
        never indexed can link to a record or an attachment, and the caller must be allowed that
        target itself. Nothing is read (or decrypted) for the caller before this."""
        targets = []
        for arg in args:
            target = await self.target_of(arg)
            await self.authorize(caller, _read_action(access, target.root), target.root)
            if target.end is not target.root and target.end["kind"] != "raw":
                await self.authorize(caller, _read_action(access, target.end), target.end)
            targets.append(target)
        return targets

    async def protect_pins(self, args: list[str]) -> None:
        """Pins of records and attachments belong to the gateway: an acknowledged record must
        never become collectable. Refuse removing (or moving) one."""
        for arg in args:
            target = await self.target_of(arg)
            if "record" in (target.root["kind"], target.end["kind"]) or "blob" in (target.root["kind"], target.end["kind"]):
                raise Forbidden(f"{arg[:100]!r} is pinned by the gateway (a record or an attachment): "
                                "its pin cannot be removed through the RPC API")

    # --- writing records -------------------------------------------------------------------------

    async def validate(self, record: ClientRecord | dict[str, Any], episode: Episode | None, *,
                       schema: bool = True, with_plugins: bool = True) -> None:
        """JSON Schema first, then the embedded FHIR resources (``records.fhir_validation``),
        then every plugin's rules; all problems reported together."""
        problems = []
        if schema:
            parsed = record.parsed if isinstance(record, ClientRecord) else record
            problems += [str(v) for v in self.schemas.validate(parsed)]
            problems += dag_json_problems(parsed.get("body") if isinstance(parsed, dict) else None, "/body")
            problems += self._fhir_problems(parsed)
        if not problems and with_plugins:
            for plugin, found in await self.plugins.call_each(
                    "medicon_validate_record", record=record, schema_id=record["schema"], episode=episode):
                for item in found:
                    pointer, message = item if isinstance(item, tuple) else ("", item)
                    problems.append(f"{pointer or '/'}: {message} (plugin {plugin})")
        if problems:
            raise RecordInvalid(problems)

    def _fhir_problems(self, record: Any) -> list[str]:
        """Problems of the FHIR R4 resources embedded in the body, as ``records.fhir_validation``
        says: refused (``enforce``), logged and accepted (``warn``), or not looked for (``off``).
        The log line names no value of the record: counts and resource types only."""
        mode = self.config.records.fhir_validation
        if mode == "off" or not isinstance(record, dict):
            return []
        found = validate_embedded(record.get("body"), "/body")
        if found and mode == "warn":
            kinds = sorted({r.get("resourceType") for _, r in find_resources(record.get("body"), "/body")
                            if isinstance(r.get("resourceType"), str)})
            log.warning("record accepted with %d FHIR R4 problem(s) in its embedded %s "
                        "(records.fhir_validation = warn)", len(found), ", ".join(kinds)[:200])
            return []
        return [f"{pointer}: {message}" for pointer, message in found]

    async def append(self, doc: Any, caller: Caller, idempotency_key: str | None = None) -> Appended:
        """Authorize, then append one record to its episode, signed as written by the caller.
        ``doc`` is a ``ClientRecord`` (the client's text, kept as it is) or a JSON value.
        ``RecordInvalid`` or ``ChainConflict`` if it does not fit. A retry of an append that
        succeeded returns the original (``created`` False) instead of a duplicate or a conflict."""
        if not isinstance(doc, (dict, ClientRecord)):
            raise RecordInvalid(["/: a record is a JSON object"])
        await self.authorize(caller, "record:write", claimed_resource(doc))
        return await self._append(normalise(ClientRecord.of(doc)), caller.principal.id, idempotency_key)

    def new_episode_id(self, caller: Caller, idempotency_key: str | None) -> str:
        """The id of an episode opened without one. With an ``Idempotency-Key`` it is derived
        from the key and the caller (a keyed pseudonym, so nobody can take it first), so a retry
        names the same episode and is recognised as the same request; without one, random."""
        if idempotency_key is None:
            return f"ep-{uuid.uuid4().hex}"
        derived = self.keys.pseudonym("episode-for-idempotency-key", f"{caller.principal.id}\n{idempotency_key}")
        return "ep-" + derived.removeprefix("ps-")

    async def append_to(self, caller: Caller, episode_id: str, doc: ClientRecord | dict[str, Any],
                        idempotency_key: str | None = None) -> Appended:
        """Append ``doc`` to an existing episode named by id (its patient and episode are the
        episode's). ``NotFound`` if the episode is unknown or outside the caller's scope."""
        episode = await self.episode_for(caller, episode_id, "record:write")
        for key, value in (("patient", episode.patient), ("episode", episode.id)):
            if key in doc and doc[key] != value:
                raise Invalid(f"the record's {key} does not match the episode")
        record = ClientRecord.of(doc).with_fields(patient=episode.patient, episode=episode.id)
        return await self._append(normalise(record), caller.principal.id, idempotency_key)

    async def append_all(self, docs: list[tuple[str, Any]], caller: Caller,
                         idempotency_key: str | None = None) -> list[Appended]:
        """Several records (``[(name, record)]``, one ``add``), all or nothing for authorization
        and schema problems: every record is authorized and checked before the first is
        appended. An append that fails later names the records already appended."""
        for _, doc in docs:
            await self.authorize(caller, "record:write", claimed_resource(doc))
        problems = []
        for name, doc in docs:
            try:
                if not isinstance(doc, (dict, ClientRecord)):
                    raise RecordInvalid(["/: a record is a JSON object"])
                await self.validate(normalise(ClientRecord.of(doc)), None, with_plugins=False)
            except RecordInvalid as err:
                problems.append(f"{name or 'record'}: {err.message}" if len(docs) > 1 else err.message)
        if problems:
            raise Invalid("; ".join(problems), details={"problems": problems})
        done: list[Appended] = []
        for index, (_, doc) in enumerate(docs):
            key = f"{idempotency_key}#{index}" if idempotency_key else None
            try:
                done.append(await self._append(normalise(ClientRecord.of(doc)), caller.principal.id, key))
            except MediconError as err:
                if done:
                    raise err.with_message(f"{err.message}; records already appended: "
                                           f"{', '.join(a.cid for a in done)}") from None
                raise
        return done

    @_counted
    async def _append(self, client: ClientRecord, signer: str, idempotency_key: str | None) -> Appended:
        # The parsed record decides everything below; the client's text is what gets sealed.
        record = client.parsed
        # Checks that do not depend on the episode come first, before any lock is taken.
        await self.validate(record, None, with_plugins=False)
        chain.check_clock_skew(record, self.config.records.max_clock_skew)
        digest = request_digest(record, signer)
        key = f"{signer}\n{idempotency_key}" if idempotency_key else None
        # A key names one request whatever episode it writes to: requests sharing a key queue
        # here (key first, then episode: always in that order), so the second finds the first.
        async with self.key_locks(key) if key else nullcontext():
            if self.config.records.pipeline:
                return await self._append_pipelined(client, signer, digest, key)
            return await self._append_serial(client, signer, digest, key)

    async def _append_serial(self, client: ClientRecord, signer: str, digest: str, key: str | None) -> Appended:
        """An append that did not name its position (no prev, no seq) and lost its head move
        to another process (another worker of this gateway, another site) is linked again to
        the episode as it now stands, a few times: the client asked for the end of the episode,
        wherever it is. One that named its position gets the conflict."""
        unnamed = "prev" not in client.parsed and "seq" not in client.parsed
        # This process's lock, then the episode's turn among the processes sharing the store
        # (``HeadStore.episode_turn``), kept between attempts: a relink is the exception (an
        # append by a process that did not take turns), not a race lost again and again.
        async with self.locks.turn(client.parsed["episode"]), self.storage.heads.episode_turn(client.parsed["episode"]):
            for attempt in range(1, RELINKS + 1):
                try:
                    return await self._append_locked(client, signer, digest, key,
                                                     relink=unnamed and attempt < RELINKS)
                except _Relink:
                    self.metrics.record_relinked()
        raise AssertionError("unreachable")

    async def _append_pipelined(self, client: ClientRecord, signer: str, digest: str, key: str | None) -> Appended:
        """An append that did not name its position (no prev, no seq) and failed only because
        the record it was chained on did not commit is linked again to the episode as it now
        stands, a few times; any other failure is the answer."""
        unnamed = "prev" not in client.parsed and "seq" not in client.parsed
        for attempt in range(1, RELINKS + 1):
            try:
                return await self._append_in_flight(client, signer, digest, key,
                                                     relink=unnamed and attempt < RELINKS)
            except Superseded:
                if not unnamed or attempt == RELINKS:
                    raise
                self.metrics.record_relinked()
            except _Relink:
                self.metrics.record_relinked()
        raise AssertionError("unreachable")

    async def _append_in_flight(self, client: ClientRecord, signer: str, digest: str, key: str | None, *,
                                relink: bool = False) -> Appended:
        """Link, seal and encode under the episode's lock (the CID is computed here), hand the
        block to the pipeline, and wait — outside the lock — until Kubo confirmed it stored and
        pinned, the replicas too, and its head moved. A head move lost to another process is
        ``_Relink`` if ``relink`` (the pipeline takes no turns between processes).

        An append that finds nothing of its episode in flight, no other append waiting for the
        episode and no overlap lately (``Pipeline.quiet``) goes the serial way instead, one
        Kubo round trip under the lock: the pipeline pays for itself only when appends to one
        episode overlap (measured: with each episode's appends one after another, the serial
        path was 11–23 % ahead). Appends that queue behind it are pipelined."""
        episode_id = client.parsed["episode"]
        audited: asyncio.Future | None = None
        try:
            async with self.locks.turn(episode_id):
                if self.locks.queued(episode_id) == 1 and self.pipeline.quiet(episode_id):
                    self.metrics.record_append_path("serial")
                    return await self._append_locked(client, signer, digest, key, relink=relink)
                self.metrics.record_append_path("pipelined")
                # The append's audit event is written while the record is linked, sealed and
                # stored; the pipeline moves its head only once the event is stored, and this
                # request answers nothing before it is settled (a failure to store it is the answer).
                audited = take_audits()
                linked = await self._link_in_flight(client, signer, digest, key, audited)
            if isinstance(linked, Appended):
                return linked
            return await self._in_flight_answer(linked, digest, key, relink=relink)
        finally:
            if audited is not None:
                await asyncio.shield(audited)

    async def _link_in_flight(self, client: ClientRecord, signer: str, digest: str, key: str | None,
                              audited: asyncio.Future | None) -> "Appended | _InFlight":
        """Under the episode's lock: the earlier append this request repeats, or the append of
        it already in flight, or the record linked, sealed, encoded and handed to the pipeline."""
        record = client.parsed
        earlier = await self._retried(record, digest, key)
        if earlier is not None:
            return await self._original(earlier)
        twin = self.pipeline.twin(record["episode"], digest)
        if twin is not None:  # the same request, sent again while the first is in flight
            return _InFlight(twin, record, twin.record, twin=True)
        episode = await self.pipeline.episode(record["episode"], self.storage.heads.get_episode)
        request, record = record, chain.link(record, episode, self._policy_for(record["schema"]))
        sealed = client.with_fields(**{name: record[name] for name in ENVELOPE_FIELDS})
        await self.validate(sealed, episode, schema=False)
        block = ipld.encode(await self.sealer.to_node(sealed, signer))
        cid = ipld.cid_of(block)
        indexed = IndexedRecord(cid, record["episode"], record["patient"], record["seq"],
                                record["schema"], record["recorded_at"], digest, key)
        closes = record["schema"] in CLOSING_KINDS
        move = HeadMove(indexed, None if episode is None else episode.head, closes)
        after = Episode(record["episode"], record["patient"], cid, record["seq"] + 1,
                        "closed" if closes else "open", record["recorded_at"])
        return _InFlight(self.pipeline.enqueue(indexed, sealed, move, block, after, audited), request, sealed)

    async def _in_flight_answer(self, linked: "_InFlight", digest: str, key: str | None, *,
                                relink: bool) -> Appended:
        """Outside the lock: the answer once the record's head moved (or did not)."""
        pending = linked.pending
        if linked.twin:
            moved = await asyncio.shield(pending.moved)
            return Appended(pending.cid, moved, pending.record, created=False)
        try:
            moved = await asyncio.shield(pending.moved)
        except (StoreConflict, KeyTaken) as lost:  # (its block loses its pin: the pipeline tells the writer)
            return await self._after_lost_move(lost, linked.request, digest, key, relink=relink)
        await self._committed(linked.sealed, pending.cid, moved)
        return Appended(pending.cid, moved, linked.sealed, created=True)

    async def _after_lost_move(self, lost: StoreConflict | KeyTaken, request: dict[str, Any], digest: str,
                               key: str | None, *, relink: bool = False) -> Appended:
        """The answer to an append whose head move lost. If this very request won elsewhere
        (sent twice at once to another process), its record; otherwise the head moved under it
        (``_Relink`` when the caller links it again, else ``ChainConflict``), or its key is held
        by a record the index cannot show."""
        earlier = await self._retried(request, digest, key)
        if earlier is not None:
            return await self._original(earlier)
        if isinstance(lost, KeyTaken):
            raise Unavailable("the Idempotency-Key is held by a record the index cannot show") from None
        if relink:
            raise _Relink() from None
        raise ChainConflict(f"episode {request['episode']!r} changed under this append", lost.current) from None

    async def _append_locked(self, client: ClientRecord, signer: str, digest: str, key: str | None, *,
                             relink: bool = False) -> Appended:
        heads, record = self.storage.heads, client.parsed
        earlier = await self._retried(record, digest, key)
        if earlier is not None:
            return await self._original(earlier)
        episode = await heads.get_episode(record["episode"])
        request, record = record, chain.link(record, episode, self._policy_for(record["schema"]))
        # The schema passed above; link only set prev (a head CID), seq and recorded_at.
        sealed = client.with_fields(**{name: record[name] for name in ENVELOPE_FIELDS})
        await self.validate(sealed, episode, schema=False)
        # Stored and pinned (recursively: the record and the chain under it) in one call whose
        # answer comes after both, before the head moves: an acknowledged record is in Kubo.
        block = ipld.encode(await self.sealer.to_node(sealed, signer))
        cid = await self.kubo.put_block(block)
        indexed = IndexedRecord(cid, record["episode"], record["patient"], record["seq"],
                                record["schema"], record["recorded_at"], digest, key)
        try:
            # --- replication: pinned on records.replicas nodes before the head moves (a failure
            # here unpins the local copy below: nothing was acknowledged) ---
            await self.replication.ensure({cid: block})
            await settle_audits()  # the append's audit event, written meanwhile, is stored first
            if episode is None:
                moved = await heads.create_episode(indexed)
            else:
                moved = await heads.append(indexed, expected_head=episode.head,
                                           closes=record["schema"] in CLOSING_KINDS)
        except (StoreConflict, KeyTaken) as lost:
            await self._release(cid)
            return await self._after_lost_move(lost, request, digest, key, relink=relink)
        except Exception:
            await self._release(cid)
            raise
        await self._committed(sealed, cid, moved)
        return Appended(cid, moved, sealed, created=True)

    async def _original(self, earlier: IndexedRecord) -> Appended:
        """The answer to a retry: the record appended the first time, as it stands now."""
        current = await self.storage.heads.get_episode(earlier.episode)
        return Appended(earlier.cid, current, await self.read_indexed(earlier.cid), created=False)

    async def _release(self, cid: str) -> None:
        """Unpin a record node this append stored but did not commit — only once the index
        surely does not hold it (an identical node may have been committed by another
        request). If that cannot be known or done now (the index or Kubo failing too), the pin
        stays and ``check --repair`` removes it: its position in the episode is taken by
        another record or never will be, which ``check`` can tell."""
        try:
            if await self.storage.heads.record(cid) is None:
                await self.kubo.pin_rm(cid)
        except MediconError as err:
            log.warning("record node %s was stored but not committed; left pinned for "
                        "`medicon-gateway check --repair` (%s)", cid, err.message)

    def _policy_for(self, schema_id: str) -> chain.Policy:
        cfg = self.config.records
        return self.policies[cfg.chain_policy_by_schema.get(schema_id, cfg.chain_policy)]

    async def _retried(self, record: dict[str, Any], digest: str, key: str | None) -> IndexedRecord | None:
        """The earlier append this request repeats, if it is a retry after a lost answer: the
        same Idempotency-Key (with the same request), or the same record naming its
        ``prev``/``seq`` (which a client only sends again when it did not hear back)."""
        heads = self.storage.heads
        if key is not None:
            earlier = await heads.record_by_key(key)
            if earlier is not None and earlier.digest != digest:
                raise IdempotencyKeyReused("this Idempotency-Key was used for a different request")
            return earlier
        if "prev" in record or "seq" in record:
            return await heads.record_by_digest(record["episode"], digest)
        return None

    async def _committed(self, record: ClientRecord, cid: str, episode: Episode) -> None:
        try:
            await self.plugins.call("medicon_record_committed", record=record, cid=cid, episode=episode,
                                    service=self)
        except MediconError as err:  # never undoes the append
            log.error("record_committed hook failed for %s: %s", cid, err.message)

    async def add_attachments(self, blobs: list[Blob]) -> None:
        """Index attachments under their patient, by the CID's one canonical form (CIDv1
        base32), so every spelling of the CID a client may use finds them."""
        await self.storage.heads.add_blobs([replace(b, cid=canonical(b.cid) or b.cid) for b in blobs])

    # --- reading records -------------------------------------------------------------------------

    async def episode_for(self, caller: Caller, episode_id: str, action: str) -> Episode:
        """The episode, once the caller may ``action`` it. ``NotFound`` if unknown, and also if
        it lies outside the caller's scope: a caller learns nothing of what it may not see, not
        even that it exists."""
        episode = await self.storage.heads.get_episode(episode_id)
        unknown = NotFound(f"episode {episode_id!r} is unknown")
        if episode is None:
            raise unknown
        await self._authorize_visible(caller, action, {"kind": "episode", "patient": episode.patient,
                                                       "episode": episode.id}, unknown)
        return episode

    async def _authorize_visible(self, caller: Caller, action: str, resource: dict[str, Any],
                                 unknown: NotFound) -> None:
        try:
            await self.authorize(caller, action, resource)
        except Forbidden:
            if not caller.principal.sees(resource):
                raise unknown from None
            raise

    async def episodes_of(self, caller: Caller, patient: str, status: str | None = None) -> list[Episode]:
        await self.authorize(caller, "chain:read", {"kind": "patient", "patient": patient})
        return await self.storage.heads.list_episodes(patient, status)

    async def record_for(self, caller: Caller, cid: str) -> tuple[IndexedRecord, ClientRecord]:
        """A record written through this gateway, once the caller may read it (``NotFound``
        if unknown or outside the caller's scope)."""
        indexed = await self.storage.heads.record(canonical(cid) or cid)
        unknown = NotFound(f"no record {cid!r} was written through this gateway")
        if indexed is None:
            raise unknown
        await self._authorize_visible(caller, "record:read", {"kind": "record", "cid": indexed.cid,
                                                               "patient": indexed.patient,
                                                               "episode": indexed.episode}, unknown)
        return indexed, await self.read_indexed(indexed.cid)

    async def history(self, caller: Caller, episode_id: str, after_seq: int, limit: int
                      ) -> tuple[Episode, list[IndexedRecord], list[ClientRecord]]:
        episode = await self.episode_for(caller, episode_id, "record:read")
        rows = await self.storage.heads.history(episode.id, after_seq, limit)
        return episode, rows, await self.read_many([r.cid for r in rows], read=await self.chain_nodes(rows))

    async def chain_nodes(self, rows: Iterable[IndexedRecord], longest: int = 500) -> dict[str, dict[str, Any]]:
        """The nodes of indexed records read a chain at a time, by CID: ``rows`` taken in runs
        of consecutive seqs of one episode (at most ``longest`` records), each run read newest
        first in one ``dag/export`` (``KuboClient.record_chain``: each record links the one
        before it by ``prev``, and each block is checked against its CID). A record in no run
        of two, or one its run's stream did not give, is not in the answer: the caller reads
        it one block at a time."""
        ordered = sorted({row.cid: row for row in rows}.values(), key=lambda row: (row.episode, row.seq))
        nodes: dict[str, dict[str, Any]] = {}
        start = 0
        while start < len(ordered):
            end = start + 1
            while end < len(ordered) and end - start < longest and (ordered[end].episode, ordered[end].seq) == (
                    ordered[end - 1].episode, ordered[end - 1].seq + 1):
                end += 1
            if end - start > 1:
                newest_first = [row.cid for row in reversed(ordered[start:end])]
                nodes.update(zip(newest_first, await self.kubo.record_chain(newest_first)))
            start = end
        return nodes

    async def read(self, cid: str) -> ClientRecord | None:
        """The record stored as ``cid`` (decrypted, signature checked), or None if the gateway
        did not write it. The caller authorized the read."""
        key = canonical(cid) or cid
        if await self.storage.heads.record(key) is None:
            return None
        return await self.read_indexed(key)

    async def read_indexed(self, cid: str, node: dict[str, Any] | None = None) -> ClientRecord:
        """The record stored as ``cid``, which the caller found in the index: its text as the
        client wrote it, with the envelope fields the gateway set. ``node``: its block, already
        read from Kubo and hash-checked (``KuboClient.record_chain``)."""
        if node is None:
            node = await self.kubo.record_node(cid)
        _require_signed(cid, await self.sealer.verified(node))
        return (await self.sealer.from_node(node))[0]

    async def read_many(self, cids: list[str], concurrency: int = 16,
                        read: dict[str, dict[str, Any]] | None = None) -> list[ClientRecord]:
        """Indexed records in the order given: their nodes taken from ``read`` (already fetched
        and hash-checked) or fetched from Kubo ``concurrency`` at a time (a page of history costs
        a few round trips of latency, not one per record), signatures checked in two threads at
        once (Ed25519 releases the GIL), then opened."""
        gate = asyncio.Semaphore(concurrency)
        read = dict(read or {})

        async def fetch(cid: str) -> dict[str, Any]:
            async with gate:
                return await self.kubo.record_node(cid)
        missing = list(dict.fromkeys(cid for cid in cids if cid not in read))
        read.update(zip(missing, await asyncio.gather(*(fetch(cid) for cid in missing))))
        nodes = [read[cid] for cid in cids]
        signers = [await self.sealer.signer_key(node) for node in nodes]  # known after the first

        def check(part: list[tuple[dict[str, Any], Any]]) -> list[bool]:
            return [self.sealer.signature_ok(node, key) for node, key in part]
        pairs, half = list(zip(nodes, signers)), (len(nodes) + 1) // 2
        verdicts = [ok for part in await asyncio.gather(asyncio.to_thread(check, pairs[:half]),
                                                        asyncio.to_thread(check, pairs[half:])) for ok in part]
        for cid, ok in zip(cids, verdicts):
            _require_signed(cid, ok)
        keys = KeysForOneRead(self.keys)
        return [(await self.sealer.from_node(node, keys))[0] for node in nodes]

    async def attachment_for(self, caller: Caller, cid: str) -> Blob:
        """An attachment indexed by this gateway, once the caller may read it (``NotFound`` if
        unknown or outside the caller's scope)."""
        unknown = NotFound(f"no attachment {cid[:100]!r} was added through this gateway")
        blob = await self.attachment(cid) if is_cid(cid) else None
        if blob is None:
            raise unknown
        await self._authorize_visible(caller, "blob:read", {"kind": "blob", "cid": canonical(cid) or cid,
                                                            "patient": blob.patient}, unknown)
        return blob

    async def attachment(self, cid: str) -> Blob | None:
        """The indexed attachment ``cid`` names, in whatever spelling of the CID."""
        key = canonical(cid)
        found = await self.storage.heads.blob(key) if key else None
        if found is None and key != cid:  # indexed under the spelling it was added with
            found = await self.storage.heads.blob(cid)
        return found

    # --- verification ----------------------------------------------------------------------------

    async def verify(self, caller: Caller, episode_id: str, head: str | None = None) -> dict[str, Any]:
        """``verify_episode`` for a caller; ``head``, if given, must be a CID (``Invalid``
        otherwise): a path or an ``/ipns`` name would have Kubo resolve it, on the network."""
        episode = await self.episode_for(caller, episode_id, "verify")
        if head is not None:
            claimed = canonical(head)
            if claimed is None:
                raise Invalid(f"head must be a CID, not {head[:100]!r}")
            head = claimed
        return await self.verify_episode(episode, head)

    async def verify_episode(self, episode: Episode, head: str | None = None, *,
                             streamed: set[str] | None = None,
                             opened: Callable[[str, ClientRecord], Awaitable[None]] | None = None) -> dict[str, Any]:
        """Walk the episode in Kubo from its head (or from ``head``, a CID claimed to extend it)
        to its first record and report the first break: a missing block, a bad signature, a
        record that fails its schema, or links, sequence numbers or times out of order. The
        blocks come in one ``dag/export`` stream, each believed only if it hashes to the CID the
        record above links (``ChainRead``); where the stream stops, one ``dag/get`` each.
        ``streamed`` collects the CIDs whose blocks came from the stream: offline, so they are
        in this Kubo's blockstore (``gateway check`` need not ask again). ``opened`` is handed
        each record the walk decrypted and found sound, so a caller with more to check of it
        (``gateway check``'s FHIR index pass) need not read and decrypt it again."""
        heads = self.storage.heads
        cid = head or episode.head
        checked, erased, expected_seq, later_time = 0, False, None, None
        pseudonym = self.sealer.episode_pseudonym(episode.id)
        signers: dict[str, int] = {}  # which gateway (site) signed how many of the checked records

        def report(problem: str | None) -> dict[str, Any]:
            brk = None if problem is None else {"cid": cid, "seq": expected_seq, "problem": problem}
            return {"episode": episode.id, "ok": problem is None, "length": episode.length,
                    "checked": checked, "erased": erased, "break": brk, "signers": signers}

        keys = KeysForOneRead(self.keys)  # one patient's data key, looked up once per verification
        async with self.kubo.chain_read(cid) as chain:  # one stream down the episode
            while cid is not None:
                try:
                    node = await chain.next(cid)
                    if node is None:  # not in the stream (see ChainRead): Kubo's own decoding
                        node = await self.kubo.dag_get(cid)
                    elif streamed is not None:
                        streamed.add(cid)
                except MediconError as err:
                    return report(f"the block cannot be read from Kubo: {err.message}")
                if not await self.sealer.verified(node):
                    return report("the signature does not verify: the block was not written by a gateway "
                                  "of this deployment")
                signer = await self.sealer.signed_by(node) or str(node.get("key"))
                if expected_seq is None:
                    expected_seq = node.get("seq")
                if node.get("seq") != expected_seq or not isinstance(expected_seq, int):
                    return report(f"seq {node.get('seq')} where {expected_seq} was expected")
                if node.get("episode") != pseudonym:
                    return report("the block belongs to another episode")
                indexed = await heads.record(cid)
                if head is None and (indexed is None or indexed.seq != expected_seq or indexed.episode != episode.id):
                    return report("the chain reaches a block the index does not hold at this position")
                prev = ipld.link_target(node.get("prev"))
                if (expected_seq == 0) != (prev is None):
                    return report("prev must be null exactly at seq 0")
                if expected_seq == 0 and node.get("schema") not in OPENING_KINDS:
                    return report("the first record of an episode must open it")
                try:
                    record, _ = await self.sealer.from_node(node, keys)
                except Erased:
                    erased = True
                except MediconError as err:
                    return report(err.message)
                else:
                    problems = [str(v) for v in self.schemas.validate(record.parsed)]
                    if problems:
                        return report("schema: " + "; ".join(problems))
                    if (record.get("seq"), record.get("prev"), record.get("episode"), record.get("schema")) != (
                            expected_seq, prev, episode.id, node.get("schema")):
                        return report("the sealed record disagrees with the block's clear metadata")
                    if record.get("patient") != episode.patient:
                        return report("the record names another patient")
                    stamp = timestamp(record["recorded_at"])
                    if later_time is not None and stamp > later_time:
                        return report("recorded_at goes backwards")
                    later_time = stamp
                    if opened is not None:
                        await opened(cid, record)
                checked += 1
                signers[signer] = signers.get(signer, 0) + 1
                cid, expected_seq = prev, expected_seq - 1
        if head is not None and checked and expected_seq != -1:
            return report("the chain does not reach the episode's first record")
        return report(None)


# Times an append that named no position is linked again after the record it was chained on
# failed to commit, or its head move was lost to another process's append (another worker of
# this gateway, another site) that moved the head meanwhile.
RELINKS = 8


class _Relink(Exception):
    """An unnamed append lost its head move to another process: link it again."""


@dataclass(frozen=True)
class _InFlight:
    """An append handed to the pipeline (or, if ``twin``, the same request's append already in
    flight): what its answer is made of once its head moved."""

    pending: Pending
    request: dict[str, Any]
    sealed: ClientRecord
    twin: bool = False


def _require_signed(cid: str, signed: bool) -> None:
    if not signed:
        raise Unavailable(f"record {cid} does not carry this gateway's signature")


def _read_action(access: str, resource: dict[str, Any]) -> str:
    kind = resource["kind"]
    if kind == "raw":
        return "raw:read"
    if access == CONTENT:
        return f"{kind}:read"
    return "chain:read"


def root_of(arg: str) -> tuple[str | None, bool]:
    """(root CID, has a path below it) of an argument such as ``/ipfs/<cid>/a/b``; ``None``
    for anything that is not an immutable ``/ipfs`` root (``/ipns/…`` names)."""
    if arg.startswith("/ipns/") or arg.startswith("ipns/"):
        return None, True
    if any(seg in (".", "..") for seg in arg.split("/")):
        # Kubo cleans them away, so the root checked here would not be the root read there
        raise Invalid(f"dot segments are not allowed in paths: {arg[:100]!r}")
    path = arg.removeprefix("/ipfs/").removeprefix("ipfs/").lstrip("/")
    root, _, rest = path.partition("/")
    if not is_cid(root):
        raise Invalid(f"invalid CID or path {arg[:100]!r}")
    return root, bool(rest.strip("/"))


# --- start-up: what the plugins provide --------------------------------------------------------

def _key_provider(plugins: PluginHost, config: Config) -> KeyProvider:
    """Without a key provider nothing can be sealed, signed or pseudonymised: no start."""
    try:
        keys = plugins.call_sync("medicon_key_provider", config=config)
    except MediconError as err:
        raise ConfigError(f"key provider: {err.message}") from None
    if keys is None:
        raise ConfigError("no key provider plugin is loaded")
    return keys


def _schemas(plugins: PluginHost, config: Config) -> SchemaRegistry:
    """Schemas built in, configured, and from plugins, loaded once."""
    dirs = [DEFAULT_SCHEMA_DIR, *map(Path, config.records.schema_dirs)]
    for found in plugins.call_sync("medicon_schema_dirs", config=config):
        dirs += [Path(d) for d in found]
    try:
        return SchemaRegistry.load(*dirs)
    except SchemaError as exc:
        raise ConfigError(f"schemas: {exc}") from None


def _policies(plugins: PluginHost, config: Config) -> dict[str, chain.Policy]:
    policies: dict[str, chain.Policy] = {}
    for provided in plugins.call_sync("medicon_chain_policies"):
        policies.update(provided)
    cfg = config.records
    wanted = {"records.chain_policy": cfg.chain_policy,
              **{f"records.chain_policy_by_schema[{k!r}]": v for k, v in cfg.chain_policy_by_schema.items()}}
    for key, name in wanted.items():
        if name not in policies:
            raise ConfigError(f"config key {key!r}: unknown chain policy {name!r} "
                              f"(loaded: {', '.join(sorted(policies)) or 'none'})")
    return policies
