"""FHIR transaction Bundles become records (``POST /fhir/r4``).

Each entry's resource (``POST Type`` to create, ``PUT Type/id`` to create with that id or to
update) is placed in a record of the episode it belongs to, byte for byte as it stands in the
Bundle — but for what FHIR asks of a server: an ``id`` assigned to a created resource that has
none (put right after ``resourceType``), and ``urn:uuid:`` references to other entries of the
Bundle replaced by ``Type/id``.

Which record:

* a new **EpisodeOfCare** opens an episode (``episode-opened/v2``; the episode's id is the
  EpisodeOfCare's); new Conditions its ``diagnosis`` names, and a new **Patient**, go in the
  same record;
* a new **Encounter** makes an ``encounter/v2`` record in the episode its ``episodeOfCare``
  names, with the new resources that reference it (``encounter``, ``context.encounter``); new
  resources referencing an Encounter already stored make an ``encounter/v2`` record of their
  own in that Encounter's episode (its body repeats the stored Encounter's status and class);
* an update of a stored resource is an ``amendment/v2`` of the record that holds its latest
  version, which it ``corrects`` (``entered-in-error`` is an update like any other); an
  EpisodeOfCare updated to finished, cancelled or entered-in-error closes its episode
  (``episode-closed/v2``).

All or nothing for what can be checked first: every entry is read, validated (FHIR R4, as
``records.fhir_validation`` says), placed and authorized (``record:write``), and every record
built and checked against its schema, before the first is appended; one refused entry refuses
the transaction with an OperationOutcome naming each refused entry. Records are then appended
in order — episodes opened first, then the others in entry order, closings last. Should an
append fail after that (Kubo or storage down, a concurrent write closing an episode), the error
names the records already appended: a chain is never rolled back. Sent again with the same
``Idempotency-Key`` (after a lost answer), the same Bundle is answered from the records it made
instead of being applied twice.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import IdempotencyKeyReused, Invalid, NotFound
from . import exactjson, strictjson
from .access import Caller
from .fhir_facade import FhirFacade
from .fhir_search import FHIR_ID, reference_key
from .fhir_validation import default_validator, find_resources, validate_resource
from .records import ClientRecord

log = logging.getLogger(__name__)

BASE = "https://medicon.example/schemas/"
OPENED, ENCOUNTER, AMENDMENT, CLOSED = (BASE + k + "/v2" for k in ("episode-opened", "encounter", "amendment",
                                                                   "episode-closed"))
ENDING = frozenset({"finished", "cancelled", "entered-in-error"})
_URN_REFERENCE = re.compile(r'("reference"\s*:\s*)"(urn:uuid:[0-9a-fA-F-]{36})"')
_ORDER = {"open": 0, "encounter": 1, "amend": 1, "close": 2}


@dataclass
class Item:
    """One entry: its resource (text as it will be stored, and parsed), where it goes."""

    index: int
    method: str
    type: str
    id: str
    text: str
    resource: dict[str, Any]
    created: bool = True
    patient: str | None = None


@dataclass
class Group:
    """The resources that make one record."""

    kind: str
    patient: str
    episode: str
    first: int
    items: list[Item] = field(default_factory=list)
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What became of an entry: the record it is in, its version, and when."""

    item: Item
    cid: str
    version: int | None
    recorded_at: str


class TransactionRefused(Invalid):
    """Entries of the Bundle cannot be taken; ``issues`` names each (entry index, message)."""

    def __init__(self, issues: list[tuple[int | None, str]]) -> None:
        where = lambda i: "Bundle" if i is None else f"Bundle.entry[{i}]"  # noqa: E731
        shown = [{"expression": where(i), "message": m} for i, m in issues]
        super().__init__(f"transaction refused: {len(issues)} problem(s): " +
                         "; ".join(f"{s['expression']}: {s['message']}" for s in shown[:10]),
                         details={"issues": shown})


class Transaction:
    def __init__(self, service: Any, caller: Caller, max_entries: int) -> None:
        self.service = service
        self.caller = caller
        self.facade = FhirFacade(service)
        self.max_entries = max_entries
        self.issues: list[tuple[int | None, str]] = []
        self.groups: list[Group] = []
        self.by_key: dict[tuple, Group] = {}

    def refuse(self, index: int | None, message: str) -> None:
        self.issues.append((index, message))

    def check(self) -> None:
        if self.issues:
            raise TransactionRefused(self.issues)

    # --- the whole transaction ---------------------------------------------------------------

    async def run(self, text: str, idempotency_key: str | None = None) -> list[Outcome]:
        items = self.read(text)
        self.check()
        if idempotency_key is not None:
            # The key names this Bundle: the same key with another Bundle is another request.
            idempotency_key = f"{idempotency_key}#{hashlib.sha256(text.encode('utf-8')).hexdigest()[:24]}"
            earlier = await self._earlier(items, idempotency_key)
            if earlier is not None:
                return earlier
        groups = await self.place(items)
        self.check()
        records = [(f"record of Bundle.entry[{', '.join(str(i.index) for i in g.items)}]", self.record(g))
                   for g in groups]
        limit = self.service.config.records.max_record_size
        for group, (_, record) in zip(groups, records):
            if len(record.text.encode("utf-8")) > limit:
                self.refuse(group.first, f"the record these entries make is over {limit} bytes: "
                                         "send them in separate transactions")
        self.check()
        appended = await self.service.append_all(records, self.caller, idempotency_key)
        outcomes = []
        for group, done in zip(groups, appended):
            for position, item in enumerate(group.items):
                version = await self._version(item, done.cid, f"/body/fhir/{position}")
                outcomes.append(Outcome(item, done.cid, version, done.record["recorded_at"]))
        return sorted(outcomes, key=lambda o: o.item.index)

    async def _earlier(self, items: list[Item], key: str) -> list[Outcome] | None:
        """The outcome of this transaction sent before with the same Idempotency-Key (a retry
        after a lost answer), read from the records it made; None if it was not."""
        heads, found = self.service.storage.heads, []
        while (indexed := await heads.record_by_key(f"{self.caller.principal.id}\n{key}#{len(found)}")) is not None:
            found.append(indexed)
        if not found:
            return None
        stored: dict[tuple[str, str], tuple[str, str, str]] = {}
        for indexed in found:
            _, record = await self.service.record_for(self.caller, indexed.cid)
            for pointer, resource in find_resources(record.get("body"), "/body"):
                stored.setdefault((resource.get("resourceType"), resource.get("id")),
                                  (indexed.cid, pointer, record["recorded_at"]))
        named = {(i.type, i.id) for i in items if i.method == "PUT" or "id" in i.resource}
        spare = [k for k in stored if k not in named]
        outcomes = []
        for item in items:
            if (item.type, item.id) not in stored:
                assigned = next((k for k in spare if k[0] == item.type), None)
                if assigned is None:
                    raise IdempotencyKeyReused("this Idempotency-Key was used for a different transaction")
                spare.remove(assigned)
                item.id = assigned[1]
            cid, pointer, recorded_at = stored[(item.type, item.id)]
            version = await self._version(item, cid, pointer)
            item.created = version == 1
            outcomes.append(Outcome(item, cid, version, recorded_at))
        return outcomes

    # --- reading the Bundle ---------------------------------------------------------------------

    def read(self, text: str) -> list[Item]:
        try:
            bundle = strictjson.loads(text)
        except strictjson.BadJSON as bad:
            raise Invalid(f"the body is not a JSON Bundle: {bad}") from None
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise Invalid("POST to the base URL takes a Bundle (resourceType Bundle)")
        if bundle.get("type") != "transaction":
            raise Invalid("only transaction Bundles are taken (type transaction; batch is not supported)")
        entries = bundle.get("entry", [])
        if not isinstance(entries, list) or not entries:
            raise Invalid("the transaction has no entry")
        if len(entries) > self.max_entries:
            raise Invalid(f"at most {self.max_entries} entries in one transaction")
        validator = default_validator()
        items, urns = [], {}
        # Each entry's text, found in one pass over the Bundle's text.
        entry_spans = [(begin, end) for _, begin, end in exactjson.items(text, exactjson.span(text, "/entry")[0])]
        for index, entry in enumerate(entries):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            request = entry.get("request") if isinstance(entry, dict) else None
            if not isinstance(resource, dict) or not isinstance(request, dict):
                self.refuse(index, "an entry needs a resource and a request")
                continue
            kind, method, url = resource.get("resourceType"), request.get("method"), request.get("url")
            if not validator.is_resource_type(kind):
                self.refuse(index, "the resource has no FHIR R4 resourceType")
                continue
            given = resource.get("id")
            if method == "PUT":
                if not (isinstance(given, str) and url == f"{kind}/{given}"):
                    self.refuse(index, f"PUT {str(url)[:80]}: the URL must be {kind}/<the resource's id>")
                    continue
                rid, assigned = given, False
            elif method == "POST":
                if url != kind:
                    self.refuse(index, f"POST {str(url)[:80]}: the URL must be the resource type, {kind}")
                    continue
                assigned = given is None
                rid = str(uuid.uuid4()) if assigned else given
            else:
                self.refuse(index, "only POST (create) and PUT (create or update) entries are taken: records are "
                                   "never removed (mark a resource entered-in-error with PUT)")
                continue
            if not isinstance(rid, str) or not FHIR_ID.fullmatch(rid):
                self.refuse(index, "the resource's id is not a FHIR id")
                continue
            item_text = exactjson.extract(text[slice(*entry_spans[index])], "/resource")
            if assigned:
                item_text = exactjson.insert_member(item_text, "resourceType", "id", rid)
            items.append(Item(index, method, kind, rid, item_text, resource))
            full_url = entry.get("fullUrl")
            if isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
                urns[full_url] = f"{kind}/{rid}"
        if urns:
            for item in items:
                item.text = _URN_REFERENCE.sub(lambda m: f'{m[1]}"{urns[m[2]]}"' if m[2] in urns else m[0], item.text)
        mode = self.service.config.records.fhir_validation
        for item in items:
            item.resource = strictjson.loads(item.text)
            if mode == "off":
                continue
            problems = validate_resource(item.resource)
            if problems and mode == "enforce":
                for pointer, message in problems:
                    self.refuse(item.index, f"{item.type} at {pointer or '/'}: {message}")
            elif problems:
                log.warning("transaction entry accepted with %d FHIR R4 problem(s) in its %s "
                            "(records.fhir_validation = warn)", len(problems), item.type)
        return items

    # --- where each resource goes ------------------------------------------------------------

    def group(self, kind: str, key: tuple, patient: str, episode: str, first: int) -> Group:
        """The record being built under ``key`` (made on first use)."""
        found = self.by_key.get(key)
        if found is None:
            found = self.by_key[key] = Group(kind, patient, episode, first)
            self.groups.append(found)
        return found

    async def place(self, items: list[Item]) -> list[Group]:
        new: dict[str, Item] = {}
        for item in items:
            if f"{item.type}/{item.id}" in new:
                self.refuse(item.index, f"{item.type}/{item.id} is in the transaction twice")
                continue
            new[f"{item.type}/{item.id}"] = item
            await self._identify(item)
        if self.issues:
            return []
        episodes: dict[str, str] = {}  # EpisodeOfCare/<id> -> episode, for the ones this transaction opens
        group = self.group
        for item in items:  # episodes first: everything else may land in them
            if item.type == "EpisodeOfCare" and item.created:
                if await self.service.storage.heads.get_episode(item.id) is not None:
                    self.refuse(item.index, f"an episode with the id {item.id} exists: choose another id")
                    continue
                opened = group("open", ("open", item.id), item.patient, item.id, item.index)
                opened.items.append(item)
                episodes[f"EpisodeOfCare/{item.id}"] = item.id
        for item in items:  # then updates, and the new Encounters other resources may join
            if not item.created:
                await self._update(item)
            elif item.type == "Encounter":
                episode = await self._episode_of(item, episodes)
                if episode is not None:
                    group("encounter", ("encounter", item.type, item.id), item.patient, episode,
                          item.index).items.append(item)
        for item in items:
            if not item.created or item.type in ("EpisodeOfCare", "Encounter"):
                continue
            if item.type == "Condition" and (opener := self._diagnosed_in(item, items)) is not None:
                self.by_key[("open", opener.id)].items.append(item)
            elif item.type == "Patient":
                opener = next((g for g in self.groups if g.kind == "open" and g.patient == item.id), None)
                if opener is None:
                    self.refuse(item.index, "a new Patient is stored with an EpisodeOfCare of the same "
                                            "transaction (its patient)")
                else:
                    opener.items.append(item)
            else:
                await self._attach(item, new)
        for found in self.groups:
            for item in found.items:
                if item.patient != found.patient:
                    self.refuse(item.index, "its patient is not the patient of the episode it belongs to")
        await self._check_episodes(self.groups)
        return sorted(self.groups, key=lambda g: (_ORDER[g.kind], g.first))

    async def _identify(self, item: Item) -> None:
        """The item's patient, and whether it updates a stored resource."""
        if item.type == "Patient":
            item.patient = item.id
        else:
            reference = item.resource.get("patient") if item.type == "EpisodeOfCare" else (
                item.resource.get("subject") or item.resource.get("patient"))
            key = reference_key(reference["reference"]) if isinstance(reference, dict) and isinstance(
                reference.get("reference"), str) else None
            if key is None or not key.startswith("Patient/"):
                self.refuse(item.index, "no patient: the resource needs subject (or patient) as Patient/<id>")
                return
            item.patient = key.partition("/")[2]
        facade = self.facade
        rows = await facade.index.versions(item.type, facade.rid(item.type, item.id))
        if not rows:
            return
        if facade.patient_pseudonym(item.patient) not in {r.patient for r in rows}:
            self.refuse(item.index, f"{item.type}/{item.id} is taken: choose another id")
        elif item.method == "POST":
            self.refuse(item.index, f"{item.type}/{item.id} exists: update it with PUT")
        else:
            item.created = False

    async def _update(self, item: Item) -> None:
        """An amendment of the record holding the latest version (a closing, for an
        EpisodeOfCare that ends)."""
        try:
            latest = await self.facade.read(self.caller, item.type, item.id)
        except NotFound:
            self.refuse(item.index, f"{item.type}/{item.id} is taken: choose another id")
            return
        indexed = await self.service.storage.heads.record(latest.entry.cid)
        if item.type == "EpisodeOfCare" and item.resource.get("status") in ENDING:
            period = item.resource.get("period")
            if not (isinstance(period, dict) and "end" in period):
                self.refuse(item.index, "an EpisodeOfCare that ends (finished, cancelled, entered-in-error) "
                                        "needs period.end")
                return
            if indexed.episode != item.id and await self._opens(indexed.episode) != item.id:
                self.refuse(item.index, "only the EpisodeOfCare that opened its episode closes it")
                return
            closing = self.group("close", ("close", indexed.episode), item.patient, indexed.episode, item.index)
            closing.items.append(item)
            closing.body = {"status": item.resource["status"],
                            "period": exactjson.Raw(exactjson.extract(item.text, "/period"))}
            return
        amended = self.group("amend", ("amend", indexed.episode, latest.entry.cid), item.patient, indexed.episode,
                        item.index)
        amended.items.append(item)
        amended.body = {"corrects": latest.entry.cid}

    async def _opens(self, episode: str) -> str | None:
        """The id of the EpisodeOfCare in the record that opened ``episode``, if any."""
        rows = await self.service.storage.heads.history(episode, -1, 1)
        if not rows:
            return None
        opening = await self.service.read_indexed(rows[0].cid)
        for _, resource in find_resources(opening.get("body"), "/body"):
            if resource.get("resourceType") == "EpisodeOfCare":
                return resource.get("id")
        return None

    async def _episode_of(self, item: Item, episodes: dict[str, str]) -> str | None:
        """The episode an Encounter's ``episodeOfCare`` names (opened now, or stored)."""
        refs = item.resource.get("episodeOfCare") or []
        keys = [reference_key(r.get("reference", "")) for r in refs if isinstance(r, dict)]
        keys = [k for k in keys if k and k.startswith("EpisodeOfCare/")]
        if not keys:
            self.refuse(item.index, "an Encounter names its episode: episodeOfCare (EpisodeOfCare/<id>)")
            return None
        if keys[0] in episodes:
            return episodes[keys[0]]
        return await self._stored_episode(item, keys[0])

    async def _stored_episode(self, item: Item, key: str) -> str | None:
        kind, _, rid = key.partition("/")
        try:
            found = await self.facade.read(self.caller, kind, rid)
        except NotFound:
            self.refuse(item.index, f"{key} is unknown")
            return None
        return (await self.service.storage.heads.record(found.entry.cid)).episode

    def _diagnosed_in(self, item: Item, items: list[Item]) -> Item | None:
        """The new EpisodeOfCare of the transaction whose diagnosis names this Condition."""
        for other in items:
            if other.type == "EpisodeOfCare" and other.created:
                for diagnosis in other.resource.get("diagnosis") or []:
                    condition = diagnosis.get("condition") if isinstance(diagnosis, dict) else None
                    if isinstance(condition, dict) and reference_key(str(condition.get("reference", ""))) == \
                            f"Condition/{item.id}":
                        return other
        return None

    async def _attach(self, item: Item, new: dict[str, Item]) -> None:
        """A new resource of an encounter: with the Encounter if it is new here, else in a
        record of its own in the stored Encounter's episode."""
        key = _encounter_of(item.resource)
        if key is None:
            self.refuse(item.index, f"no episode for this {item.type}: reference its Encounter (encounter, or "
                                    "context.encounter), or send a Condition with the EpisodeOfCare that names it")
            return
        encounter = new.get(key)
        if encounter is not None and encounter.created:
            target = self.by_key.get(("encounter", "Encounter", encounter.id))
            if target is None:
                self.refuse(item.index, f"{key} of this transaction has no episode")
                return
            target.items.append(item)
            return
        try:
            stored = await self.facade.read(self.caller, "Encounter", key.partition("/")[2])
        except NotFound:
            self.refuse(item.index, f"{key} is unknown")
            return
        episode = (await self.service.storage.heads.record(stored.entry.cid)).episode
        target = self.group("encounter", ("stored", key), item.patient, episode, item.index)
        target.items.append(item)
        present = strictjson.loads(stored.text)
        target.body = {name: exactjson.Raw(exactjson.extract(stored.text, "/" + name))
                       for name in ("status", "class") if name in present}

    async def _check_episodes(self, groups: list[Group]) -> None:
        """Episodes appended to exist (or are opened by this transaction), are open and lie in
        the caller's scope."""
        opening = {g.episode for g in groups if g.kind == "open"}
        for found in groups:
            if found.kind == "open" or found.episode in opening:
                continue
            try:
                episode = await self.service.episode_for(self.caller, found.episode, "record:write")
            except NotFound:
                self.refuse(found.first, "its episode is unknown")
                continue
            if episode.status != "open":
                self.refuse(found.first, "its episode is closed")

    # --- the records -------------------------------------------------------------------------

    def record(self, group: Group) -> ClientRecord:
        fhir = [exactjson.Raw(item.text) for item in group.items]
        if group.kind == "open":
            head = group.items[0]
            body: dict[str, Any] = {"status": head.resource.get("status")}
            if "period" in head.resource:
                body["period"] = exactjson.Raw(exactjson.extract(head.text, "/period"))
        elif group.kind == "encounter":
            head = group.items[0]
            body = group.body or {"status": head.resource.get("status")}
            if not group.body and "class" in head.resource:
                body["class"] = exactjson.Raw(exactjson.extract(head.text, "/class"))
        elif group.kind == "amend":
            names = [f"{i.method} {i.type}/{i.id}" for i in group.items]
            body = {**group.body, "reason": "Updated through the FHIR API: " + ", ".join(names),
                    "changes": {"updated": [f"{i.type}/{i.id}" for i in group.items]}}
        else:
            body = dict(group.body)
        schema = {"open": OPENED, "encounter": ENCOUNTER, "amend": AMENDMENT, "close": CLOSED}[group.kind]
        doc = {"schema": schema, "patient": group.patient, "episode": group.episode,
               "author": self.caller.principal.id[:256], "body": {**body, "fhir": fhir}}
        return ClientRecord.from_text(exactjson.render(doc))

    async def _version(self, item: Item, cid: str, pointer: str) -> int | None:
        rows = await self.facade.index.versions(item.type, self.facade.rid(item.type, item.id))
        return next((r.version for r in rows if r.cid == cid and r.pointer == pointer), None)


def _encounter_of(resource: dict[str, Any]) -> str | None:
    """``Encounter/<id>`` a resource belongs to: ``encounter``, or ``context.encounter`` (a
    DocumentReference), or ``context`` (a Reference)."""
    candidates = [resource.get("encounter")]
    context = resource.get("context")
    if isinstance(context, dict):
        inner = context.get("encounter")
        candidates += inner if isinstance(inner, list) else [context]
    for candidate in candidates:
        if isinstance(candidate, dict) and isinstance(candidate.get("reference"), str):
            key = reference_key(candidate["reference"])
            if key and key.startswith("Encounter/"):
                return key
    return None
