"""Group commit towards Kubo: the record blocks of concurrent appends written in one call.

An append used to be one ``block/put`` round trip of its own; Kubo spends about as much on the
call as on the block. Here the blocks queued while a call is under way go together in the next
one, up to ``max_calls`` calls at once (many small calls rather than a few long ones: Kubo
writes the blocks of one call one after another, the blocks of several calls side by side): one multipart ``block/put?pin=true``, each block pinned
recursively under its own CID as before (Kubo pins a ``block/put`` block without walking its
links — a ``pin/add`` would walk the episode's whole chain for each one). Kubo writes and pins
the parts one after another and answers one line for each once both are done, so each line
confirms its block; a failure part-way ends the answer early (its message only in a trailer),
and the blocks without a line are not written. The pins the lines report are then checked with
one ``pin/ls`` (``KuboClient.confirm_stored``) before any block is reported written.

A block may wait for another (``after``): the next record of an episode is linked to the one
before it by its CID before that one is written, and is not sent to Kubo until it is — in the
same call after it, or once its call is confirmed. So Kubo never pins a record whose ``prev``
it does not hold, and when a block fails, those waiting for it fail with it, unwritten.

``after_write(blocks, after)`` (CID → bytes; CID → the CID of the same call it is chained on),
if given, runs once per call after Kubo confirmed it and before any of its blocks is reported
written (replication: pinned on ``records.replicas`` nodes before heads move); if it raises,
every block of the call fails with that error and loses its pin.

A block written but then not committed (its head did not move) is ``settle``d as not kept: its
pin is removed once the index surely does not hold it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from ..errors import MediconError, StorageFull, Unavailable
from .client import KUBO_FULL, KuboClient

log = logging.getLogger(__name__)

AfterWrite = Callable[[dict[str, bytes], dict[str, str]], Awaitable[None]]
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
    stored: bool = False  # Kubo reported it written and pinned (it may still fail after)
    kept: bool | None = None  # settled: committed (True) or not (False)


class BlockWriter:
    """Writes dag-cbor blocks to Kubo, pinned, in as few calls as the load allows."""

    def __init__(self, kubo: KuboClient, *, release: Callable[[str], Awaitable[None]],
                 max_blocks: int = 8, max_bytes: int = 4 << 20, max_calls: int = 32,
                 after_write: AfterWrite | None = None, on_batch: Callable[[int], None] | None = None) -> None:
        self._kubo = kubo
        # Removes the pin of a block stored but not committed (once the index surely does
        # not hold it): the record service's own clean-up, the same as on its serial path.
        self._release = release
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
        """Whether a block was committed (called once its write is over). One that Kubo stored
        but that was not committed loses its pin."""
        if block.kept is not None:
            return
        block.kept = kept
        if block.stored and not kept:
            self._background(self._release(block.cid))

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
            failures = await self._put(batch)
            written = [b for b in batch if b not in failures]
            if written and self.after_write is not None:
                try:
                    await self.after_write({b.cid: b.data for b in written},
                                           {b.cid: b.after.cid for b in written if b.after in batch})
                except MediconError as err:
                    failures.update(dict.fromkeys(written, err))
        except Exception as exc:  # never leave an append waiting for ever
            log.exception("writing %d blocks to Kubo failed", len(batch))
            failures = dict.fromkeys(batch, Unavailable(f"writing the record to Kubo failed ({type(exc).__name__})"))
        for block in batch:
            _settle(block.written, failures.get(block))
            if block in failures:
                self.settle(block, False)  # a block stored but failed after (replicas) loses its pin

    async def _put(self, batch: list[Write]) -> dict[Write, MediconError]:
        """Write and pin ``batch``: the blocks Kubo did not confirm, with why. A failure on the
        first block of a call is the call's status; one on a later block ends Kubo's answer
        early and its message is lost (a trailer), so it is diagnosed: Kubo's disk full
        (``StorageFull``) if Kubo reports next to no free space, else ``Unavailable``. A block
        counts as written only if the block it is chained on is written too.

        Once Kubo's disk was found full, blocks are refused here (``StorageFull``) until Kubo
        reports ``FULL_BELOW`` bytes free again: a write at the margin of a full disk can break
        Kubo's pin store for good (leveldb keeps a failed journal write's error until Kubo
        restarts), so the writer does not keep trying there."""
        size = sum(len(b.data) for b in batch)
        if self._low_space:
            free = await self._kubo.disk_free()
            if free is not None and free < FULL_BELOW + size:
                return dict.fromkeys(batch, StorageFull(KUBO_FULL))
            self._low_space = False
        try:
            keys = set(await self._kubo.put_blocks([b.data for b in batch], pin=True))
        except StorageFull as full:
            self._low_space = True
            return dict.fromkeys(batch, full)
        except MediconError as err:
            return dict.fromkeys(batch, err)
        for block in batch:
            block.stored = block.cid in keys
        written = {b for b in batch if b.stored and (b.after is None or b.after.stored
                                                     or b.after.written.done() and b.after.written.exception() is None)}
        missing = [b for b in batch if b not in written]
        if len(written) > 1:
            # One pin/ls: each block Kubo answered for is pinned recursively (one block alone
            # needs none: the first part's failure is the call's status, as for put_block).
            try:
                await self._kubo.confirm_stored([], [b.cid for b in batch if b in written])
            except MediconError as err:
                return dict.fromkeys(batch, err)
        if not missing:
            return {}
        free = await self._kubo.disk_free()
        if free is not None and free < FULL_BELOW + sum(len(b.data) for b in missing):
            self._low_space = True
            error: MediconError = StorageFull(KUBO_FULL)
        else:
            error = Unavailable(f"Kubo stopped after {len(batch) - len(missing)} of {len(batch)} blocks "
                                "without saying why")
        return dict.fromkeys(missing, error)

    # --- pins of blocks not kept ----------------------------------------------------------------

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
