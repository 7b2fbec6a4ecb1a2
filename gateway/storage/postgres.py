"""The shared storage backend: one PostgreSQL database for every gateway that names it.

Every store of ``base`` lives in one database (``storage.url``), reached through an asyncpg
connection pool; the schema is created and upgraded by versioned migrations
(``migrations/postgres/NNNN_*.sql``, see ``migrate``).

What makes several gateways safe together is in the database, never in a gateway's memory:

* a head moves by one conditional statement (``UPDATE … WHERE head = expected`` and the
  record's insert, together): of two gateways appending to one episode, the second finds the
  head moved and gets ``StoreConflict`` with the current episode — no fork;
* tokens and data keys are read on every use (one indexed lookup), so a revocation or a
  shredding on one gateway is refused by every other on its next request;
* the audit log is one hash chain: an append locks the chain's head row, so appends from all
  gateways are serialized. Each gateway group-commits its own events (one transaction, one lock
  and one WAL flush for every event waiting), which is where batching pays: the lock is held
  across a commit. Head moves and token writes are single statements on their own pooled
  connections; PostgreSQL already shares a WAL flush between concurrent commits, and an
  application-level batch of head moves measured no faster (``bench/pg_commit.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg

from ..errors import Invalid, MediconError, StorageFull, Unavailable
from ..metrics import Metrics
from ..security.tokens import (AuthResult, NewToken, TokenError, TokenInfo, decode_token, generate_token,
                               hash_token, judge, last_use_due, new_token_id)
from .base import Storage
from . import auditwalk
from .auditwalk import audit_hash
from .pins import PostgresPinStore
from .fhirsql import RESOURCE_COLS, entry_of, search_sql
from .groupcommit import AsyncGroupCommit
from .model import (Blob, ChainBroken, Episode, FhirEntry, FhirQuery, GatewayKey, HeadMove, IndexedRecord,
                    KeyConflict, KeyState, KeyTaken, PatientKey, StoreConflict)

_CHECKPOINT_COLS = ("seq", "hash", "time", "key", "sig")

log = logging.getLogger(__name__)
T = TypeVar("T")

# pg_advisory_lock key of schema migrations: "medicon" as a number.
MIGRATION_LOCK = int.from_bytes(b"medicon", "big")
_CONNECTION_ERRORS = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError,
                      asyncio.TimeoutError, asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError,
                      asyncpg.CrashShutdownError, asyncpg.TooManyConnectionsError)


def storable(*values: str | None) -> bool:
    """PostgreSQL text holds no NUL character (nor anything that is not UTF-8): a value with
    one was never stored, so a lookup of it finds nothing without asking the database."""
    return not any(value is not None and ("\x00" in value or _unencodable(value)) for value in values)


def _unencodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def describe_url(url: str) -> str:
    """Where a database URL points, for messages: host, port and database — never the user's
    password (nor the user)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "localhost", parts.port or 5432
    except ValueError:
        return "the configured database"
    database = unquote(parts.path.lstrip("/")) or "(default)"
    return f"{host}:{port}/{database}"


class MigrationError(Unavailable):
    """The database's schema does not fit this gateway (changed, newer, or not migrated)."""


class PostgresDatabase:
    """The pool, and the one place PostgreSQL's failures become the gateway's errors: a full
    disk ``StorageFull``, a lost or refused connection ``Unavailable``, in words that name the
    database's host and name but never its credentials."""

    metrics: Metrics | None = None  # storage errors are counted when set

    def __init__(self, pool: asyncpg.Pool, where: str, acquire_timeout: float, url: str = "",
                 command_timeout: float = 30.0) -> None:
        self.pool = pool
        self.where = where
        self._acquire_timeout = acquire_timeout
        self.url = url  # for the audit walker's own connection; never in a message
        self.command_timeout = command_timeout
        # episode turns (``turn``): at most half the pool's connections
        self._turn_slots = asyncio.Semaphore(pool.get_max_size() // 2) if pool.get_max_size() >= 2 else None

    @classmethod
    async def open(cls, url: str, *, min_size: int = 2, max_size: int = 10, connect_timeout: float = 10.0,
                   command_timeout: float = 30.0) -> "PostgresDatabase":
        where = describe_url(url)
        try:
            pool = await asyncpg.create_pool(
                url, min_size=min(min_size, max_size), max_size=max_size, timeout=connect_timeout,
                command_timeout=command_timeout, server_settings={"application_name": "medicon-gateway"},
                reset=_keep_session)
        except asyncpg.InvalidPasswordError:
            raise Unavailable(f"the database at {where} refused the gateway's credentials "
                              "(check storage.url)") from None
        except asyncpg.InvalidCatalogNameError:
            raise Unavailable(f"the database at {where} does not exist: create it first") from None
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
            raise _failure(exc, where, "database", "connect") from None
        except ValueError:  # asyncpg's parser: never repeat its message, it quotes the URL
            raise Unavailable("storage.url is not a PostgreSQL URL asyncpg can use") from None
        return cls(pool, where, connect_timeout, url, command_timeout)

    async def run(self, what: str, name: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``await fn(connection)`` on a pooled connection; the gateway's errors for the
        database's. Errors of ``fn`` itself (a lost compare-and-swap) pass as they are."""
        try:
            async with self.pool.acquire(timeout=self._acquire_timeout) as conn:
                return await fn(conn)
        except MediconError:
            raise
        except (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError, asyncpg.DataError,
                UnicodeEncodeError):
            raise Invalid("a value holds a character the database cannot store (NUL, or text that is "
                          "not UTF-8)") from None
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
            if self.metrics is not None:
                self.metrics.storage_error(name, what, "full" if isinstance(exc, asyncpg.DiskFullError) else "failed")
            raise _failure(exc, self.where, name, what) from None

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        """Hold ``pg_advisory_xact_lock`` on ``key`` (hashed) for the body's duration, on a pooled
        connection. At most half the pool holds turns at once: a turn's holder needs another
        connection to do its work, and the other half is always left for that (and for
        everything else), so turns never take the pool from the work they wait for, and add no
        connection to what the database must allow. A pool of one takes no turns."""
        if self._turn_slots is None:
            yield
            return
        async with self._turn_slots:
            try:
                conn = await self.pool.acquire(timeout=self._acquire_timeout)
            except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
                raise _failure(exc, self.where, "head", "take an episode's turn") from None
            try:
                transaction = conn.transaction()
                try:
                    await transaction.start()
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                                       "medicon-turn\x1f" + key)
                except (asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
                    raise _failure(exc, self.where, "head", "take an episode's turn") from None
                try:
                    yield
                finally:
                    try:
                        await transaction.rollback()  # nothing was written on it: ending it frees the lock
                    except (asyncpg.PostgresError, *_CONNECTION_ERRORS):
                        conn.terminate()  # the server ends the lock with the connection
            finally:
                await self.pool.release(conn)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.pool.close(), 10)
        except (asyncio.TimeoutError, *_CONNECTION_ERRORS):
            self.pool.terminate()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What the pool does to a connection given back, after asyncpg's own rollback of a
    transaction left open: nothing. asyncpg's default also unlocks session advisory locks,
    closes cursors, unlistens and resets settings, one more round trip for every query the
    gateway makes (7 % of a gateway's CPU appending on PostgreSQL). The gateway leaves none of
    those on a pooled connection: its advisory locks are transaction-scoped, except
    ``migrate``'s, which ends its lock itself or else the connection."""


def _failure(exc: BaseException, where: str, name: str, what: str) -> MediconError:
    if isinstance(exc, asyncpg.DiskFullError):
        return StorageFull(f"the database's volume is full ({where}): the gateway's {name} store cannot {what}")
    if isinstance(exc, asyncio.TimeoutError) or isinstance(exc, asyncpg.QueryCanceledError):
        return Unavailable(f"the database at {where} did not answer in time: the gateway's {name} store "
                           f"cannot {what}", retry_after=1)
    if isinstance(exc, _CONNECTION_ERRORS):
        return Unavailable(f"the database at {where} is unreachable: the gateway's {name} store cannot "
                           f"{what}", retry_after=1)
    return Unavailable(f"the gateway's {name} store failed to {what} ({type(exc).__name__}, "
                       f"SQLSTATE {getattr(exc, 'sqlstate', '?')})")


# --- migrations ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def migrations() -> list[Migration]:
    """The schema's versions, in order: ``migrations/postgres/NNNN_name.sql``."""
    found = []
    for entry in (resources.files(__package__) / "migrations" / "postgres").iterdir():
        stem, dot, ext = entry.name.partition(".")
        number, _, name = stem.partition("_")
        if ext == "sql" and number.isdigit():
            found.append(Migration(int(number), name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise MigrationError("the gateway's migrations are not numbered 0001, 0002, … without gaps")
    return found


async def _applied(conn: asyncpg.Connection) -> dict[int, asyncpg.Record]:
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return {}
    return {r["version"]: r for r in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")}


def _pending(known: list[Migration], applied: dict[int, asyncpg.Record], where: str) -> list[Migration]:
    newest = max(known, key=lambda m: m.version).version
    for version, row in applied.items():
        if version > newest:
            raise MigrationError(f"the database at {where} has schema version {version}, newer than this "
                                 f"gateway knows ({newest}): upgrade the gateway")
    for m in known:
        row = applied.get(m.version)
        if row is not None and row["checksum"] != m.checksum:
            raise MigrationError(f"migration {m.version:04d}_{m.name} of the database at {where} differs from "
                                 "this gateway's: the schema was applied by another version of it")
    return [m for m in known if m.version not in applied]


async def migrate(conn: asyncpg.Connection, where: str) -> list[str]:
    """Apply every pending migration, each in a transaction of its own, recorded in
    ``schema_migrations``, under an advisory lock: gateways starting together migrate once,
    the others wait and find nothing left to do. Returns the names applied."""
    known = migrations()
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
                           " name text NOT NULL, checksum text NOT NULL,"
                           " applied_at timestamptz NOT NULL DEFAULT now())")
        done = []
        for m in _pending(known, await _applied(conn), where):
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                                   m.version, m.name, m.checksum)
            log.info("database %s: applied migration %04d_%s", where, m.version, m.name)
            done.append(f"{m.version:04d}_{m.name}")
        return done
    finally:
        try:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        except BaseException:  # cancelled or failed: the lock must not stay with a pooled connection
            conn.terminate()  # the server ends the lock with the session
            raise


async def require_migrated(conn: asyncpg.Connection, where: str) -> None:
    pending = _pending(migrations(), await _applied(conn), where)
    if pending:
        raise MigrationError(f"the database at {where} lacks {len(pending)} schema migration(s) "
                             f"(from {pending[0].version:04d}_{pending[0].name}): run `medicon-gateway migrate`")


# --- heads, the record index and attachments ------------------------------------------------------

_EPISODE_COLS = "id, patient, head, length, status, last_recorded_at"
_RECORD_COLS = "cid, episode, patient, seq, schema, recorded_at, digest, idempotency_key"


def _episode(row: asyncpg.Record | None) -> Episode | None:
    return None if row is None else Episode(*row)


def _record(row: asyncpg.Record | None) -> IndexedRecord | None:
    return None if row is None else IndexedRecord(*row)


def _key_taken(exc: asyncpg.UniqueViolationError, record: IndexedRecord) -> None:
    """The unique violation was the record's idempotency key (a concurrent request with the same
    key committed first): ``KeyTaken``, never the backend's error. The statement wrote nothing."""
    if record.idempotency_key is not None and "idempotency_key" in (exc.constraint_name or ""):
        raise KeyTaken(record.idempotency_key) from None


class _Lost(Exception):
    """A compare-and-swap that lost, before the episode as it stands is read (the statement may
    have failed, and its transaction with it)."""


class PostgresHeadStore:
    """Heads move only by compare-and-swap, in one statement: the head's conditional UPDATE and
    the record's INSERT succeed together or not at all, and a second gateway's UPDATE waits for
    the first's row lock, then finds the head moved (``StoreConflict``, current episode)."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    def _run(self, what: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> Awaitable[T]:
        return self._db.run(what, "head", fn)

    def episode_turn(self, episode: str) -> contextlib.AbstractAsyncContextManager[None]:
        """A transaction-scoped advisory lock on the episode (``PostgresDatabase.turn``).
        PostgreSQL queues the waiters in order; the lock goes with the transaction however the
        append ends, or with the connection if it is lost."""
        return self._db.turn(episode)

    async def get_episode(self, episode: str) -> Episode | None:
        if not storable(episode):
            return None
        return await self._run("read", lambda c: self._episode(c, episode))

    @staticmethod
    async def _episode(conn: asyncpg.Connection, episode: str) -> Episode | None:
        return _episode(await conn.fetchrow(f"SELECT {_EPISODE_COLS} FROM episodes WHERE id = $1", episode))

    async def list_episodes(self, patient: str, status: str | None = None) -> list[Episode]:
        if not storable(patient, status):
            return []
        return await self._run("read", lambda c: self._list(c, patient, status))

    async def episodes_after(self, after: str, limit: int) -> list[Episode]:
        rows = await self._run("read", lambda c: c.fetch(
            f"SELECT {_EPISODE_COLS} FROM episodes WHERE id > $1 ORDER BY id LIMIT $2::bigint", after, limit))
        return [Episode(*r) for r in rows]

    async def record_count(self) -> int:
        return int(await self._run("read", lambda c: c.fetchval("SELECT coalesce(sum(length), 0) FROM episodes")))

    @staticmethod
    async def _list(conn: asyncpg.Connection, patient: str, status: str | None) -> list[Episode]:
        rows = await conn.fetch(f"SELECT {_EPISODE_COLS} FROM episodes WHERE patient = $1"
                                " AND ($2::text IS NULL OR status = $2) ORDER BY created", patient, status)
        return [Episode(*r) for r in rows]

    async def create_episode(self, record: IndexedRecord) -> Episode:
        return await self._run("write", lambda c: self._lost_as_conflict(c, record, self._create(c, record)))

    @classmethod
    async def _lost_as_conflict(cls, conn: asyncpg.Connection, record: IndexedRecord, step: Awaitable[Episode]) -> Episode:
        try:
            return await step
        except _Lost as lost:  # read after the failed statement, outside it
            raise StoreConflict(str(lost), await cls._episode(conn, record.episode)) from None

    @staticmethod
    async def _create(conn: asyncpg.Connection, record: IndexedRecord) -> Episode:
        try:
            made = await conn.fetchval(
                "WITH made AS (INSERT INTO episodes (id, patient, head, length, status, last_recorded_at)"
                " VALUES ($1, $2, $3, 1, 'open', $4) ON CONFLICT (id) DO NOTHING RETURNING id)"
                f" INSERT INTO records ({_RECORD_COLS}) SELECT $3, id, $2, 0, $5, $4, $6, $7 FROM made"
                " RETURNING cid", record.episode, record.patient, record.cid, record.recorded_at,
                record.schema, record.digest, record.idempotency_key)
        except asyncpg.UniqueViolationError as exc:
            _key_taken(exc, record)
            made = None
        if made is None:
            raise _Lost(f"episode {record.episode!r} already exists")
        return Episode(record.episode, record.patient, record.cid, 1, "open", record.recorded_at)

    async def append(self, record: IndexedRecord, *, expected_head: str, closes: bool) -> Episode:
        """Move the head from ``expected_head`` to ``record.cid`` iff nobody moved it first."""
        return await self._run("write", lambda c: self._lost_as_conflict(
            c, record, self._move(c, record, expected_head, closes)))

    @staticmethod
    async def _move(conn: asyncpg.Connection, record: IndexedRecord, expected_head: str, closes: bool) -> Episode:
        status = "closed" if closes else "open"
        try:
            moved = await conn.fetchval(
                "WITH moved AS (UPDATE episodes SET head = $1, length = length + 1, status = $2,"
                " last_recorded_at = $3 WHERE id = $4 AND head = $5 AND length = $6 AND status = 'open'"
                f" RETURNING id) INSERT INTO records ({_RECORD_COLS})"
                " SELECT $1, id, $7, $6, $8, $3, $9, $10 FROM moved RETURNING cid",
                record.cid, status, record.recorded_at, record.episode, expected_head, record.seq,
                record.patient, record.schema, record.digest, record.idempotency_key)
        except asyncpg.UniqueViolationError as exc:
            _key_taken(exc, record)
            moved = None
        if moved is None:
            raise _Lost(f"head of episode {record.episode!r} moved")
        return Episode(record.episode, record.patient, record.cid, record.seq + 1, status, record.recorded_at)

    async def append_chain(self, moves: list[HeadMove]) -> list[Episode | Exception]:
        """Several moves of one episode's head in one transaction on one connection (a
        savepoint each), so each finds the head the one before it set."""
        async def chain(conn: asyncpg.Connection) -> list[Episode | Exception]:
            outcomes: list[Episode | Exception] = []
            async with conn.transaction():
                for move in moves:
                    if outcomes and isinstance(outcomes[-1], Exception):
                        outcomes.append(ChainBroken("an earlier head move of this chain failed"))
                        continue
                    try:
                        async with conn.transaction():
                            if move.expected_head is None:
                                outcomes.append(await self._create(conn, move.record))
                            else:
                                outcomes.append(await self._move(conn, move.record, move.expected_head,
                                                                 move.closes))
                    except _Lost as lost:  # its savepoint is rolled back: the episode can be read
                        outcomes.append(StoreConflict(str(lost), await self._episode(conn, move.record.episode)))
                    except KeyTaken as taken:
                        outcomes.append(taken)
            return outcomes
        return await self._run("write", chain)

    async def history(self, episode: str, after_seq: int, limit: int) -> list[IndexedRecord]:
        if not storable(episode):
            return []
        return await self._run("read", lambda c: self._records(
            c, "episode = $1 AND seq > $2::bigint ORDER BY seq LIMIT $3::bigint", episode, after_seq, limit))

    @staticmethod
    async def _records(conn: asyncpg.Connection, where: str, *args: Any) -> list[IndexedRecord]:
        return [IndexedRecord(*r) for r in await conn.fetch(f"SELECT {_RECORD_COLS} FROM records WHERE {where}", *args)]

    async def _one(self, where: str, *args: Any) -> IndexedRecord | None:
        if not storable(*args):
            return None
        return _record(await self._run("read", lambda c: c.fetchrow(
            f"SELECT {_RECORD_COLS} FROM records WHERE {where}", *args)))

    async def record(self, cid: str) -> IndexedRecord | None:
        return await self._one("cid = $1", cid)

    async def indexed_among(self, cids: list[str]) -> set[str]:
        cids = [cid for cid in cids if storable(cid)]
        rows = await self._run("read", lambda c: c.fetch("SELECT cid FROM records WHERE cid = ANY($1::text[])", cids))
        return {row[0] for row in rows}

    async def record_by_digest(self, episode: str, digest: str) -> IndexedRecord | None:
        return await self._one("episode = $1 AND digest = $2 LIMIT 1", episode, digest)

    async def record_by_key(self, key: str) -> IndexedRecord | None:
        return await self._one("idempotency_key = $1", key)

    async def add_blobs(self, blobs: list[Blob]) -> None:
        """Index attachments under their patient; a CID already indexed keeps its first patient."""
        if not blobs:
            return
        await self._run("write", lambda c: c.execute(
            "INSERT INTO blobs (cid, patient, encrypted, content_type)"
            " SELECT cid, patient, encrypted, content_type"
            " FROM unnest($1::text[], $2::text[], $3::boolean[], $4::text[])"
            " WITH ORDINALITY AS b(cid, patient, encrypted, content_type, n) ORDER BY n"
            " ON CONFLICT (cid) DO NOTHING",
            [b.cid for b in blobs], [b.patient for b in blobs], [b.encrypted for b in blobs],
            [b.content_type for b in blobs]))

    async def blob(self, cid: str) -> Blob | None:
        if not storable(cid):
            return None
        row = await self._run("read", lambda c: c.fetchrow(
            "SELECT cid, patient, encrypted, content_type FROM blobs WHERE cid = $1", cid))
        return None if row is None else Blob(*row)


# --- tokens --------------------------------------------------------------------------------------

_TOKEN_COLS = "id, name, role, patients, episodes, created_at, expires_at, revoked_at, last_used_at"


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


def _token_info(row: asyncpg.Record) -> TokenInfo:
    load = lambda s: None if s is None else tuple(json.loads(s))  # noqa: E731
    return TokenInfo(row["id"], row["name"], row["role"], load(row["patients"]), load(row["episodes"]),
                     _dt(row["created_at"]), _dt(row["expires_at"]), _dt(row["revoked_at"]),
                     _dt(row["last_used_at"]))


class PostgresTokenStore:
    """Tokens as SHA-256 hashes, one indexed lookup per request; nothing cached, so a revocation
    on any gateway (or by the CLI) is refused by every gateway on its very next request."""

    def __init__(self, db: PostgresDatabase, *, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    def _run(self, what: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> Awaitable[T]:
        return self._db.run(what, "token", fn)

    async def create(self, name: str, role: str, patients: Iterable[str] | None = None,
                     episodes: Iterable[str] | None = None,
                     expires_in: timedelta | None = None) -> tuple[str, TokenInfo]:
        """Create a token; return ``(plaintext, info)``. The plaintext is kept nowhere."""
        new = NewToken.checked(name, role, patients, episodes, expires_in)
        token, now = generate_token(), self._clock()
        expires_at = None if new.expires_in is None else now + new.expires_in.total_seconds()

        async def insert(conn: asyncpg.Connection) -> TokenInfo:
            for _ in range(5):
                token_id = new_token_id()
                try:
                    await conn.execute(
                        "INSERT INTO tokens (id, name, token_hash, role, patients, episodes, created_at, expires_at)"
                        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)", token_id, new.name, hash_token(token), new.role,
                        None if new.patients is None else json.dumps(list(new.patients)),
                        None if new.episodes is None else json.dumps(list(new.episodes)), now, expires_at)
                except asyncpg.UniqueViolationError as exc:
                    if exc.constraint_name == "tokens_live_name":
                        raise TokenError(f"a live token named {new.name!r} exists; revoke it first") from None
                    continue  # an id collision (1 in 4 billion): draw another
                return TokenInfo(token_id, new.name, new.role, new.patients, new.episodes, _dt(now),
                                 _dt(expires_at), None, None)
            raise TokenError("could not allocate a token id")
        return token, await self._run("write", insert)

    async def list(self, *, include_revoked: bool = True) -> list[TokenInfo]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = await self._run("read", lambda c: c.fetch(f"SELECT {_TOKEN_COLS} FROM tokens{where}"
                                                         " ORDER BY created_at, id"))
        return [_token_info(r) for r in rows]

    async def get(self, name_or_id: str) -> TokenInfo | None:
        if not storable(name_or_id):
            return None
        row = await self._run("read", lambda c: c.fetchrow(
            f"SELECT {_TOKEN_COLS} FROM tokens WHERE id = $1 OR (name = $1 AND revoked_at IS NULL)"
            " ORDER BY id = $1 DESC LIMIT 1", name_or_id))
        return None if row is None else _token_info(row)

    async def revoke(self, name_or_id: str) -> bool:
        if not storable(name_or_id):
            return False
        now = self._clock()
        done = await self._run("write", lambda c: c.execute(
            "UPDATE tokens SET revoked_at = $1 WHERE revoked_at IS NULL AND (id = $2 OR name = $2)", now, name_or_id))
        return done != "UPDATE 0"

    async def check(self, token: str) -> AuthResult:
        """One indexed SELECT on the token's hash. Never raises for a bad token."""
        if not isinstance(token, str) or decode_token(token) is None:
            return AuthResult(None, "malformed")
        digest = hash_token(token)
        row = await self._run("read", lambda c: c.fetchrow(
            f"SELECT {_TOKEN_COLS}, token_hash FROM tokens WHERE token_hash = $1", digest))
        found = None if row is None or not hmac.compare_digest(row["token_hash"], digest) else _token_info(row)
        now = self._clock()
        result = judge(found, now)
        if result.principal is not None:
            await self._touch(found, now)
        return result

    async def _touch(self, info: TokenInfo, now: float) -> None:
        if not last_use_due(info, now):
            return
        try:
            await self._run("write", lambda c: c.execute("UPDATE tokens SET last_used_at = $1 WHERE id = $2",
                                                         now, info.id))
        except (StorageFull, Unavailable):
            pass  # bookkeeping only: never fail a request on it


# --- the audit log -------------------------------------------------------------------------------

def _chained(kept: list[tuple[dict[str, Any], str]], seq: int, prev: str) -> tuple[list, list, list, list]:
    """The audit rows of ``kept`` (event, its JSON) after the entry ``seq`` whose hash is
    ``prev``, as the columns seq, event, prev, hash."""
    seqs, texts, prevs, hashes = [], [], [], []
    for event, text in kept:
        seq += 1
        digest = audit_hash(prev, event)
        seqs.append(seq), texts.append(text), prevs.append(prev), hashes.append(digest)
        prev = digest
    return seqs, texts, prevs, hashes


class PostgresAuditStore:
    """One hash chain for every gateway of the database. A batch of this gateway's events is
    appended by one statement that moves the chain's head row (``audit_head``) from the head
    this gateway last saw and inserts the batch after it, or does nothing if another gateway
    moved the head since; the batch is then appended in a transaction that first locks the head
    row. Either way batches from all gateways follow each other and each entry's ``prev`` is
    the hash of the entry before it, whoever wrote that. Verification (``gateway.core`` drives
    it from the latest signed checkpoint) has a worker process (``auditwalk``) read the chain a
    page at a time and re-hash it, so the gateway's event loop neither decodes those rows nor
    hashes them."""

    BATCH = 256

    def __init__(self, db: PostgresDatabase, metrics: Metrics | None = None) -> None:
        self._db = db
        self._group = AsyncGroupCommit(self._commit, batch=self.BATCH,
                                       on_batch=metrics.commit_batch_observer("audit") if metrics else None)
        self._walker = auditwalk.WalkerProcess()
        # (seq, hash) of the chain's head as this gateway last wrote or read it; None: unknown.
        self._head: tuple[int, str] | None = None

    async def append(self, event: dict[str, Any]) -> None:
        await self._group.submit(event)

    async def _commit(self, events: list[dict[str, Any]]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        texts: list[str | None] = []
        for event in events:  # an event that does not serialise fails alone
            try:
                texts.append(json.dumps(event, sort_keys=True))
                outcomes.append((True, None))
            except (TypeError, ValueError) as exc:
                texts.append(None)
                outcomes.append((False, exc))
        kept = [(e, t) for e, t in zip(events, texts) if t is not None]
        if kept:
            head, self._head = self._head, None  # unknown until this batch is in
            self._head = await self._db.run("append to the log", "audit", lambda c: self._append(c, kept, head))
        return outcomes

    @staticmethod
    async def _append(conn: asyncpg.Connection, kept: list[tuple[dict[str, Any], str]],
                      head: tuple[int, str] | None) -> tuple[int, str]:
        """Append ``kept`` after ``head`` in one statement if the chain still ends there, else
        after the chain's end read under its lock. The chain's new head."""
        if head is not None:
            rows = _chained(kept, *head)
            if await conn.fetchval(
                    "WITH moved AS (UPDATE audit_head SET seq = $5, hash = $6 WHERE id = 1 AND seq = $7 AND hash = $8"
                    " RETURNING id), added AS (INSERT INTO audit (seq, event, prev, hash)"
                    " SELECT u.* FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[]) AS u"
                    " WHERE EXISTS (SELECT FROM moved) RETURNING seq) SELECT count(*) FROM added",
                    *rows, rows[0][-1], rows[3][-1], *head):
                return rows[0][-1], rows[3][-1]
        async with conn.transaction():
            seq, prev = await conn.fetchrow("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
            rows = _chained(kept, seq, prev)
            await conn.execute("INSERT INTO audit (seq, event, prev, hash)"
                               " SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[])", *rows)
            await conn.execute("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1", rows[0][-1], rows[3][-1])
        return rows[0][-1], rows[3][-1]

    async def page(self, after: int, limit: int) -> list[dict[str, Any]]:
        rows = await self._db.run("read", "audit", lambda c: c.fetch(
            "SELECT seq, event, prev, hash FROM audit WHERE seq > $1::bigint ORDER BY seq LIMIT $2::bigint",
            after, limit))
        return [{"seq": r["seq"], **json.loads(r["event"]), "prev": r["prev"], "hash": r["hash"]} for r in rows]

    async def last(self) -> tuple[int, str]:
        row = await self._db.run("read", "audit", lambda c: c.fetchrow("SELECT seq, hash FROM audit_head WHERE id = 1"))
        return row["seq"], row["hash"]

    async def walk(self, after: int, prev: str, limit: int) -> dict[str, Any]:
        """A page of the chain after ``after``, read and re-hashed by the walker process."""
        try:
            found = await self._walker.run(auditwalk.walk_postgres, self._db.url, after, prev, limit,
                                           self._db.command_timeout)
        except auditwalk.WalkerProcess.WorkerDied:
            raise Unavailable("the audit log's verification worker died") from None
        if "failed" in found:
            how = "did not answer in time" if found["failed"] == "timeout" else "is unreachable"
            raise Unavailable(f"the database at {self._db.where} {how}: the gateway's audit store cannot "
                              "verify the log", retry_after=1)
        return found

    async def hash_at(self, seq: int) -> str | None:
        return await self._db.run("read", "audit", lambda c: c.fetchval(
            "SELECT hash FROM audit WHERE seq = $1::bigint", seq))

    async def checkpoints(self) -> list[dict[str, Any]]:
        rows = await self._db.run("read", "audit", lambda c: c.fetch(
            f"SELECT {', '.join(_CHECKPOINT_COLS)} FROM audit_checkpoints ORDER BY seq"))
        return [dict(r) for r in rows]

    async def latest_checkpoint(self) -> dict[str, Any] | None:
        row = await self._db.run("read", "audit", lambda c: c.fetchrow(
            f"SELECT {', '.join(_CHECKPOINT_COLS)} FROM audit_checkpoints ORDER BY seq DESC LIMIT 1"))
        return None if row is None else dict(row)

    async def add_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        await self._db.run("write", "audit", lambda c: c.execute(
            f"INSERT INTO audit_checkpoints ({', '.join(_CHECKPOINT_COLS)}) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (seq) DO NOTHING", *(checkpoint[k] for k in _CHECKPOINT_COLS)))

    async def close(self) -> None:
        await self._walker.close()
        await self._group.close()


# --- keys ----------------------------------------------------------------------------------------

_KEY_COLS = "pseudonym, dek_id, kek_id, wrapped"
_GATEWAY_COLS = "key_id, gateway_id, public_key, kek_ids, registered_at, mac"


def _patient_key(row: asyncpg.Record | None) -> PatientKey | None:
    return None if row is None else PatientKey(*row)


def _gateway_key(row: asyncpg.Record | None) -> GatewayKey | None:
    if row is None:
        return None
    return GatewayKey(row["key_id"], row["gateway_id"], row["public_key"], tuple(row["kek_ids"]),
                      row["registered_at"].isoformat(timespec="seconds"), row["mac"])


class PostgresKeyStore:
    """``base.KeyStore`` in the shared database. A data key is added only while its KEK is the
    active one: the insert takes a share lock on the key state, which a rotation's switch of the
    active KEK must wait for, so no key is wrapped by a KEK a rotation has left behind."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    def _run(self, what: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> Awaitable[T]:
        return self._db.run(what, "key", fn)

    async def state(self) -> KeyState | None:
        return await self._run("read", self._state)

    @staticmethod
    async def _state(conn: asyncpg.Connection) -> KeyState | None:
        row = await conn.fetchrow("SELECT active_kek, pseudonym_check FROM key_state WHERE id = 1")
        return None if row is None else KeyState(*row)

    async def init_state(self, state: KeyState) -> KeyState:
        async def init(conn: asyncpg.Connection) -> KeyState:
            await conn.execute("INSERT INTO key_state VALUES (1, $1, $2) ON CONFLICT (id) DO NOTHING",
                               state.active_kek, state.pseudonym_check)
            return await self._state(conn)
        return await self._run("write", init)

    async def set_active_kek(self, kek_id: str, *, expected: str) -> KeyState:
        async def switch(conn: asyncpg.Connection) -> KeyState:
            done = await conn.execute("UPDATE key_state SET active_kek = $1 WHERE id = 1 AND active_kek = $2",
                                      kek_id, expected)
            current = await self._state(conn)
            if done == "UPDATE 0":
                raise KeyConflict(f"the active key-encryption key is {current and current.active_kek}, "
                                  f"not {expected}", current)
            return current
        return await self._run("write", switch)

    async def patient_key(self, pseudonym: str) -> PatientKey | None:
        return _patient_key(await self._run("read", lambda c: c.fetchrow(
            f"SELECT {_KEY_COLS} FROM patient_keys WHERE pseudonym = $1", pseudonym)))

    async def key_by_id(self, dek_id: str) -> PatientKey | None:
        if not storable(dek_id):
            return None
        return _patient_key(await self._run("read", lambda c: c.fetchrow(
            f"SELECT {_KEY_COLS} FROM patient_keys WHERE dek_id = $1", dek_id)))

    async def add_patient_key(self, key: PatientKey) -> PatientKey:
        async def add(conn: asyncpg.Connection) -> PatientKey:
            row = await conn.fetchrow(
                "WITH s AS (SELECT active_kek FROM key_state WHERE id = 1 FOR SHARE),"
                " added AS (INSERT INTO patient_keys (pseudonym, dek_id, kek_id, wrapped)"
                "  SELECT $1, $2, $3, $4 FROM s WHERE s.active_kek = $3"
                "  ON CONFLICT (pseudonym) DO NOTHING RETURNING pseudonym)"
                " SELECT (SELECT active_kek FROM s) AS active, EXISTS (SELECT 1 FROM added) AS added",
                key.pseudonym, key.dek_id, key.kek_id, key.wrapped)
            if row["added"]:
                return key
            standing = _patient_key(await conn.fetchrow(
                f"SELECT {_KEY_COLS} FROM patient_keys WHERE pseudonym = $1", key.pseudonym))
            if standing is not None:
                return standing
            raise KeyConflict(f"data keys are wrapped by {row['active']} now, not {key.kek_id}",
                              await self._state(conn))
        return await self._run("write", add)

    async def shred(self, pseudonym: str) -> int:
        async def shred(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                tombstone = await conn.fetchval(
                    "INSERT INTO patient_keys (pseudonym, shredded_at) VALUES ($1, now())"
                    " ON CONFLICT (pseudonym) DO NOTHING RETURNING pseudonym", pseudonym)
                if tombstone is not None:
                    return 0
                live = await conn.fetchval("SELECT wrapped IS NOT NULL FROM patient_keys WHERE pseudonym = $1"
                                           " FOR UPDATE", pseudonym)
                await conn.execute("UPDATE patient_keys SET kek_id = NULL, wrapped = NULL,"
                                   " shredded_at = coalesce(shredded_at, now()) WHERE pseudonym = $1", pseudonym)
                return int(bool(live))
        return await self._run("write", shred)

    async def import_keys(self, keys: list[PatientKey]) -> int:
        live = [k for k in keys if not k.shredded]
        dead = [k for k in keys if k.shredded]

        async def load(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                added = await conn.fetchval(
                    "WITH added AS (INSERT INTO patient_keys (pseudonym, dek_id, kek_id, wrapped)"
                    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[])"
                    " ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM added",
                    [k.pseudonym for k in live], [k.dek_id for k in live], [k.kek_id for k in live],
                    [k.wrapped for k in live])
                buried = await conn.fetchval(
                    "WITH dead AS (INSERT INTO patient_keys (pseudonym, dek_id, shredded_at)"
                    " SELECT p, d, now() FROM unnest($1::text[], $2::text[]) AS t(p, d)"
                    " ON CONFLICT (pseudonym) DO UPDATE SET kek_id = NULL, wrapped = NULL,"
                    " shredded_at = coalesce(patient_keys.shredded_at, now())"
                    " WHERE patient_keys.wrapped IS NOT NULL RETURNING 1) SELECT count(*) FROM dead",
                    [k.pseudonym for k in dead], [k.dek_id for k in dead])
                return added + buried
        return await self._run("write", load)

    async def rewrap(self, kek_id: str, rewrap: Callable[[list[PatientKey]], list[bytes]], *,
                     after: str, limit: int) -> tuple[str | None, int]:
        async def batch(conn: asyncpg.Connection) -> tuple[str | None, int]:
            async with conn.transaction():
                rows = [_patient_key(r) for r in await conn.fetch(
                    f"SELECT {_KEY_COLS} FROM patient_keys WHERE pseudonym > $1 AND wrapped IS NOT NULL"
                    " ORDER BY pseudonym LIMIT $2 FOR UPDATE", after, limit)]
                stale = [k for k in rows if k.kek_id != kek_id]
                if stale:
                    wrapped = await asyncio.to_thread(rewrap, stale)
                    await conn.execute(
                        "UPDATE patient_keys SET kek_id = $1, wrapped = w.wrapped"
                        " FROM unnest($2::text[], $3::bytea[]) AS w(pseudonym, wrapped)"
                        " WHERE patient_keys.pseudonym = w.pseudonym",
                        kek_id, [k.pseudonym for k in stale], wrapped)
                return (rows[-1].pseudonym if len(rows) == limit else None), len(stale)
        return await self._run("re-wrap keys", batch)

    async def count(self, *, not_wrapped_by: str | None = None) -> int:
        return await self._run("read", lambda c: c.fetchval(
            "SELECT count(*) FROM patient_keys WHERE wrapped IS NOT NULL AND kek_id IS DISTINCT FROM $1",
            not_wrapped_by))

    async def register_gateway(self, key: GatewayKey) -> GatewayKey:
        async def register(conn: asyncpg.Connection) -> GatewayKey:
            row = await conn.fetchrow(
                "INSERT INTO gateway_keys (key_id, gateway_id, public_key, kek_ids, mac) VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (key_id) DO UPDATE SET kek_ids = excluded.kek_ids, mac = excluded.mac"
                " WHERE gateway_keys.gateway_id = excluded.gateway_id"
                " AND gateway_keys.public_key = excluded.public_key"
                f" RETURNING {_GATEWAY_COLS}", key.key_id, key.gateway_id, key.public_key, list(key.kek_ids), key.mac)
            if row is None:
                standing = await conn.fetchval("SELECT gateway_id FROM gateway_keys WHERE key_id = $1", key.key_id)
                raise KeyConflict(f"signing key {key.key_id} is registered to gateway {standing!r}", None)
            return _gateway_key(row)
        return await self._run("write", register)

    async def gateway_key(self, key_id: str) -> GatewayKey | None:
        if not storable(key_id):
            return None
        return _gateway_key(await self._run("read", lambda c: c.fetchrow(
            f"SELECT {_GATEWAY_COLS} FROM gateway_keys WHERE key_id = $1", key_id)))

    async def gateways(self) -> list[GatewayKey]:
        rows = await self._run("read", lambda c: c.fetch(
            f"SELECT {_GATEWAY_COLS} FROM gateway_keys ORDER BY registered_at, key_id"))
        return [_gateway_key(r) for r in rows]


# --- the FHIR index ------------------------------------------------------------------------------

class PostgresFhirIndex:
    """The FHIR index in the shared database. Versions of one resource are numbered under a
    transaction-scoped advisory lock on it, so gateways indexing it at once never collide."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    def _run(self, what: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> Awaitable[T]:
        return self._db.run(what, "fhir", fn)

    async def add(self, entries: list[FhirEntry]) -> list[FhirEntry]:
        async def add(conn: asyncpg.Connection) -> list[FhirEntry]:
            stored = []
            async with conn.transaction():
                for e in entries:
                    key = (e.type, e.rid, e.patient)
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", "\x1f".join(key))
                    known = await conn.fetchrow("SELECT entry, version FROM fhir_resources"
                                                " WHERE cid = $1 AND pointer = $2", e.cid, e.pointer)
                    if known is not None:
                        stored.append(replace(e, row=known["entry"], version=known["version"]))
                        continue
                    last = await conn.fetchval("SELECT coalesce(max(version), 0) FROM fhir_resources"
                                               " WHERE type = $1 AND rid = $2 AND patient = $3", *key)
                    await conn.execute("UPDATE fhir_resources SET latest = 0"
                                       " WHERE type = $1 AND rid = $2 AND patient = $3 AND latest = 1", *key)
                    entry = await conn.fetchval(
                        "INSERT INTO fhir_resources (type, rid, patient, episode, version, latest, cid, pointer,"
                        " recorded_at) VALUES ($1, $2, $3, $4, $5, 1, $6, $7, $8) RETURNING entry",
                        *key, e.episode, last + 1, e.cid, e.pointer, e.recorded_at)
                    if e.params:
                        await conn.executemany(
                            "INSERT INTO fhir_params (entry, name, token, low, high) VALUES ($1, $2, $3, $4, $5)",
                            [(entry, p.name, p.token, p.low, p.high) for p in e.params])
                    stored.append(replace(e, row=entry, version=last + 1))
            return stored
        return await self._run("write", add) if entries else []

    async def versions(self, type: str, rid: str) -> list[FhirEntry]:
        if not storable(type, rid):
            return []
        rows = await self._run("read", lambda c: c.fetch(
            f"SELECT {RESOURCE_COLS} FROM fhir_resources WHERE type = $1 AND rid = $2"
            " ORDER BY patient, version DESC", type, rid))
        return [entry_of(r) for r in rows]

    async def search(self, query: FhirQuery) -> list[FhirEntry]:
        sql, args = search_sql(query, lambda n: f"${n}")
        if not storable(*(a for a in args if isinstance(a, str))):
            return []
        return [entry_of(r) for r in await self._run("read", lambda c: c.fetch(sql, *args))]

    async def pointers(self, cid: str) -> set[str]:
        if not storable(cid):
            return set()
        rows = await self._run("read", lambda c: c.fetch("SELECT pointer FROM fhir_resources WHERE cid = $1", cid))
        return {r["pointer"] for r in rows}

    async def erase_patient(self, patient: str) -> int:
        result = await self._run("write", lambda c: c.execute("DELETE FROM fhir_resources WHERE patient = $1",
                                                              patient))
        return int(result.split()[-1])


# --- opening -------------------------------------------------------------------------------------

async def migrate_database(url: str, *, connect_timeout: float = 10.0) -> tuple[str, list[str]]:
    """``medicon-gateway migrate``: (where the database is, the migrations applied now)."""
    db = await PostgresDatabase.open(url, min_size=1, max_size=1, connect_timeout=connect_timeout)
    try:
        return db.where, await db.run("migrate", "database", lambda c: migrate(c, db.where))
    finally:
        await db.close()


async def open_postgres_storage(url: str, *, pool_min: int = 2, pool_max: int = 10,
                                connect_timeout: float = 10.0, command_timeout: float = 30.0,
                                migrate_on_start: bool = True, metrics: Metrics | None = None) -> Storage:
    db = await PostgresDatabase.open(url, min_size=pool_min, max_size=pool_max,
                                     connect_timeout=connect_timeout, command_timeout=command_timeout)
    db.metrics = metrics
    try:
        if migrate_on_start:
            await db.run("migrate", "database", lambda c: migrate(c, db.where))
        else:
            await db.run("check its schema", "database", lambda c: require_migrated(c, db.where))
    except BaseException:
        await db.close()
        raise
    audit = PostgresAuditStore(db, metrics)
    return Storage(heads=PostgresHeadStore(db), tokens=PostgresTokenStore(db), audit=audit,
                   keys=PostgresKeyStore(db), fhir=PostgresFhirIndex(db), closers=[db.close, audit.close],
                   pins=PostgresPinStore(db))
