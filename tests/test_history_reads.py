"""A page of history, and an episode's verification, read from Kubo in one ``dag/export`` down
the ``prev`` links, and believed block by block: each block must hash to the CID the index
(or the record above it) names for its place, and what the stream does not give (a block Kubo
lacks, a chain that is not the index's) is read one block at a time as before — never left
out, never taken from elsewhere."""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter

import pytest

from conftest import gateway_config
from gateway.core.access import Caller
from gateway.core.check import check_service
from gateway.core.fhir_facade import FhirFacade
from gateway.core.service import RecordService
from gateway.errors import MediconError
from gateway.kubo import car, ipld
from gateway.security.principal import Principal
from records_helpers import BASE, encounter, opened, uid

ADMIN = Caller(Principal("token:history-admin", "admin"), "req-history", "test")


class KuboCalls(Counter):
    """The service's Kubo observer: how many calls of each command it made."""

    def kubo_call(self, command: str, seconds: float, error: str | None = None) -> None:
        self[command] += 1
        if error:
            self[f"{command} {error}"] += 1


async def _episode(service: RecordService, length: int) -> tuple[str, list[str]]:
    patient, episode = uid("p"), uid("e")
    cids = [(await service.append(opened(patient, episode), ADMIN)).cid]
    for i in range(1, length):
        cids.append((await service.append(encounter(patient, episode, note=f"visit {i}"), ADMIN)).cid)
    return episode, cids


def _counted(service: RecordService) -> KuboCalls:
    calls = KuboCalls()
    service.kubo.observer = calls
    return calls


@pytest.fixture
async def service(kubo):
    async with RecordService.open(gateway_config(kubo)) as opened_service:
        yield opened_service


async def test_a_page_of_history_is_one_kubo_call_whatever_its_length(service):
    episode, cids = await _episode(service, 14)
    for after, limit in ((2, 8), (-1, 14), (9, 100)):
        calls = _counted(service)
        _, rows, records = await service.history(ADMIN, episode, after, limit)
        wanted = list(range(after + 1, min(after + 1 + limit, 14)))
        assert [r.seq for r in rows] == wanted and [r.cid for r in rows] == cids[wanted[0]:wanted[-1] + 1]
        assert [r["seq"] for r in records] == wanted
        assert [r["body"]["notes"] for r in records if r["seq"] > 0] == [f"visit {s}" for s in wanted if s > 0]
        assert calls == {"dag/export": 1}, calls  # not one block/get per record


async def test_verifying_an_episode_is_one_kubo_stream_not_a_call_per_record(service):
    episode, cids = await _episode(service, 25)
    calls = _counted(service)
    verdict = await service.verify(ADMIN, episode)
    assert verdict["ok"] is True and verdict["checked"] == 25, verdict
    assert calls == {"dag/export": 1}, calls  # not one dag/get per record
    calls.clear()  # from a claimed head: the same stream, and the same verdict
    assert (await service.verify(ADMIN, episode, head=cids[-1]))["checked"] == 25
    assert calls == {"dag/export": 1}, calls


async def test_the_chain_read_keeps_only_the_blocks_that_hash_to_the_cids_asked_for(service):
    episode, cids = await _episode(service, 6)
    _, others = await _episode(service, 2)
    kubo = service.kubo
    singly = [await kubo.record_node(cid) for cid in cids]

    assert await kubo.record_chain(cids[::-1]) == singly[::-1]
    # the stream goes on down the chain; a CID that is not the next link ends what is believed
    assert await kubo.record_chain([cids[4], cids[3], others[0], cids[1]]) == [singly[4], singly[3]]
    assert await kubo.record_chain([cids[4], cids[2]]) == [singly[4]]
    # past the first record the stream ends: the rest is the caller's to read one by one
    assert await kubo.record_chain([cids[1], cids[0], others[1]]) == [singly[1], singly[0]]
    # a root Kubo does not have: nothing, at once (offline: no search of the network)
    calls = _counted(service)
    absent = await asyncio.wait_for(kubo.record_chain([ipld.cid_of(os.urandom(16)), cids[0]]), timeout=10)
    assert absent == [] and calls == {"dag/export": 1, "dag/export refused": 1}, calls


async def test_a_block_kubo_lost_mid_page_is_not_skipped(own_kubo):
    async with RecordService.open(gateway_config(own_kubo)) as service:
        episode, cids = await _episode(service, 9)
        kubo = service.kubo
        lost = cids[4]
        for line in (await kubo.call("pin/ls", [("type", "recursive"), ("stream", "true")])).splitlines():
            await kubo.call("pin/rm", [("arg", json.loads(line)["Cid"])])
        await kubo.call("block/rm", [("arg", lost)])

        newer = await kubo.record_chain(cids[8:2:-1])
        assert [node["seq"] for node in newer] == [8, 7, 6, 5]  # the stream stops at the lost block

        calls = _counted(service)
        with pytest.raises(MediconError) as failed:  # the page is not answered without seq 4
            await service.history(ADMIN, episode, 1, 6)
        assert "not found" in failed.value.message and lost in failed.value.message
        assert calls["dag/export"] == 1 and calls["block/get"] >= 1, calls
        _, rows, records = await service.history(ADMIN, episode, 4, 4)  # a page after it reads
        assert [r["seq"] for r in records] == [5, 6, 7, 8]

        calls.clear()  # verification reports the break where the block is, not a shorter chain
        verdict = await service.verify(ADMIN, episode)
        assert verdict["ok"] is False and verdict["checked"] == 4, verdict
        assert verdict["break"]["cid"] == lost and verdict["break"]["seq"] == 4
        assert "cannot be read from Kubo" in verdict["break"]["problem"]
        assert calls["dag/export"] == 1 and calls["dag/get"] == 1, calls

        calls.clear()  # `gateway check`: the lost block is missing; blocks the walk read are not asked again
        report = await check_service(service)
        assert report["missing"] == [{"cid": lost, "episode": episode, "seq": 4}], report
        assert [b["break"]["seq"] for b in report["broken"]] == [4] and report["clean"] is False
        assert calls["block/stat"] == 5, calls  # seqs 0-4: below the break, the walk read none of them


async def test_a_check_walks_each_chain_in_one_stream_and_asks_no_more_of_kubo(own_kubo):
    async with RecordService.open(gateway_config(own_kubo)) as service:
        for length in (6, 3, 1):
            await _episode(service, length)
        calls = _counted(service)
        report = await check_service(service)
        assert report["clean"] is True and report["records"] == 10, report
        assert service.plugins.pm.get_plugin("fhir_index") is not None  # its pass reads no chain again
        assert calls["dag/export"] == 3, calls  # a 1-record episode is its head alone: in the stream
        assert calls["block/stat"] == 0 and calls["dag/get"] == 0 and calls["block/get"] == 0, calls


def _counted_openings(service: RecordService, monkeypatch) -> Counter:
    """How many times each record node is opened (decrypted) by the service's sealer."""
    openings: Counter = Counter()
    from_node = service.sealer.from_node

    async def counted(node, *args, **kwargs):
        openings[(node.get("episode"), node.get("seq"))] += 1
        return await from_node(node, *args, **kwargs)
    monkeypatch.setattr(service.sealer, "from_node", counted)
    return openings


async def test_a_check_opens_each_record_once_and_checks_the_index_below_a_break(own_kubo, monkeypatch):
    """``gateway check``'s FHIR index pass takes the records the chain walks opened; only
    those no walk opened (below a break) are read and opened again, and their index entries
    are still checked."""
    async with RecordService.open(gateway_config(own_kubo)) as service:
        assert service.plugins.pm.get_plugin("fhir_index") is not None
        patient, episode = uid("p"), uid("e")
        cids = [(await service.append(opened(patient, episode), ADMIN)).cid]
        for i in range(1, 6):
            cids.append((await service.append(_with_observation(patient, episode, i), ADMIN)).cid)
        openings, calls = _counted_openings(service, monkeypatch), _counted(service)
        report = await check_service(service)
        assert report["clean"] is True and report["unindexed"] == [], report
        assert len(openings) == 6 and set(openings.values()) == {1}, openings
        assert calls["dag/export"] == 1 and calls["block/get"] == 0, calls

        facade = FhirFacade(service)
        assert await service.storage.fhir.erase_patient(facade.patient_pseudonym(patient)) == 5
        for line in (await service.kubo.call("pin/ls", [("type", "recursive"), ("stream", "true")])).splitlines():
            await service.kubo.call("pin/rm", [("arg", json.loads(line)["Cid"])])
        await service.kubo.call("block/rm", [("arg", cids[3])])
        openings.clear()
        report = await check_service(service)
        assert [b["break"]["seq"] for b in report["broken"]] == [3], report
        # seqs 5 and 4 opened by the walk, 2 and 1 (and the opening) read after it; 3 is lost
        assert sorted(report["unindexed"]) == sorted(cids[i] for i in (1, 2, 4, 5)), report
        assert sorted(seq for _, seq in openings) == [0, 1, 2, 4, 5] and set(openings.values()) == {1}, openings


def _with_observation(patient: str, episode: str, i: int) -> dict:
    return {"schema": f"{BASE}/encounter/v2", "patient": patient, "episode": episode, "author": "lab.central",
            "body": {"status": "finished", "class": {"code": "AMB"},
                     "fhir": [{"resourceType": "Observation", "id": f"o-{episode}-{i}", "status": "final",
                               "code": {"text": "weight"}, "valueString": f"{70 + i} kg"}]}}


async def test_a_patients_resources_are_read_a_chain_at_a_time(own_kubo):
    """``$everything`` and searches read an episode's run of records with one export; what
    is not in a run (another episode's single record) one block at a time."""
    async with RecordService.open(gateway_config(own_kubo)) as service:
        patient, episodes = uid("p"), [uid("e"), uid("e")]
        for episode, length in zip(episodes, (7, 2)):
            await service.append(opened(patient, episode), ADMIN)
            for i in range(1, length):
                await service.append(_with_observation(patient, episode, i), ADMIN)
        facade = FhirFacade(service)
        calls = _counted(service)
        page = await facade.everything(ADMIN, patient, [])
        wanted = {f"o-{episodes[0]}-{i}" for i in range(1, 7)} | {f"o-{episodes[1]}-1"}
        assert {found.id for found in page.found} >= wanted
        assert [json.loads(found.text)["valueString"] for found in page.found
                if found.id == f"o-{episodes[0]}-3"] == ["73 kg"]
        assert calls["dag/export"] == 1 and calls["block/get"] == 1, calls  # 6 records in a run; 1 alone

        calls.clear()
        found = await facade.search(ADMIN, "Observation", [("patient", patient)])
        assert {f.id for f in found.found} == wanted
        assert calls["dag/export"] == 1 and calls["block/get"] == 1, calls


class _Chunks:
    """A stream that hands out ``data`` ``size`` bytes at a time (how the reader sees a
    response arrive in pieces)."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data, self.size = data, size

    async def readany(self) -> bytes:
        part, self.data = self.data[:self.size], self.data[self.size:]
        return part


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _car(*sections: bytes) -> bytes:
    header = bytes.fromhex("a265726f6f747380") + b"gversion\x01"  # {"roots": [], "version": 1}
    return _varint(len(header)) + header + b"".join(_varint(len(s)) + s for s in sections)


CID = bytes.fromhex("01711220") + bytes(range(32))


async def _read(data: bytes, size: int, **kw) -> list[tuple[bytes, bytes]]:
    return [section async for section in car.blocks(_Chunks(data, size), **kw)]


@pytest.mark.parametrize("size", [1, 2, 7, 1 << 16])
async def test_the_car_reader_splits_sections_however_the_bytes_arrive(size):
    data = _car(CID + b"first", CID + b"", CID + b"x" * 300)
    assert await _read(data, size) == [(CID, b"first"), (CID, b""), (CID, b"x" * 300)]


async def test_the_car_reader_takes_a_block_of_any_size_kubo_stores_in_small_pieces():
    big = os.urandom(2 * 1024 * 1024)  # Kubo's largest block
    assert await _read(_car(CID + big, CID + b"after"), 4096) == [(CID, big), (CID, b"after")]


@pytest.mark.parametrize("data, problem", [
    (b"", "no CAR header"),
    (_car(CID + b"block")[:-2], "ends inside a section"),
    (_car(CID + b"block") + b"\x85", "ends inside a length"),
    (_car(bytes.fromhex("1220") + bytes(32) + b"v0 block"), "CIDv1"),
    (_car(CID[:20]), "cut inside its CID"),
    (_car(CID + b"x" * 100), "a section of"),
    (_car(CID) + b"\xff" * 9, "longer than any block"),
])
async def test_the_car_reader_refuses_what_is_not_a_car_it_accepts(data, problem):
    with pytest.raises(car.CarError, match=problem):
        await _read(data, 3, max_section=120)
