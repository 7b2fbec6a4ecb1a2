"""Appends chained while earlier ones are in flight, written to Kubo in batches, heads moved in
order (``core/pipeline.py``, ``kubo/batcher.py``), against a real Kubo and the storage backend
under test: many appends to one episode make one gap-free chain, each record pinned recursively
under its own CID; Kubo stopping mid-pipeline fails what was in flight after the failure
without a gap and loses nothing acknowledged; another gateway moving the head first (PostgreSQL)
fails the records chained on the loser without a fork; a retry of a request still in flight
gets its answer; ``records.pipeline = false`` is the serial path."""

from __future__ import annotations

import asyncio
import time

from conftest import STORAGE_URLS, app_client, bearer, gateway_config
from gateway.core import pipeline
from gateway.core.check import check_service
from gateway.http.appkeys import SERVICE
from gateway.storage.model import ChainBroken, HeadMove, IndexedRecord, StoreConflict
from records_helpers import encounter, opened, uid
from test_metrics import samples


PIPELINED = {"records.pipeline": True}


def recursive_pins(kubo) -> set[str]:
    return set(kubo.ipfs("pin", "ls", "--type=recursive", "--quiet").stdout.decode().split())


async def _history(c, episode: str) -> list[dict]:
    r = await c.get(f"/medicon/v1/episodes/{episode}/history?limit=500")
    assert r.status == 200, await r.text()
    return (await r.json())["records"]


def _kubo_batches(text: str) -> tuple[float, float]:
    """(count, sum) of the Kubo write batches in a Prometheus scrape."""
    kubo = {s.name: s.value for s in samples(text) if s.labels == {"store": "kubo"}}
    count = kubo.get("medicon_storage_commit_batch_size_count")
    total = kubo.get("medicon_storage_commit_batch_size_sum")
    assert count is not None and total is not None, "no Kubo write batch was reported"
    return count, total


def _assert_one_chain(chain: list[dict]) -> None:
    assert [r["seq"] for r in chain] == list(range(len(chain))), "a gap or a position twice"
    for before, after in zip(chain, chain[1:]):
        assert after["record"]["prev"] == before["cid"], "a fork: a record not linked to the one before it"


async def _open(c, patient: str, episode: str) -> str:
    r = await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
    assert r.status == 201, await r.text()
    return (await r.json())["cid"]


async def test_many_appends_to_one_episode_make_one_chain_each_record_pinned_recursively(aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo, **PIPELINED))
    patient, episode = uid("p"), uid("e")
    await _open(c, patient, episode)

    async def append(i: int) -> dict:
        r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode, note=f"n{i}"))
        assert r.status == 201, await r.text()
        return await r.json()
    answers = await asyncio.gather(*(append(i) for i in range(48)))
    assert sorted(a["seq"] for a in answers) == list(range(1, 49))
    chain = await _history(c, episode)
    _assert_one_chain(chain)
    assert len(chain) == 49
    verdict = await (await c.get(f"/medicon/v1/episodes/{episode}/verify")).json()
    assert verdict["ok"] and verdict["checked"] == 49
    assert {r["cid"] for r in chain} <= recursive_pins(kubo), "a record not pinned recursively under its CID"
    count, total = _kubo_batches(await (await c.get("/metrics")).text())
    assert total > count, "no Kubo write carried more than one block: nothing was batched"
    report = await check_service(c.server.app[SERVICE])
    assert report["unpinned"] == [] and report["missing"] == [] and report["orphans"] == [], report


async def test_kubo_stopping_mid_pipeline_fails_what_follows_without_a_gap_or_a_lost_record(aiohttp_client, own_kubo):
    c = await app_client(aiohttp_client, gateway_config(own_kubo, **PIPELINED))
    patient, episode = uid("p"), uid("e")
    await _open(c, patient, episode)
    acked: dict[str, int] = {}
    failed: list[int] = []

    async def writer(i: int) -> None:
        for n in range(1000):
            r = await c.post(f"/medicon/v1/episodes/{episode}/records",
                             json=encounter(patient, episode, note=f"{i}.{n}"))
            if r.status == 201:
                body = await r.json()
                acked[body["cid"]] = body["seq"]
            else:
                assert 500 <= r.status < 600, await r.text()
                failed.append(r.status)
                return
    writers = [asyncio.ensure_future(writer(i)) for i in range(16)]
    deadline = time.monotonic() + 60
    while len(acked) < 40:  # the pipeline is full and moving
        assert time.monotonic() < deadline, f"only {len(acked)} appends acknowledged in 60 s"
        assert not any(w.done() for w in writers), [w.exception() for w in writers if w.done()]
        await asyncio.sleep(0.01)
    await asyncio.to_thread(own_kubo.stop)
    await asyncio.wait_for(asyncio.gather(*writers), 120)
    assert len(failed) == 16, "every writer met the stopped Kubo"
    seqs = sorted(acked.values())
    assert seqs == list(range(1, len(seqs) + 1)), "the acknowledged records have a gap"
    indexed = await c.server.app[SERVICE].storage.heads.history(episode, -1, 10_000)
    assert {r.cid: r.seq for r in indexed if r.seq > 0} == acked, "the head moved past what was acknowledged"
    await asyncio.to_thread(own_kubo.start)
    chain = await _history(c, episode)
    _assert_one_chain(chain)
    assert {r["cid"] for r in chain} <= recursive_pins(own_kubo), "an acknowledged record lost its pin"
    r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode, note="after"))
    assert r.status == 201, await r.text()
    assert (await r.json())["seq"] == len(chain), "the next append did not continue from the head store"
    _assert_one_chain(await _history(c, episode))


async def test_another_gateway_moving_the_head_first_fails_chained_records_without_a_fork(aiohttp_client, kubo, postgres_db):
    """Two gateways on one PostgreSQL append to one episode at once: each answer is a 201 (one
    that lost its position is linked again), a 409 (the head moved under it) or a 503 (chained
    on a record that lost, too often); the acknowledged records form one chain without a gap,
    and nothing that failed stays pinned once settled."""
    from gateway.http.app import create_app
    from gateway.storage.postgres import migrate_database
    await migrate_database(postgres_db)
    cfg = gateway_config(kubo, **PIPELINED, **{"storage.url": postgres_db})
    STORAGE_URLS[str(cfg.records.data_dir)] = postgres_db  # (where make_token writes the token)
    first = await app_client(aiohttp_client, cfg)
    second = await aiohttp_client(create_app(cfg), headers=bearer(first.token))
    patient, episode = uid("p"), uid("e")
    await _open(first, patient, episode)
    statuses: list[int] = []
    acked: dict[str, int] = {}

    async def writer(c, i: int) -> None:
        for n in range(6):
            r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode, note=f"{i}.{n}"))
            statuses.append(r.status)
            if r.status == 201:
                body = await r.json()
                acked[body["cid"]] = body["seq"]
            else:
                assert r.status in (409, 503), await r.text()
    await asyncio.gather(*(writer(first if i % 2 else second, i) for i in range(16)))
    assert 201 in statuses
    relinked = sum(g.server.app[SERVICE].metrics.registry.get_sample_value("medicon_record_relinks_total")
                   for g in (first, second))
    assert set(statuses) != {201} or relinked, "the two gateways never raced for a position: nothing was tested"
    chain = await _history(first, episode)
    _assert_one_chain(chain)
    assert {r["cid"]: r["seq"] for r in chain if r["seq"] > 0} == acked
    for gateway in (first, second):
        service = gateway.server.app[SERVICE]
        await service.pipeline.close()
        await service.writer.close()  # the clean-ups of what failed are done
    assert {r["cid"] for r in chain} <= recursive_pins(kubo)
    report = await check_service(first.server.app[SERVICE])
    assert report["orphans"] == [] and report["unpinned"] == [] and report["missing"] == [], report


async def test_a_retry_of_a_request_still_in_flight_gets_its_answer(aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo, **PIPELINED))
    patient, episode = uid("p"), uid("e")
    first = await _open(c, patient, episode)
    doc = encounter(patient, episode, note="sent twice", prev=first, seq=1)
    answers = await asyncio.gather(*(c.post(f"/medicon/v1/episodes/{episode}/records", json=doc) for _ in range(4)))
    bodies = [await r.json() for r in answers]
    assert sorted(r.status for r in answers) == [200, 200, 200, 201], bodies
    assert len({b["cid"] for b in bodies}) == 1 and len(await _history(c, episode)) == 2


async def test_pipeline_off_is_the_serial_path(aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo, **{"records.pipeline": False}))
    patient, episode = uid("p"), uid("e")
    await _open(c, patient, episode)
    answers = await asyncio.gather(*(c.post(f"/medicon/v1/episodes/{episode}/records",
                                            json=encounter(patient, episode, note=str(i))) for i in range(16)))
    assert all(r.status == 201 for r in answers)
    chain = await _history(c, episode)
    _assert_one_chain(chain)
    assert {r["cid"] for r in chain} <= recursive_pins(kubo)
    count, _ = _kubo_batches(await (await c.get("/metrics")).text())
    assert count == 0, "the serial path went through the batcher"


def _append_paths(text: str) -> dict[str, float]:
    """Appends by the way they went (serial, pipelined) in a Prometheus scrape."""
    return {s.labels["path"]: s.value for s in samples(text) if s.name == "medicon_record_append_paths_total"}


async def test_an_append_alone_on_its_episode_is_one_kubo_round_trip_and_only_overlapping_ones_are_pipelined(
        aiohttp_client, kubo, monkeypatch):
    """With the pipeline on, an append that finds nothing of its episode in flight, no append
    waiting for it and no overlap lately goes the serial way (no batcher); appends to one
    episode that overlap are pipelined, and so is the next one within ``OVERLAP_WINDOW``;
    every record still lands in one chain, pinned."""
    monkeypatch.setattr(pipeline, "OVERLAP_WINDOW", 3600.0)
    c = await app_client(aiohttp_client, gateway_config(kubo, **PIPELINED))
    patients, episodes = [uid("p") for _ in range(6)], [uid("e") for _ in range(6)]
    for patient, episode in zip(patients, episodes):
        await _open(c, patient, episode)

    async def append(patient: str, episode: str, note: str) -> None:
        r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode, note=note))
        assert r.status == 201, await r.text()

    async def one_after_another(patient: str, episode: str) -> None:
        for i in range(4):
            await append(patient, episode, str(i))

    async def paths() -> tuple[dict[str, float], float]:
        text = await (await c.get("/metrics")).text()
        return _append_paths(text), _kubo_batches(text)[0]

    # six clients at once, each on its own episode: no episode ever has two appends at a time
    await asyncio.gather(*(one_after_another(p, e) for p, e in zip(patients, episodes)))
    assert await paths() == ({"serial": 30.0}, 0), "an append alone on its episode was pipelined"

    # sixteen at once on one episode: those queued behind the first are pipelined
    patient, episode = patients[0], episodes[0]
    await asyncio.gather(*(append(patient, episode, f"burst {i}") for i in range(16)))
    counted, batches = await paths()
    assert counted["serial"] + counted.get("pipelined", 0) == 46 and counted.get("pipelined", 0) >= 8, counted
    assert batches > 0, "overlapping appends to one episode were not pipelined"
    # the episode's next append, alone but within the window, is pipelined too
    await append(patient, episode, "right after the burst")
    assert (await paths())[0] == {**counted, "pipelined": counted["pipelined"] + 1}

    # past the window, an episode whose appends overlapped takes lone appends the serial way
    monkeypatch.setattr(pipeline, "OVERLAP_WINDOW", 0.0)
    other_patient, other = patients[1], episodes[1]
    await asyncio.gather(*(append(other_patient, other, f"burst {i}") for i in range(8)))
    before, _ = await paths()
    assert before["pipelined"] > counted["pipelined"] + 1, "the second burst did not overlap"
    await append(other_patient, other, "alone again")
    assert (await paths())[0] == {**before, "serial": before["serial"] + 1}

    for patient, episode, length in ((patients[0], episodes[0], 22), (other_patient, other, 14)):
        chain = await _history(c, episode)
        _assert_one_chain(chain)
        assert len(chain) == length
        assert {r["cid"] for r in chain} <= recursive_pins(kubo), "a record not pinned recursively under its CID"


async def test_append_chain_moves_in_order_and_stops_at_the_first_loss(tmp_path, request):
    """``HeadStore.append_chain`` on both backends: the moves before a lost compare-and-swap
    commit, the lost one says why, the ones after it are not tried."""
    from gateway.storage.postgres import PostgresDatabase, PostgresHeadStore, migrate_database
    from gateway.storage.sqlite import HEADS_SCHEMA, SQLiteDatabase, SQLiteHeadStore
    db = await SQLiteDatabase.open(tmp_path / "heads.sqlite3", HEADS_SCHEMA, name="head")
    url = request.getfixturevalue("postgres_db")
    await migrate_database(url)
    pg = await PostgresDatabase.open(url, min_size=1, max_size=2)
    try:
        for heads in (SQLiteHeadStore(db), PostgresHeadStore(pg)):
            def rec(seq: int, cid: str) -> IndexedRecord:
                return IndexedRecord(cid, "e1", "p1", seq, "s", f"2026-01-01T00:00:0{seq}Z")
            out = await heads.append_chain([HeadMove(rec(0, "c0"), None), HeadMove(rec(1, "c1"), "c0"),
                                            HeadMove(rec(2, "c2"), "c1")])
            assert [e.head for e in out] == ["c0", "c1", "c2"]
            out = await heads.append_chain([HeadMove(rec(3, "c3"), "c2"), HeadMove(rec(4, "x4"), "stale"),
                                            HeadMove(rec(5, "x5"), "x4")])
            assert out[0].head == "c3" and isinstance(out[1], StoreConflict) and isinstance(out[2], ChainBroken)
            assert out[1].current.head == "c3"
            episode = await heads.get_episode("e1")
            assert (episode.head, episode.length) == ("c3", 4)
            assert [r.cid for r in await heads.history("e1", -1, 10)] == ["c0", "c1", "c2", "c3"]
    finally:
        await db.close()
        await pg.close()
