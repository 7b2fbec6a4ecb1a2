"""Group commit: one writer commits what the event loop queues, a batch at a time.

Concurrent requests' writes share one transaction and its fsync, and each request waits for its
own outcome, so nothing is answered before it is durable. Used by the head store and by the
audit log; each supplies the function that commits a batch. SQLite's stores commit in a thread
of their own (``GroupCommit``: SQLite blocks); PostgreSQL's in a task of the event loop
(``AsyncGroupCommit``: asyncpg does not).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Awaitable, Callable, Generic, TypeVar

Item = TypeVar("Item")
# (True, result) or (False, exception) for each item of a batch, in order.
Outcome = tuple[bool, Any]

_STOP = object()


class GroupCommit(Generic[Item]):
    """``commit(items)`` runs in a thread of its own, on as many queued items as are waiting (up
    to ``batch``) and returns one outcome per item; if it raises, every item of the batch fails
    with that error. The thread starts with the first write and ends after ``idle`` seconds
    without one (or at ``close``). ``on_batch(size)``, if given, is told each batch's size from
    the writer thread (the metrics' batch-size histogram)."""

    def __init__(self, commit: Callable[[list[Item]], list[Outcome]], *, name: str, batch: int,
                 idle: float = 5.0, on_batch: Callable[[int], None] | None = None) -> None:
        self._commit = commit
        self._on_batch = on_batch
        self._name = name
        self._batch = batch
        self._idle = idle
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    async def submit(self, item: Item) -> Any:
        """Queue ``item`` and wait until its batch is committed: its result, or its error."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name} is closed")
            self._queue.put((item, future))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        # Shielded: once queued, the write happens whether or not the request still waits.
        return await asyncio.shield(future)

    def close(self) -> None:
        """Refuse new writes, commit the queued ones, end the thread (blocking)."""
        with self._lock:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(_STOP)
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self._idle)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            batch, stop = _drain(first, self._queue.get_nowait, queue.Empty, self._batch)
            if batch:
                if self._on_batch is not None:
                    self._on_batch(len(batch))
                try:
                    outcomes = self._commit([item for item, _ in batch])
                except Exception as exc:
                    outcomes = [(False, exc)] * len(batch)
                for (_, future), (ok, value) in zip(batch, outcomes):
                    future.get_loop().call_soon_threadsafe(_settle, future, ok, value)
            if stop:
                return


class AsyncGroupCommit(Generic[Item]):
    """``commit(items)`` on as many queued items as are waiting (up to ``batch``), one batch at
    a time, in a task of the event loop; each ``submit`` waits for its own outcome ((True,
    result) or (False, exception)). If ``commit`` raises, every item of its batch fails."""

    def __init__(self, commit: Callable[[list[Item]], Awaitable[list[Outcome]]], *, batch: int,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self._commit = commit
        self._batch = batch
        self._on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._closed = False

    async def submit(self, item: Item) -> Any:
        if self._closed:
            raise RuntimeError("the store is closed")
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await asyncio.shield(future)  # once queued, written whether or not the caller waits

    async def _run(self) -> None:
        while True:
            batch, stop = _drain(await self._queue.get(), self._queue.get_nowait, asyncio.QueueEmpty, self._batch)
            if batch:
                if self._on_batch is not None:
                    self._on_batch(len(batch))
                try:
                    outcomes = await self._commit([item for item, _ in batch])
                except Exception as exc:  # noqa: BLE001 - every waiter gets the batch's error
                    outcomes = [(False, exc)] * len(batch)
                for (_, future), (ok, value) in zip(batch, outcomes):
                    _settle(future, ok, value)
            if stop:
                return

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        self._closed = True
        if self._task is not None:
            self._queue.put_nowait(_STOP)
            await self._task


def _drain(first: Any, take: Callable[[], Any], empty: type[Exception], limit: int) -> tuple[list, bool]:
    """The batch that begins with ``first``: what else is queued now (``take`` raises ``empty``
    when nothing is), up to ``limit`` items; and whether the stop sign came with it."""
    stop = first is _STOP
    batch = [] if stop else [first]
    while not stop and len(batch) < limit:
        try:
            item = take()
        except empty:
            break
        stop = item is _STOP
        if not stop:
            batch.append(item)
    return batch, stop


def _settle(future: asyncio.Future, ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
