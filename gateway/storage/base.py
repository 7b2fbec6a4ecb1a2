"""The storage interfaces the core sees, and the choice of backend.

The core only knows these protocols; the embedded SQLite backend (``gateway.storage.sqlite``)
implements them, and a shared backend for several gateways implements them the same way. Every
method is a coroutine: no backend blocks the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Protocol

from ..security.tokens import AuthResult, TokenInfo
from .model import Blob, Episode, IndexedRecord


class HeadStore(Protocol):
    """Episode heads (moved only by compare-and-swap), the record index, idempotency keys and
    the attachment index."""

    async def get_episode(self, episode: str) -> Episode | None: ...
    async def list_episodes(self, patient: str, status: str | None = None) -> list[Episode]: ...
    async def episodes(self) -> list[Episode]: ...
    # Both raise ``model.StoreConflict`` when the compare-and-swap loses, and ``model.KeyTaken``
    # when the record's idempotency key is held by another record (keys are unique across all
    # records): never the backend's own unique-constraint error; nothing is written either way.
    async def create_episode(self, record: IndexedRecord) -> Episode: ...
    async def append(self, record: IndexedRecord, *, expected_head: str, closes: bool) -> Episode: ...
    async def history(self, episode: str, after_seq: int, limit: int) -> list[IndexedRecord]: ...
    async def record(self, cid: str) -> IndexedRecord | None: ...
    async def all_records(self) -> list[IndexedRecord]: ...
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
    """The audit log: a hash chain, appended durably before a request is answered."""

    async def append(self, event: dict[str, Any]) -> None: ...
    async def page(self, after: int, limit: int) -> list[dict[str, Any]]: ...
    async def verify(self) -> dict[str, Any]: ...


@dataclass
class Storage:
    """Every store of one gateway, opened together and closed together."""

    heads: HeadStore
    tokens: TokenStore
    audit: AuditStore
    closers: list

    async def close(self) -> None:
        for close in reversed(self.closers):
            await close()
