"""Appends chained while earlier ones are in flight, written to Kubo in batches, heads moved in
order (``core/pipeline.py``, ``kubo/batcher.py``), against a real Kubo and both storage backends:
many appends to one episode make one gap-free chain; records are kept by pin nodes (one pin per
batch), which the RPC API cannot unpin and ``check`` counts and repairs; when another gateway
moves the head first, the appends chained on the loser fail without a fork or a gap; a retry
of a request still in flight gets its answer; the per-record pin mode still pins each record."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from conftest import app_client, bearer, gateway_config
from gateway.core import pins
from gateway.core.check import check_service
from gateway.http.appkeys import SERVICE
from gateway.storage.model import ChainBroken, HeadMove, IndexedRecord, StoreConflict
from records_helpers import encounter, opened, uid


def recursive_pins(kubo) -> set[str]:
    return set(kubo.ipfs("pin", "ls", "--type=recursive", "--quiet").stdout.decode().split())


def kept(kubo, cid: str) -> bool:
    """Pinned recursively, or kept by a pin (``indirect``)."""
    return kubo.ipfs("pin", "ls", cid, check=False).returncode == 0


async def _history(c, episode: str) -> list[dict]:
    r = await c.get(f"/medicon/v1/episodes/{episode}/history?limit=500")
    assert r.status == 200, await r.text()
    return (await r.json())["records"]


def _batch_sizes(text: str) -> tuple[float, float]:
    """(count, sum) of the Kubo write batches in a Prometheus scrape."""
    count = re.search(r'medicon_storage_commit_batch_size_count\{store="kubo"\} ([0-9.e+]+)', text)
    total = re.search(r'medicon_storage_commit_batch_size_sum\{store="kubo"\} ([0-9.e+]+)', text)
    return float(count.group(1)), float(total.group(1))


async def test_many_appends_to_one_episode_make_one_chain_in_few_pins(aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo))
    patient, episode = uid("p"), uid("e")
    r = await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
    assert r.status == 201
    pins_before = recursive_pins(kubo)

    async def append(i: int) -> dict:
        r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode, note=f"n{i}"))
        assert r.status == 201, await r.text()
        return await r.json()
    answers = await asyncio.gather(*(append(i) for i in range(48)))
    assert sorted(a["seq"] for a in answers) == list(range(1, 49))  # no gap, no position twice
    chain = await _history(c, episode)
    assert [r["seq"] for r in chain] == list(range(49))
    for before, after in zip(chain, chain[1:]):
        assert after["record"]["prev"] == before["cid"]
    verdict = await (await c.get(f"/medicon/v1/episodes/{episode}/verify")).json()
    assert verdict["ok"] and verdict["checked"] == 49
    assert all(kept(kubo, a["cid"]) for a in answers)
    new_pins = recursive_pins(kubo) - pins_before
    assert len(new_pins) < 48, "every record got a pin of its own: no batch was written together"
    count, total = _batch_sizes(await (await c.get("/metrics")).text())
    assert total > count, "no Kubo write carried more than one block"
    service = c.server.app[SERVICE]
    report = await check_service(service)
    assert report["unpinned"] == [] and report["missing"] == [] and report["orphans"] == [], report


async def test_pin_nodes_are_the_gateways_and_the_rpc_api_cannot_unpin_them(aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo))
    patient, episode = uid("p"), uid("e")
    await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
    pins_before = recursive_pins(kubo)
    await asyncio.gather(*(c.post(f"/medicon/v1/episodes/{episode}/records",
                                  json=encounter(patient, episode, note=str(i))) for i in range(12)))
    service = c.server.app[SERVICE]
    keepers = []
    for cid in recursive_pins(kubo) - pins_before:
        node = await service.kubo.dag_get(cid)
        if pins.listed(node) is not None:
            assert await pins.is_pin_node(service.sealer, node)
            keepers.append(cid)
    assert keepers, "no pin node was written"
    for query in (f"pin/rm?arg={keepers[0]}", f"pin/update?arg={keepers[0]}&arg={keepers[0]}"):
        r = await c.post(f"/api/v0/{query}")
        assert r.status == 403 and "keeps records" in (await r.json())["Message"]
    assert keepers[0] in recursive_pins(kubo)
    # a look-alike a client makes (not signed by the gateway) is the client's own
    fake = json.dumps({**await service.kubo.dag_get(keepers[0]), "sig": "x"}).encode()
    lookalike = kubo.ipfs("dag", "put", "--pin=true", input=fake).stdout.decode().strip()
    assert not await pins.is_pin_node(service.sealer, await service.kubo.dag_get(lookalike))
    r = await c.post(f"/api/v0/pin/rm?arg={lookalike}")
    assert r.status == 200, await r.text()


async def test_check_repair_narrows_a_pin_node_that_keeps_an_orphan(aiohttp_client, kubo):
    """A batch whose pin node lists a record whose head never moved (what a gateway killed
    between the two leaves behind): check names the orphan, --repair replaces the pin node by
    one that keeps only the committed records, and nothing committed loses its pin."""
    from gateway.core import chain
    from gateway.core.records import normalise
    from gateway.kubo import ipld
    c = await app_client(aiohttp_client, gateway_config(kubo))
    patient, episode = uid("p"), uid("e")
    committed = (await (await c.post(f"/medicon/v1/patients/{patient}/episodes",
                                     json=opened(patient, episode))).json())["cid"]
    service = c.server.app[SERVICE]
    current = await service.storage.heads.get_episode(episode)
    stale = chain.link(normalise(encounter(patient, episode, note="crashed")), current, service._policy_for(
        encounter(patient, episode)["schema"]))
    orphan_block = ipld.encode(await service.sealer.to_node(stale, "token:crashed"))
    orphan = ipld.cid_of(orphan_block)
    keeper = pins.pin_block(service.sealer, [committed, orphan])
    keeper_cid = ipld.cid_of(keeper)
    await service.kubo.put_blocks([keeper], pin=True)
    await service.kubo.put_blocks([orphan_block], pin=False)
    r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode, note="wins"))
    assert r.status == 201  # takes the position the orphan wanted
    report = await check_service(service)
    assert orphan in report["orphans"] and committed not in report["orphans"]
    repaired = await check_service(service, repair=True)
    assert any(step.get("pin node") == keeper_cid for step in repaired["repaired"])
    assert keeper_cid not in recursive_pins(kubo)
    assert kept(kubo, committed) and not kept(kubo, orphan)
    after = await check_service(service)
    assert after["orphans"] == [] and after["unpinned"] == []


async def test_another_gateway_moving_the_head_fails_only_what_was_chained_on_the_loser(aiohttp_client, kubo):
    """Two gateways on one head store append to one episode at once: each answer is a 201, a
    409 (the head moved under it) or a 503 (chained on a record that lost), the acknowledged
    records form one chain without a gap, and no record that failed stays pinned once settled."""
    from gateway.http.app import create_app
    cfg = gateway_config(kubo)
    first = await app_client(aiohttp_client, cfg)
    second = await aiohttp_client(create_app(cfg), headers=bearer(first.token))
    patient, episode = uid("p"), uid("e")
    r = await first.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
    assert r.status == 201
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
    print('STATUSES', sorted(__import__('collections').Counter(statuses).items()))
    chain = await _history(first, episode)
    assert [r["seq"] for r in chain] == list(range(len(chain)))
    assert {r["cid"]: r["seq"] for r in chain if r["seq"] > 0} == acked
    for service in (first.server.app[SERVICE], second.server.app[SERVICE]):
        await service.writer.close()  # the clean-ups of what failed are done
    report = await check_service(first.server.app[SERVICE])
    assert report["orphans"] == [] and report["unpinned"] == [] and report["missing"] == [], report


async def test_a_retry_of_a_request_still_in_flight_gets_its_answer(aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo))
    patient, episode = uid("p"), uid("e")
    first = await (await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))).json()
    doc = encounter(patient, episode, note="sent twice", prev=first["cid"], seq=1)
    answers = await asyncio.gather(*(c.post(f"/medicon/v1/episodes/{episode}/records", json=doc) for _ in range(4)))
    statuses = sorted(r.status for r in answers)
    bodies = [await r.json() for r in answers]
    assert statuses == [200, 200, 200, 201], bodies
    assert len({b["cid"] for b in bodies}) == 1 and len(await _history(c, episode)) == 2


async def test_per_record_pins_pin_every_record(aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo, **{"records.pin": "record"}))
    patient, episode = uid("p"), uid("e")
    await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
    answers = await asyncio.gather(*(c.post(f"/medicon/v1/episodes/{episode}/records",
                                            json=encounter(patient, episode, note=str(i))) for i in range(16)))
    cids = [(await r.json())["cid"] for r in answers]
    assert set(cids) <= recursive_pins(kubo)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_append_chain_moves_in_order_and_stops_at_the_first_loss(backend, tmp_path, request):
    """``HeadStore.append_chain`` on each backend: the moves before a lost compare-and-swap
    commit, the lost one says why, the ones after it are not tried."""
    if backend == "sqlite":
        from gateway.storage.sqlite import HEADS_SCHEMA, SQLiteDatabase, SQLiteHeadStore
        db = await SQLiteDatabase.open(tmp_path / "heads.sqlite3", HEADS_SCHEMA, name="head")
        heads, close = SQLiteHeadStore(db), db.close
    else:
        from gateway.storage.postgres import PostgresDatabase, PostgresHeadStore, migrate
        url = request.getfixturevalue("postgres_db")
        db = await PostgresDatabase.open(url, min_size=1, max_size=2)
        async with db.pool.acquire() as conn:
            await migrate(conn, "test")
        heads, close = PostgresHeadStore(db), db.close
    try:
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
        await close()
