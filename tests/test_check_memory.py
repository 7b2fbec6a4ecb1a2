"""``gateway check`` holds what one episode needs and a piece of Kubo's list of pins at a time,
never the whole index or the whole list: a deployment of millions of records is checked in the
memory of its longest episode. (It used to hold every indexed record, every recursive pin and
every CID its walks read: about 1.3 kB per record, 1.3 GB for a million.)

Measured with ``tracemalloc``: the most a pass of the check held above what was held when the
check began, the check run once before on the same records (so that the caches it fills are
full already). The passes are told apart by the check's own progress reports: the records pass
ends with its last ``records`` report, the pins pass with the check."""

from __future__ import annotations

import gc
import os
import tracemalloc

from conftest import gateway_config
from gateway.core.access import Caller
from gateway.core import chain, check
from gateway.core.check import check_service
from gateway.core.records import normalise
from gateway.core.service import RecordService
from gateway.kubo import ipld
from gateway.security.principal import Principal
from records_helpers import encounter, opened, uid

ADMIN = Caller(Principal("token:check-memory", "admin"), "req-check-memory", "test")
LENGTH = 25  # records per episode: the same throughout, so only the number of episodes changes


async def _episodes(service: RecordService, count: int) -> list[tuple[str, str]]:
    made = []
    for _ in range(count):
        patient, episode = uid("p"), uid("e")
        await service.append(opened(patient, episode), ADMIN)
        for i in range(1, LENGTH):
            await service.append(encounter(patient, episode, note=f"visit {i}"), ADMIN)
        made.append((patient, episode))
    return made


async def _held_by_pass(service: RecordService) -> dict[str, int]:
    """Bytes each pass of a check held at most while it ran: ``records`` and ``pins``."""
    await check_service(service)  # fills the caches (CIDs parsed, URLs) with these records
    held: dict[str, int] = {}

    def progress(phase: str, done: int, total: int) -> None:
        if phase == "records" and done == total:
            held["records"] = tracemalloc.get_traced_memory()[1] - start
            tracemalloc.reset_peak()

    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        report = await check_service(service, progress=progress)
        held["pins"] = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert report["clean"] is True and report["records"] > 0, report
    return held


async def test_the_records_pass_holds_no_more_for_four_times_the_records(own_kubo):
    async with RecordService.open(gateway_config(own_kubo)) as service:
        await _episodes(service, 10)
        small = (await _held_by_pass(service))["records"]
        await _episodes(service, 30)  # four times the records, in episodes of the same length
        large = (await _held_by_pass(service))["records"]
        # Holding each record for the whole pass adds ~0.7 MB here; the episodes' list (kept
        # for the pass) and the pages read a few kB.
        assert large < small + 150_000, (small, large)


async def test_the_pins_pass_reads_kubos_list_a_piece_at_a_time(own_kubo):
    async with RecordService.open(gateway_config(own_kubo)) as service:
        await _episodes(service, 4)
        few = (await _held_by_pass(service))["pins"]
        for _ in range(8):  # 4,000 more recursive pins: raw blocks, as attachments' leaves are
            await service.kubo.call("block/put", [("pin", "true")], files=[os.urandom(32) for _ in range(500)])
        many = (await _held_by_pass(service))["pins"]
        # Holding the list whole (the answer, then a set of its CIDs) adds ~0.8 MB here; read a
        # piece at a time it adds at most what Kubo's answer fills of the buffers (aiohttp's
        # and the parser's: ~0.3 MB, whatever the length of the list).
        assert many < few + 400_000, (few, many)


async def test_records_unpinned_among_pinned_ones_are_each_found_page_by_page(own_kubo):
    """Pins are asked a hundred records at a time, and Kubo fails such a call at the first
    record that is not pinned: each unpinned record is still found, none of the pinned ones
    is reported, and ``--repair`` pins exactly those."""
    async with RecordService.open(gateway_config(own_kubo)) as service:
        await _episodes(service, 6)  # 150 records: pages of an episode, calls of a hundred
        heads = service.storage.heads
        pages = [await heads.history(e.id, -1, LENGTH) for e in await heads.episodes_after("", 10)]  # check's order
        records = [r.cid for page in pages for r in page]
        unpinned = [records[i] for i in (3, 4, 61, 149)]  # neighbours, and in different calls
        for cid in unpinned:
            assert await service.kubo.pin_rm(cid)
        report = await check_service(service)
        assert report["unpinned"] == unpinned and report["missing"] == [] and not report["clean"], report
        repaired = await check_service(service, repair=True)
        assert [r["pinned"] for r in repaired["repaired"]] == unpinned and repaired["clean"], repaired
        assert await service.kubo.pinned_among(records) == set(records)
        assert (await check_service(service))["unpinned"] == []


async def test_the_index_says_which_of_many_cids_it_holds(own_kubo):
    """``indexed_among`` answers for more CIDs than one SQL statement binds, and for CIDs it
    never held (any text: a pin's CID is Kubo's word, not the gateway's)."""
    async with RecordService.open(gateway_config(own_kubo)) as service:
        await _episodes(service, 1)
        [episode] = await service.storage.heads.episodes_after("", 2)
        held = [r.cid for r in await service.storage.heads.history(episode.id, -1, LENGTH)]
        strangers = [f"bafyrei{i:052d}" for i in range(1200)] + ["", "not a cid", "x" * 5000]
        asked = strangers[:700] + held + strangers[700:]
        assert await service.storage.heads.indexed_among(asked) == set(held)
        assert await service.storage.heads.indexed_among([]) == set()


async def _stored_not_appended(service: RecordService, doc: dict, episode: str | None) -> str:
    """A signed record node for ``doc``, linked to ``episode`` as it stands now (None: as an
    opening), stored and pinned, its head never moved: what a gateway killed between the two
    leaves behind."""
    current = None if episode is None else await service.storage.heads.get_episode(episode)
    record = chain.link(normalise(doc), current, service._policy_for(doc["schema"]))
    return await service.kubo.put_block(ipld.encode(await service.sealer.to_node(record, "token:crashed")))


async def test_nodes_the_index_lacks_are_placed_by_their_episode_across_pages(own_kubo, monkeypatch):
    """A pinned record node the index does not hold names its episode by pseudonym only: found
    through the record its ``prev`` links, or (an opening) by one pass over the episodes. With
    pages of two, every pass of the check crosses pages."""
    monkeypatch.setattr(check, "PAGE", 2)
    async with RecordService.open(gateway_config(own_kubo)) as service:
        made = sorted(await _episodes(service, 5), key=lambda pair: pair[1])  # the check's order, by id
        (p1, e1), (p2, e2) = made[0], made[-1]  # on its first page, and on its last
        # the only node of its episode here, an opening: placed by the pass over the episodes
        reopened = await _stored_not_appended(service, opened(p2, e2), None)
        # placed through the record their prev links
        stale = await _stored_not_appended(service, encounter(p1, e1, note="crashed"), e1)
        await service.append(encounter(p1, e1, note="took its place"), ADMIN)  # so `stale` lost its position
        waiting = await _stored_not_appended(service, encounter(p1, e1, note="about to move the head"), e1)
        unopened = await _stored_not_appended(service, opened(p1, uid("e")), None)  # an episode not created yet
        report = await check_service(service)
        assert report["episodes"] == 5 and report["records"] == 5 * LENGTH + 1, report
        assert report["orphans"] == sorted([reopened, stale]), report
        assert report["pending"] == sorted([waiting, unopened]), report
        assert report["clean"] is True and report["missing"] == report["unpinned"] == report["broken"] == []
