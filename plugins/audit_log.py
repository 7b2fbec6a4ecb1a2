"""Built-in audit log: every decision appended to a hash-chained log of its own.

Each entry carries the SHA-256 of the one before, so deleting, reordering or editing an entry
breaks the chain from there on; ``/medicon/v1/audit/verify`` walks it. Entries hold
pseudonyms, never patient identifiers, and never secrets.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

from aiohttp import web

from gateway import auth
from gateway.appkeys import CONFIG
from gateway.errors import GatewayError
from gateway.groupcommit import GroupCommit
from gateway.hookspecs import hookimpl

GENESIS = "0" * 64
FIELDS = ("time", "request_id", "principal", "role", "action", "resource", "decision", "path")
# Hashed when present (refused credentials): entries without them hash as they always did.
OPTIONAL_FIELDS = ("reason",)
_logs: dict[Path, "AuditLog"] = {}
_logs_lock = threading.Lock()


def entry_hash(prev: str, event: dict) -> str:
    hashed = {k: event.get(k) for k in FIELDS} | {k: event[k] for k in OPTIONAL_FIELDS if k in event}
    body = json.dumps(hashed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(prev.encode() + b"\n" + body.encode()).hexdigest()


class AuditLog:
    """One SQLite file, appended by a writer thread of its own. Concurrent requests' events are
    committed together (one transaction, one fsync for the batch), and each request waits for
    its own event to be durable before it goes on: nothing is answered unaudited."""

    BATCH = 256

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.execute("CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, event TEXT NOT NULL, "
                         "prev TEXT NOT NULL, hash TEXT NOT NULL)")
        self._lock = threading.Lock()          # one user of the connection at a time
        self._writer = GroupCommit(self._commit, name="audit-writer", batch=self.BATCH)

    def append(self, event: dict) -> None:
        """Append one event now (from any thread)."""
        self._write([event])

    async def append_async(self, event: dict) -> None:
        """Append one event through the writer thread; returns once it is committed."""
        await self._writer.submit(event)

    def _commit(self, events: list[dict]) -> list[tuple[bool, None]]:
        self._write(events)
        return [(True, None)] * len(events)

    def _write(self, events: list[dict]) -> None:
        with self._lock:
            # The last hash is read inside the write transaction: another process (a CLI
            # command) may have appended since.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                prev = row[0] if row else GENESIS
                for event in events:
                    digest = entry_hash(prev, event)
                    self._db.execute("INSERT INTO audit (event, prev, hash) VALUES (?, ?, ?)",
                                     (json.dumps(event, sort_keys=True), prev, digest))
                    prev = digest
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def page(self, after: int, limit: int) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT seq, event, prev, hash FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (after, limit)).fetchall()
        return [{"seq": seq, **json.loads(event), "prev": prev, "hash": h} for seq, event, prev, h in rows]

    def verify(self) -> dict:
        prev, count = GENESIS, 0
        with self._lock:
            rows = self._db.execute("SELECT seq, event, prev, hash FROM audit ORDER BY seq").fetchall()
        for seq, event, stored_prev, stored_hash in rows:
            if stored_prev != prev or entry_hash(prev, json.loads(event)) != stored_hash:
                return {"ok": False, "entries": count, "break": {"seq": seq}}
            prev, count = stored_hash, count + 1
        return {"ok": True, "entries": count, "break": None, "head": prev}


def log_for(config) -> AuditLog:
    path = Path(config.records.data_dir) / "audit.sqlite3"
    with _logs_lock:
        if path not in _logs:
            _logs[path] = AuditLog(path)
        return _logs[path]


@hookimpl
async def medicon_audit_event(event, config):
    await log_for(config).append_async(event)


async def audit_page(request: web.Request) -> web.Response:
    await auth.authorize(request, "audit:read", {"kind": "audit"})
    try:
        after = int(request.query.get("after", "0"))
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise GatewayError(400, "after and limit must be integers") from None
    if not 1 <= limit <= 1000:
        raise GatewayError(400, "limit must be between 1 and 1000")
    if not 0 <= after < 2**63:
        raise GatewayError(400, "after must be a sequence number (0 or more)")
    entries = log_for(request.app[CONFIG]).page(after, limit)
    return web.json_response({"entries": entries, "next": str(entries[-1]["seq"]) if len(entries) == limit else None})


async def audit_verify(request: web.Request) -> web.Response:
    await auth.authorize(request, "audit:read", {"kind": "audit"})
    return web.json_response(log_for(request.app[CONFIG]).verify())


@hookimpl
def medicon_register_routes():
    return [("GET", "/medicon/v1/audit", audit_page), ("GET", "/medicon/v1/audit/verify", audit_verify)]
