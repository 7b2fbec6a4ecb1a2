"""The record service on its own: no web server, no HTTP, only a real Kubo and the configured
storage backend. What the HTTP surfaces do is this, mapped to their shapes."""

from __future__ import annotations

import pytest

from conftest import gateway_config
from gateway.core.access import Caller
from gateway.core.check import check_service
from gateway.core.records import ChainConflict, RecordInvalid
from gateway.core.service import RecordService
from gateway.errors import Erased, Forbidden, Invalid, MediconError, NotFound
from gateway.security.principal import Principal
from records_helpers import encounter, opened, uid

ADMIN = Caller(Principal("token:core-admin", "admin"), "req-admin", "test")


def scoped(role: str, patient: str) -> Caller:
    return Caller(Principal(f"token:{role}-{patient}", role, patients=frozenset({patient})), "req-scoped", "test")


@pytest.fixture
async def service(kubo):
    async with RecordService.open(gateway_config(kubo)) as opened_service:
        yield opened_service


async def test_append_read_history_verify_without_a_web_server(service):
    patient, episode = uid("p"), uid("e")
    first = await service.append(opened(patient, episode), ADMIN)
    assert first.created and first.seq == 0 and first.record["prev"] is None
    later = [await service.append(encounter(patient, episode, note=f"visit {i}"), ADMIN) for i in range(3)]
    assert [a.seq for a in later] == [1, 2, 3] and later[0].record["prev"] == first.cid
    assert all(b.record["prev"] == a.cid for a, b in zip(later, later[1:]))

    indexed, record = await service.record_for(ADMIN, later[1].cid)
    assert indexed.episode == episode and record["body"]["notes"] == "visit 1"
    found, rows, records = await service.history(ADMIN, episode, -1, 100)
    assert found.head == later[-1].cid and [r.cid for r in rows] == [first.cid] + [a.cid for a in later]
    assert [r["seq"] for r in records] == [0, 1, 2, 3]
    verdict = await service.verify(ADMIN, episode)
    assert verdict["ok"] is True and verdict["checked"] == 4

    report = await check_service(service)
    assert report["clean"] is True, report


async def test_failures_are_domain_errors_that_name_no_http_status(service):
    patient, episode = uid("p"), uid("e")
    first = await service.append(opened(patient, episode), ADMIN)
    await service.append(encounter(patient, episode), ADMIN)

    with pytest.raises(ChainConflict) as conflict:  # a stale prev: the episode moved on
        await service.append({**encounter(patient, episode), "prev": first.cid, "seq": 1}, ADMIN)
    assert conflict.value.episode.head != first.cid and conflict.value.episode.length == 2
    with pytest.raises(RecordInvalid) as invalid:
        await service.append({**encounter(patient, episode), "body": {"class": 7}}, ADMIN)
    assert invalid.value.details["problems"]
    with pytest.raises(NotFound):
        await service.history(ADMIN, uid("e"), -1, 10)
    for err in (conflict.value, invalid.value):
        assert isinstance(err, MediconError) and not hasattr(err, "status")


async def test_an_idempotent_retry_returns_the_original(service):
    patient, episode = uid("p"), uid("e")
    await service.append(opened(patient, episode), ADMIN)
    doc = encounter(patient, episode, note="once")
    original = await service.append(doc, ADMIN, idempotency_key="k-1")
    retried = await service.append(doc, ADMIN, idempotency_key="k-1")
    assert original.created and not retried.created and retried.cid == original.cid
    _, rows, _ = await service.history(ADMIN, episode, -1, 10)
    assert len(rows) == 2


async def test_a_scoped_caller_finds_nothing_outside_its_scope(service):
    mine, other = uid("p"), uid("p")
    for patient in (mine, other):
        await service.append(opened(patient, f"ep-of-{patient}"), ADMIN)
    theirs = await service.append(encounter(other, f"ep-of-{other}"), ADMIN)
    clinician = scoped("clinician", mine)

    with pytest.raises(NotFound):  # out of scope looks exactly like absent
        await service.record_for(clinician, theirs.cid)
    with pytest.raises(NotFound):
        await service.history(clinician, f"ep-of-{other}", -1, 10)
    with pytest.raises((Forbidden, NotFound)):
        await service.append(encounter(other, f"ep-of-{other}"), clinician)
    appended = await service.append(encounter(mine, f"ep-of-{mine}"), clinician)
    assert (await service.record_for(clinician, appended.cid))[1]["patient"] == mine


async def test_an_erased_patient_reads_as_erased(service):
    patient, episode = uid("p"), uid("e")
    await service.append(opened(patient, episode), ADMIN)
    record = await service.append(encounter(patient, episode, note="to be erased"), ADMIN)
    assert await service.keys.shred_patient(patient) >= 1
    with pytest.raises(Erased):
        await service.record_for(ADMIN, record.cid)
    with pytest.raises((Erased, Invalid)):
        await service.append(encounter(patient, episode), ADMIN)


async def test_a_history_page_or_a_verification_looks_up_its_patients_data_key_once_and_a_shredding_acts_on_the_next_page(service, monkeypatch):
    patient, episode = uid("p"), uid("e")
    await service.append(opened(patient, episode), ADMIN)
    for i in range(12):
        await service.append(encounter(patient, episode, note=f"visit {i}"), ADMIN)
    store = service.keys.store
    lookups = []
    real = store.key_by_id

    async def counted(dek_id):
        lookups.append(dek_id)
        return await real(dek_id)
    monkeypatch.setattr(store, "key_by_id", counted)
    _, rows, records = await service.history(ADMIN, episode, -1, 100)
    assert len(records) == 13 and records[-1]["body"]["notes"] == "visit 11"
    assert len(lookups) == 1, f"{len(lookups)} data-key lookups for one page of one patient"
    lookups.clear()
    assert (await service.verify(ADMIN, episode))["ok"] is True
    assert len(lookups) == 1, f"{len(lookups)} data-key lookups to verify one episode"
    assert await service.keys.shred_patient(patient) >= 1
    with pytest.raises(Erased):
        await service.history(ADMIN, episode, -1, 100)
