"""The head store: each episode's head CID and length, a seq → CID index, patient → episodes.

Heads move only by compare-and-swap, after Kubo has stored the record: a writer whose ``prev``
is stale loses and is told the current head, so two writers can never fork an episode. The
``HeadStore`` protocol is all the rest of the gateway sees, so a shared store (PostgreSQL) can
replace the embedded SQLite one for several gateway replicas.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

import aiosqlite

from .groupcommit import GroupCommit, Outcome

T = TypeVar("T")


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
    """Embedded, durable default: SQLite in WAL mode with synchronous=FULL.

    Writes go through one writer thread (``_Writer``) that commits the writes of concurrent
    requests together — each in a savepoint of its own, so one losing compare-and-swap does not
    undo another — with one fsync per batch; a request is answered only after its batch is
    durable. Reads use a second connection (aiosqlite), one round trip each, and never see
    uncommitted writes.
    """

    def __init__(self, reader: aiosqlite.Connection, writer: "_Writer") -> None:
        self._db = reader
        self._writer = writer

    @classmethod
    async def open(cls, path: Path) -> "SQLiteHeadStore":
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = await asyncio.to_thread(_Writer, path)
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA busy_timeout=10000")
        await db.execute("PRAGMA foreign_keys=ON")
        return cls(db, writer)

    async def close(self) -> None:
        await self._db.close()
        await asyncio.to_thread(self._writer.close)

    async def _one(self, sql: str, args: tuple) -> tuple | None:
        rows = await self._db.execute_fetchall(sql, args)
        return rows[0] if rows else None

    async def get_episode(self, episode: str) -> Episode | None:
        row = await self._one(f"SELECT {_EPISODE_COLS} FROM episodes WHERE id = ?", (episode,))
        return Episode(*row) if row else None

    async def list_episodes(self, patient: str, status: str | None = None) -> list[Episode]:
        sql = f"SELECT {_EPISODE_COLS} FROM episodes WHERE patient = ?"
        args: tuple = (patient,)
        if status is not None:
            sql += " AND status = ?"
            args += (status,)
        return [Episode(*row) for row in await self._db.execute_fetchall(sql + " ORDER BY rowid", args)]

    async def create_episode(self, record: IndexedRecord) -> Episode:
        return await self._writer.submit(_create_episode, record)

    async def append(self, record: IndexedRecord, *, expected_head: str, closes: bool) -> Episode:
        """Move the head from ``expected_head`` to ``record.cid`` iff nobody moved it first."""
        return await self._writer.submit(_append, record, expected_head, closes)

    async def history(self, episode: str, after_seq: int, limit: int) -> list[IndexedRecord]:
        rows = await self._db.execute_fetchall(
            f"SELECT {_RECORD_COLS} FROM records WHERE episode = ? AND seq > ? ORDER BY seq LIMIT ?",
            (episode, after_seq, limit))
        return [IndexedRecord(*row) for row in rows]

    async def record(self, cid: str) -> IndexedRecord | None:
        row = await self._one(f"SELECT {_RECORD_COLS} FROM records WHERE cid = ?", (cid,))
        return IndexedRecord(*row) if row else None

    async def record_by_digest(self, episode: str, digest: str) -> IndexedRecord | None:
        row = await self._one(f"SELECT {_RECORD_COLS} FROM records WHERE episode = ? AND digest = ?",
                              (episode, digest))
        return IndexedRecord(*row) if row else None

    async def record_by_key(self, key: str) -> IndexedRecord | None:
        row = await self._one(f"SELECT {_RECORD_COLS} FROM records WHERE idempotency_key = ?", (key,))
        return IndexedRecord(*row) if row else None

    async def episodes(self) -> list[Episode]:
        return [Episode(*row) for row in
                await self._db.execute_fetchall(f"SELECT {_EPISODE_COLS} FROM episodes ORDER BY rowid", ())]

    async def all_records(self) -> list[IndexedRecord]:
        return [IndexedRecord(*row) for row in await self._db.execute_fetchall(
            f"SELECT {_RECORD_COLS} FROM records ORDER BY episode, seq", ())]

    async def add_blobs(self, blobs: list[Blob]) -> None:
        """Index attachments (files and the directories around them) under their patient. A CID
        already indexed keeps its first patient: identical bytes are not re-assigned."""
        await self._writer.submit(_add_blobs, blobs)

    async def blob(self, cid: str) -> Blob | None:
        row = await self._one("SELECT cid, patient, encrypted, content_type FROM blobs WHERE cid = ?", (cid,))
        return Blob(row[0], row[1], bool(row[2]), row[3]) if row else None


# --- writes: run by the writer thread, inside a savepoint of the batch's transaction -----------

def _episode_row(db: sqlite3.Connection, episode: str) -> Episode | None:
    row = db.execute(f"SELECT {_EPISODE_COLS} FROM episodes WHERE id = ?", (episode,)).fetchone()
    return Episode(*row) if row else None


def _insert_record(db: sqlite3.Connection, r: IndexedRecord) -> None:
    db.execute(f"INSERT INTO records ({_RECORD_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
               (r.cid, r.episode, r.patient, r.seq, r.schema, r.recorded_at, r.digest, r.idempotency_key))


def _create_episode(db: sqlite3.Connection, record: IndexedRecord) -> Episode:
    cur = db.execute("INSERT INTO episodes VALUES (?, ?, ?, 1, 'open', ?) ON CONFLICT (id) DO NOTHING",
                     (record.episode, record.patient, record.cid, record.recorded_at))
    if cur.rowcount != 1:
        raise StoreConflict(f"episode {record.episode!r} already exists", _episode_row(db, record.episode))
    _insert_record(db, record)
    return Episode(record.episode, record.patient, record.cid, 1, "open", record.recorded_at)


def _append(db: sqlite3.Connection, record: IndexedRecord, expected_head: str, closes: bool) -> Episode:
    status = "closed" if closes else "open"
    cur = db.execute(
        "UPDATE episodes SET head = ?, length = length + 1, status = ?, last_recorded_at = ? "
        "WHERE id = ? AND head = ? AND length = ? AND status = 'open'",
        (record.cid, status, record.recorded_at, record.episode, expected_head, record.seq))
    if cur.rowcount != 1:
        raise StoreConflict(f"head of episode {record.episode!r} moved", _episode_row(db, record.episode))
    _insert_record(db, record)
    return Episode(record.episode, record.patient, record.cid, record.seq + 1, status, record.recorded_at)


def _add_blobs(db: sqlite3.Connection, blobs: list[Blob]) -> None:
    db.executemany("INSERT INTO blobs VALUES (?, ?, ?, ?) ON CONFLICT (cid) DO NOTHING",
                   [(b.cid, b.patient, int(b.encrypted), b.content_type) for b in blobs])


class _Writer:
    """The head store's one writer: its connection and how a batch of writes commits."""

    BATCH = 128

    def __init__(self, path: Path) -> None:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=10000")
        db.executescript(SCHEMA)
        self._db = db
        self._group = GroupCommit(self._commit, name="head-store-writer", batch=self.BATCH)

    async def submit(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._group.submit((fn, args))

    def close(self) -> None:
        self._group.close()
        self._db.close()

    def _commit(self, batch: list[tuple[Callable[..., Any], tuple]]) -> list[Outcome]:
        db, outcomes = self._db, []
        try:
            db.execute("BEGIN IMMEDIATE")
            for fn, args in batch:
                db.execute("SAVEPOINT one")
                try:
                    outcomes.append((True, fn(db, *args)))
                except Exception as exc:
                    db.execute("ROLLBACK TO one")
                    outcomes.append((False, exc))
                db.execute("RELEASE one")
            db.execute("COMMIT")
        except Exception:  # the batch did not commit: every write in it fails with the error
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return outcomes
