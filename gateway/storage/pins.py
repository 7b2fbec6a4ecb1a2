"""The pin objects of the Pinning Service API (``base.PinStore``), in both backends: an SQLite
file of their own in ``records.data_dir``, or the ``pin_requests`` table of the shared
PostgreSQL database (migration ``0003_pin_requests``).

Rows hold only what the API carries: CIDs (of sealed blocks, for the gateway's own replicas),
names and metadata a replicator chose, origins (multiaddrs) — never a patient's identifier.
Listings filter on node, CID, status, time and name in the database, newest first; the rare
``meta`` filter is applied to the rows the others left.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Awaitable, Callable, TypeVar

import asyncpg

from .model import PinRequest

T = TypeVar("T")

PINS_FILE = "pins.sqlite3"
PINS_SCHEMA = """
CREATE TABLE IF NOT EXISTS pin_requests (
    requestid TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    cid TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'pinning', 'pinned', 'failed')),
    created_us INTEGER NOT NULL,
    owner TEXT NOT NULL,
    name TEXT,
    origins TEXT NOT NULL,
    meta TEXT NOT NULL,
    details TEXT
);
CREATE INDEX IF NOT EXISTS pin_requests_by_cid ON pin_requests (node, cid);
CREATE INDEX IF NOT EXISTS pin_requests_by_time ON pin_requests (node, created_us);
"""
_COLS = "requestid, node, cid, status, created_us, owner, name, origins, meta, details"
_UNFINISHED = ("queued", "pinning")


def _row(row: Any) -> PinRequest | None:
    if row is None:
        return None
    requestid, node, cid, status, created_us, owner, name, origins, meta, details = tuple(row)
    return PinRequest(requestid, node, cid, status, int(created_us), owner, name, tuple(json.loads(origins)),
                      tuple(sorted(json.loads(meta).items())), details)


def _values(pin: PinRequest) -> tuple:
    return (pin.requestid, pin.node, pin.cid, pin.status, pin.created_us, pin.owner, pin.name,
            json.dumps(list(pin.origins)), json.dumps(dict(pin.meta)), pin.details)


_NAME_MATCH = {"exact": "name = {p}", "iexact": "lower(name) = lower({p})",
               "partial": "{pos}(name, {p}) > 0", "ipartial": "{pos}(lower(name), lower({p})) > 0"}


def _where(param: Callable[[Any], str], position: str, node: str, cids: list[str] | None, name: str | None,
           match: str, statuses: tuple[str, ...], before_us: int | None, after_us: int | None) -> str:
    """The WHERE clause of a listing; ``param(value)`` adds a value and returns its placeholder."""
    where = [f"node = {param(node)}", f"status IN ({', '.join(param(s) for s in statuses)})"]
    if cids:
        where.append(f"cid IN ({', '.join(param(c) for c in cids)})")
    if name is not None:
        where.append(_NAME_MATCH[match].format(p=param(name), pos=position))
    if before_us is not None:
        where.append(f"created_us < {param(before_us)}")
    if after_us is not None:
        where.append(f"created_us > {param(after_us)}")
    return " AND ".join(where)


def _meta_fits(pin: PinRequest, meta: dict[str, str]) -> bool:
    held = dict(pin.meta)
    return all(held.get(k) == v for k, v in meta.items())


def _page(rows: list[PinRequest], meta: dict[str, str] | None, limit: int, count: int) -> tuple[int, list[PinRequest]]:
    if meta:
        rows = [r for r in rows if _meta_fits(r, meta)]
        return len(rows), rows[:limit]
    return count, rows


def storable(*values: str | None) -> bool:
    """What PostgreSQL text can hold (no NUL, only UTF-8): a value it cannot was never stored."""
    try:
        return not any(v is not None and "\x00" in v.encode("utf-8").decode("utf-8") for v in values)
    except UnicodeEncodeError:
        return False


class SQLitePinStore:
    """On an ``SQLiteDatabase`` (``gateway.storage.sqlite``) of its own: ``pins.sqlite3``."""

    def __init__(self, db: Any) -> None:
        self._db = db

    async def add(self, pin: PinRequest) -> None:
        await self._db.write(lambda db: db.execute(f"INSERT INTO pin_requests ({_COLS}) VALUES "
                                                   f"({', '.join('?' * 10)})", _values(pin)))

    async def get(self, node: str, requestid: str) -> PinRequest | None:
        return await self._db.read(lambda db: _row(db.execute(
            f"SELECT {_COLS} FROM pin_requests WHERE node = ? AND requestid = ?", (node, requestid)).fetchone()))

    async def set_status(self, node: str, requestid: str, status: str, details: str | None = None) -> None:
        await self._db.write(lambda db: db.execute(
            "UPDATE pin_requests SET status = ?, details = ? WHERE node = ? AND requestid = ?",
            (status, details, node, requestid)))

    async def remove(self, node: str, requestid: str) -> PinRequest | None:
        def remove(db: sqlite3.Connection) -> PinRequest | None:
            found = _row(db.execute(f"SELECT {_COLS} FROM pin_requests WHERE node = ? AND requestid = ?",
                                    (node, requestid)).fetchone())
            db.execute("DELETE FROM pin_requests WHERE node = ? AND requestid = ?", (node, requestid))
            return found
        return await self._db.write(remove)

    async def find(self, node: str, *, cids: list[str] | None = None, name: str | None = None,
                   match: str = "exact", statuses: tuple[str, ...] = ("pinned",), before_us: int | None = None,
                   after_us: int | None = None, meta: dict[str, str] | None = None,
                   limit: int = 10) -> tuple[int, list[PinRequest]]:
        args: list[Any] = []

        def param(value: Any) -> str:
            args.append(value)
            return "?"
        where = _where(param, "instr", node, cids, name, match, statuses, before_us, after_us)

        def find(db: sqlite3.Connection) -> tuple[int, list[PinRequest]]:
            count = db.execute(f"SELECT count(*) FROM pin_requests WHERE {where}", args).fetchone()[0]
            page = "" if meta else f" LIMIT {int(limit)}"
            rows = [_row(r) for r in db.execute(f"SELECT {_COLS} FROM pin_requests WHERE {where} "
                                                f"ORDER BY created_us DESC, requestid{page}", args)]
            return _page(rows, meta, limit, count)
        return await self._db.read(find)

    async def unfinished(self, node: str) -> list[PinRequest]:
        return await self._db.read(lambda db: [_row(r) for r in db.execute(
            f"SELECT {_COLS} FROM pin_requests WHERE node = ? AND status IN (?, ?) ORDER BY created_us",
            (node, *_UNFINISHED))])

    async def holders(self, node: str, cid: str) -> int:
        return await self._db.read(lambda db: db.execute(
            "SELECT count(*) FROM pin_requests WHERE node = ? AND cid = ?", (node, cid)).fetchone()[0])


class PostgresPinStore:
    """On the shared ``PostgresDatabase`` (``gateway.storage.postgres``)."""

    def __init__(self, db: Any) -> None:
        self._db = db

    def _run(self, what: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> Awaitable[T]:
        return self._db.run(what, "pin", fn)

    async def add(self, pin: PinRequest) -> None:
        await self._run("write", lambda c: c.execute(
            f"INSERT INTO pin_requests ({_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)", *_values(pin)))

    async def get(self, node: str, requestid: str) -> PinRequest | None:
        if not storable(node, requestid):
            return None
        return await self._run("read", lambda c: self._one(c, node, requestid))

    @staticmethod
    async def _one(conn: asyncpg.Connection, node: str, requestid: str) -> PinRequest | None:
        return _row(await conn.fetchrow(f"SELECT {_COLS} FROM pin_requests WHERE node = $1 AND requestid = $2",
                                        node, requestid))

    async def set_status(self, node: str, requestid: str, status: str, details: str | None = None) -> None:
        await self._run("write", lambda c: c.execute(
            "UPDATE pin_requests SET status = $1, details = $2 WHERE node = $3 AND requestid = $4",
            status, details, node, requestid))

    async def remove(self, node: str, requestid: str) -> PinRequest | None:
        if not storable(node, requestid):
            return None
        row = await self._run("write", lambda c: c.fetchrow(
            f"DELETE FROM pin_requests WHERE node = $1 AND requestid = $2 RETURNING {_COLS}", node, requestid))
        return _row(row)

    async def find(self, node: str, *, cids: list[str] | None = None, name: str | None = None,
                   match: str = "exact", statuses: tuple[str, ...] = ("pinned",), before_us: int | None = None,
                   after_us: int | None = None, meta: dict[str, str] | None = None,
                   limit: int = 10) -> tuple[int, list[PinRequest]]:
        if not storable(node, name, *(cids or ()), *(meta or {}).keys(), *(meta or {}).values()):
            return 0, []
        args: list[Any] = []

        def param(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"
        where = _where(param, "strpos", node, cids, name, match, statuses, before_us, after_us)

        async def find(conn: asyncpg.Connection) -> tuple[int, list[PinRequest]]:
            count = await conn.fetchval(f"SELECT count(*) FROM pin_requests WHERE {where}", *args)
            page = "" if meta else f" LIMIT {int(limit)}"
            rows = [_row(r) for r in await conn.fetch(f"SELECT {_COLS} FROM pin_requests WHERE {where} "
                                                      f"ORDER BY created_us DESC, requestid{page}", *args)]
            return _page(rows, meta, limit, count)
        return await self._run("read", find)

    async def unfinished(self, node: str) -> list[PinRequest]:
        return await self._run("read", lambda c: self._unfinished(c, node))

    @staticmethod
    async def _unfinished(conn: asyncpg.Connection, node: str) -> list[PinRequest]:
        return [_row(r) for r in await conn.fetch(
            f"SELECT {_COLS} FROM pin_requests WHERE node = $1 AND status = ANY($2::text[]) ORDER BY created_us",
            node, list(_UNFINISHED))]

    async def holders(self, node: str, cid: str) -> int:
        return await self._run("read", lambda c: c.fetchval(
            "SELECT count(*) FROM pin_requests WHERE node = $1 AND cid = $2", node, cid))
