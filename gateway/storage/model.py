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


class StoreConflict(Exception):
    """A compare-and-swap lost: ``current`` is the episode as it is now (None if absent)."""

    def __init__(self, message: str, current: Episode | None) -> None:
        super().__init__(message)
        self.current = current


class KeyTaken(Exception):
    """The record's idempotency key is already held by another record (a concurrent request
    with the same key committed first). Raised by ``create_episode`` and ``append`` instead of
    the backend's unique-constraint error; nothing was written."""

    def __init__(self, key: str) -> None:
        super().__init__("idempotency key already used")
        self.key = key
