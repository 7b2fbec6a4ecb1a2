"""Appends in flight: each episode's records chained before Kubo has answered, heads moved in order.

An append used to hold its episode's lock through a Kubo round trip and a head store commit,
so one episode took one record at a time. Here the lock is held only to link, seal and encode
the record — its CID is computed locally (dag-cbor is deterministic) — and the next append to
the episode is linked to that CID at once, while the record is on its way to Kubo
(``BlockWriter``: written with others in one call). Heads then move in chain order, several
records of an episode in one transaction (``HeadStore.append_chain``), and only once Kubo has
confirmed each record written and pinned.

A failure anywhere (Kubo, a lost compare-and-swap against another gateway) fails that record
and every record of the episode chained after it: none of them moved a head, so there is never
a fork nor a gap. The episode's in-memory tail is then dropped, and the next append reads the
episode from the head store again, as it does whenever nothing is in flight.

The records' futures are driven by the writer and by one mover task per episode, never by the
request that made them: a request that goes away does not leave the records after it waiting.

Only appends that overlap come here: the service sends an append that finds its episode
``quiet`` (nothing in flight, no overlap lately) and no other append waiting the serial way.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ..errors import Busy, MediconError, Unavailable
from ..kubo.batcher import BlockWriter, Write
from ..storage.base import HeadStore
from ..storage.model import ChainBroken, Episode, HeadMove, IndexedRecord, KeyTaken, StoreConflict

log = logging.getLogger(__name__)


class Superseded(Busy):
    """Not appended because a record before it in its episode was not committed (another
    gateway moved the head first). Nothing of it is in the episode; the append may be retried
    (the service does so once, for an append that did not name its position)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message or SUPERSEDED, retry_after=1)


@dataclass(eq=False)
class Pending:
    """A record linked into its episode and on its way: ``moved`` is the episode after it, once
    its head moved, or the failure."""

    indexed: IndexedRecord
    record: dict[str, Any]
    move: HeadMove
    write: Write
    # The append's audit events (``access.take_audits``), written while the record goes to
    # Kubo: its head moves only once they are stored; None when there are none.
    audited: asyncio.Future | None = None
    moved: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def cid(self) -> str:
        return self.indexed.cid

    def audit_failure(self) -> BaseException | None:
        """Why its audit events could not be stored (only once they are settled)."""
        if self.audited is None:
            return None
        if self.audited.cancelled():
            return Unavailable("the append's audit event could not be stored")
        return self.audited.exception()

    def settled(self) -> bool:
        """Kubo answered for its block, and its audit events are stored or failed."""
        return self.write.written.done() and (self.audited is None or self.audited.done())

    def ready(self) -> bool:
        """Kubo confirmed its block and its audit events are stored."""
        return self.settled() and self.write.written.exception() is None and self.audit_failure() is None


@dataclass(eq=False)
class Tail:
    """An episode's appends in flight, in chain order, and the episode as it will stand after
    the last of them."""

    episode: Episode | None
    pending: deque[Pending] = field(default_factory=deque)
    failed: bool = False
    # Whether two or more of its appends were in flight at once.
    overlapped: bool = False
    mover: asyncio.Task | None = None
    drained: asyncio.Event = field(default_factory=asyncio.Event)


class Pipeline:
    def __init__(self, heads: HeadStore, writer: BlockWriter) -> None:
        self.heads = heads
        self.writer = writer
        self.tails: dict[str, Tail] = {}
        # Episodes whose head another gateway moved under one of ours, and until when (loop
        # time) their appends go one at a time.
        self.contended: dict[str, float] = {}
        # Episodes whose appends overlapped in flight, and until when (loop time) an append that
        # finds nothing in flight is still pipelined.
        self.overlapping: dict[str, float] = {}

    async def episode(self, episode_id: str, read: Callable[[str], Awaitable[Episode | None]]) -> Episode | None:
        """The episode an append links to (called under the episode's lock): as it will stand
        after the appends in flight, or, with none in flight, as the head store has it. After a
        failure, once the failed appends have drained."""
        tail = self.tails.get(episode_id)
        while tail is not None and (tail.failed or self._contended(episode_id)):
            await tail.drained.wait()
            tail = self.tails.get(episode_id)
        return tail.episode if tail is not None else await read(episode_id)

    def _contended(self, episode_id: str) -> bool:
        """Whether another gateway moved this episode's head under one of ours lately: then
        each append waits for the one before it to commit (as without the pipeline), so a lost
        position fails one record, not every record chained on it."""
        return _ahead(self.contended, episode_id)

    def quiet(self, episode_id: str) -> bool:
        """Nothing of the episode is in flight (nor draining after a failure), so the head
        store has the episode as it stands, and its appends have not overlapped in the last
        ``OVERLAP_WINDOW`` seconds: an append now is most likely alone. (Without the window,
        the clients of a busy episode, all answered when a batch commits, would send their next
        appends behind one that found the episode empty and went the serial way.)"""
        return episode_id not in self.tails and not _ahead(self.overlapping, episode_id)

    async def close(self) -> None:
        """Wait until every append in flight has moved its head or failed."""
        while self.tails:
            await next(iter(self.tails.values())).drained.wait()

    def twin(self, episode_id: str, digest: str) -> Pending | None:
        """An append in flight of the same request (same record, same signer): a retry that
        must get the first one's answer, not a conflict with it."""
        tail = self.tails.get(episode_id)
        if tail is None:
            return None
        return next((p for p in tail.pending if p.indexed.digest == digest), None)

    def enqueue(self, indexed: IndexedRecord, record: dict[str, Any], move: HeadMove, block: bytes,
                after: Episode, audited: asyncio.Future | None = None) -> Pending:
        """Send a linked record on its way (under the episode's lock); ``after`` is the episode
        as it will stand once the record is appended; ``audited``, its audit events being
        written (the head waits for them)."""
        tail = self.tails.get(indexed.episode)
        if tail is None:
            tail = self.tails[indexed.episode] = Tail(None)
        before = tail.pending[-1].write if tail.pending else None
        pending = Pending(indexed, record, move, self.writer.write(block, indexed.cid, after=before), audited)
        tail.pending.append(pending)
        tail.overlapped = tail.overlapped or len(tail.pending) > 1
        tail.episode = after
        pending.write.written.add_done_callback(lambda _: self._kick(indexed.episode))
        if audited is not None:
            audited.add_done_callback(lambda _: self._kick(indexed.episode))
        return pending

    def _kick(self, episode_id: str) -> None:
        tail = self.tails.get(episode_id)
        if tail is not None and (tail.mover is None or tail.mover.done()):
            tail.mover = asyncio.get_running_loop().create_task(self._move(episode_id, tail))

    async def _move(self, episode_id: str, tail: Tail) -> None:
        """Move the head through every record at the front of the tail that Kubo holds, in
        order, one transaction per round, until the front is still being written."""
        try:
            while tail.pending:
                front = tail.pending[0]
                if not front.settled():
                    return  # its write's (or its audit's) callback starts the next round
                if front.write.written.exception() is not None:
                    # Kubo did not store it: the records chained on it were not stored either
                    # (the writer holds a block until the one before it is written), for the
                    # same reason.
                    self._fail_all(tail, front.write.written.exception(), same_for_all=True)
                    break
                if front.audit_failure() is not None:
                    # not audited, so not appended; those chained on it link again
                    self._fail_all(tail, front.audit_failure())
                    break
                ready: list[Pending] = []
                for p in tail.pending:
                    if not p.ready():
                        break
                    ready.append(p)
                try:
                    outcomes = await self.heads.append_chain([p.move for p in ready])
                except MediconError as err:
                    outcomes = [err] * len(ready)
                for p, outcome in zip(ready, outcomes):
                    tail.pending.popleft()
                    self._settle(p, Superseded() if isinstance(outcome, ChainBroken) else outcome)
                lost = next((o for o in outcomes if isinstance(o, Exception)), None)
                if isinstance(lost, (StoreConflict, KeyTaken)):
                    self._fail_all(tail, None)  # another writer took the position: link again
                    self.contended[episode_id] = asyncio.get_running_loop().time() + CONTENDED_FOR
                elif lost is not None:  # the head store failed (full, unreachable): so would they
                    self._fail_all(tail, lost, same_for_all=True)
        except Exception as exc:  # never leave the appends of an episode waiting for ever
            log.exception("moving the head of an episode failed")
            self._fail_all(tail, Unavailable(f"moving the episode's head failed ({type(exc).__name__})"))
        finally:
            if not tail.pending and self.tails.get(episode_id) is tail:
                del self.tails[episode_id]
                if tail.overlapped:
                    self._overlapped(episode_id)
                tail.drained.set()

    def _overlapped(self, episode_id: str) -> None:
        now = asyncio.get_running_loop().time()
        if len(self.overlapping) >= 4096:  # forget the episodes long gone quiet
            self.overlapping = {e: t for e, t in self.overlapping.items() if t >= now}
        self.overlapping[episode_id] = now + OVERLAP_WINDOW

    def _fail_all(self, tail: Tail, error: BaseException | None, *, same_for_all: bool = False) -> None:
        """Fail every record in flight: the first with ``error`` (if given), the others with
        ``Superseded`` (each was chained on the one before), or with ``error`` too if
        ``same_for_all``. Appends to the episode wait until the tail is gone, then read the
        episode again."""
        tail.failed = True
        first = True
        while tail.pending:
            p = tail.pending.popleft()
            self._settle(p, error if error is not None and (first or same_for_all) else Superseded())
            first = False

    def _settle(self, p: Pending, outcome: Any) -> None:
        """Answer the append, and tell the writer whether its block is kept: a block written
        for a record that did not commit loses its pin (once its write is over)."""
        _settle(p.moved, outcome)
        kept = not isinstance(outcome, BaseException)

        def written(future: asyncio.Future) -> None:
            if not future.cancelled() and future.exception() is None:
                self.writer.settle(p.write, kept)
        if p.write.written.done():
            written(p.write.written)
        else:
            p.write.written.add_done_callback(written)


# Seconds an episode's appends go one at a time after another gateway moved its head first.
CONTENDED_FOR = 2.0

# Seconds an episode's appends stay pipelined after some of them overlapped in flight.
OVERLAP_WINDOW = 1.0

SUPERSEDED = ("an earlier record of this episode could not be stored or committed, and this one was "
              "chained on it: nothing of it was appended")


def _ahead(deadlines: dict[str, float], episode_id: str) -> bool:
    """Whether the episode's deadline (loop time) is still ahead; one that passed is dropped."""
    until = deadlines.get(episode_id)
    if until is None:
        return False
    if until < asyncio.get_running_loop().time():
        del deadlines[episode_id]
        return False
    return True


def _settle(future: asyncio.Future, outcome: Any) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
        future.exception()  # retrieved: the request may have gone
    else:
        future.set_result(outcome)
