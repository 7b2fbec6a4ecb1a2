"""Append-only episodes: how a record is linked into its episode (``prev``, ``seq``,
``recorded_at``), and the per-episode locks that queue appends within one process."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import Counter
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from ..errors import Conflict, Internal, MediconError
from ..storage.model import Episode
from .records import OPENING_KINDS, ChainConflict, RecordInvalid, now, timestamp

log = logging.getLogger(__name__)

Policy = Callable[[str | None, str], str]


class EpisodeLocks:
    """One lock per episode, so appends to the same episode in this process queue instead of
    colliding; the head store's compare-and-swap still guards against other processes."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._queued: Counter[str] = Counter()

    def __call__(self, episode: str) -> asyncio.Lock:
        lock = self._locks.get(episode)
        if lock is None:
            lock = self._locks[episode] = asyncio.Lock()
        return lock

    @asynccontextmanager
    async def turn(self, episode: str) -> AsyncIterator[None]:
        """The episode's lock, counted in ``queued`` from the moment it is asked for until it
        is released, so its holder can tell whether others wait behind it."""
        self._queued[episode] += 1
        try:
            async with self(episode):
                yield
        finally:
            self._queued[episode] -= 1
            if not self._queued[episode]:
                del self._queued[episode]

    def queued(self, episode: str) -> int:
        """How many ``turn``s of the episode are held or waited for (the holder included)."""
        return self._queued[episode]


def link(record: dict[str, Any], episode: Episode | None, policy: Policy) -> dict[str, Any]:
    """``record`` with ``prev``, ``seq`` and ``recorded_at`` decided against the episode as it
    stands; ``ChainConflict`` if it does not fit. A ``recorded_at`` the gateway stamps itself is
    never before the episode's last one (a record stamped by a clock a little ahead, within
    ``records.max_clock_skew``, does not make the gateway's own stamps conflict)."""
    opening = record["schema"] in OPENING_KINDS
    given_prev = record.get("prev")
    # An episode of another patient is none of this writer's business: it learns no more than
    # that the id is taken (opening) or not there (appending), never whose it is or its state.
    foreign = episode is not None and record["patient"] != episode.patient
    if opening:
        if foreign:
            raise ChainConflict(f"episode id {record['episode']!r} is taken; choose another", None)
        if episode is not None:
            raise ChainConflict(f"episode {record['episode']!r} already exists", episode)
        prev, seq, last = None, 0, None
    else:
        if episode is None or foreign:
            raise ChainConflict(f"episode {record['episode']!r} does not exist; open it first", None)
        if episode.status != "open":
            raise ChainConflict(f"episode {record['episode']!r} is closed", episode)
        prev = _apply(policy, given_prev, episode)
        seq, last = episode.length, episode.last_recorded_at
    if "seq" in record and record["seq"] != seq:
        raise ChainConflict(f"seq {record['seq']} is not the next position {seq}", episode)
    recorded_at = record.get("recorded_at")
    if not recorded_at:
        recorded_at = now()
        if last is not None and timestamp(recorded_at) < timestamp(last):
            recorded_at = last
    if last is not None and timestamp(recorded_at) < timestamp(last):
        raise ChainConflict(f"recorded_at {recorded_at} is before the episode's last record ({last})", episode)
    return {**record, "prev": prev, "seq": seq, "recorded_at": recorded_at}


def check_clock_skew(record: dict[str, Any], max_ahead: float) -> None:
    """``recorded_at`` may not lie more than ``max_ahead`` seconds past the gateway's clock:
    an episode's times never go backwards, so a record from a clock running ahead would hold
    off every other writer's appends (409) until that time had passed."""
    given = record.get("recorded_at")
    if not given:
        return
    ahead = (timestamp(given) - timestamp(now())).total_seconds()
    if ahead > max_ahead:
        raise RecordInvalid([f"/recorded_at: {given} is {ahead:.0f} s ahead of the gateway's clock; "
                             f"at most {max_ahead:g} s ahead is accepted (records.max_clock_skew)"])


def _apply(policy: Policy, given_prev: str | None, episode: Episode) -> str:
    """Run a chain policy (a plugin's code): it may refuse, never fork the chain."""
    name = f"{policy.__module__}.{getattr(policy, '__name__', type(policy).__name__)}"
    try:
        prev = policy(given_prev, episode.head)
    except Conflict as err:
        raise ChainConflict(err.message, episode) from None
    except MediconError:
        raise
    except Exception as exc:
        log.exception("chain policy %s failed", name)
        raise Internal(f"chain policy {name} failed: {type(exc).__name__}") from None
    if prev != episode.head:
        raise Internal(f"chain policy {name} linked {prev!r} instead of the head")
    return prev
