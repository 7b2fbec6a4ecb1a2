"""The audit chain's hash, and re-hashing a page of it in a process of its own.

Re-hashing is pure Python (JSON and SHA-256 per entry): in a thread of the gateway it would hold
the GIL, and every request — health probes included — would queue behind it. So the SQLite
audit store walks the chain in a worker process (``walk_file``), at a lower CPU priority than
the gateway, a page per call; for the PostgreSQL store the worker reads the page itself on a
connection of its own (``walk_postgres``), so neither the rows' decoding nor their transfer
runs on the gateway's event loop. This module imports only the standard library at the top
(asyncpg only when a PostgreSQL walk asks for it), so the worker starts quickly.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
import os
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

GENESIS = "0" * 64
AUDIT_FIELDS = ("time", "request_id", "principal", "role", "action", "resource", "decision", "path")
# Hashed when present (refused credentials): entries without them hash as they always did.
AUDIT_OPTIONAL_FIELDS = ("reason",)
# The worker yields the CPU to the gateway (and to Kubo) whenever they want it.
WORKER_NICENESS = 10

_connections: dict[str, sqlite3.Connection] = {}


def audit_hash(prev: str, event: dict) -> str:
    """The hash of an entry: its fields (sorted) after the hash of the one before."""
    hashed = {k: event.get(k) for k in AUDIT_FIELDS} | {k: event[k] for k in AUDIT_OPTIONAL_FIELDS if k in event}
    body = json.dumps(hashed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(prev.encode() + b"\n" + body.encode()).hexdigest()


def walk(db: sqlite3.Connection, after: int, prev: str, limit: int) -> dict:
    """Re-hash up to ``limit`` entries after ``after``, the first linking to ``prev``."""
    rows = db.execute("SELECT seq, event, prev, hash FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                      (after, limit)).fetchall()
    return walk_rows(rows, after, prev)


def walk_rows(rows: list[tuple], after: int, prev: str) -> dict:
    """Re-hash ``rows`` (seq, event, prev, hash) in order, the first linking to ``prev``: how
    many check out, the last good seq and hash, and the seq of the first break (or None)."""
    checked, last = 0, after
    for seq, event, stored_prev, stored_hash in rows:
        if stored_prev != prev or audit_hash(prev, json.loads(event)) != stored_hash:
            return {"checked": checked, "last": last, "head": prev, "break": seq}
        prev, last, checked = stored_hash, seq, checked + 1
    return {"checked": checked, "last": last, "head": prev, "break": None}


def walk_file(path: str, after: int, prev: str, limit: int) -> dict:
    """``walk`` on the audit database at ``path`` (in the worker: one connection per file)."""
    db = _connections.get(path)
    if db is None:
        db = _connections[path] = sqlite3.connect(path)
        db.execute("PRAGMA busy_timeout=10000")
    return walk(db, after, prev, limit)


_postgres: dict[str, tuple[asyncio.AbstractEventLoop, Any]] = {}


def walk_postgres(url: str, after: int, prev: str, limit: int, timeout: float) -> dict:
    """``walk_rows`` on a page the worker reads from the database at ``url`` (one connection
    per URL, kept). A failure comes back as ``{"failed": kind}`` — never the driver's words,
    which may quote the URL."""
    import asyncpg

    loop, conn = _postgres.get(url, (None, None))
    try:
        if conn is None or conn.is_closed():
            loop = loop or asyncio.new_event_loop()
            conn = loop.run_until_complete(asyncpg.connect(
                url, timeout=timeout, command_timeout=timeout,
                server_settings={"application_name": "medicon-gateway audit walk"}))
            _postgres[url] = (loop, conn)
        rows = loop.run_until_complete(conn.fetch(
            "SELECT seq, event, prev, hash FROM audit WHERE seq > $1::bigint ORDER BY seq LIMIT $2::bigint",
            after, limit))
    except (asyncio.TimeoutError, asyncpg.QueryCanceledError):
        return {"failed": "timeout"}
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        _postgres.pop(url, None)
        return {"failed": "unreachable"}
    return walk_rows([tuple(r) for r in rows], after, prev)


def lower_priority() -> None:
    """The worker's initializer."""
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        pass


class WalkerProcess:
    """The worker process pages of the chain are re-hashed in, started by the first walk (most
    gateways never verify). ``WorkerDied`` if it was killed: the next walk starts another."""

    class WorkerDied(Exception):
        pass

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    async def run(self, fn: Callable[..., dict], *args: Any) -> dict:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=lower_priority)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except BrokenProcessPool:
            self._pool = None
            raise self.WorkerDied() from None

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
