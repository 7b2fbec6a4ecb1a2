"""The PostgreSQL backend on a real PostgreSQL server: several gateways on one database.

Two store instances (two connection pools) stand for two gateways; at the end, two real
gateway processes share one database and one Kubo. Nothing is mocked: a full disk is a real
full tmpfs under a tablespace, a lost database a real server stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from conftest import ROOT, STORAGE_URLS, bearer, start_gateway
from gateway.errors import Invalid, StorageFull, Unavailable
from gateway.security.keyring import KeyShredded, LocalKeyring
from gateway.core.key_provider import KeyringProvider
from gateway.storage.auditwalk import GENESIS
from gateway.storage.model import Blob, IndexedRecord, KeyTaken, StoreConflict
from gateway.storage.postgres import (MigrationError, PostgresDatabase, migrate_database, migrations,
                                      open_postgres_storage)
from realparts import PostgresServer
from records_helpers import encounter, opened, uid

WITHIN = 1.0  # seconds: a change on one gateway is seen by every other within this


@pytest.fixture
async def two(postgres_db):
    """Two gateways' stores on one database: two pools, as two processes would have."""
    a = await open_postgres_storage(postgres_db, pool_min=1, pool_max=4)
    b = await open_postgres_storage(postgres_db, pool_min=1, pool_max=4)
    yield a, b
    await a.close()
    await b.close()


async def rows(url: str, query: str, *args) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def seen_within(check, seconds: float = WITHIN) -> float:
    """Poll ``check()`` (a coroutine function returning bool) until true; the time it took.
    Fails if it is not true within ``seconds``."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < seconds, f"not seen within {seconds}s"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def record(episode: str, seq: int, cid: str | None = None, key: str | None = None) -> IndexedRecord:
    return IndexedRecord(cid or f"bafy-{uuid.uuid4().hex}", episode, "patient-1", seq, "s", f"t{seq}", None, key)


# --- migrations --------------------------------------------------------------------------------

async def test_migrations_run_once_even_when_gateways_start_together(postgres_db):
    applied = await asyncio.gather(*(migrate_database(postgres_db) for _ in range(5)))
    names = [f"{m.version:04d}_{m.name}" for m in migrations()]
    assert sorted(done for _, done in applied if done) == [names], applied  # one of them migrated
    assert all(where.endswith(postgres_db.rsplit("/", 1)[1]) for where, _ in applied)
    recorded = await rows(postgres_db, "SELECT version, name FROM schema_migrations ORDER BY version")
    assert [(r["version"], r["name"]) for r in recorded] == [(m.version, m.name) for m in migrations()]
    assert (await migrate_database(postgres_db))[1] == []  # idempotent
    storage = await open_postgres_storage(postgres_db)  # and on start: nothing left to do
    await storage.close()
    assert len(await rows(postgres_db, "SELECT * FROM schema_migrations")) == len(migrations())


async def test_a_connection_given_back_to_the_pool_costs_no_query_and_keeps_no_transaction(postgres_db):
    """asyncpg's default reset (unlock every advisory lock, close cursors, unlisten, reset
    settings) is a round trip after every query; the pool here sends nothing more than the
    queries, and still rolls back a transaction a user left open."""
    db = await PostgresDatabase.open(postgres_db, min_size=1, max_size=1)
    try:
        sent: list[str] = []
        async with db.pool.acquire() as conn:
            conn.add_query_logger(lambda logged: sent.append(logged.query))
        sent.clear()
        for _ in range(5):
            assert await db.run("read", "test", lambda c: c.fetchval("SELECT 1")) == 1
        assert sent == ["SELECT 1"] * 5
        async with db.pool.acquire() as conn:
            await conn.execute("BEGIN")
        async with db.pool.acquire() as conn:
            assert not conn.is_in_transaction()
    finally:
        await db.close()


async def test_a_migration_cancelled_midway_leaves_its_lock_with_no_pooled_connection(postgres_db):
    """``migrate`` holds a session advisory lock, which the pool's reset no longer clears:
    cancelled while it holds it, it ends the lock itself (or its connection), so the next
    migration runs."""
    from gateway.storage.postgres import migrate
    await migrate_database(postgres_db)
    blocker = await asyncpg.connect(postgres_db)
    db = await PostgresDatabase.open(postgres_db, min_size=1, max_size=1)
    try:
        await blocker.execute("BEGIN; LOCK TABLE schema_migrations IN ACCESS EXCLUSIVE MODE")
        task = asyncio.ensure_future(db.run("migrate", "database", lambda c: migrate(c, db.where)))

        async def migration_waits_on_the_table() -> bool:
            return bool(await rows(postgres_db, "SELECT 1 FROM pg_locks WHERE locktype = 'relation' AND NOT granted"
                                                " AND relation = 'schema_migrations'::regclass"))
        await seen_within(migration_waits_on_the_table, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await blocker.execute("ROLLBACK")
        assert (await asyncio.wait_for(migrate_database(postgres_db), 10))[1] == []
        assert await db.run("read", "test", lambda c: c.fetchval("SELECT 1")) == 1  # the pool still works
    finally:
        await db.close()
        await blocker.close()


async def test_an_unmigrated_database_is_refused_when_migrating_on_start_is_off(postgres_db):
    with pytest.raises(MigrationError, match="medicon-gateway migrate"):
        await open_postgres_storage(postgres_db, migrate_on_start=False)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MEDICON_")},
           "MEDICON_STORAGE_URL": postgres_db, "MEDICON_RECORDS_DATA_DIR": tempfile.mkdtemp()}
    first = subprocess.run([sys.executable, "-m", "gateway", "migrate"], capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "applied 0001_initial" in first.stderr
    again = subprocess.run([sys.executable, "-m", "gateway", "migrate"], capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=60)
    assert again.returncode == 0 and "schema up to date" in again.stderr
    password = postgres_db.split(":")[2].split("@")[0]
    assert password not in first.stderr + first.stdout + again.stderr + again.stdout
    storage = await open_postgres_storage(postgres_db, migrate_on_start=False)
    await storage.close()


async def test_a_changed_or_newer_schema_is_refused(postgres_db):
    await migrate_database(postgres_db)
    conn = await asyncpg.connect(postgres_db)
    try:
        await conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
        with pytest.raises(MigrationError, match="differs"):
            await open_postgres_storage(postgres_db)
        await conn.execute("UPDATE schema_migrations SET checksum = $1 WHERE version = 1", migrations()[0].checksum)
        await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (999, 'future', 'x')")
        with pytest.raises(MigrationError, match="newer than this gateway knows"):
            await open_postgres_storage(postgres_db)
    finally:
        await conn.close()


# --- heads: compare-and-swap across gateways -----------------------------------------------------

async def test_two_gateways_racing_on_one_head_never_fork(two):
    a, b = two
    episode = uid("e")
    await a.heads.create_episode(record(episode, 0))
    for _ in range(30):
        head = (await b.heads.get_episode(episode)).head
        seq = (await a.heads.get_episode(episode)).length
        outcomes = await asyncio.gather(
            a.heads.append(record(episode, seq), expected_head=head, closes=False),
            b.heads.append(record(episode, seq), expected_head=head, closes=False), return_exceptions=True)
        won = [o for o in outcomes if not isinstance(o, Exception)]
        lost = [o for o in outcomes if isinstance(o, StoreConflict)]
        assert len(won) == 1 and len(lost) == 1, outcomes
        assert lost[0].current == won[0]  # the loser learns the head as it is now
    assert (await a.heads.get_episode(episode)).length == 31


async def test_many_writers_on_two_gateways_build_one_chain(two):
    """Writers on both gateways append to one episode as fast as they can, each retrying after
    a lost compare-and-swap: every success extends the head it read, no two share a parent."""
    a, b = two
    episode = uid("e")
    first = await a.heads.create_episode(record(episode, 0))
    parents: dict[str, str] = {}  # expected head -> the record that moved it

    async def writer(store, n: int) -> None:
        for _ in range(n):
            while True:
                current = await store.heads.get_episode(episode)
                mine = record(episode, current.length)
                try:
                    await store.heads.append(mine, expected_head=current.head, closes=False)
                except StoreConflict as lost:
                    assert lost.current.head != current.head
                    continue
                assert current.head not in parents, "two appends moved the same head: a fork"
                parents[current.head] = mine.cid
                break
    await asyncio.gather(*(writer(store, 15) for store in (a, b, a, b, a, b)))
    chain, cid = [], first.head
    while cid in parents:
        cid = parents[cid]
        chain.append(cid)
    final = await b.heads.get_episode(episode)
    assert len(chain) == 90 and final.head == chain[-1] and final.length == 91
    history = await b.heads.history(episode, -1, 1000)
    assert [r.seq for r in history] == list(range(91)) and [r.cid for r in history[1:]] == chain


async def test_an_idempotency_key_is_taken_once_across_gateways(two):
    a, b = two
    e1, e2 = uid("e"), uid("e")
    await a.heads.create_episode(record(e1, 0, key="client\nkey-1"))
    with pytest.raises(KeyTaken):
        await b.heads.create_episode(record(e2, 0, key="client\nkey-1"))
    assert await a.heads.get_episode(e2) is None
    assert (await b.heads.record_by_key("client\nkey-1")).episode == e1


async def test_blobs_keep_their_first_patient(two):
    a, b = two
    await a.heads.add_blobs([Blob("bafy-1", "p-1", True, "text/plain"), Blob("bafy-1", "p-2", False)])
    await b.heads.add_blobs([Blob("bafy-1", "p-3", False), Blob("bafy-2", "p-3", False)])
    assert await a.heads.blob("bafy-1") == Blob("bafy-1", "p-1", True, "text/plain")
    assert (await a.heads.blob("bafy-2")).patient == "p-3"


async def test_what_postgresql_cannot_store_is_never_found_nor_a_server_error(two):
    """PostgreSQL text holds no NUL (SQLite does): such identifiers are looked up as absent,
    and stored nowhere with a 4xx error, never a 5xx."""
    a, _ = two
    for odd in ("a\x00b", "\ud800", "\x00"):
        assert await a.heads.get_episode(odd) is None
        assert await a.heads.list_episodes(odd) == [] and await a.heads.history(odd, -1, 10) == []
        assert await a.heads.record(odd) is None and await a.heads.record_by_key(odd) is None
        assert await a.heads.record_by_digest(odd, odd) is None and await a.heads.blob(odd) is None
        assert await a.heads.indexed_among([odd, "bafy-none"]) == set()
        assert await a.tokens.get(odd) is None and await a.tokens.revoke(odd) is False
        assert await a.keys.key_by_id(odd) is None and await a.keys.gateway_key(odd) is None
        with pytest.raises(Invalid, match="cannot store"):
            await a.heads.create_episode(record(odd, 0))
    episode = uid("e")
    await a.heads.create_episode(record(episode, 0))
    assert await a.heads.history(episode, 10**17, 10) == []  # past any seq, not out of range
    assert len(await a.heads.history(episode, -1, 10**12)) == 1
    assert await a.audit.page(2**63 - 1, 1000) == []


async def test_hostile_identifiers_are_answered_as_on_sqlite(aiohttp_client, kubo, postgres_db):
    from conftest import app_client, gateway_config
    await migrate_database(postgres_db)
    cfg = gateway_config(kubo, **{"storage.url": postgres_db})
    STORAGE_URLS[cfg.records.data_dir] = postgres_db  # its admin token goes to that database
    c = await app_client(aiohttp_client, cfg)
    for path, status in [("/medicon/v1/episodes/a%00b", 404), ("/medicon/v1/episodes/a%00b/verify", 404),
                         ("/medicon/v1/episodes/a%00b/history", 404), ("/medicon/v1/patients/a%00b/episodes", 200),
                         ("/medicon/v1/episodes/x/history?cursor=999999999999999999", 404)]:
        r = await c.get(path)
        assert r.status == status, (path, await r.text())


# --- tokens and keys: a change on one gateway, refused by the other ----------------------------

async def test_a_token_revoked_on_one_gateway_is_refused_by_the_other_within_a_second(two, postgres_db):
    a, b = two
    token, info = await a.tokens.create("ward-7", "clinician", patients=["p1"])
    assert (await b.tokens.check(token)).principal.id == "token:ward-7"
    assert await b.tokens.revoke("ward-7") is True
    took = await seen_within(lambda: _refused(a, token))
    assert took < WITHIN
    assert (await a.tokens.check(token)).reason == "revoked"
    stored = await rows(postgres_db, "SELECT * FROM tokens")
    assert token not in repr([tuple(r) for r in stored]) and token[4:] not in repr([tuple(r) for r in stored])
    await a.tokens.create("ward-7", "clinician", patients=["p1"])  # the name is free again
    with pytest.raises(Exception, match="exists"):
        await b.tokens.create("ward-7", "lab")


async def _refused(store, token: str) -> bool:
    return (await store.tokens.check(token)).principal is None


async def test_shredding_on_one_gateway_is_seen_by_the_other_within_a_second(two, tmp_path):
    a_store, b_store = two
    LocalKeyring.init(tmp_path / "keyring.json")
    a, b = KeyringProvider(tmp_path / "keyring.json"), KeyringProvider(tmp_path / "keyring.json")
    await a.attach(a_store.keys)
    await b.attach(b_store.keys)
    dek_id, dek = await a.data_key_for_patient("P-1")
    assert await b.data_key(dek_id) == dek  # b holds it unwrapped in memory now
    assert await a.shred_patient("P-1") == 1

    async def erased() -> bool:
        try:
            await b.data_key(dek_id)
        except KeyShredded:
            return True
        return False
    assert await seen_within(erased) < WITHIN
    with pytest.raises(KeyShredded):
        await b.data_key_for_patient("P-1")


# --- the audit log: one chain for every gateway --------------------------------------------------

async def walk_chain(store, page: int = 1000) -> dict:
    """The whole chain re-hashed through the store's paged ``walk`` (what a full walk of
    ``AuditVerifier`` does before it looks at signed checkpoints)."""
    after, prev = 0, GENESIS
    while True:
        found = await store.walk(after, prev, page)
        after, prev = found["last"], found["head"]
        if found["break"] is not None:
            return {"ok": False, "entries": after, "break": {"seq": found["break"]}, "head": None}
        if found["checked"] < page:
            return {"ok": True, "entries": after, "break": None, "head": prev}


async def test_audit_appends_from_two_gateways_form_one_verifiable_chain(two, postgres_db):
    a, b = two

    async def burst(store, site: str, n: int) -> None:
        for i in range(n):
            await asyncio.gather(*(store.audit.append({"action": f"{site}-{i}-{j}", "decision": "allow",
                                                       "principal": site}) for j in range(random.randint(1, 5))))
    await asyncio.gather(burst(a, "a", 40), burst(b, "b", 40))
    verdict = await walk_chain(b.audit)
    entries = await a.audit.page(0, 1000)
    assert verdict["ok"] is True and verdict["entries"] == len(entries) and verdict["head"] == entries[-1]["hash"]
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert all(e["prev"] == p["hash"] for p, e in zip(entries, entries[1:]))
    sites = [e["principal"] for e in entries]
    assert {"a", "b"} == set(sites) and any(x != y for x, y in zip(sites, sites[1:]))  # interleaved

    victim = entries[len(entries) // 2]["seq"]
    conn = await asyncpg.connect(postgres_db)
    try:
        await conn.execute("UPDATE audit SET event = replace(event, 'allow', 'deny') WHERE seq = $1", victim)
        assert await walk_chain(a.audit) == {"ok": False, "entries": victim - 1, "break": {"seq": victim}, "head": None}
        await conn.execute("UPDATE audit SET event = replace(event, 'deny', 'allow') WHERE seq = $1", victim)
        assert (await walk_chain(a.audit))["ok"] is True
        await conn.execute("DELETE FROM audit WHERE seq = $1", victim)
        assert (await walk_chain(b.audit))["break"] == {"seq": victim + 1}
    finally:
        await conn.close()


async def test_an_audit_batch_after_the_gateways_own_is_one_statement_and_another_gateways_is_followed(two, postgres_db):
    """A batch appended after this gateway's last one moves the chain's head and adds the batch
    in one statement (no lock, no transaction of several round trips); once another gateway has
    appended, that statement finds the head moved, changes nothing, and the batch goes after
    the other gateway's entries under the head row's lock: one chain, no fork, no gap."""
    from gateway.storage.postgres import PostgresAuditStore
    db = await PostgresDatabase.open(postgres_db, min_size=1, max_size=1)
    audit = PostgresAuditStore(db)
    try:
        sent: list[str] = []
        async with db.pool.acquire() as conn:
            conn.add_query_logger(lambda logged: sent.append(logged.query))
        await audit.append({"action": "first", "decision": "allow"})  # the head is not known yet
        sent.clear()
        for i in range(5):
            await audit.append({"action": f"own-{i}", "decision": "allow"})
        assert len(sent) == 5 and all(q.startswith("WITH moved AS (UPDATE audit_head") for q in sent), sent
        other = two[0].audit
        await other.append({"action": "other", "decision": "allow"})
        sent.clear()
        await audit.append({"action": "after-other", "decision": "allow"})
        assert any("FOR UPDATE" in q for q in sent), sent
        sent.clear()
        await audit.append({"action": "last", "decision": "allow"})
        assert len(sent) == 1, sent
        entries = await audit.page(0, 1000)
        assert [e["action"] for e in entries[-4:]] == ["own-4", "other", "after-other", "last"]
        assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
        verdict = await walk_chain(audit)
        assert verdict["ok"] is True and verdict["head"] == entries[-1]["hash"]
    finally:
        await audit.close()
        await db.close()


async def test_audit_verification_leaves_the_event_loop_free(two):
    """The chain is read and hashed by the walker process: while 20 000 entries are checked, the
    event loop keeps running (reading and hashing them on the loop stalls it for 0.2-0.3 s here)."""
    a, _ = two
    await asyncio.gather(*(a.audit.append({"action": f"x{i}", "decision": "allow", "principal": "token:t",
                                           "resource": {"kind": "record", "cid": "bafy" * 10}})
                           for i in range(20_000)))
    gaps, done = [], asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    task = asyncio.create_task(ticker())
    verdict = await walk_chain(a.audit, page=20_000)  # one page: its hashing must not run on the loop
    done.set()
    await task
    assert verdict["ok"] and verdict["entries"] == 20_000
    assert max(gaps) < 0.1, f"the event loop stalled for {max(gaps) * 1000:.0f} ms during verification"


# --- failures in words -------------------------------------------------------------------------

async def test_a_lost_database_is_unavailable_in_words_without_the_password():
    server = PostgresServer().start()
    try:
        url = server.create_database("lost")
        storage = await open_postgres_storage(url, pool_min=1, pool_max=2, connect_timeout=2)
        await storage.tokens.create("t", "admin")
        server.stop()
        for call in (lambda: storage.heads.get_episode("e"), lambda: storage.tokens.check("mdc_" + "A" * 43),
                     lambda: storage.audit.append({"action": "x"}), lambda: storage.keys.state(),
                     lambda: storage.audit.walk(0, GENESIS, 100)):
            with pytest.raises(Unavailable) as down:
                await call()
            assert "unreachable" in down.value.message or "did not answer" in down.value.message
            assert f"127.0.0.1:{server.port}/lost" in down.value.message
            assert server.password not in down.value.message and "medicon:" not in down.value.message
        await storage.close()
        with pytest.raises(Unavailable) as refused:
            await open_postgres_storage(url, connect_timeout=2)
        assert "unreachable" in refused.value.message and server.password not in refused.value.message
    finally:
        server.stop()


async def test_wrong_credentials_are_refused_without_echoing_them(postgres, postgres_db):
    wrong = postgres_db.replace(postgres.password, "Not-The-Password-42")
    with pytest.raises(Unavailable, match="refused the gateway's credentials") as refused:
        await PostgresDatabase.open(wrong, connect_timeout=5)
    assert "Not-The-Password-42" not in refused.value.message
    missing = postgres_db.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(Unavailable, match="does not exist") as absent:
        await PostgresDatabase.open(missing, connect_timeout=5)
    assert postgres.password not in absent.value.message


def test_a_gateway_that_cannot_reach_its_database_says_so_without_the_password(tmp_path):
    from gateway.kubo.node import free_port
    LocalKeyring.init(tmp_path / "keyring.json")
    secret = "S3cret-" + uuid.uuid4().hex
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MEDICON_")},
           "MEDICON_RECORDS_DATA_DIR": str(tmp_path),
           "MEDICON_STORAGE_URL": f"postgresql://medicon:{secret}@127.0.0.1:{free_port()}/gw",
           "MEDICON_STORAGE_CONNECT_TIMEOUT": "2"}
    done = subprocess.run([sys.executable, "-m", "gateway", "--log-level", "DEBUG", "serve", "--port", "0"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "unreachable" in done.stderr and "/gw" in done.stderr
    assert secret not in done.stderr + done.stdout
    bad = subprocess.run([sys.executable, "-m", "gateway", "token", "list"], capture_output=True, text=True,
                         env={**env, "MEDICON_STORAGE_URL": f"mysql://root:{secret}@db/x"}, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "storage.url" in bad.stderr and secret not in bad.stderr + bad.stdout


async def test_a_full_database_volume_is_storage_full():
    """A tablespace on a 1 MiB tmpfs, in a PostgreSQL server of this test's own: the writes
    that no longer fit fail with StorageFull, and what was acknowledged before still verifies."""
    mount_point = tempfile.mkdtemp(prefix="medicon-full-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mount_point], capture_output=True,
                             text=True)
    assert mounted.returncode == 0, ("this test mounts a small tmpfs to fill PostgreSQL's volume and needs "
                                     f"root (as CI and `make test` run): {mounted.stderr}")
    server = PostgresServer()
    try:
        server.start()
        owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
        os.chown(mount_point, owner.pw_uid, owner.pw_gid)
        url = server.create_database("filled")
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"CREATE TABLESPACE small LOCATION '{mount_point}'")
            await conn.execute("ALTER DATABASE filled SET default_tablespace = small")
        finally:
            await conn.close()
        storage = await open_postgres_storage(url)  # its tables are made on the small volume
        acknowledged = 0
        try:
            with pytest.raises(StorageFull, match="volume is full") as full:
                for i in range(100_000):
                    await storage.audit.append({"action": "x" * 2000, "decision": "allow", "i": i})
                    acknowledged += 1
            assert server.password not in full.value.message and acknowledged > 0
            verdict = await walk_chain(storage.audit)
            assert verdict["ok"] is True and verdict["entries"] == acknowledged
            with pytest.raises(StorageFull):
                for i in range(1000):
                    await storage.heads.create_episode(record(uid("e") + "x" * 1500, 0))
        finally:
            await storage.close()
    finally:
        server.stop()
        subprocess.run(["umount", mount_point], capture_output=True)
        os.rmdir(mount_point)


# --- two gateway processes on one database ---------------------------------------------------------

@pytest.fixture
def two_sites(kubo, postgres, tmp_path):
    """Gateways ``site-a`` and ``site-b``: one database, one Kubo, the same KEK and pseudonym key
    (``keys export`` / ``keys join``), a signing key each. An admin token works on both."""
    from conftest import run_blocking
    url = postgres.create_database(f"sites_{uuid.uuid4().hex}")
    run_blocking(migrate_database(url))
    dirs = [tempfile.mkdtemp(prefix="medicon-site-a-"), tempfile.mkdtemp(prefix="medicon-site-b-")]
    LocalKeyring.init(Path(dirs[0]) / "keyring.json", gateway_id="site-a")
    LocalKeyring.load(Path(dirs[0]) / "keyring.json").export(tmp_path / "bundle.json")
    LocalKeyring.join(Path(dirs[1]) / "keyring.json", tmp_path / "bundle.json", gateway_id="site-b")
    for d in dirs:
        STORAGE_URLS[d] = url
    gateways = [start_gateway(kubo, data_dir=d) for d in dirs]
    yield url, gateways
    for gw in gateways:
        gw.stop()


def cli(gw, *args: str) -> subprocess.CompletedProcess:
    """The ``medicon-gateway`` CLI as an operator at ``gw``'s site runs it."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MEDICON_")},
           "MEDICON_RECORDS_DATA_DIR": gw.data_dir, "MEDICON_STORAGE_URL": STORAGE_URLS[gw.data_dir]}
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


async def test_two_gateways_append_to_one_episode_without_forking(two_sites, kubo):
    url, (a, b) = two_sites
    patient, episode = uid("p"), uid("e")
    async with aiohttp.ClientSession(headers=bearer(a.token)) as s:  # one token store: good on both
        async with s.post(f"{b.url}/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode)) as r:
            assert r.status == 201, await r.text()

        async def append(gw, i: int) -> int:
            async with s.post(f"{gw.url}/medicon/v1/episodes/{episode}/records",
                              json=encounter(patient, episode, note=f"n{i}")) as r:
                assert r.status in (201, 409), await r.text()
                return r.status
        statuses = await asyncio.gather(*(append((a, b)[i % 2], i) for i in range(24)))
        written = statuses.count(201)
        for gw in (a, b):  # both read and verify the whole chain, whoever wrote each record
            async with s.get(f"{gw.url}/medicon/v1/episodes/{episode}/verify") as r:
                verdict = await r.json()
            assert verdict["ok"] is True and verdict["length"] == 1 + written, verdict
            assert set(verdict["signers"]) == {"site-a", "site-b"}, verdict  # which site wrote what
            assert sum(verdict["signers"].values()) == 1 + written
            async with s.get(f"{gw.url}/medicon/v1/episodes/{episode}/history?limit=100") as r:
                page = await r.json()
                assert r.status == 200, page
            assert [x["seq"] for x in page["records"]] == list(range(1 + written))
    signers = {json.loads(kubo.ipfs("dag", "get", x["cid"]).stdout)["key"] for x in page["records"]}
    registered = {r["gateway_id"]: r["key_id"] for r in await rows(url, "SELECT gateway_id, key_id FROM gateway_keys")}
    assert set(registered) == {"site-a", "site-b"}
    assert signers == set(registered.values()), "each site signs with its own key, and both wrote"


async def test_a_token_revoked_at_one_site_is_refused_at_the_other_within_a_second(two_sites):
    _, (a, b) = two_sites
    made = cli(a, "token", "create", "courier", "--role", "clinician")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().split("=", 1)[1]
    async with aiohttp.ClientSession(headers=bearer(token)) as s:
        async def status(gw) -> int:
            async with s.post(f"{gw.url}/api/v0/version") as r:
                return r.status
        assert [await status(a), await status(b)] == [200, 200]
        revoked = cli(a, "token", "revoke", "courier")
        assert revoked.returncode == 0, revoked.stderr

        async def refused() -> bool:
            return await status(b) == 401
        assert await seen_within(refused) < WITHIN
        assert await status(a) == 401


async def test_a_patient_shredded_at_one_site_is_erased_at_the_other_within_a_second(two_sites):
    _, (a, b) = two_sites
    patient, episode = uid("p"), uid("e")
    async with aiohttp.ClientSession(headers=bearer(a.token)) as s:
        async with s.post(f"{a.url}/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode)) as r:
            cid = (await r.json())["cid"]
        async with s.get(f"{b.url}/medicon/v1/records/{cid}") as r:
            assert r.status == 200  # b opened it: its data key is in b's cache now
        shred = cli(a, "keys", "shred", "--patient", patient)
        assert shred.returncode == 0, shred.stderr

        async def erased() -> bool:
            async with s.get(f"{b.url}/medicon/v1/records/{cid}") as r:
                return r.status == 410
        assert await seen_within(erased) < WITHIN
        async with s.get(f"{a.url}/medicon/v1/records/{cid}") as r:
            assert r.status == 410
        async with s.post(f"{b.url}/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode)) as r:
            assert r.status == 410  # no new data under a shredded patient either


async def test_key_rotation_at_one_site_keeps_both_sites_reading(two_sites, tmp_path):
    url, (a, b) = two_sites
    patient, episode = uid("p"), uid("e")
    async with aiohttp.ClientSession(headers=bearer(a.token)) as s:
        async with s.post(f"{a.url}/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode)) as r:
            cid = (await r.json())["cid"]
        blocked = cli(a, "keys", "rotate")
        assert blocked.returncode == 2 and "site-b" in blocked.stderr  # b lacks the new KEK
        bundle = tmp_path / "bundle-2.json"
        assert cli(a, "keys", "export", "--out", str(bundle)).returncode == 0
        joined = cli(b, "keys", "join", "--update", str(bundle))
        assert joined.returncode == 0, joined.stderr
        rotated = cli(a, "keys", "rotate", "--batch", "1")
        assert rotated.returncode == 0, rotated.stderr
        assert "keys rotate: data keys 1/1 (100%)" in rotated.stderr  # the progress line
        state = await rows(url, "SELECT active_kek FROM key_state")
        assert {r["kek_id"] for r in await rows(url, "SELECT kek_id FROM patient_keys")} == {state[0]["active_kek"]}
        for gw in (a, b):
            async with s.get(f"{gw.url}/medicon/v1/records/{cid}") as r:
                assert r.status == 200, await r.text()
        other, other_episode = uid("p"), uid("e")  # a new patient at b, after the rotation
        async with s.post(f"{b.url}/medicon/v1/patients/{other}/episodes", json=opened(other, other_episode)) as r:
            assert r.status == 201, await r.text()
            new_cid = (await r.json())["cid"]
        async with s.get(f"{a.url}/medicon/v1/records/{new_cid}") as r:
            assert r.status == 200, await r.text()
    gateways = cli(a, "keys", "gateways")
    assert gateways.returncode == 0 and "site-a" in gateways.stdout and "site-b" in gateways.stdout


async def test_a_killed_verification_worker_is_unavailable_then_replaced(two):
    """The walker process is killed between two pages: that walk is ``Unavailable`` (never a
    verdict), and the next walk starts a new worker and gives one."""
    import multiprocessing
    import signal
    a, _ = two
    await asyncio.gather(*(a.audit.append({"action": f"k{i}", "decision": "allow"}) for i in range(50)))
    assert (await walk_chain(a.audit))["ok"]
    before = set(multiprocessing.active_children())
    assert before, "the walk ran in no worker process"
    for worker in before:
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
    with pytest.raises(Unavailable, match="verification worker died"):
        await walk_chain(a.audit)
    verdict = await walk_chain(a.audit)
    assert verdict["ok"] and verdict["entries"] >= 50
    assert not set(multiprocessing.active_children()) & before
