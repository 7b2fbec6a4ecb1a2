"""What the gateway keeps about records, episodes and attachments (beside the blocks in Kubo)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Episode:
    id: str
    patient: str
    head: str
    length: int
    status: str            # "open" | "closed"
    last_recorded_at: str


@dataclass(frozen=True)
class IndexedRecord:
    cid: str
    episode: str
    patient: str
    seq: int
    schema: str
    recorded_at: str
    # What the client sent (and who), hashed: a retry of the same append is recognised by it.
    digest: str | None = None
    # The client's Idempotency-Key, scoped to the principal that sent it.
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Blob:
    """An attachment (or a directory of them) and the patient it belongs to."""

    cid: str
    patient: str
    encrypted: bool
    content_type: str | None = None


@dataclass(frozen=True)
class FhirParam:
    """One value a FHIR search parameter finds a resource by: a token (a keyed pseudonym of a
    code, a status or a reference: never the value itself) or a date range (``low`` inclusive,
    ``high`` exclusive, UTC, in the fixed-width form of ``gateway.core.fhir_search``)."""

    name: str
    token: str | None = None
    low: str | None = None
    high: str | None = None


@dataclass(frozen=True)
class FhirEntry:
    """One version of a FHIR resource embedded in a record, as the FHIR index keeps it: where
    it is (the record's CID and a JSON pointer inside it) and what search finds it by. No clear
    identifier: ``rid`` (type and id), ``patient`` and ``episode`` are keyed pseudonyms.
    ``row`` (the store's insertion order) and ``version`` are given by the store."""

    type: str
    rid: str
    patient: str
    episode: str
    cid: str
    pointer: str
    recorded_at: str
    params: tuple[FhirParam, ...] = ()
    version: int = 0
    row: int = 0


@dataclass(frozen=True)
class FhirMatch:
    """One alternative of a search condition on parameter ``name``: one of ``tokens``, or a
    date comparison (``prefix`` eq, ne, gt, lt, ge, le, sa, eb) with the range [low, high)."""

    name: str
    tokens: tuple[str, ...] = ()
    prefix: str | None = None
    low: str | None = None
    high: str | None = None


@dataclass(frozen=True)
class FhirQuery:
    """A search of current versions: of ``types`` (None: any), of one of ``patient``
    (pseudonyms), within ``patients``/``episodes`` (pseudonyms: the caller's scope), of one of
    ``rids`` (``_id``), every
    condition of ``all_of`` met (each by one of its alternatives), rows after ``after``, at
    most ``limit``, in write order."""

    types: tuple[str, ...] | None = None
    patient: tuple[str, ...] | None = None
    patients: tuple[str, ...] | None = None
    episodes: tuple[str, ...] | None = None
    rids: tuple[str, ...] | None = None
    all_of: tuple[tuple[FhirMatch, ...], ...] = ()
    after: int = 0
    limit: int = 50


class StoreConflict(Exception):
    """A compare-and-swap lost: ``current`` is the episode as it is now (None if absent)."""

    def __init__(self, message: str, current: Episode | None) -> None:
        super().__init__(message)
        self.current = current


class ChainBroken(Exception):
    """A head move of ``HeadStore.append_chain`` not attempted: an earlier move of the same
    chain failed, and this one was linked to it."""


@dataclass(frozen=True)
class HeadMove:
    """One step of ``HeadStore.append_chain``: index ``record`` and move its episode's head to it
    from ``expected_head`` (None: ``record`` opens the episode), closing the episode if
    ``closes``."""

    record: IndexedRecord
    expected_head: str | None
    closes: bool = False


class KeyTaken(Exception):
    """The record's idempotency key is already held by another record (a concurrent request
    with the same key committed first). Raised by ``create_episode`` and ``append`` instead of
    the backend's unique-constraint error; nothing was written."""

    def __init__(self, key: str) -> None:
        super().__init__("idempotency key already used")
        self.key = key


# --- keys ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatientKey:
    """A patient's data key as the key store holds it: wrapped by a key-encryption key the
    database never sees, named by the patient's pseudonym. A shredded patient keeps a
    tombstone: ``wrapped`` and ``kek_id`` are gone, ``dek_id`` stays (so data naming it is
    known to be erased, not unknown); ``dek_id`` is None if the patient never had a key."""

    pseudonym: str
    dek_id: str | None
    kek_id: str | None
    wrapped: bytes | None

    @property
    def shredded(self) -> bool:
        return self.wrapped is None


@dataclass(frozen=True)
class KeyState:
    """What every gateway sharing the key store must agree on: the key-encryption key new data
    keys are wrapped with, and a check value of the pseudonym key (an HMAC, not the key)."""

    active_kek: str
    pseudonym_check: str


@dataclass(frozen=True)
class GatewayKey:
    """A gateway's Ed25519 public key, registered so every gateway can check its signatures;
    ``key_id`` is what a record node carries in ``key``. ``kek_ids`` are the key-encryption
    keys its key file held when it last registered (rotation waits for every gateway). ``mac``
    binds key id, gateway id and public key to the deployment's shared secret, so a row written
    into the database by anyone without a key file is not taken for a gateway's key."""

    key_id: str
    gateway_id: str
    public_key: bytes
    kek_ids: tuple[str, ...] = ()
    registered_at: str = ""
    mac: bytes = b""


class KeyConflict(Exception):
    """A key write did not fit the store's state: ``state`` is that state (another active KEK)."""

    def __init__(self, message: str, state: KeyState | None) -> None:
        super().__init__(message)
        self.state = state


PIN_STATUSES = ("queued", "pinning", "pinned", "failed")


@dataclass(frozen=True)
class PinRequest:
    """A pin object of the Pinning Service API this gateway serves, for the Kubo node ``node``
    (its peer id): the CID a replicator asked this node to keep, where to fetch it from, and how
    far it got. ``created_us`` (µs since the epoch) orders and pages the listings."""

    requestid: str
    node: str
    cid: str
    status: str
    created_us: int
    owner: str
    name: str | None = None
    origins: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    details: str | None = None
