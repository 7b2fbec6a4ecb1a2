"""Does group commit pay on PostgreSQL? Head moves and audit appends, one transaction each
versus batched (not in `make test`).

Head moves: N episodes appended to concurrently, each append one statement on a pooled
connection (what ``PostgresHeadStore`` does) versus the same statements batched into one
transaction with a savepoint each (an ``AsyncGroupCommit``). Audit appends: one transaction per
event (batch 1) versus ``PostgresAuditStore``'s group commit (batch 256), both locking the
chain's head row.

    .venv/bin/python -m bench.pg_commit [--postgres-url postgresql://…]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from pathlib import Path

import asyncpg

from gateway.storage import postgres as pg
from gateway.storage.model import IndexedRecord

_MOVE = ("WITH moved AS (UPDATE episodes SET head = $1, length = length + 1, last_recorded_at = $2"
         " WHERE id = $3 AND head = $4 AND length = $5 AND status = 'open' RETURNING id)"
         " INSERT INTO records (cid, episode, patient, seq, schema, recorded_at, digest, idempotency_key)"
         " SELECT $1, id, $6, $5, $7, $2, NULL, NULL FROM moved RETURNING cid")


def _record(episode: str, seq: int) -> IndexedRecord:
    return IndexedRecord(f"bafy{secrets.token_hex(16)}", episode, "patient", seq, "schema", "2026-01-01T00:00:00Z")


async def _database(base: str) -> str:
    name = f"pg_commit_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(base)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return base.rsplit("/", 1)[0] + "/" + name


async def heads(base: str, writers: int, each: int, batched: bool) -> float:
    storage = await pg.open_postgres_storage(await _database(base), pool_min=10, pool_max=10)
    episodes = [secrets.token_hex(8) for _ in range(writers)]
    for episode in episodes:
        await storage.heads.create_episode(_record(episode, 0))
    db = storage.heads._db

    async def commit(items):
        async def run(conn):
            out = []
            async with conn.transaction():
                for r, head in items:
                    async with conn.transaction():
                        out.append((True, await conn.fetchval(_MOVE, r.cid, r.recorded_at, r.episode, head, r.seq,
                                                              r.patient, r.schema)))
            return out
        return await db.run("write", "head", run)
    group = pg.AsyncGroupCommit(commit, batch=128)

    async def writer(episode: str) -> None:
        head = (await storage.heads.get_episode(episode)).head
        for seq in range(1, each + 1):
            r = _record(episode, seq)
            if batched:
                await group.submit((r, head))
            else:
                await storage.heads.append(r, expected_head=head, closes=False)
            head = r.cid
    start = time.perf_counter()
    await asyncio.gather(*(writer(e) for e in episodes))
    rate = writers * each / (time.perf_counter() - start)
    await group.close()
    await storage.close()
    return rate


async def audit(base: str, concurrency: int, total: int, batch: int) -> float:
    storage = await pg.open_postgres_storage(await _database(base), pool_min=10, pool_max=10)
    storage.audit._group._batch = batch
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await storage.audit.append({"action": f"bench-{i}", "decision": "allow"})
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    rate = total / (time.perf_counter() - start)
    assert (await storage.audit.verify())["ok"]
    await storage.close()
    return rate


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_commit", description=__doc__.splitlines()[0])
    parser.add_argument("--postgres-url", help="an existing server's maintenance database (default: start one)")
    args = parser.parse_args(argv)
    server, base = None, args.postgres_url
    if base is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from realparts import PostgresServer
        server = PostgresServer().start()
        base = server.dsn
    try:
        for writers in (1, 16, 64):
            each = 200 if writers == 1 else max(20, 3200 // writers)
            one, grouped = await heads(base, writers, each, False), await heads(base, writers, each, True)
            print(f"head moves, {writers:3d} writers: one statement each {one:7.0f}/s, group commit {grouped:7.0f}/s",
                  flush=True)
        for concurrency in (1, 16, 64):
            total = 400 if concurrency == 1 else 4000
            one, grouped = await audit(base, concurrency, total, 1), await audit(base, concurrency, total, 256)
            print(f"audit appends, {concurrency:3d} at once: one transaction each {one:7.0f}/s, "
                  f"group commit {grouped:7.0f}/s", flush=True)
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
