"""The embedded storage backend: SQLite files in ``records.data_dir``, one access pattern for all.

``SQLiteDatabase`` is the one way the gateway uses SQLite. Writes go through one writer thread
(``GroupCommit``) that commits the writes of concurrent requests together — each in a savepoint
of its own, so one failing write (a lost compare-and-swap) does not undo another — with one
fsync per batch (WAL, ``synchronous=FULL``); a write returns only once its batch is durable.
Reads run on a small pool of reader threads, each with its own connection, and never see
uncommitted writes. Point lookups (one indexed row: a token, an episode, a record, a key) run
at once on the event loop's thread instead — a hop to a reader thread and back cost more CPU
than the lookup, a fifth of an append's — on a connection that never waits for a lock: a
lookup that would have to wait goes to a reader thread. The event loop never waits on a lock.

Each store keeps its own file (``heads.sqlite3``, ``tokens.sqlite3``, ``audit.sqlite3``,
``keys.sqlite3``, ``fhir.sqlite3``), so the ``medicon-gateway token`` and ``keys`` CLI in another process can write
tokens and keys while the gateway reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from ..errors import StorageFull, Unavailable, is_out_of_space
from ..metrics import Metrics
from ..security.tokens import (AuthResult, NewToken, TokenError, TokenInfo, decode_token, generate_token,
                               hash_token, judge, last_use_due, new_token_id)
from . import auditwalk
from .auditwalk import AUDIT_FIELDS, AUDIT_OPTIONAL_FIELDS, GENESIS, audit_hash  # noqa: F401 (the chain's format)
from .base import Storage
from .fhirsql import RESOURCE_COLS, entry_of, search_sql
from .groupcommit import GroupCommit, Outcome
from .pins import PINS_FILE, PINS_SCHEMA, SQLitePinStore
from .model import (Blob, ChainBroken, Episode, FhirEntry, FhirQuery, GatewayKey, HeadMove, IndexedRecord,
                    KeyConflict, KeyState,
                    KeyTaken, PatientKey, StoreConflict)

T = TypeVar("T")
Query = Callable[..., T]  # fn(connection, *args) -> T, run with a connection of the database


def _is_busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY/LOCKED: another connection holds a lock this one would have had to wait for."""
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc).lower()


def _is_disk_full(exc: BaseException) -> bool:
    return (isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()) or is_out_of_space(exc)


def _volume_full(path: Path) -> bool:
    """Whether the volume holding ``path`` has (next to) no room left: SQLite reports some
    writes that fail for want of space as I/O errors, not as SQLITE_FULL."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


class SQLiteDatabase:
    """One SQLite file: group-committed writes on a writer thread, reads on reader threads."""

    BATCH = 128

    def __init__(self, path: Path, schema: str, *, readers: int = 2, name: str = "sqlite",
                 metrics: Metrics | None = None) -> None:
        self.path = path
        self._schema = schema
        self._name = name
        self._metrics = metrics
        self._writer_db = self._connect()
        self._writer_db.executescript(schema)
        self._group = GroupCommit(self._commit, name=f"{name}-writer", batch=self.BATCH,
                                  on_batch=metrics.commit_batch_observer(name) if metrics else None)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = [self._writer_db]
        self._connections_lock = threading.Lock()
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix=f"{name}-reader")

    @classmethod
    async def open(cls, path: Path, schema: str, *, mode: int = 0o600, **kw: Any) -> "SQLiteDatabase":
        def make() -> SQLiteDatabase:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, mode))  # born private
            return cls(path, schema, **kw)
        return await asyncio.to_thread(make)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=10000")
        return db

    def _reader(self) -> sqlite3.Connection:
        return self._thread_connection("db")

    def _thread_connection(self, slot: str, *pragmas: str) -> sqlite3.Connection:
        """This thread's connection in ``slot``, made (with ``pragmas``) on first use."""
        db = getattr(self._local, slot, None)
        if db is None:
            db = self._connect()
            for pragma in pragmas:
                db.execute(pragma)
            setattr(self._local, slot, db)
            with self._connections_lock:
                self._connections.append(db)
        return db

    async def read(self, fn: Query[T], *args: Any) -> T:
        """``fn(connection, *args)`` on a reader thread."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._readers, lambda: fn(self._reader(), *args))
        except sqlite3.Error as exc:
            raise self._failure(exc, "read") from None

    async def lookup(self, fn: Query[T], *args: Any) -> T:
        """``fn(connection, *args)`` for a point lookup (an indexed row or a few, nothing that
        scans): run at once on the calling (event loop's) thread, or on a reader thread if it
        would have to wait for a lock."""
        try:
            return fn(self._loop_reader(), *args)
        except sqlite3.Error as exc:
            if not _is_busy(exc):
                raise self._failure(exc, "read") from None
        return await self.read(fn, *args)

    def _loop_reader(self) -> sqlite3.Connection:
        # never sleep on the event loop waiting for a lock: fall back to a reader thread instead
        return self._thread_connection("loop_db", "PRAGMA busy_timeout=0")

    async def write(self, fn: Query[T], *args: Any) -> T:
        """``fn(connection, *args)`` in a savepoint of the writer's next batch; returns when the
        batch is durable. Exceptions of ``fn`` (not SQLite's) are raised as they are."""
        try:
            return await self._group.submit((fn, args))
        except sqlite3.Error as exc:
            raise self._failure(exc, "write") from None

    def _failure(self, exc: sqlite3.Error, what: str) -> Exception:
        if self._metrics is not None:
            self._metrics.storage_error(self._name, what, "full" if _is_disk_full(exc) else "failed")
        if _is_disk_full(exc) or (what == "write" and _volume_full(self.path)):
            return StorageFull(f"the gateway's data volume is full: its {self._name} store cannot {what}")
        return Unavailable(f"the gateway's {self._name} store failed to {what} ({type(exc).__name__})")

    def _commit(self, batch: list[tuple[Query, tuple]]) -> list[Outcome]:
        db, outcomes = self._writer_db, []
        try:
            db.execute("BEGIN IMMEDIATE")
            for fn, args in batch:
                db.execute("SAVEPOINT one")
                try:
                    outcomes.append((True, fn(db, *args)))
                except sqlite3.Error as exc:
                    if _is_disk_full(exc):
                        raise  # the whole transaction is gone: every write of the batch fails
                    db.execute("ROLLBACK TO one")
                    outcomes.append((False, exc))
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

    async def close(self) -> None:
        def shut() -> None:
            self._group.close()
            self._readers.shutdown(wait=True)
            with self._connections_lock:
                for db in self._connections:
                    db.close()
        await asyncio.to_thread(shut)


# --- heads, the record index and attachments -------------------------------------------------

HEADS_SCHEMA = """
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


def _episode_row(db: sqlite3.Connection, episode: str) -> Episode | None:
    row = db.execute(f"SELECT {_EPISODE_COLS} FROM episodes WHERE id = ?", (episode,)).fetchone()
    return Episode(*row) if row else None


def _record_where(db: sqlite3.Connection, where: str, args: tuple) -> IndexedRecord | None:
    row = db.execute(f"SELECT {_RECORD_COLS} FROM records WHERE {where}", args).fetchone()
    return IndexedRecord(*row) if row else None


def _insert_record(db: sqlite3.Connection, r: IndexedRecord) -> None:
    try:
        db.execute(f"INSERT INTO records ({_RECORD_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (r.cid, r.episode, r.patient, r.seq, r.schema, r.recorded_at, r.digest, r.idempotency_key))
    except sqlite3.IntegrityError as exc:
        if r.idempotency_key is not None and "records.idempotency_key" in str(exc):
            raise KeyTaken(r.idempotency_key) from None
        raise


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


def _append_chain(db: sqlite3.Connection, moves: list[HeadMove]) -> list[Episode | Exception]:
    outcomes: list[Episode | Exception] = []
    for move in moves:
        if outcomes and isinstance(outcomes[-1], Exception):
            outcomes.append(ChainBroken("an earlier head move of this chain failed"))
            continue
        db.execute("SAVEPOINT move")
        try:
            if move.expected_head is None:
                outcomes.append(_create_episode(db, move.record))
            else:
                outcomes.append(_append(db, move.record, move.expected_head, move.closes))
        except (StoreConflict, KeyTaken) as lost:
            db.execute("ROLLBACK TO move")
            outcomes.append(lost)
        db.execute("RELEASE move")
    return outcomes


def _list_episodes(db: sqlite3.Connection, patient: str, status: str | None) -> list[Episode]:
    sql, args = f"SELECT {_EPISODE_COLS} FROM episodes WHERE patient = ?", (patient,)
    if status is not None:
        sql, args = sql + " AND status = ?", args + (status,)
    return [Episode(*row) for row in db.execute(sql + " ORDER BY rowid", args)]


def _history(db: sqlite3.Connection, episode: str, after_seq: int, limit: int) -> list[IndexedRecord]:
    return [IndexedRecord(*row) for row in db.execute(
        f"SELECT {_RECORD_COLS} FROM records WHERE episode = ? AND seq > ? ORDER BY seq LIMIT ?",
        (episode, after_seq, limit))]


def _indexed_among(db: sqlite3.Connection, cids: list[str]) -> set[str]:
    held: set[str] = set()
    for start in range(0, len(cids), 500):  # SQLite's bound parameters per statement are limited
        batch = cids[start:start + 500]
        held.update(row[0] for row in db.execute(
            f"SELECT cid FROM records WHERE cid IN ({', '.join('?' * len(batch))})", batch))
    return held


def _add_blobs(db: sqlite3.Connection, blobs: list[Blob]) -> None:
    db.executemany("INSERT INTO blobs VALUES (?, ?, ?, ?) ON CONFLICT (cid) DO NOTHING",
                   [(b.cid, b.patient, int(b.encrypted), b.content_type) for b in blobs])


def _blob(db: sqlite3.Connection, cid: str) -> Blob | None:
    row = db.execute("SELECT cid, patient, encrypted, content_type FROM blobs WHERE cid = ?", (cid,)).fetchone()
    return Blob(row[0], row[1], bool(row[2]), row[3]) if row else None


class SQLiteHeadStore:
    """Heads move only by compare-and-swap, after Kubo has stored the record: a writer whose
    ``prev`` is stale loses (``StoreConflict`` with the current episode), so no fork."""

    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db

    def episode_turn(self, episode: str) -> contextlib.nullcontext:
        """One process writes these files: the record service's own per-episode lock is the turn."""
        return contextlib.nullcontext()

    async def get_episode(self, episode: str) -> Episode | None:
        return await self._db.lookup(_episode_row, episode)

    async def list_episodes(self, patient: str, status: str | None = None) -> list[Episode]:
        return await self._db.read(_list_episodes, patient, status)

    async def episodes_after(self, after: str, limit: int) -> list[Episode]:
        return await self._db.read(lambda db: [Episode(*row) for row in db.execute(
            f"SELECT {_EPISODE_COLS} FROM episodes WHERE id > ? ORDER BY id LIMIT ?", (after, limit))])

    async def record_count(self) -> int:
        return await self._db.read(lambda db: db.execute("SELECT coalesce(sum(length), 0) FROM episodes").fetchone()[0])

    async def create_episode(self, record: IndexedRecord) -> Episode:
        return await self._db.write(_create_episode, record)

    async def append(self, record: IndexedRecord, *, expected_head: str, closes: bool) -> Episode:
        """Move the head from ``expected_head`` to ``record.cid`` iff nobody moved it first."""
        return await self._db.write(_append, record, expected_head, closes)

    async def append_chain(self, moves: list[HeadMove]) -> list[Episode | Exception]:
        """Several moves of one episode's head in one savepoint of the writer's next batch."""
        return await self._db.write(_append_chain, moves)

    async def history(self, episode: str, after_seq: int, limit: int) -> list[IndexedRecord]:
        return await self._db.read(_history, episode, after_seq, limit)

    async def record(self, cid: str) -> IndexedRecord | None:
        return await self._db.lookup(_record_where, "cid = ?", (cid,))

    async def indexed_among(self, cids: list[str]) -> set[str]:
        return await self._db.read(_indexed_among, cids)

    async def record_by_digest(self, episode: str, digest: str) -> IndexedRecord | None:
        return await self._db.lookup(_record_where, "episode = ? AND digest = ?", (episode, digest))

    async def record_by_key(self, key: str) -> IndexedRecord | None:
        return await self._db.lookup(_record_where, "idempotency_key = ?", (key,))

    async def add_blobs(self, blobs: list[Blob]) -> None:
        """Index attachments (files and the directories around them) under their patient. A CID
        already indexed keeps its first patient: identical bytes are not re-assigned."""
        await self._db.write(_add_blobs, blobs)

    async def blob(self, cid: str) -> Blob | None:
        return await self._db.lookup(_blob, cid)


# --- tokens ------------------------------------------------------------------------------------

TOKENS_FILE = "tokens.sqlite3"

TOKENS_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    token_hash   TEXT NOT NULL UNIQUE,
    role         TEXT NOT NULL,
    patients     TEXT,             -- JSON list, NULL = no restriction
    episodes     TEXT,             -- JSON list, NULL = no restriction
    created_at   REAL NOT NULL,    -- Unix seconds
    expires_at   REAL,
    revoked_at   REAL,
    last_used_at REAL
);
-- A name names one live token; a revoked token's name may be given to its replacement.
CREATE UNIQUE INDEX IF NOT EXISTS tokens_live_name ON tokens(name) WHERE revoked_at IS NULL;
"""
_TOKEN_COLS = "id, name, role, patients, episodes, created_at, expires_at, revoked_at, last_used_at"


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


def _token_info(row: tuple) -> TokenInfo:
    tid, name, role, patients, episodes, created, expires, revoked, used = row
    load = lambda s: None if s is None else tuple(json.loads(s))  # noqa: E731
    return TokenInfo(tid, name, role, load(patients), load(episodes), _dt(created), _dt(expires),
                     _dt(revoked), _dt(used))


def _insert_token(db: sqlite3.Connection, new: NewToken, token_hash: str, now: float) -> TokenInfo:
    expires_at = None if new.expires_in is None else now + new.expires_in.total_seconds()
    for _ in range(5):
        token_id = new_token_id()
        try:
            db.execute("INSERT INTO tokens (id, name, token_hash, role, patients, episodes, created_at,"
                       " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (token_id, new.name, token_hash, new.role,
                        None if new.patients is None else json.dumps(list(new.patients)),
                        None if new.episodes is None else json.dumps(list(new.episodes)), now, expires_at))
        except sqlite3.IntegrityError:
            if db.execute("SELECT 1 FROM tokens WHERE name = ? AND revoked_at IS NULL", (new.name,)).fetchone():
                raise TokenError(f"a live token named {new.name!r} exists; revoke it first") from None
            continue  # an id collision (1 in 4 billion): draw another
        return TokenInfo(token_id, new.name, new.role, new.patients, new.episodes, _dt(now),
                         _dt(expires_at), None, None)
    raise TokenError("could not allocate a token id")


def _token_by_hash(db: sqlite3.Connection, digest: str) -> tuple[TokenInfo, str] | None:
    row = db.execute(f"SELECT {_TOKEN_COLS}, token_hash FROM tokens WHERE token_hash = ?", (digest,)).fetchone()
    return None if row is None else (_token_info(row[:-1]), row[-1])


class SQLiteTokenStore:
    """Tokens as SHA-256 hashes, one indexed lookup per request; nothing cached, so a revocation
    by the CLI in another process is refused on the very next request."""

    def __init__(self, db: SQLiteDatabase, *, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    async def create(self, name: str, role: str, patients: Iterable[str] | None = None,
                     episodes: Iterable[str] | None = None,
                     expires_in: timedelta | None = None) -> tuple[str, TokenInfo]:
        """Create a token; return ``(plaintext, info)``. The plaintext is kept nowhere: this is
        the only time it is seen."""
        new = NewToken.checked(name, role, patients, episodes, expires_in)
        token = generate_token()
        return token, await self._db.write(_insert_token, new, hash_token(token), self._clock())

    async def list(self, *, include_revoked: bool = True) -> list[TokenInfo]:
        """Every token's public description, oldest first. Never the secret nor its hash."""
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        return await self._db.read(lambda db: [_token_info(row) for row in db.execute(
            f"SELECT {_TOKEN_COLS} FROM tokens{where} ORDER BY created_at, id")])

    async def get(self, name_or_id: str) -> TokenInfo | None:
        """The token with this id, or the live token with this name."""
        row = await self._db.read(lambda db: db.execute(
            f"SELECT {_TOKEN_COLS} FROM tokens WHERE id = ? OR (name = ? AND revoked_at IS NULL)"
            " ORDER BY id = ? DESC LIMIT 1", (name_or_id, name_or_id, name_or_id)).fetchone())
        return None if row is None else _token_info(row)

    async def revoke(self, name_or_id: str) -> bool:
        """Revoke the token with this id, or the live token with this name. True if one was
        revoked now; False if none matched or it was revoked already."""
        now = self._clock()
        return await self._db.write(lambda db: db.execute(
            "UPDATE tokens SET revoked_at = ? WHERE revoked_at IS NULL AND (id = ? OR name = ?)",
            (now, name_or_id, name_or_id)).rowcount > 0)

    async def check(self, token: str) -> AuthResult:
        """Check ``token``: one indexed SELECT on its hash. Never raises for a bad token."""
        if not isinstance(token, str) or decode_token(token) is None:
            return AuthResult(None, "malformed")
        digest = hash_token(token)
        found = await self._db.lookup(_token_by_hash, digest)
        if found is not None and not hmac.compare_digest(found[1], digest):
            found = None
        now = self._clock()
        result = judge(None if found is None else found[0], now)
        if result.principal is not None:
            await self._touch(found[0], now)
        return result

    async def _touch(self, info: TokenInfo, now: float) -> None:
        if not last_use_due(info, now):
            return
        try:
            await self._db.write(lambda db: db.execute(
                "UPDATE tokens SET last_used_at = ? WHERE id = ?", (now, info.id)))
        except (StorageFull, Unavailable):
            pass  # bookkeeping only: never fail a request on it


# --- the audit log -----------------------------------------------------------------------------

AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, event TEXT NOT NULL,
                                  prev TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit_checkpoints (seq INTEGER PRIMARY KEY, hash TEXT NOT NULL,
                                              time TEXT NOT NULL, key TEXT NOT NULL, sig TEXT NOT NULL);
"""


def _append_event(db: sqlite3.Connection, event: dict) -> None:
    # The last hash is read inside the write transaction (after the batch's earlier events).
    row = db.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    prev = row[0] if row else GENESIS
    db.execute("INSERT INTO audit (event, prev, hash) VALUES (?, ?, ?)",
               (json.dumps(event, sort_keys=True), prev, audit_hash(prev, event)))


def _audit_page(db: sqlite3.Connection, after: int, limit: int) -> list[dict]:
    rows = db.execute("SELECT seq, event, prev, hash FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                      (after, limit))
    return [{"seq": seq, **json.loads(event), "prev": prev, "hash": h} for seq, event, prev, h in rows]


_CHECKPOINT_COLS = ("seq", "hash", "time", "key", "sig")


class SQLiteAuditStore:
    """Each entry carries the SHA-256 of the one before, so deleting, reordering or editing an
    entry breaks the chain from there on. Events of concurrent requests share a commit.
    Signed checkpoints (``seq``, the entry's ``hash``) are kept beside the chain."""

    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db
        self._walker = auditwalk.WalkerProcess()

    async def append(self, event: dict[str, Any]) -> None:
        await self._db.write(_append_event, event)

    async def page(self, after: int, limit: int) -> list[dict[str, Any]]:
        return await self._db.read(_audit_page, after, limit)

    async def last(self) -> tuple[int, str]:
        row = await self._db.read(lambda db: db.execute(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone())
        return (row[0], row[1]) if row else (0, GENESIS)

    async def walk(self, after: int, prev: str, limit: int) -> dict[str, Any]:
        """A page re-hashed in the walker process (``auditwalk``): never in the gateway's."""
        try:
            return await self._walker.run(auditwalk.walk_file, str(self._db.path), after, prev, limit)
        except sqlite3.Error as exc:
            raise self._db._failure(exc, "read") from None
        except auditwalk.WalkerProcess.WorkerDied:
            raise Unavailable("the audit log's verification worker died") from None

    async def close(self) -> None:
        await self._walker.close()
        await self._db.close()

    async def hash_at(self, seq: int) -> str | None:
        row = await self._db.read(lambda db: db.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone())
        return row[0] if row else None

    async def checkpoints(self) -> list[dict[str, Any]]:
        return await self._db.read(lambda db: [dict(zip(_CHECKPOINT_COLS, row)) for row in db.execute(
            f"SELECT {', '.join(_CHECKPOINT_COLS)} FROM audit_checkpoints ORDER BY seq")])

    async def latest_checkpoint(self) -> dict[str, Any] | None:
        row = await self._db.read(lambda db: db.execute(
            f"SELECT {', '.join(_CHECKPOINT_COLS)} FROM audit_checkpoints ORDER BY seq DESC LIMIT 1").fetchone())
        return dict(zip(_CHECKPOINT_COLS, row)) if row else None

    async def add_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        await self._db.write(lambda db: db.execute(
            f"INSERT INTO audit_checkpoints ({', '.join(_CHECKPOINT_COLS)}) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (seq) DO NOTHING", tuple(checkpoint[c] for c in _CHECKPOINT_COLS)))


# --- keys ----------------------------------------------------------------------------------------

KEYS_FILE = "keys.sqlite3"

KEYS_SCHEMA = """
CREATE TABLE IF NOT EXISTS key_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    active_kek TEXT NOT NULL,
    pseudonym_check TEXT NOT NULL
);
-- One row per patient pseudonym: a live wrapped key, or a tombstone (wrapped NULL).
CREATE TABLE IF NOT EXISTS patient_keys (
    pseudonym TEXT PRIMARY KEY,
    dek_id TEXT UNIQUE,
    kek_id TEXT,
    wrapped BLOB,
    created_at TEXT NOT NULL,
    shredded_at TEXT,
    CHECK ((wrapped IS NULL) = (kek_id IS NULL))
);
CREATE TABLE IF NOT EXISTS gateway_keys (
    key_id TEXT PRIMARY KEY,
    gateway_id TEXT NOT NULL,
    public_key BLOB NOT NULL,
    kek_ids TEXT NOT NULL,          -- JSON list
    registered_at TEXT NOT NULL,
    mac BLOB NOT NULL
);
"""
_KEY_COLS = "pseudonym, dek_id, kek_id, wrapped"
_GATEWAY_COLS = "key_id, gateway_id, public_key, kek_ids, registered_at, mac"


def _utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _patient_key(row: tuple | None) -> PatientKey | None:
    return None if row is None else PatientKey(row[0], row[1], row[2], None if row[3] is None else bytes(row[3]))


def _gateway_key(row: tuple | None) -> GatewayKey | None:
    if row is None:
        return None
    key_id, gateway_id, public_key, kek_ids, at, mac = row
    return GatewayKey(key_id, gateway_id, bytes(public_key), tuple(json.loads(kek_ids)), at, bytes(mac))


def _key_state(db: sqlite3.Connection) -> KeyState | None:
    row = db.execute("SELECT active_kek, pseudonym_check FROM key_state WHERE id = 1").fetchone()
    return None if row is None else KeyState(*row)


def _key_where(db: sqlite3.Connection, column: str, value: str) -> PatientKey | None:
    return _patient_key(db.execute(f"SELECT {_KEY_COLS} FROM patient_keys WHERE {column} = ?", (value,)).fetchone())


def _init_state(db: sqlite3.Connection, state: KeyState) -> KeyState:
    db.execute("INSERT INTO key_state VALUES (1, ?, ?) ON CONFLICT (id) DO NOTHING",
               (state.active_kek, state.pseudonym_check))
    return _key_state(db)


def _set_active_kek(db: sqlite3.Connection, kek_id: str, expected: str) -> KeyState:
    if db.execute("UPDATE key_state SET active_kek = ? WHERE id = 1 AND active_kek = ?",
                  (kek_id, expected)).rowcount != 1:
        current = _key_state(db)
        raise KeyConflict(f"the active key-encryption key is {current and current.active_kek}, "
                          f"not {expected}", current)
    return _key_state(db)


def _add_patient_key(db: sqlite3.Connection, key: PatientKey) -> PatientKey:
    # The write transaction holds SQLite's one write lock: the state read here cannot change
    # before the insert commits.
    state = _key_state(db)
    if state is None or state.active_kek != key.kek_id:
        standing = _key_where(db, "pseudonym", key.pseudonym)
        if standing is not None:
            return standing
        raise KeyConflict(f"data keys are wrapped by {state and state.active_kek} now, not {key.kek_id}", state)
    db.execute("INSERT INTO patient_keys (pseudonym, dek_id, kek_id, wrapped, created_at) VALUES (?, ?, ?, ?, ?)"
               " ON CONFLICT (pseudonym) DO NOTHING", (key.pseudonym, key.dek_id, key.kek_id, key.wrapped, _utc()))
    return _key_where(db, "pseudonym", key.pseudonym)


def _shred(db: sqlite3.Connection, pseudonym: str) -> int:
    standing = _key_where(db, "pseudonym", pseudonym)
    now = _utc()
    if standing is None:
        db.execute("INSERT INTO patient_keys (pseudonym, created_at, shredded_at) VALUES (?, ?, ?)",
                   (pseudonym, now, now))
        return 0
    db.execute("UPDATE patient_keys SET kek_id = NULL, wrapped = NULL, shredded_at = coalesce(shredded_at, ?)"
               " WHERE pseudonym = ?", (now, pseudonym))
    return 0 if standing.shredded else 1


def _import_keys(db: sqlite3.Connection, keys: list[PatientKey]) -> int:
    changed = 0
    for key in keys:
        if key.shredded:
            standing = _key_where(db, "pseudonym", key.pseudonym)
            if standing is None:
                db.execute("INSERT INTO patient_keys (pseudonym, dek_id, created_at, shredded_at)"
                           " VALUES (?, ?, ?, ?)", (key.pseudonym, key.dek_id, _utc(), _utc()))
                changed += 1
            elif not standing.shredded:
                _shred(db, key.pseudonym)
                changed += 1
        else:
            changed += db.execute(
                "INSERT INTO patient_keys (pseudonym, dek_id, kek_id, wrapped, created_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING", (key.pseudonym, key.dek_id, key.kek_id, key.wrapped, _utc())).rowcount
    return changed


def _rewrap(db: sqlite3.Connection, kek_id: str, rewrap: Callable[[list[PatientKey]], list[bytes]],
            after: str, limit: int) -> tuple[str | None, int]:
    rows = [_patient_key(r) for r in db.execute(
        f"SELECT {_KEY_COLS} FROM patient_keys WHERE pseudonym > ? AND wrapped IS NOT NULL"
        " ORDER BY pseudonym LIMIT ?", (after, limit))]
    stale = [k for k in rows if k.kek_id != kek_id]
    if stale:
        db.executemany("UPDATE patient_keys SET kek_id = ?, wrapped = ? WHERE pseudonym = ?",
                       [(kek_id, wrapped, k.pseudonym) for k, wrapped in zip(stale, rewrap(stale), strict=True)])
    return (rows[-1].pseudonym if len(rows) == limit else None), len(stale)


def _register_gateway(db: sqlite3.Connection, key: GatewayKey) -> GatewayKey:
    standing = _gateway_key(db.execute(f"SELECT {_GATEWAY_COLS} FROM gateway_keys WHERE key_id = ?",
                                       (key.key_id,)).fetchone())
    if standing is not None and (standing.gateway_id, standing.public_key) != (key.gateway_id, key.public_key):
        raise KeyConflict(f"signing key {key.key_id} is registered to gateway {standing.gateway_id!r}", None)
    db.execute(f"INSERT INTO gateway_keys ({_GATEWAY_COLS}) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key_id)"
               " DO UPDATE SET kek_ids = excluded.kek_ids, mac = excluded.mac",
               (key.key_id, key.gateway_id, key.public_key, json.dumps(list(key.kek_ids)), _utc(), key.mac))
    return _gateway_key(db.execute(f"SELECT {_GATEWAY_COLS} FROM gateway_keys WHERE key_id = ?",
                                   (key.key_id,)).fetchone())


class SQLiteKeyStore:
    """``base.KeyStore`` in ``keys.sqlite3``: every lookup is one indexed read on a reader
    thread, every change a group-committed write; the ``keys`` CLI writes the same file."""

    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db

    async def state(self) -> KeyState | None:
        return await self._db.read(_key_state)

    async def init_state(self, state: KeyState) -> KeyState:
        return await self._db.write(_init_state, state)

    async def set_active_kek(self, kek_id: str, *, expected: str) -> KeyState:
        return await self._db.write(_set_active_kek, kek_id, expected)

    async def patient_key(self, pseudonym: str) -> PatientKey | None:
        return await self._db.lookup(_key_where, "pseudonym", pseudonym)

    async def key_by_id(self, dek_id: str) -> PatientKey | None:
        return await self._db.lookup(_key_where, "dek_id", dek_id)

    async def add_patient_key(self, key: PatientKey) -> PatientKey:
        return await self._db.write(_add_patient_key, key)

    async def shred(self, pseudonym: str) -> int:
        return await self._db.write(_shred, pseudonym)

    async def import_keys(self, keys: list[PatientKey]) -> int:
        return await self._db.write(_import_keys, keys)

    async def rewrap(self, kek_id: str, rewrap: Callable[[list[PatientKey]], list[bytes]], *,
                     after: str, limit: int) -> tuple[str | None, int]:
        return await self._db.write(_rewrap, kek_id, rewrap, after, limit)

    async def count(self, *, not_wrapped_by: str | None = None) -> int:
        return await self._db.read(lambda db: db.execute(
            "SELECT count(*) FROM patient_keys WHERE wrapped IS NOT NULL AND kek_id IS NOT ?",
            (not_wrapped_by,)).fetchone()[0])

    async def register_gateway(self, key: GatewayKey) -> GatewayKey:
        return await self._db.write(_register_gateway, key)

    async def gateway_key(self, key_id: str) -> GatewayKey | None:
        return await self._db.lookup(lambda db: _gateway_key(db.execute(
            f"SELECT {_GATEWAY_COLS} FROM gateway_keys WHERE key_id = ?", (key_id,)).fetchone()))

    async def gateways(self) -> list[GatewayKey]:
        return await self._db.read(lambda db: [_gateway_key(r) for r in db.execute(
            f"SELECT {_GATEWAY_COLS} FROM gateway_keys ORDER BY registered_at, key_id")])


# --- the FHIR index ---------------------------------------------------------------------------

FHIR_FILE = "fhir.sqlite3"

FHIR_SCHEMA = """
CREATE TABLE IF NOT EXISTS fhir_resources (
    entry       INTEGER PRIMARY KEY AUTOINCREMENT,
    type        TEXT NOT NULL,
    rid         TEXT NOT NULL,
    patient     TEXT NOT NULL,
    episode     TEXT NOT NULL,
    version     INTEGER NOT NULL,
    latest      INTEGER NOT NULL,
    cid         TEXT NOT NULL,
    pointer     TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    UNIQUE (cid, pointer),
    UNIQUE (type, rid, patient, version)
);
CREATE INDEX IF NOT EXISTS fhir_latest_by_type ON fhir_resources (type, latest, entry);
CREATE INDEX IF NOT EXISTS fhir_latest_by_patient ON fhir_resources (patient, latest, entry);
CREATE TABLE IF NOT EXISTS fhir_params (
    entry INTEGER NOT NULL REFERENCES fhir_resources (entry) ON DELETE CASCADE,
    name  TEXT NOT NULL,
    token TEXT,
    low   TEXT,
    high  TEXT
);
CREATE INDEX IF NOT EXISTS fhir_params_by_token ON fhir_params (name, token);
CREATE INDEX IF NOT EXISTS fhir_params_by_entry ON fhir_params (entry);
"""


def _fhir_add(db: sqlite3.Connection, entries: list[FhirEntry]) -> list[FhirEntry]:
    stored = []
    for e in entries:
        known = db.execute("SELECT entry, version FROM fhir_resources WHERE cid = ? AND pointer = ?",
                           (e.cid, e.pointer)).fetchone()
        if known is not None:
            stored.append(replace(e, row=known[0], version=known[1]))
            continue
        key = (e.type, e.rid, e.patient)
        last = db.execute("SELECT max(version) FROM fhir_resources WHERE type = ? AND rid = ? AND patient = ?",
                          key).fetchone()[0] or 0
        db.execute("UPDATE fhir_resources SET latest = 0 WHERE type = ? AND rid = ? AND patient = ? AND latest = 1",
                   key)
        entry = db.execute(
            "INSERT INTO fhir_resources (type, rid, patient, episode, version, latest, cid, pointer, recorded_at)"
            " VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?)",
            (*key, e.episode, last + 1, e.cid, e.pointer, e.recorded_at)).lastrowid
        db.executemany("INSERT INTO fhir_params (entry, name, token, low, high) VALUES (?, ?, ?, ?, ?)",
                       [(entry, p.name, p.token, p.low, p.high) for p in e.params])
        stored.append(replace(e, row=entry, version=last + 1))
    return stored


class SQLiteFhirIndex:
    """The FHIR index in its own file; versions are numbered under the writer's transaction."""

    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db

    async def add(self, entries: list[FhirEntry]) -> list[FhirEntry]:
        return await self._db.write(_fhir_add, list(entries)) if entries else []

    async def versions(self, type: str, rid: str) -> list[FhirEntry]:
        return await self._db.read(lambda db: [entry_of(r) for r in db.execute(
            f"SELECT {RESOURCE_COLS} FROM fhir_resources WHERE type = ? AND rid = ?"
            " ORDER BY patient, version DESC", (type, rid))])

    async def search(self, query: FhirQuery) -> list[FhirEntry]:
        sql, args = search_sql(query, lambda n: "?")
        return await self._db.read(lambda db: [entry_of(r) for r in db.execute(sql, args)])

    async def pointers(self, cid: str) -> set[str]:
        return await self._db.read(lambda db: {r[0] for r in db.execute(
            "SELECT pointer FROM fhir_resources WHERE cid = ?", (cid,))})

    async def erase_patient(self, patient: str) -> int:
        return await self._db.write(lambda db: db.execute(
            "DELETE FROM fhir_resources WHERE patient = ?", (patient,)).rowcount)


async def open_sqlite_storage(data_dir: Path, metrics: Metrics | None = None) -> Storage:
    heads = await SQLiteDatabase.open(data_dir / "heads.sqlite3", HEADS_SCHEMA, name="head", metrics=metrics)
    tokens = await SQLiteDatabase.open(data_dir / TOKENS_FILE, TOKENS_SCHEMA, name="token", metrics=metrics)
    audit = await SQLiteDatabase.open(data_dir / "audit.sqlite3", AUDIT_SCHEMA, name="audit", metrics=metrics)
    keys = await SQLiteDatabase.open(data_dir / KEYS_FILE, KEYS_SCHEMA, name="key", metrics=metrics)
    pins = await SQLiteDatabase.open(data_dir / PINS_FILE, PINS_SCHEMA, name="pin", metrics=metrics)
    fhir = await SQLiteDatabase.open(data_dir / FHIR_FILE, FHIR_SCHEMA, name="fhir", metrics=metrics)
    audit_store = SQLiteAuditStore(audit)
    return Storage(heads=SQLiteHeadStore(heads), tokens=SQLiteTokenStore(tokens),
                   audit=audit_store, keys=SQLiteKeyStore(keys), fhir=SQLiteFhirIndex(fhir),
                   closers=[heads.close, tokens.close, audit_store.close, keys.close, pins.close, fhir.close],
                   pins=SQLitePinStore(pins))
