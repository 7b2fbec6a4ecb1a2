"""The head store: each episode's head CID and length, a seq → CID index, patient → episodes.

Heads move only by compare-and-swap, after Kubo has stored the record: a writer whose ``prev``
is stale loses and is told the current head, so two writers can never fork an episode. The
``HeadStore`` protocol is all the rest of the gateway sees, so a shared store (PostgreSQL) can
replace the embedded SQLite one for several gateway replicas.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosqlite


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
    """The compare-and-swap lost: ``current`` is the episode as it is now (None if absent)."""

    def __init__(self, message: str, current: Episode | None) -> None:
        super().__init__(message)
        self.current = current


class HeadStore(Protocol):
    async def get_episode(self, episode: str) -> Episode | None: ...
    async def list_episodes(self, patient: str, status: str | None = None) -> list[Episode]: ...
    async def create_episode(self, record: IndexedRecord) -> Episode: ...
    async def append(self, record: IndexedRecord, *, expected_head: str, closes: bool) -> Episode: ...
    async def history(self, episode: str, after_seq: int, limit: int) -> list[IndexedRecord]: ...
    async def record(self, cid: str) -> IndexedRecord | None: ...
    async def record_by_digest(self, episode: str, digest: str) -> IndexedRecord | None: ...
    async def record_by_key(self, key: str) -> IndexedRecord | None: ...
    async def add_blobs(self, blobs: list[Blob]) -> None: ...
    async def blob(self, cid: str) -> Blob | None: ...
    async def close(self) -> None: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS episodes (
    id TEXT PRIMARY KEY,
    patient TEXT NOT NULL,
    head TEXT NOT NULL,
    length INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    last_recorded_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS episodes_by_patient ON episodes (patient, id);
CREATE TABLE IF NOT EXISTS records (
    cid TEXT PRIMARY KEY,
    episode TEXT NOT NULL REFERENCES episodes (id),
    patient TEXT NOT NULL,
    seq INTEGER NOT NULL,
    schema TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    digest TEXT,
    idempotency_key TEXT UNIQUE,
    UNIQUE (episode, seq)
);
CREATE INDEX IF NOT EXISTS records_by_digest ON records (episode, digest);
CREATE TABLE IF NOT EXISTS blobs (
    cid TEXT PRIMARY KEY,
    patient TEXT NOT NULL,
    encrypted INTEGER NOT NULL,
    content_type TEXT
);
"""

_EPISODE_COLS = "id, patient, head, length, status, last_recorded_at"
_RECORD_COLS = "cid, episode, patient, seq, schema, recorded_at, digest, idempotency_key"


class SQLiteHeadStore:
    """Embedded, durable default: WAL, synchronous=FULL, one connection (one writer).

    The one connection is shared by every request, so a lock keeps one transaction (and no
    reader) on it at a time: a read never sees another request's uncommitted append.
    """

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> "SQLiteHeadStore":
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.executescript(SCHEMA)
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    async def get_episode(self, episode: str) -> Episode | None:
        async with self._lock:
            return await self._get_episode(episode)

    async def _get_episode(self, episode: str) -> Episode | None:
        async with self._db.execute(f"SELECT {_EPISODE_COLS} FROM episodes WHERE id = ?", (episode,)) as cur:
            row = await cur.fetchone()
        return Episode(*row) if row else None

    async def list_episodes(self, patient: str, status: str | None = None) -> list[Episode]:
        sql = f"SELECT {_EPISODE_COLS} FROM episodes WHERE patient = ?"
        args: tuple = (patient,)
        if status is not None:
            sql += " AND status = ?"
            args += (status,)
        async with self._lock, self._db.execute(sql + " ORDER BY rowid", args) as cur:
            return [Episode(*row) for row in await cur.fetchall()]

    async def create_episode(self, record: IndexedRecord) -> Episode:
        async with self._lock:
            return await self._create_episode(record)

    async def _create_episode(self, record: IndexedRecord) -> Episode:
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            cur = await self._db.execute(
                "INSERT INTO episodes VALUES (?, ?, ?, 1, 'open', ?) ON CONFLICT (id) DO NOTHING",
                (record.episode, record.patient, record.cid, record.recorded_at))
            if cur.rowcount != 1:
                await self._db.execute("ROLLBACK")
                raise StoreConflict(f"episode {record.episode!r} already exists",
                                    await self._get_episode(record.episode))
            await self._insert_record(record)
            await self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                await self._db.execute("ROLLBACK")
            raise
        return Episode(record.episode, record.patient, record.cid, 1, "open", record.recorded_at)

    async def append(self, record: IndexedRecord, *, expected_head: str, closes: bool) -> Episode:
        """Move the head from ``expected_head`` to ``record.cid`` iff nobody moved it first."""
        async with self._lock:
            return await self._append(record, expected_head, closes)

    async def _append(self, record: IndexedRecord, expected_head: str, closes: bool) -> Episode:
        status = "closed" if closes else "open"
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            cur = await self._db.execute(
                "UPDATE episodes SET head = ?, length = length + 1, status = ?, last_recorded_at = ? "
                "WHERE id = ? AND head = ? AND length = ? AND status = 'open'",
                (record.cid, status, record.recorded_at, record.episode, expected_head, record.seq))
            if cur.rowcount != 1:
                await self._db.execute("ROLLBACK")
                current = await self._get_episode(record.episode)
                raise StoreConflict(f"head of episode {record.episode!r} moved", current)
            await self._insert_record(record)
            await self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                await self._db.execute("ROLLBACK")
            raise
        return Episode(record.episode, record.patient, record.cid, record.seq + 1, status, record.recorded_at)

    async def _insert_record(self, r: IndexedRecord) -> None:
        await self._db.execute(f"INSERT INTO records ({_RECORD_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (r.cid, r.episode, r.patient, r.seq, r.schema, r.recorded_at, r.digest,
                                r.idempotency_key))

    async def history(self, episode: str, after_seq: int, limit: int) -> list[IndexedRecord]:
        async with self._lock, self._db.execute(
            f"SELECT {_RECORD_COLS} FROM records WHERE episode = ? AND seq > ? ORDER BY seq LIMIT ?",
            (episode, after_seq, limit),
        ) as cur:
            return [IndexedRecord(*row) for row in await cur.fetchall()]

    async def record(self, cid: str) -> IndexedRecord | None:
        async with self._lock, self._db.execute(f"SELECT {_RECORD_COLS} FROM records WHERE cid = ?", (cid,)) as cur:
            row = await cur.fetchone()
        return IndexedRecord(*row) if row else None

    async def record_by_digest(self, episode: str, digest: str) -> IndexedRecord | None:
        async with self._lock, self._db.execute(
                f"SELECT {_RECORD_COLS} FROM records WHERE episode = ? AND digest = ?", (episode, digest)) as cur:
            row = await cur.fetchone()
        return IndexedRecord(*row) if row else None

    async def record_by_key(self, key: str) -> IndexedRecord | None:
        async with self._lock, self._db.execute(
                f"SELECT {_RECORD_COLS} FROM records WHERE idempotency_key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return IndexedRecord(*row) if row else None

    async def episodes(self) -> list[Episode]:
        async with self._lock, self._db.execute(f"SELECT {_EPISODE_COLS} FROM episodes ORDER BY rowid") as cur:
            return [Episode(*row) for row in await cur.fetchall()]

    async def all_records(self) -> list[IndexedRecord]:
        async with self._lock, self._db.execute(f"SELECT {_RECORD_COLS} FROM records ORDER BY episode, seq") as cur:
            return [IndexedRecord(*row) for row in await cur.fetchall()]

    async def add_blobs(self, blobs: list[Blob]) -> None:
        """Index attachments (files and the directories around them) under their patient. A CID
        already indexed keeps its first patient: identical bytes are not re-assigned."""
        async with self._lock:
            await self._db.executemany(
                "INSERT INTO blobs VALUES (?, ?, ?, ?) ON CONFLICT (cid) DO NOTHING",
                [(b.cid, b.patient, int(b.encrypted), b.content_type) for b in blobs])

    async def blob(self, cid: str) -> Blob | None:
        async with self._lock, self._db.execute(
                "SELECT cid, patient, encrypted, content_type FROM blobs WHERE cid = ?", (cid,)) as cur:
            row = await cur.fetchone()
        return Blob(row[0], row[1], bool(row[2]), row[3]) if row else None
