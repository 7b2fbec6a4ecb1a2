"""A read's audit event is written while the read goes on (its call to Kubo overlaps the audit
log's fsync), but no answer starts before the event is stored: on every surface, an audit log
that cannot take the event turns the read into an error that carries none of the content. A
write is audited before it is made: an append's event is written while its record is sealed
and stored in Kubo, and its head moves only once the event is stored."""

from __future__ import annotations

import asyncio
import io
import sys
import textwrap
import time

import pytest

from conftest import app_client, gateway_config
from gateway.http.appkeys import SERVICE
from records_helpers import encounter, opened, uid

GATE = '''
import asyncio
from gateway.errors import Unavailable
from gateway.hookspecs import hookimpl

# mode: None (pass), "fail" (the event cannot be stored), "hold" (stored once released),
# "hold_first" (only the first gated event held; with then_fail, it then cannot be stored);
# actions: which allowed actions are gated (by suffix).
STATE = {"mode": None, "actions": (":read",), "held": None, "released": None, "gated": [], "then_fail": False}


@hookimpl
async def medicon_audit_event(event, service):
    if STATE["mode"] is None or event["decision"] != "allow":
        return
    if not event["action"].endswith(STATE["actions"]):
        return
    STATE["gated"].append(event["action"])
    if STATE["mode"] == "fail":
        raise Unavailable("the audit store is unreachable")
    if STATE["mode"] == "hold_first" and len(STATE["gated"]) > 1:
        return  # only the first gated event is held
    STATE["held"].set()
    await STATE["released"].wait()
    if STATE.get("then_fail"):
        raise Unavailable("the audit store is unreachable")
'''


@pytest.fixture
def audit_gate(tmp_path, monkeypatch):
    (tmp_path / "audit_gate.py").write_text(textwrap.dedent(GATE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import audit_gate
    yield audit_gate
    sys.modules.pop("audit_gate", None)


async def _setup(aiohttp_client, kubo, audit_gate, **overrides):
    """A gateway with the gate loaded, a raw blob, a record and its episode to read."""
    c = await app_client(aiohttp_client, gateway_config(kubo, **{"plugins.modules": ["audit_gate"], **overrides}))
    content = b"raw bytes the caller may read only once the read is audited " + uid("n").encode()
    r = await c.post("/api/v0/add", data={"file": io.BytesIO(content)})
    assert r.status == 200, await r.text()
    raw = (await r.json())["Hash"]
    patient, episode = uid("p"), uid("e")
    assert (await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))).status == 201
    r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode, note="marker-for-the-audit-test"))
    assert r.status == 201, await r.text()
    record = (await r.json())["cid"]
    return c, content, raw, record, episode, patient


def _reads(raw: str, record: str, episode: str) -> list[tuple[str, str, str]]:
    """(what, method, path): every way in that reads content, streamed from Kubo or answered whole."""
    return [
        ("rpc cat (streamed)", "POST", f"/api/v0/cat?arg={raw}"),
        ("rpc block/get (streamed)", "POST", f"/api/v0/block/get?arg={raw}"),
        ("/ipfs path (streamed)", "GET", f"/ipfs/{raw}"),
        ("record by /ipfs (whole)", "GET", f"/ipfs/{record}"),
        ("record by REST (whole)", "GET", f"/medicon/v1/records/{record}"),
        ("rpc cat of a record (whole)", "POST", f"/api/v0/cat?arg={record}"),
        ("episode history (whole)", "GET", f"/medicon/v1/episodes/{episode}/history"),
    ]


async def test_a_read_whose_audit_event_cannot_be_stored_is_refused_on_every_surface(aiohttp_client, kubo, audit_gate):
    c, content, raw, record, episode, patient = await _setup(aiohttp_client, kubo, audit_gate)
    for what, method, path in _reads(raw, record, episode):
        audit_gate.STATE.update(mode=None)
        r = await c.request(method, path)
        assert r.status == 200, (what, r.status, await r.text())
        audit_gate.STATE.update(mode="fail", gated=[])
        r = await c.request(method, path)
        body = await r.read()
        assert r.status in (502, 503), (what, r.status, body[:300])  # the surface's "unavailable"
        assert audit_gate.STATE["gated"], f"{what}: no read was audited"
        assert content not in body and b"marker-for-the-audit-test" not in body, what
        assert b"audit store is unreachable" in body, (what, body[:300])


async def test_a_streamed_read_asks_kubo_while_its_audit_event_is_written_and_answers_after(aiohttp_client, kubo, audit_gate):
    c, content, raw, record, episode, patient = await _setup(aiohttp_client, kubo, audit_gate)
    for label, method, path in (("cat", "POST", f"/api/v0/cat?arg={raw}"), ("gateway:ipfs", "GET", f"/ipfs/{raw}")):
        asked = _kubo_calls(c, label)
        audit_gate.STATE.update(mode="hold", held=asyncio.Event(), released=asyncio.Event(), gated=[])
        reading = asyncio.ensure_future(c.request(method, path))
        await asyncio.wait_for(audit_gate.STATE["held"].wait(), 10)
        deadline = time.monotonic() + 10
        while _kubo_calls(c, label) == asked:  # Kubo answers while the event is still being written
            assert time.monotonic() < deadline, f"{label}: Kubo was not asked before the audit event was stored"
            await asyncio.sleep(0.005)
        assert not reading.done(), f"{label}: the answer started before its audit event was stored"
        audit_gate.STATE["released"].set()
        r = await asyncio.wait_for(reading, 10)
        assert r.status == 200 and await r.read() == content, label


def _kubo_calls(c, command: str) -> float:
    """How many calls to Kubo the gateway has finished for ``command`` (its own metrics)."""
    registry = c.server.app[SERVICE].metrics.registry
    value = registry.get_sample_value("medicon_kubo_call_duration_seconds_count", {"command": command})
    return value or 0.0


def _recursive_pins(kubo) -> set[str]:
    """Kubo's recursive pins, asked of Kubo itself (not through the gateway)."""
    import requests
    r = requests.post(f"{kubo.api_url}/api/v0/pin/ls", params={"type": "recursive"},
                      headers=kubo.rpc_headers, timeout=30)
    r.raise_for_status()
    return set(r.json()["Keys"])


@pytest.mark.parametrize("pipeline", [False, True], ids=["serial", "pipelined"])
async def test_a_write_whose_audit_event_cannot_be_stored_is_not_made(aiohttp_client, kubo, audit_gate, pipeline):
    c, content, raw, record, episode, patient = await _setup(aiohttp_client, kubo, audit_gate,
                                                             **{"records.pipeline": pipeline})
    before = (await (await c.get(f"/medicon/v1/episodes/{episode}")).json())["length"]
    pins = _recursive_pins(kubo)
    for path, doc in ((f"/medicon/v1/episodes/{episode}/records", encounter(patient, episode, note="never stored")),
                      (f"/medicon/v1/patients/{patient}/episodes", opened(patient, uid("e")))):
        audit_gate.STATE.update(mode="fail", actions=(":write",), gated=[])
        r = await c.post(path, json=doc)
        assert r.status in (502, 503), await r.text()
        assert "audit store is unreachable" in (await r.json())["error"]["message"]
        assert audit_gate.STATE["gated"] == ["record:write"]
    audit_gate.STATE.update(mode=None)
    after = (await (await c.get(f"/medicon/v1/episodes/{episode}")).json())["length"]
    assert after == before
    assert len((await (await c.get(f"/medicon/v1/patients/{patient}/episodes")).json())["episodes"]) == 1
    assert _recursive_pins(kubo) - pins == set(), "a record block stored for an unaudited append kept its pin"


@pytest.mark.parametrize("pipeline", [False, True], ids=["serial", "pipelined"])
async def test_an_append_is_stored_in_kubo_while_its_audit_event_is_written_and_commits_after(
        aiohttp_client, kubo, audit_gate, pipeline):
    c, content, raw, record, episode, patient = await _setup(aiohttp_client, kubo, audit_gate,
                                                             **{"records.pipeline": pipeline})
    before = (await (await c.get(f"/medicon/v1/episodes/{episode}")).json())["length"]
    stored = _kubo_calls(c, "block/put")
    audit_gate.STATE.update(mode="hold", actions=(":write",), held=asyncio.Event(), released=asyncio.Event(), gated=[])
    writing = asyncio.ensure_future(c.post(f"/medicon/v1/episodes/{episode}/records",
                                           json=encounter(patient, episode, note="held")))
    await asyncio.wait_for(audit_gate.STATE["held"].wait(), 10)
    deadline = time.monotonic() + 10
    while _kubo_calls(c, "block/put") == stored:  # the record goes to Kubo while its event is written
        assert time.monotonic() < deadline, "the record was not stored before its audit event was"
        await asyncio.sleep(0.005)
    head = c.server.app[SERVICE].storage.heads
    assert (await head.get_episode(episode)).length == before, "the head moved before the append was audited"
    assert not writing.done()
    audit_gate.STATE["released"].set()
    r = await asyncio.wait_for(writing, 10)
    assert r.status == 201, await r.text()
    assert (await head.get_episode(episode)).length == before + 1


async def _until(condition, what: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


async def _two_appends_the_first_held(aiohttp_client, kubo, audit_gate, *, mode: str, then_fail: bool, notes):
    """A pipelined gateway; two appends to one episode, the second sent once the first's audit
    event is held, both stored in Kubo (pinned) before anything is released. Returns the
    client, the episode before, the pins before, and the two requests under way."""
    c, content, raw, record, episode, patient = await _setup(aiohttp_client, kubo, audit_gate,
                                                             **{"records.pipeline": True})
    before = await c.server.app[SERVICE].storage.heads.get_episode(episode)
    pins = _recursive_pins(kubo)
    audit_gate.STATE.update(mode=mode, actions=(":write",), held=asyncio.Event(), released=asyncio.Event(),
                            gated=[], then_fail=then_fail)
    # Both appends queue behind the test's turn of the episode, so the first finds the second
    # waiting and is pipelined (alone, it would take the serial path).
    service = c.server.app[SERVICE]
    async with service.locks.turn(episode):
        first = asyncio.ensure_future(c.post(f"/medicon/v1/episodes/{episode}/records",
                                             json=encounter(patient, episode, note=notes[0])))
        await asyncio.wait_for(audit_gate.STATE["held"].wait(), 10)
        second = asyncio.ensure_future(c.post(f"/medicon/v1/episodes/{episode}/records",
                                              json=encounter(patient, episode, note=notes[1])))
        await _until(lambda: service.locks.queued(episode) == 3, "the two appends did not queue for the episode")
    await _until(lambda: len(_recursive_pins(kubo) - pins) == 2, "both records were not stored while audited")
    return c, before, pins, first, second


async def test_pipelined_appends_chained_on_one_whose_audit_is_held_are_stored_but_commit_after_it(
        aiohttp_client, kubo, audit_gate):
    c, before, pins, first, second = await _two_appends_the_first_held(
        aiohttp_client, kubo, audit_gate, mode="hold", then_fail=False, notes=("first, held", "second, chained on it"))
    head = c.server.app[SERVICE].storage.heads
    assert (await head.get_episode(before.id)).length == before.length, "a head moved before its append was audited"
    assert not first.done() and not second.done()
    audit_gate.STATE["released"].set()
    one, two = await asyncio.wait_for(first, 10), await asyncio.wait_for(second, 10)
    assert one.status == 201 and two.status == 201, (await one.text(), await two.text())
    one, two = await one.json(), await two.json()
    assert one["record"]["prev"] == before.head and two["record"]["prev"] == one["cid"]
    assert (await head.get_episode(before.id)).length == before.length + 2


async def test_a_pipelined_append_whose_audit_fails_is_not_made_and_the_one_chained_on_it_links_again(
        aiohttp_client, kubo, audit_gate):
    c, before, pins, first, second = await _two_appends_the_first_held(
        aiohttp_client, kubo, audit_gate, mode="hold_first", then_fail=True,
        notes=("never audited", "chained on it, then again"))
    audit_gate.STATE["released"].set()
    one, two = await asyncio.wait_for(first, 10), await asyncio.wait_for(second, 10)
    assert one.status in (502, 503), await one.text()
    assert "audit store is unreachable" in (await one.json())["error"]["message"]
    assert two.status == 201, await two.text()
    two = await two.json()
    assert two["record"]["prev"] == before.head, "the second append kept the unaudited record as its prev"
    assert (await c.server.app[SERVICE].storage.heads.get_episode(before.id)).length == before.length + 1
    # the unaudited record's block and the second's first linking lose their pins
    await _until(lambda: _recursive_pins(kubo) - pins == {two["cid"]}, "a block of an append that did not "
                 f"commit kept its pin: {_recursive_pins(kubo) - pins}")
