"""Audit verification costs O(new entries) and never holds up the gateway: signed checkpoints,
paged walks off the event loop, and what each kind of walk catches."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import time

import aiohttp

from conftest import (STORAGE_URLS, app_client, audit_sql, bearer, gateway_config, make_token, new_data_dir,
                      run_blocking, start_gateway)
from gateway.storage.sqlite import AUDIT_SCHEMA, GENESIS, audit_hash


class RawAudit:
    """The gateway's audit store as someone with access to the database sees it (either
    backend; ``$1`` placeholders): to tamper with it."""

    def __init__(self, cfg) -> None:
        self.data_dir = cfg.records.data_dir

    def execute(self, query: str, *args) -> list[tuple]:
        return audit_sql(self.data_dir, query, *args)

    def head_follows(self) -> None:
        """PostgreSQL keeps the chain's last seq and hash in a row of its own (appends link to
        it): a tamperer who covers their tracks moves it too. SQLite reads the last entry."""
        if STORAGE_URLS.get(self.data_dir):
            [(last, last_hash)] = self.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            self.execute("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1", last, last_hash)


def _db(cfg) -> RawAudit:
    return RawAudit(cfg)


async def _verify(c, auditor: str, full: bool = False) -> dict:
    r = await c.get("/medicon/v1/audit/verify" + ("?full=1" if full else ""), headers=bearer(auditor))
    assert r.status == 200, await r.text()
    return await r.json()


async def _requests(c, n: int) -> None:
    for _ in range(n):
        assert (await c.post("/api/v0/version")).status == 200


def _rehash_from(db: RawAudit, seq: int) -> None:
    """Rewrite the chain from ``seq`` on, every hash recomputed: what someone who edits an
    entry and covers their tracks does."""
    [(prev,)] = db.execute("SELECT prev FROM audit WHERE seq = $1", seq)
    for row_seq, event in db.execute("SELECT seq, event FROM audit WHERE seq >= $1 ORDER BY seq", seq):
        digest = audit_hash(prev, json.loads(event))
        db.execute("UPDATE audit SET prev = $1, hash = $2 WHERE seq = $3", prev, digest, row_seq)
        prev = digest
    db.head_follows()


async def test_the_default_walk_rehashes_only_what_came_after_the_last_checkpoint(aiohttp_client, kubo):
    cfg = gateway_config(kubo)
    c = await app_client(aiohttp_client, cfg)
    auditor = make_token(cfg, role="auditor")
    await _requests(c, 5)
    first = await _verify(c, auditor)
    assert first["ok"] and first["mode"] == "checkpoint" and first["from"] is None
    assert first["checked"] == first["entries"] >= 6
    made = first["checkpoint"]
    assert made["seq"] == first["entries"] and made["hash"] == first["head"] and made["sig"]

    await _requests(c, 7)
    second = await _verify(c, auditor)
    assert second["ok"] and second["from"] == made
    # the 7 requests, and the auditor's verify request itself (audited before it is answered)
    assert second["checked"] == second["entries"] - made["seq"] == 8
    assert second["checkpoint"]["seq"] == second["entries"]

    full = await _verify(c, auditor, full=True)
    assert full["ok"] and full["mode"] == "full" and full["checked"] == full["entries"] == second["entries"] + 1


async def test_what_the_checkpoint_walk_catches(aiohttp_client, kubo):
    cfg = gateway_config(kubo)
    c = await app_client(aiohttp_client, cfg)
    auditor = make_token(cfg, role="auditor")
    await _requests(c, 6)
    checkpoint = (await _verify(c, auditor))["checkpoint"]
    await _requests(c, 4)
    db = _db(cfg)

    # 1. an entry after the checkpoint, edited: found by the default walk
    after = checkpoint["seq"] + 2
    db.execute("UPDATE audit SET event = replace(event, 'allow', 'deny') WHERE seq = $1", after)
    verdict = await _verify(c, auditor)
    assert not verdict["ok"] and verdict["break"]["seq"] == after and verdict["from"] == checkpoint
    _rehash_from(db, after)  # (covered up, so the next cases start from a consistent log)

    # 2. an entry before the checkpoint, edited and every later hash recomputed: the entry
    # the checkpoint signed no longer has the signed hash
    db.execute("UPDATE audit SET event = replace(event, 'allow', 'deny') WHERE seq = 2")
    _rehash_from(db, 2)
    verdict = await _verify(c, auditor)
    assert not verdict["ok"] and verdict["break"]["seq"] == checkpoint["seq"]
    assert "rewritten" in verdict["break"]["problem"]

    # 3. the checkpoint itself moved to the rewritten hash: its signature does not verify
    [(new_hash,)] = db.execute("SELECT hash FROM audit WHERE seq = $1", checkpoint["seq"])
    db.execute("UPDATE audit_checkpoints SET hash = $1 WHERE seq = $2", new_hash, checkpoint["seq"])
    verdict = await _verify(c, auditor)
    assert not verdict["ok"] and "signature" in verdict["break"]["problem"]
    verdict = await _verify(c, auditor, full=True)  # the full walk checks every checkpoint too
    assert not verdict["ok"] and verdict["break"]["seq"] == checkpoint["seq"]

    # 4. the log cut short below its checkpoint (the verify request's own event is appended
    # at the checkpoint's seq again before the walk: another entry than the one signed)
    db.execute("UPDATE audit_checkpoints SET hash = $1 WHERE seq = $2", checkpoint["hash"], checkpoint["seq"])
    if STORAGE_URLS.get(cfg.records.data_dir):  # the foreign key from checkpoints to entries, dropped first
        db.execute("ALTER TABLE audit_checkpoints DROP CONSTRAINT audit_checkpoints_seq_fkey")
    db.execute("DELETE FROM audit WHERE seq >= $1", checkpoint["seq"] - 1)
    db.head_follows()
    verdict = await _verify(c, auditor)
    assert not verdict["ok"] and verdict["break"]["seq"] == checkpoint["seq"]
    assert verdict["break"]["problem"].startswith(("the log is shorter", "the entry differs"))


async def test_an_edit_that_leaves_the_hashes_alone_is_for_the_full_walk(aiohttp_client, kubo):
    """The limit of the default walk, stated: an old entry edited in place (its stored hash
    left as it was) is only found by re-hashing it, which is the full walk's job."""
    cfg = gateway_config(kubo)
    c = await app_client(aiohttp_client, cfg)
    auditor = make_token(cfg, role="auditor")
    await _requests(c, 3)
    await _verify(c, auditor)
    db = _db(cfg)
    db.execute("UPDATE audit SET event = replace(event, 'allow', 'deny') WHERE seq = 2")
    assert (await _verify(c, auditor))["ok"] is True
    verdict = await _verify(c, auditor, full=True)
    assert not verdict["ok"] and verdict["break"]["seq"] == 2


async def test_checkpoints_are_kept_as_the_log_grows(aiohttp_client, kubo, monkeypatch):
    import plugins.audit_log
    monkeypatch.setattr(plugins.audit_log, "CHECKPOINT_EVERY", 5)
    cfg = gateway_config(kubo)
    c = await app_client(aiohttp_client, cfg)
    await _requests(c, 12)
    db = _db(cfg)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seqs = [row[0] for row in db.execute("SELECT seq FROM audit_checkpoints ORDER BY seq")]
        if seqs:
            break
        await asyncio.sleep(0.05)
    assert seqs and seqs[-1] >= 5, f"checkpoints after 12 events, a walk started every 5: {seqs}"
    auditor = make_token(cfg, role="auditor")
    verdict = await _verify(c, auditor)
    assert verdict["ok"] and verdict["from"]["seq"] >= seqs[-1] and verdict["checked"] <= 12


# --- a million entries ---------------------------------------------------------------------------

MILLION = 1_000_000


def _chain(entries: int):
    """A valid audit chain of ``entries`` entries, ``(seq, event, prev, hash)`` in batches.
    Hashes are made from text built here (much faster than a dict per entry); the first
    entries are checked against the gateway's own ``audit_hash``, and the walk under test
    would report any entry where the two disagreed."""
    prev, rows = GENESIS, []
    for seq in range(1, entries + 1):
        stamp = f"2026-01-01T00:{seq // 60 % 60:02d}:{seq % 60:02d}Z"
        stored = (f'{{"action": "node:info", "decision": "allow", "path": "api", "principal": "token:bulk", '
                  f'"request_id": "r{seq}", "resource": {{"kind": "node"}}, "role": "admin", "time": "{stamp}"}}')
        hashed = (f'{{"action":"node:info","decision":"allow","path":"api","principal":"token:bulk",'
                  f'"request_id":"r{seq}","resource":{{"kind":"node"}},"role":"admin","time":"{stamp}"}}')
        digest = hashlib.sha256(prev.encode() + b"\n" + hashed.encode()).hexdigest()
        if seq <= 100:
            assert digest == audit_hash(prev, json.loads(stored))
        rows.append((seq, stored, prev, digest))
        prev = digest
        if len(rows) == 100_000:
            yield rows
            rows = []
    yield rows


def _build_log(data_dir: str, entries: int) -> None:
    """The chain written straight into the audit store of ``data_dir`` (either backend)."""
    url = STORAGE_URLS.get(data_dir)
    if url is None:
        db = sqlite3.connect(os.path.join(data_dir, "audit.sqlite3"))
        db.executescript(AUDIT_SCHEMA)
        for rows in _chain(entries):
            db.executemany("INSERT INTO audit (seq, event, prev, hash) VALUES (?, ?, ?, ?)", rows)
        db.commit()
        db.close()
        return

    async def copy() -> None:
        import asyncpg
        conn = await asyncpg.connect(url)
        try:
            last = (0, GENESIS)
            for rows in _chain(entries):
                await conn.copy_records_to_table("audit", records=rows, columns=["seq", "event", "prev", "hash"])
                last = (rows[-1][0], rows[-1][3]) if rows else last
            await conn.execute("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1", *last)
        finally:
            await conn.close()
    run_blocking(copy())


async def test_a_full_walk_of_a_million_entries_never_holds_up_healthz(kubo):
    data_dir = new_data_dir()
    _build_log(data_dir, MILLION)
    gw = start_gateway(kubo, data_dir=data_dir)
    latencies: list[float] = []
    seen_running: list[dict] = []
    try:
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(headers=gw.headers, timeout=timeout) as s:
            async def get(path: str) -> tuple[int, dict]:
                async with s.get(gw.url + path) as r:
                    return r.status, await r.json()
            walks = [asyncio.create_task(get("/medicon/v1/audit/verify?full=1")) for _ in range(2)]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # until the walk shows how far it is
                seen_running = (await get("/medicon/v1/audit/verify/progress"))[1]["running"]
                if seen_running and seen_running[0]["checked"] > 0:
                    break
                await asyncio.sleep(0.02)
            assert seen_running and seen_running[0]["checked"] > 0, f"no progress in /progress: {seen_running}"
            async with aiohttp.ClientSession() as probe:  # health probes carry no credentials
                while not all(w.done() for w in walks):
                    t0 = time.perf_counter()
                    async with probe.get(gw.url + "/healthz") as r:
                        assert r.status == 200
                    latencies.append(time.perf_counter() - t0)
                    await asyncio.sleep(0.02)
            progress = (await get("/medicon/v1/audit/verify/progress"))[1]["running"]
            (status_a, first), (status_b, second) = [w.result() for w in walks]
    finally:
        assert gw.stop() == 0
    assert status_a == status_b == 200
    assert first == second, "two requests for a full walk share one walk"
    assert [w["mode"] for w in seen_running] == ["full"] and seen_running[0]["entries"] >= MILLION
    assert progress == []
    assert first["ok"] is True and first["checked"] >= MILLION and first["checkpoint"]["seq"] == first["entries"]
    assert len(latencies) >= 100, f"only {len(latencies)} probes while the walk ran ({first['seconds']} s)"
    latencies.sort()
    median, p99, worst = (latencies[int(q * (len(latencies) - 1))] for q in (0.5, 0.99, 1.0))
    stats = (f"{len(latencies)} probes during a {first['seconds']:.0f} s walk: median {median * 1000:.1f} ms, "
             f"p99 {p99 * 1000:.1f} ms, worst {worst * 1000:.0f} ms")
    print(stats)
    # Within 100 ms. On this shared 2-core machine a probe now and then waits 100-250 ms for a
    # CPU whatever the gateway does (measured: a plain niced CPU burner in place of the walk,
    # same probes, same outliers), so the bound is on the 99th percentile; a walk that held the
    # event loop would hold probes for seconds (the whole walk), and the worst is bounded too.
    assert median < 0.01 and p99 < 0.1, stats
    assert worst < 1.0, stats
