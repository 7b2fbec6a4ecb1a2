"""The storage interfaces the core sees, and the choice of backend.

The core only knows these protocols; the embedded SQLite backend (``gateway.storage.sqlite``)
implements them, and PostgreSQL (``gateway.storage.postgres``), shared by several gateways,
implements them the same way. Every method is a coroutine: no backend blocks the event loop.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Protocol

from ..security.tokens import AuthResult, TokenInfo
from .model import (Blob, Episode, FhirEntry, FhirQuery, GatewayKey, HeadMove, IndexedRecord, KeyState,
                    PatientKey, PinRequest)


class HeadStore(Protocol):
    """Episode heads (moved only by compare-and-swap), the record index, idempotency keys and
    the attachment index."""

    async def get_episode(self, episode: str) -> Episode | None: ...
    async def list_episodes(self, patient: str, status: str | None = None) -> list[Episode]: ...
    # Episodes in the order of their ids, those after ``after`` ("" for the first), ``limit`` at
    # a time: how ``check`` goes through them all without holding them all.
    async def episodes_after(self, after: str, limit: int) -> list[Episode]: ...
    # How many records the index holds now (the episodes' lengths summed).
    async def record_count(self) -> int: ...
    # Both raise ``model.StoreConflict`` when the compare-and-swap loses, and ``model.KeyTaken``
    # when the record's idempotency key is held by another record (keys are unique across all
    # records): never the backend's own unique-constraint error; nothing is written either way.
    async def create_episode(self, record: IndexedRecord) -> Episode: ...
    async def append(self, record: IndexedRecord, *, expected_head: str, closes: bool) -> Episode: ...
    # Several moves of one episode's head, in order, in one transaction: each is ``create_episode``
    # (``expected_head`` None) or ``append``, and its outcome (the episode after it, or the
    # ``StoreConflict``/``KeyTaken`` it lost with) is returned in its place; after the first
    # that fails, the rest are not tried (``ChainBroken``). What succeeded is committed.
    async def append_chain(self, moves: list[HeadMove]) -> list[Episode | Exception]: ...
    # Held while one append to ``episode`` is linked, stored and moves the head, so that the
    # processes sharing the store (workers of a gateway, gateways of several sites) take turns
    # in arrival order instead of racing, where the process that just won would start its next
    # append first and keep winning. Correctness never rests on it: heads move by CAS only.
    def episode_turn(self, episode: str) -> AbstractAsyncContextManager[None]: ...
    async def history(self, episode: str, after_seq: int, limit: int) -> list[IndexedRecord]: ...
    async def record(self, cid: str) -> IndexedRecord | None: ...
    # Which of ``cids`` the record index holds (a few hundred at a time: ``check`` asks page
    # by page rather than holding the whole index).
    async def indexed_among(self, cids: list[str]) -> set[str]: ...
    async def record_by_digest(self, episode: str, digest: str) -> IndexedRecord | None: ...
    async def record_by_key(self, key: str) -> IndexedRecord | None: ...
    async def add_blobs(self, blobs: list[Blob]) -> None: ...
    async def blob(self, cid: str) -> Blob | None: ...


class TokenStore(Protocol):
    """API tokens, kept as hashes only."""

    async def create(self, name: str, role: str, patients: Iterable[str] | None = None,
                     episodes: Iterable[str] | None = None,
                     expires_in: timedelta | None = None) -> tuple[str, TokenInfo]: ...
    async def list(self, *, include_revoked: bool = True) -> list[TokenInfo]: ...
    async def get(self, name_or_id: str) -> TokenInfo | None: ...
    async def revoke(self, name_or_id: str) -> bool: ...
    async def check(self, token: str) -> AuthResult: ...


class AuditStore(Protocol):
    """The audit log: a hash chain, appended durably before a request is answered, and signed
    checkpoints beside it (made and checked by ``gateway.core.audit``, which also pages through
    ``walk``: no call re-hashes more than ``limit`` entries, none holds the event loop)."""

    async def append(self, event: dict[str, Any]) -> None: ...
    async def page(self, after: int, limit: int) -> list[dict[str, Any]]: ...
    # (seq, hash) of the last entry; (0, GENESIS) when the log is empty.
    async def last(self) -> tuple[int, str]: ...
    # Re-hash up to ``limit`` entries with seq > ``after``, the first linking to ``prev``:
    # {"checked": n, "last": seq of the last good entry, "head": its hash, "break": seq | None}.
    async def walk(self, after: int, prev: str, limit: int) -> dict[str, Any]: ...
    async def hash_at(self, seq: int) -> str | None: ...
    # Checkpoints are {"seq", "hash", "time", "key", "sig"}; adding one at a seq that has one
    # already is a no-op.
    async def checkpoints(self) -> list[dict[str, Any]]: ...
    async def latest_checkpoint(self) -> dict[str, Any] | None: ...
    async def add_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...


class KeyStore(Protocol):
    """Patients' data keys, wrapped by a key-encryption key the store never holds, by patient
    pseudonym; tombstones of shredded patients; the key state every gateway shares; the
    gateways' registered signing keys. Nothing here opens anything without a gateway's key file.

    A new patient is one insert; a lookup is one indexed read, never cached by the store, so a
    shredding is seen by every gateway on its next lookup."""

    async def state(self) -> KeyState | None: ...
    async def init_state(self, state: KeyState) -> KeyState:
        """Store ``state`` unless one is stored already; the state that stands."""
    async def set_active_kek(self, kek_id: str, *, expected: str) -> KeyState:
        """Move the active KEK from ``expected`` to ``kek_id`` (``KeyConflict`` if it moved).
        Waits for data keys being added under the old one; none is added under it after."""
    async def patient_key(self, pseudonym: str) -> PatientKey | None: ...
    async def key_by_id(self, dek_id: str) -> PatientKey | None: ...
    async def add_patient_key(self, key: PatientKey) -> PatientKey:
        """Insert ``key`` unless the patient has a key or a tombstone; the row that stands.
        ``KeyConflict`` if ``key.kek_id`` is not the active KEK (a rotation moved it)."""
    async def shred(self, pseudonym: str) -> int:
        """Destroy the patient's wrapped key and leave a tombstone (even if there was no key);
        how many keys were destroyed (0 or 1)."""
    async def import_keys(self, keys: list[PatientKey]) -> int:
        """Migration from key files: add live keys where the patient has no row, tombstones
        over whatever stands; how many rows changed."""
    async def rewrap(self, kek_id: str, rewrap: Callable[[list[PatientKey]], list[bytes]], *,
                     after: str, limit: int) -> tuple[str | None, int]:
        """One batch of a rotation: the next ``limit`` live keys after pseudonym ``after`` (in
        order), those not wrapped by ``kek_id`` replaced by ``rewrap(keys)``, in one
        transaction. (last pseudonym of the batch or None at the end, keys re-wrapped)."""
    async def count(self, *, not_wrapped_by: str | None = None) -> int:
        """Live keys (those wrapped by another KEK than ``not_wrapped_by``)."""
    async def register_gateway(self, key: GatewayKey) -> GatewayKey:
        """Register a gateway's public key (or update the KEK ids it holds); the row that
        stands. ``KeyConflict`` if the key id is registered to another gateway id."""
    async def gateway_key(self, key_id: str) -> GatewayKey | None: ...
    async def gateways(self) -> list[GatewayKey]: ...


class PinStore(Protocol):
    """The pin objects of the Pinning Service API a gateway serves for its Kubo node (replicas
    of other sites' records, or anything a replicator asks it to keep). Every call names the
    node (its peer id): gateways of several nodes share one database, each serves its own."""

    async def add(self, pin: PinRequest) -> None: ...
    async def get(self, node: str, requestid: str) -> PinRequest | None: ...
    async def set_status(self, node: str, requestid: str, status: str, details: str | None = None) -> None: ...
    async def remove(self, node: str, requestid: str) -> PinRequest | None: ...
    # (how many match, the first ``limit`` of them, newest first). ``name`` matched by ``match``
    # (exact, iexact, partial, ipartial); ``meta``: every key given must hold its value.
    async def find(self, node: str, *, cids: list[str] | None = None, name: str | None = None,
                   match: str = "exact", statuses: tuple[str, ...] = ("pinned",), before_us: int | None = None,
                   after_us: int | None = None, meta: dict[str, str] | None = None,
                   limit: int = 10) -> tuple[int, list[PinRequest]]: ...
    # Requests still queued or pinning (to be resumed after a restart).
    async def unfinished(self, node: str) -> list[PinRequest]: ...
    # How many requests on ``node`` hold ``cid`` (whatever their status).
    async def holders(self, node: str, cid: str) -> int: ...

class FhirIndexStore(Protocol):
    """The FHIR facade's search index: each version of each FHIR resource records embed (where
    it is: record CID and JSON pointer) and what search finds it by. Keyed pseudonyms only —
    of the type and id, the patient, the episode, codes and references — and date ranges; no
    identifier in clear. A patient's rows go with crypto-shredding (``erase_patient``)."""

    async def add(self, entries: list[FhirEntry]) -> list[FhirEntry]:
        """Index ``entries`` in order, each the next version of its type, id and patient (the
        latest from now on); one already indexed (same CID and pointer) stays as it is. The
        entries as stored (``version``, ``row``)."""
    async def versions(self, type: str, rid: str) -> list[FhirEntry]:
        """Every version of the resource, of every patient, by patient then newest first."""
    async def search(self, query: FhirQuery) -> list[FhirEntry]: ...
    async def pointers(self, cid: str) -> set[str]:
        """Where in the record ``cid`` the index has resources (JSON pointers)."""
    async def erase_patient(self, patient: str) -> int:
        """Remove every row of the patient (by pseudonym); how many versions were removed."""


@dataclass
class Storage:
    """Every store of one gateway, opened together and closed together."""

    heads: HeadStore
    tokens: TokenStore
    audit: AuditStore
    keys: KeyStore
    fhir: FhirIndexStore
    closers: list
    pins: PinStore | None = None

    async def close(self) -> None:
        for close in reversed(self.closers):
            await close()
