"""Verifying the audit log without stopping the gateway: signed checkpoints and paged walks.

The log is a hash chain (``gateway.storage``); re-hashing all of it costs O(log) — a million
entries take seconds. So the gateway keeps **signed checkpoints**: (``seq``, the hash of entry
``seq``, the time), signed with the gateway's Ed25519 key once a walk has verified the chain up
to there. Two ways to verify:

- ``checkpoint`` (the default): check the latest checkpoint's signature, that entry ``seq``
  still has the hash it signed, then re-hash only the entries after it — O(new entries). An
  entry before the checkpoint cannot be rewritten without changing the hash the checkpoint
  signed (every hash covers the one before); an edit that leaves the stored hashes alone is
  what the full walk is for.
- ``full``: re-hash every entry from the first, and check every checkpoint on the way.

Both walk in pages (``PAGE`` entries a call; the SQLite store re-hashes them in a worker
process at a lower CPU priority, so the gateway's event loop never waits on it), report progress, and end by signing a new checkpoint at the
last entry verified. One walk of each kind runs at a time: a second request for it waits for
the running one's verdict instead of starting another.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..security import crypto
from ..storage.auditwalk import GENESIS
from ..storage.base import AuditStore
from .sealing import Sealer

log = logging.getLogger(__name__)

CHECKPOINT, FULL = "checkpoint", "full"
PAGE = 5000
PROGRESS_LOG_EVERY = 100_000


@dataclass
class Walk:
    """A verification under way (or the last one done)."""

    mode: str
    started: float = field(default_factory=time.time)
    total: int = 0       # entries in the log when the walk started
    checked: int = 0     # entries re-hashed so far
    task: asyncio.Task | None = None

    def progress(self) -> dict[str, Any]:
        return {"mode": self.mode, "checked": self.checked, "entries": self.total,
                "started": _iso(self.started), "seconds": round(time.time() - self.started, 3)}


class AuditVerifier:
    def __init__(self, store: AuditStore, sealer: Sealer) -> None:
        self.store = store
        self.sealer = sealer
        self.running: dict[str, Walk] = {}

    def sign(self, seq: int, head: str) -> dict[str, Any]:
        body = {"seq": seq, "hash": head, "time": _iso(time.time()), "key": self.sealer.key_id}
        return {**body, "sig": crypto.sign(self.sealer.keys.signing_key, body)}

    async def signed(self, checkpoint: dict[str, Any]) -> bool:
        """Signed by a gateway of this deployment (any of them: they share one audit chain)."""
        body = {k: checkpoint[k] for k in ("seq", "hash", "time", "key")}
        key = await self.sealer.signer_key({"key": checkpoint["key"]})
        return key is not None and crypto.verify_signature(key, body, checkpoint["sig"])

    def start(self, mode: str = CHECKPOINT) -> asyncio.Task:
        """The walk of ``mode`` under way, or a new one."""
        walk = self.running.get(mode)
        if walk is None or walk.task is None or walk.task.done():
            walk = self.running[mode] = Walk(mode)
            walk.task = asyncio.create_task(self._run(walk), name=f"audit-verify-{mode}")
            walk.task.add_done_callback(_retrieved)
        return walk.task

    async def verify(self, mode: str = CHECKPOINT) -> dict[str, Any]:
        """The verdict of a walk of ``mode``: the running one's, or a new one's."""
        # Shielded: a client that gives up does not cancel the walk others may be waiting for.
        return await asyncio.shield(self.start(mode))

    async def stop(self) -> None:
        """Cancel the walks under way (at shutdown, before the store closes)."""
        tasks = [w.task for w in self.running.values() if w.task is not None and not w.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def progress(self) -> list[dict[str, Any]]:
        return [w.progress() for w in self.running.values() if w.task is not None and not w.task.done()]

    async def _run(self, walk: Walk) -> dict[str, Any]:
        try:
            verdict = await self._walk(walk)
        except Exception:
            log.exception("audit verification (%s) failed", walk.mode)
            raise
        log.info("audit verification (%s): %s, %d entries re-hashed in %.1f s", walk.mode,
                 "ok" if verdict["ok"] else f"break at seq {verdict['break']['seq']}", walk.checked,
                 time.time() - walk.started)
        return verdict

    async def _walk(self, walk: Walk) -> dict[str, Any]:
        store = self.store
        walk.total = (await store.last())[0]
        after, prev, start = 0, GENESIS, None
        checkpoints = await store.checkpoints() if walk.mode == FULL else []
        if walk.mode == CHECKPOINT:
            start = await store.latest_checkpoint()
            if start is not None:
                problem = await self._checkpoint_problem(start)
                if problem:
                    return self._verdict(walk, start, start["seq"], None, {"seq": start["seq"], "problem": problem})
                after, prev = start["seq"], start["hash"]
        logged = 0
        while True:
            page = await store.walk(after, prev, PAGE)
            walk.checked += page["checked"]
            after, prev = page["last"], page["head"]
            if page["break"] is not None:
                return self._verdict(walk, start, after, None, {
                    "seq": page["break"], "problem": "the entry's link or hash does not match the chain"})
            if walk.checked - logged >= PROGRESS_LOG_EVERY:
                logged = walk.checked
                log.info("audit verification (%s): %d of about %d entries re-hashed", walk.mode,
                         walk.checked, walk.total)
            if page["checked"] < PAGE:
                break
        for checkpoint in checkpoints:  # a full walk also checks every signed checkpoint
            problem = await self._checkpoint_problem(checkpoint)
            if problem:
                return self._verdict(walk, start, after, None, {"seq": checkpoint["seq"], "problem": problem})
        latest = start if walk.mode == CHECKPOINT else (checkpoints[-1] if checkpoints else None)
        made = None
        if after > (latest["seq"] if latest else 0):
            made = self.sign(after, prev)
            await store.add_checkpoint(made)
        return self._verdict(walk, start, after, prev, None, made)

    async def _checkpoint_problem(self, checkpoint: dict[str, Any]) -> str | None:
        if not await self.signed(checkpoint):
            return "the checkpoint's signature does not verify (not signed by a gateway of this deployment)"
        stored = await self.store.hash_at(checkpoint["seq"])
        if stored is None:
            return "the log is shorter than its signed checkpoint: entries were removed"
        if stored != checkpoint["hash"]:
            return "the entry differs from the one the checkpoint signed: the log was rewritten"
        return None

    def _verdict(self, walk: Walk, start: dict[str, Any] | None, last: int, head: str | None,
                 brk: dict[str, Any] | None, made: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"ok": brk is None, "mode": walk.mode, "entries": last, "checked": walk.checked,
                "from": None if start is None else _public(start), "break": brk, "head": head,
                "checkpoint": None if made is None else _public(made),
                "seconds": round(time.time() - walk.started, 3)}


def _retrieved(task: asyncio.Task) -> None:
    """A walk nobody waits for (started in the background) still has its failure seen: logged
    by ``_run``, and retrieved here so asyncio does not report it again."""
    if not task.cancelled():
        task.exception()


def _public(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return {k: checkpoint[k] for k in ("seq", "hash", "time", "key", "sig")}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
