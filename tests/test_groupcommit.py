"""The group-commit writer shared by the head store and the audit log."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.storage.groupcommit import AsyncGroupCommit, GroupCommit


async def test_concurrent_writes_share_batches_and_each_gets_its_own_outcome():
    batches: list[list[int]] = []
    gate = threading.Event()

    def commit(items):
        gate.wait(5)  # hold the first batch so the others queue up behind it
        batches.append(items)
        return [(False, ValueError(f"odd {i}")) if i % 2 else (True, i * 10) for i in items]

    group = GroupCommit(commit, name="test-writer", batch=64)
    tasks = [asyncio.create_task(group.submit(i)) for i in range(20)]
    await asyncio.sleep(0.1)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for i, result in enumerate(results):
        if i % 2:
            assert isinstance(result, ValueError) and str(result) == f"odd {i}"
        else:
            assert result == i * 10
    assert sum(len(b) for b in batches) == 20 and len(batches) < 20  # grouped, none lost
    await asyncio.to_thread(group.close)


async def test_a_failed_commit_fails_its_whole_batch_and_the_writer_goes_on():
    calls = []

    def commit(items):
        calls.append(items)
        if len(calls) == 1:
            raise OSError("disk full")
        return [(True, i) for i in items]

    group = GroupCommit(commit, name="test-writer", batch=8)
    with pytest.raises(OSError, match="disk full"):
        await group.submit(1)
    assert await group.submit(2) == 2
    await asyncio.to_thread(group.close)


async def test_close_commits_what_is_queued_and_refuses_more():
    committed = []
    gate = threading.Event()

    def commit(items):
        gate.wait(5)
        committed.extend(items)
        return [(True, None)] * len(items)

    group = GroupCommit(commit, name="test-writer", batch=2, idle=30)
    tasks = [asyncio.create_task(group.submit(i)) for i in range(5)]
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(asyncio.to_thread(group.close))
    await asyncio.sleep(0.05)
    gate.set()
    await closing  # does not wait for the idle timeout
    await asyncio.gather(*tasks)
    assert sorted(committed) == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="closed"):
        await group.submit(5)


# --- the event loop's writer (PostgreSQL) --------------------------------------------------------

async def test_the_event_loop_writer_batches_what_is_queued_and_a_failed_batch_fails_together():
    batches: list[list[int]] = []

    async def commit(items):
        batches.append(items)
        if len(batches) == 2:
            raise OSError("disk full")
        return [(True, i * 10) for i in items]

    group = AsyncGroupCommit(commit, batch=4)
    results = await asyncio.gather(*(group.submit(i) for i in range(10)), return_exceptions=True)
    assert [len(b) for b in batches] == [4, 4, 2]  # all queued before the writer ran: full batches
    failed = set(batches[1])
    for i, result in enumerate(results):
        if i in failed:
            assert isinstance(result, OSError)
        else:
            assert result == i * 10
    await group.close()


async def test_the_event_loop_writer_commits_what_is_queued_at_close_and_refuses_more():
    committed: list[int] = []

    async def commit(items):
        committed.extend(items)
        return [(True, None)] * len(items)

    group = AsyncGroupCommit(commit, batch=2)
    tasks = [asyncio.create_task(group.submit(i)) for i in range(5)]
    await asyncio.gather(*tasks[:1])  # the writer is running
    await group.close()
    await asyncio.gather(*tasks)
    assert sorted(committed) == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="closed"):
        await group.submit(5)
