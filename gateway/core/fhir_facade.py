"""The FHIR R4 facade's reads over the record service: a resource by type and id (and
version), its history, search, and a patient's everything.

Every FHIR resource a record embeds (an object with ``resourceType`` and an ``id``) is a
version of the resource ``Type/id``: the first record that carries it makes version 1, each
later one (an amendment, a FHIR update) the next. The index (``storage.fhir``, fed by the
``fhir_index`` plugin as records are committed) says where each version is — the record's CID
and a JSON pointer — and what search finds it by; the resource itself is read from its record,
through the record service, and cut out of the record's text: the bytes the client sent.

Reads are authorized as the REST API's: ``record:read`` on each episode a result comes from
(one audit event per episode), and what lies outside the caller's scope is not found. Ids are
server-wide per type; should records of two patients use one ``Type/id``, each patient's
resource is kept apart (its own versions), and a read finds the one the caller may see.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..errors import Conflict, Erased, Forbidden, Invalid, NotFound
from ..security.keyring import PATIENT
from ..storage.model import FhirEntry, FhirQuery, IndexedRecord
from . import exactjson
from .access import Caller
from .fhir_search import (FHIR_ID, ID_KIND, SEARCH_PARAMS, TOKEN_KIND, Search, index_params, parse_search)
from .fhir_validation import default_validator, find_resources
from .records import ClientRecord


@dataclass(frozen=True)
class Found:
    """A version of a resource, read: its index row, its id, and its JSON text as sent."""

    entry: FhirEntry
    id: str
    text: str


@dataclass(frozen=True)
class Page:
    found: list[Found]
    next_cursor: int | None
    used: list[tuple[str, str]]


class FhirFacade:
    def __init__(self, service: Any) -> None:
        self.service = service
        self.index = service.storage.fhir
        self._keys = service.keys

    # --- pseudonyms ------------------------------------------------------------------------------

    def rid(self, resource_type: str, resource_id: str) -> str:
        return self._keys.pseudonym(ID_KIND, f"{resource_type}/{resource_id}")

    def token(self, form: str) -> str:
        return self._keys.pseudonym(TOKEN_KIND, form)

    def patient_pseudonym(self, patient: str) -> str:
        return self._keys.pseudonym(PATIENT, patient)

    # --- indexing (the fhir_index plugin) ---------------------------------------------------------

    def entries(self, record: ClientRecord, cid: str) -> list[FhirEntry]:
        """The index rows of the resources ``record`` embeds (those with a type and an id)."""
        validator = default_validator()
        out = []
        for pointer, resource in find_resources(record.get("body"), "/body"):
            kind, rid = resource.get("resourceType"), resource.get("id")
            if not validator.is_resource_type(kind) or not isinstance(rid, str) or not FHIR_ID.fullmatch(rid):
                continue
            out.append(FhirEntry(kind, self.rid(kind, rid), self.patient_pseudonym(record["patient"]),
                                 self.service.sealer.episode_pseudonym(record["episode"]), cid, pointer,
                                 record["recorded_at"], index_params(resource, self.token)))
        return out

    async def add_to_index(self, record: ClientRecord, cid: str) -> list[FhirEntry]:
        return await self.index.add(self.entries(record, cid))

    # --- reading ---------------------------------------------------------------------------------

    async def read(self, caller: Caller, resource_type: str, resource_id: str,
                   version: int | None = None) -> Found:
        """The latest version of ``Type/id`` (or ``version``) the caller may read."""
        versions = await self._versions(caller, resource_type, resource_id)
        if version is None:
            return versions[0]
        for found in versions:
            if found.entry.version == version:
                return found
        raise NotFound(f"{resource_type}/{resource_id} has no version {version}")

    async def history(self, caller: Caller, resource_type: str, resource_id: str) -> list[Found]:
        """Every version of ``Type/id``, newest first."""
        return await self._versions(caller, resource_type, resource_id)

    async def _versions(self, caller: Caller, resource_type: str, resource_id: str) -> list[Found]:
        unknown = NotFound(f"{resource_type}/{resource_id} is unknown")
        if not FHIR_ID.fullmatch(resource_id):
            raise unknown
        rows = await self.index.versions(resource_type, self.rid(resource_type, resource_id))
        by_patient: dict[str, list[FhirEntry]] = {}
        for row in rows:
            by_patient.setdefault(row.patient, []).append(row)
        visible = []
        for patient_rows in by_patient.values():
            found = await self._read(caller, patient_rows, skip_erased=len(by_patient) > 1)
            if found:
                visible.append(found)
        if not visible:
            raise unknown
        if len(visible) > 1:
            raise Conflict(f"{resource_type}/{resource_id} names resources of several patients: search with "
                           f"_id and patient to tell them apart")
        return visible[0]

    async def search(self, caller: Caller, resource_type: str, pairs: list[tuple[str, str]], *,
                     lenient: bool = False) -> Page:
        if resource_type not in SEARCH_PARAMS:
            raise Invalid(f"search is supported on {', '.join(SEARCH_PARAMS)}; read {resource_type} by id")
        search = parse_search(resource_type, pairs, self.token, lenient=lenient)
        query = FhirQuery(types=(resource_type,),
                          patient=None if search.patients is None else tuple(
                              self.patient_pseudonym(p) for p in search.patients),
                          rids=None if search.ids is None else tuple(self.rid(resource_type, i) for i in search.ids),
                          all_of=tuple(search.all_of))
        return await self._page(caller, query, search)

    async def everything(self, caller: Caller, patient: str, pairs: list[tuple[str, str]]) -> Page:
        """Every resource of the patient's records the caller may read (latest versions, in
        write order), a page at a time. ``NotFound`` if the caller sees no episode of them."""
        search = parse_search(None, pairs, self.token)
        principal = caller.principal
        episodes = [e for e in await self.service.storage.heads.list_episodes(patient)
                    if principal.sees({"patient": e.patient, "episode": e.id})]
        if not episodes:
            raise NotFound(f"Patient/{patient} is unknown")
        query = FhirQuery(patient=(self.patient_pseudonym(patient),))
        return await self._page(caller, query, search)

    async def _page(self, caller: Caller, query: FhirQuery, search: Search) -> Page:
        principal = caller.principal
        scope = {}
        if principal.patients is not None:
            scope["patients"] = tuple(self.patient_pseudonym(p) for p in sorted(principal.patients))
        if principal.episodes is not None:
            scope["episodes"] = tuple(self.service.sealer.episode_pseudonym(e) for e in sorted(principal.episodes))
        query = replace(query, **scope, after=search.cursor, limit=search.count + 1)
        rows = await self.index.search(query)
        more = len(rows) > search.count
        rows = rows[:search.count]
        records = await self._records(caller, rows, skip_erased=True)
        found = [_found(row, records[row.cid]) for row in rows if row.cid in records]
        return Page(found, rows[-1].row if more else None, search.used)

    async def _read(self, caller: Caller, rows: list[FhirEntry], *, skip_erased: bool) -> list[Found]:
        records = await self._records(caller, rows, skip_erased=skip_erased)
        return [_found(row, records[row.cid]) for row in rows if row.cid in records]

    async def _records(self, caller: Caller, rows: list[FhirEntry], *, skip_erased: bool) -> dict[str, ClientRecord]:
        """The records of ``rows`` the caller may read, by CID: authorized once per episode
        (``record:read``, audited), read together. Episodes outside the caller's scope are left
        out; a role that may not read records at all is ``Forbidden``."""
        heads = self.service.storage.heads
        by_episode: dict[str, list[IndexedRecord]] = {}
        for cid in dict.fromkeys(row.cid for row in rows):
            indexed = await heads.record(cid)
            if indexed is not None:
                by_episode.setdefault(indexed.episode, []).append(indexed)
        out: dict[str, ClientRecord] = {}
        for episode, found in by_episode.items():
            try:
                await self.service.episode_for(caller, episode, "record:read")
            except NotFound:
                continue
            except Forbidden:
                raise
            cids = [indexed.cid for indexed in found]
            try:  # a patient's resources are mostly runs of an episode's records: a chain read each
                out.update(zip(cids, await self.service.read_many(cids, read=await self.service.chain_nodes(found))))
            except Erased:
                if not skip_erased:
                    raise
        return out


def _found(row: FhirEntry, record: ClientRecord) -> Found:
    resource = _at(record.parsed, row.pointer)
    return Found(row, resource["id"], exactjson.extract(record.text, row.pointer))


def _at(value: Any, pointer: str) -> Any:
    for token in pointer.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        value = value[int(token)] if isinstance(value, list) else value[token]
    return value
