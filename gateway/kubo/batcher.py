"""Group commit towards Kubo: the record blocks of concurrent appends written in one call.

An append used to be one ``block/put`` round trip of its own, pinned on its own; Kubo spends
about as much on the call as on the block, and more on the pin than on either. Here the blocks
queued while a call is under way go together in the next one, up to ``max_calls`` calls at once,
and (with ``pin_node``) one pin keeps the whole batch:

1. the batch's pin node — a small dag-cbor node linking every block of the batch, made by
   ``pin_node(cids)`` — is stored with ``block/put?pin=true``: Kubo answers after it is written
   and pinned (recursively, without walking its links). A batch of one block is pinned on its
   own instead (one pin either way, one call less);
2. the blocks are stored, unpinned, in one multipart ``block/put``: Kubo answers one line for each
   block as it is written, so each line confirms its block.

Pinned first, so no garbage collection can take a block between its write and its pin (a GC
meeting a pin whose blocks are still being written fails, and deletes nothing). A block without
its line is not written; the pin node is then replaced by one listing only the written blocks.
Without ``pin_node`` each block is pinned by its own ``pin=true`` in the one call.

A block may wait for another (``after``): the next record of an episode is linked to the one
before it by its CID before that one is written, and is not sent to Kubo until it is — in the
same call after it, or once its call is confirmed. So no pin ever keeps a record whose ``prev``
Kubo does not hold, and when a block fails, those waiting for it fail with it, unwritten.

A block written but then not committed (its head did not move) is ``settle``d as not kept: its
own pin is removed, or its batch's pin node is replaced (once every block of the batch is
settled) by one that no longer lists it.

``after_write(cids)``, if given, runs once per call after Kubo confirmed it and before any of
its blocks is reported written (the seam for replicating a batch before heads move); if it
raises, every block of the call fails with that error.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from ..errors import MediconError, StorageFull, Unavailable
from . import ipld
from .client import KUBO_FULL, KuboClient

log = logging.getLogger(__name__)

AfterWrite = Callable[[list[str]], Awaitable[None]]
PinNode = Callable[[list[str]], bytes]
# Free bytes on Kubo's disk (beyond the blocks a call did not get to) below which a call that
# stopped early is taken as Kubo's disk being full.
FULL_BELOW = 4 << 20


@dataclass(eq=False)
class Write:
    """A block on its way to Kubo: ``written`` is done once Kubo holds it pinned, or failed
    with the reason."""

    data: bytes
    cid: str
    after: "Write | None"
    written: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    batch: "_Batch | None" = None
    kept: bool | None = None  # settled: committed (True) or not (False)


@dataclass(eq=False)
class _Batch:
    """The blocks Kubo confirmed in one call, and the pin node keeping them (None: each block
    pinned on its own)."""

    writes: list[Write]
    pin: str | None


class BlockWriter:
    """Writes dag-cbor blocks to Kubo, pinned, in as few calls as the load allows."""

    def __init__(self, kubo: KuboClient, *, pin_node: PinNode | None = None,
                 is_committed: Callable[[str], Awaitable[bool]] | None = None, max_blocks: int = 128,
                 max_bytes: int = 4 << 20, max_calls: int = 2, after_write: AfterWrite | None = None,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self._kubo = kubo
        self._pin_node = pin_node
        self._is_committed = is_committed
        self._max_blocks = max_blocks
        self._max_bytes = max_bytes
        self._max_calls = max_calls
        self.after_write = after_write
        self._on_batch = on_batch
        self._queue: deque[Write] = deque()
        self._calls: set[asyncio.Task] = set()
        self._cleanups: set[asyncio.Task] = set()
        # Set once Kubo said its disk is full; cleared once it reports room again.
        self._low_space = False

    def write(self, data: bytes, cid: str, after: Write | None = None) -> Write:
        """Queue ``data`` (whose CID is ``cid``). With ``after`` (another write), it is sent only
        once that one is written, and fails unwritten if that one fails."""
        block = Write(data, cid, after)
        self._queue.append(block)
        self._pump()
        return block

    def settle(self, block: Write, kept: bool) -> None:
        """Whether a written block was committed. One that was not loses its pin: its own, or
        its place in its batch's pin node once the whole batch is settled."""
        if block.kept is not None or block.batch is None:
            return
        block.kept = kept
        batch = block.batch
        if batch.pin is None:
            if not kept:
                self._background(self._unpin_record(block.cid))
        elif all(w.kept is not None for w in batch.writes) and not all(w.kept for w in batch.writes):
            self._background(self._repin(batch.pin, [w.cid for w in batch.writes if w.kept]))

    async def close(self) -> None:
        """Wait for the calls under way (queued blocks are sent first) and for the clean-ups."""
        while self._calls or self._cleanups:
            await asyncio.gather(*self._calls, *self._cleanups, return_exceptions=True)

    # --- batches ------------------------------------------------------------------------------

    def _ready(self, block: Write, batch: set[Write]) -> bool | None:
        """True: it may go in this batch; False: it waits for another; None: it failed."""
        before = block.after
        if before is None or before in batch:
            return True
        if not before.written.done():
            return False
        if before.written.cancelled() or before.written.exception() is not None:
            error = Unavailable("the record before it in its episode could not be stored") \
                if before.written.cancelled() else before.written.exception()
            _settle(block.written, error)
            return None
        return True

    def _pump(self) -> None:
        """Start calls for the blocks that may go, while fewer than ``max_calls`` run."""
        while self._queue and len(self._calls) < self._max_calls:
            batch: list[Write] = []
            members: set[Write] = set()
            size = 0
            kept: deque[Write] = deque()
            while self._queue:
                block = self._queue.popleft()
                full = batch and (len(batch) >= self._max_blocks or size + len(block.data) > self._max_bytes)
                ready = False if full else self._ready(block, members)
                if ready is None:
                    continue
                if not ready:
                    kept.append(block)
                    continue
                batch.append(block)
                members.add(block)
                size += len(block.data)
            self._queue = kept
            if not batch:
                return
            task = asyncio.get_running_loop().create_task(self._call(batch))
            self._calls.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._calls.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("block writer call failed unexpectedly", exc_info=task.exception())
        self._pump()

    async def _call(self, batch: list[Write]) -> None:
        if self._on_batch is not None:
            self._on_batch(len(batch))
        try:
            failures, pin = await self._put(batch)
            written = [b for b in batch if b not in failures]
            if written and self.after_write is not None:
                try:
                    await self.after_write([b.cid for b in written])
                except MediconError as err:
                    failures.update(dict.fromkeys(written, err))
                    written = []
            if written:
                kept = _Batch(written, pin)
                for block in written:
                    block.batch = kept
            elif pin is not None:
                self._background(self._repin(pin, []))
        except Exception as exc:  # never leave an append waiting for ever
            log.exception("writing %d blocks to Kubo failed", len(batch))
            failures = dict.fromkeys(batch, Unavailable(f"writing the record to Kubo failed ({type(exc).__name__})"))
        for block in batch:
            _settle(block.written, failures.get(block))

    async def _put(self, batch: list[Write]) -> tuple[dict[Write, MediconError], str | None]:
        """Write ``batch``: the blocks Kubo did not confirm, with why, and the pin node keeping
        the others (None without pin nodes). A failure on the first block of a call is the
        call's status; one on a later block ends Kubo's answer early and its message is lost
        (a trailer), so it is diagnosed: Kubo's disk full (``StorageFull``) if Kubo reports
        next to no free space, else ``Unavailable``.

        Once Kubo's disk was found full, blocks are refused here (``StorageFull``) until Kubo
        reports ``FULL_BELOW`` bytes free again: a write at the margin of a full disk can break
        Kubo's pin store for good (leveldb keeps a failed journal write's error until Kubo
        restarts), so the writer does not keep trying there."""
        size = sum(len(b.data) for b in batch)
        if self._low_space:
            free = await self._kubo.disk_free()
            if free is not None and free < FULL_BELOW + size:
                return dict.fromkeys(batch, StorageFull(KUBO_FULL)), None
            self._low_space = False
        pin = None
        try:
            if self._pin_node is not None and len(batch) > 1:  # (one block: its own pin costs no more)
                node = self._pin_node([b.cid for b in batch])
                pin = ipld.cid_of(node)
                if await self._kubo.put_blocks([node], pin=True) != [pin]:
                    raise Unavailable("Kubo did not confirm the batch's pin node")
            keys = set(await self._kubo.put_blocks([b.data for b in batch], pin=pin is None))
        except StorageFull as full:
            self._low_space = True
            return dict.fromkeys(batch, full), pin
        except MediconError as err:
            return dict.fromkeys(batch, err), pin
        missing = [b for b in batch if b.cid not in keys]
        if not missing:
            return {}, pin
        if pin is not None and len(missing) < len(batch):  # the pin node must not list a hole
            pin = await self._repin(pin, [b.cid for b in batch if b.cid in keys])
            if pin is None:
                return dict.fromkeys(batch, Unavailable("Kubo stopped part-way through a batch, and its pin "
                                                        "could not be narrowed to what it wrote")), None
        free = await self._kubo.disk_free()
        if free is not None and free < FULL_BELOW + sum(len(b.data) for b in missing):
            self._low_space = True
            error: MediconError = StorageFull(KUBO_FULL)
        else:
            error = Unavailable(f"Kubo stopped after {len(batch) - len(missing)} of {len(batch)} blocks "
                                "without saying why")
        return dict.fromkeys(missing, error), pin

    # --- pins of blocks not kept ----------------------------------------------------------------

    async def _repin(self, old: str, cids: list[str]) -> str | None:
        """Replace the pin node ``old`` by one listing only ``cids`` (none: just unpin it); the
        new pin node's CID, or None if that failed (``old`` stays, for ``check --repair``)."""
        new = None
        try:
            if cids:
                node = self._pin_node([*cids])
                new = ipld.cid_of(node)
                if await self._kubo.put_blocks([node], pin=True) != [new]:
                    raise Unavailable("Kubo did not confirm the replacement pin node")
            await self._kubo.pin_rm(old)
        except MediconError as err:
            log.warning("pin node %s keeps blocks that were not committed; left for "
                        "`medicon-gateway check --repair` (%s)", old, err.message)
            return None
        return new if cids else old

    async def _unpin_record(self, cid: str) -> None:
        """Remove the pin of a record block not committed — only once the index surely does not
        hold it (an identical node may have been committed by another request)."""
        try:
            if self._is_committed is None or not await self._is_committed(cid):
                await self._kubo.pin_rm(cid)
        except MediconError as err:
            log.warning("record node %s was stored but not committed; left pinned for "
                        "`medicon-gateway check --repair` (%s)", cid, err.message)

    def _background(self, work: Awaitable[object]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
        future.exception()  # retrieved: a failure nobody awaits is not logged as lost
