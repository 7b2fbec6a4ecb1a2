"""Point lookups on the embedded SQLite stores run on the event loop's thread (a hop to a reader
thread cost more than the lookup), and never make the loop wait for a lock: a lookup that
would wait goes to a reader thread."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

from gateway.errors import Unavailable
from gateway.storage.sqlite import SQLiteDatabase

SCHEMA = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v TEXT NOT NULL);"


def _row(db: sqlite3.Connection, key: str) -> tuple[str | None, int]:
    row = db.execute("SELECT v FROM t WHERE k = ?", (key,)).fetchone()
    return (row[0] if row else None), threading.get_ident()


async def test_a_point_lookup_runs_on_the_loop_thread_and_a_read_on_a_reader_thread(tmp_path):
    db = await SQLiteDatabase.open(tmp_path / "s.sqlite3", SCHEMA)
    try:
        await db.write(lambda c: c.execute("INSERT INTO t VALUES ('a', 'one')"))
        value, thread = await db.lookup(_row, "a")
        assert (value, thread) == ("one", threading.get_ident())
        value, thread = await db.read(_row, "a")
        assert value == "one" and thread != threading.get_ident()
        with_error = db.lookup(lambda c: c.execute("SELECT nothing FROM nowhere"))
        try:
            await with_error
        except Unavailable as err:  # the store's failure, as a read's
            assert "failed to read" in err.message
        else:
            raise AssertionError("a failing lookup did not fail")
    finally:
        await db.close()


def _row_under_lock(db: sqlite3.Connection, key: str) -> tuple[str | None, int]:
    """A lookup that needs the file's write lock (WAL readers never wait for one; this is how a
    test makes a lookup meet a lock another connection holds)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        return _row(db, key)
    finally:
        db.execute("ROLLBACK")


async def test_a_lookup_that_would_wait_for_a_lock_waits_on_a_reader_thread_not_on_the_loop(tmp_path):
    path = tmp_path / "s.sqlite3"
    db = await SQLiteDatabase.open(path, SCHEMA)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        await db.write(lambda c: c.execute("INSERT INTO t VALUES ('a', 'one')"))
        holder.execute("BEGIN IMMEDIATE")  # another process writing, not yet committed
        holder.execute("UPDATE t SET v = 'two' WHERE k = 'a'")
        lookup = asyncio.ensure_future(db.lookup(_row_under_lock, "a"))
        started = time.monotonic()
        for _ in range(30):  # the loop keeps running while the lookup waits for the lock
            await asyncio.sleep(0.01)
        assert time.monotonic() - started < 2, "the event loop waited for the lock"
        assert not lookup.done(), "the lookup did not wait for the lock"
        holder.execute("COMMIT")
        value, thread = await asyncio.wait_for(lookup, 15)
        assert value == "two" and thread != threading.get_ident()  # answered by a reader thread
    finally:
        holder.close()
        await db.close()
