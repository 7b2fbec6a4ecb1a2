"""Nothing acknowledged is ever lost: races, crashes (SIGKILL), Kubo faults, SIGTERM drain,
garbage collection, and the `check` command."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from gateway.config import load_config
from gateway.kubo import ipld
from conftest import (CHAOS, storage_env, app_client, bearer, chaos_scale, gateway_config, new_data_dir, start_gateway,
                      trickle_body)
from records_helpers import encounter, opened, uid


async def _history(client_get, episode: str) -> list[dict]:
    records, cursor = [], None
    while True:
        url = f"/medicon/v1/episodes/{episode}/history?limit=500" + (f"&cursor={cursor}" if cursor else "")
        page = await client_get(url)
        records += page["records"]
        cursor = page["next"]
        if cursor is None:
            return records


def _assert_one_chain(records: list[dict]) -> None:
    assert [r["seq"] for r in records] == list(range(len(records))), "sequence not contiguous"
    for older, newer in zip(records, records[1:]):
        if newer["record"]["prev"] != older["cid"]:
            CHAOS["forks"] += 1
            raise AssertionError(f"fork at seq {newer['seq']}")


async def test_200_concurrent_appenders_over_20_episodes(aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo, **{"records.chain_policy": "strict"}))
    patient = uid("p")
    episodes = []
    for _ in range(20):
        ep = uid("e")
        r = await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, ep))
        episodes.append(ep)

    async def writer(i: int):
        ep = episodes[i % 20]
        head = (await (await c.get(f"/medicon/v1/episodes/{ep}")).json())["head"]
        r = await c.post(f"/medicon/v1/episodes/{ep}/records", json=encounter(patient, ep, note=f"w{i}", prev=head))
        return ep, r.status, await r.json()

    results = await asyncio.gather(*(writer(i) for i in range(chaos_scale(200))))
    acked = [(ep, body["cid"]) for ep, status, body in results if status == 201]
    losers = [body for _, status, body in results if status == 409]
    CHAOS["server_errors"] += sum(status >= 500 for _, status, _ in results)
    assert all(status in (201, 409) for _, status, _ in results)
    assert acked and losers, "expected both winners and losers under contention"
    assert all(body["error"]["current"]["head"] for body in losers)  # losers are told the head

    async def get(url):
        return await (await c.get(url)).json()
    CHAOS["acknowledged"] += len(acked)
    for ep in episodes:
        chain = await _history(get, ep)
        _assert_one_chain(chain)
        cids = {r["cid"] for r in chain}
        found = [cid for e, cid in acked if e == ep and cid in cids]
        CHAOS["found_after_recovery"] += len(found)
        assert len(found) == len([1 for e, _ in acked if e == ep])
        assert len(chain) == 1 + len(found)  # nothing but acknowledged appends


async def test_sigkill_mid_burst_never_loses_an_acknowledged_append(own_kubo):
    data_dir = new_data_dir()
    patient = uid("p")
    episodes = [uid("e") for _ in range(4)]
    acked: list[tuple[str, str, int]] = []
    server_errors = 0
    gw = start_gateway(own_kubo, data_dir=data_dir)
    async with aiohttp.ClientSession(headers=gw.headers) as s:
        for ep in episodes:
            async with s.post(f"{gw.url}/medicon/v1/patients/{patient}/episodes", json=opened(patient, ep)) as r:
                assert r.status == 201
    for round_ in range(chaos_scale(10)):
        if round_:
            gw = start_gateway(own_kubo, data_dir=data_dir)
        got_some = asyncio.Event()

        async def writer(i: int, session):
            nonlocal server_errors
            ep = episodes[i % len(episodes)]
            try:
                async with session.post(f"{gw.url}/medicon/v1/episodes/{ep}/records",
                                        json=encounter(patient, ep, note=f"r{round_}w{i}")) as r:
                    body = await r.json()
                    if r.status == 201:
                        acked.append((ep, body["cid"], body["seq"]))
                        if sum(1 for _ in acked) % 3 == 0:
                            got_some.set()
                    elif r.status >= 500:
                        server_errors += 1
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                pass  # the gateway died under this request: not acknowledged

        async with aiohttp.ClientSession(headers=gw.headers) as s:
            tasks = [asyncio.create_task(writer(i, s)) for i in range(40)]
            try:
                await asyncio.wait_for(got_some.wait(), 20)
            finally:
                gw.process.send_signal(signal.SIGKILL)
                await asyncio.gather(*tasks)
        gw.process.wait()

    CHAOS["acknowledged"] += len(acked)
    CHAOS["server_errors"] += server_errors
    gw = start_gateway(own_kubo, data_dir=data_dir)
    try:
        async with aiohttp.ClientSession(headers=gw.headers) as s:
            async def get(url):
                async with s.get(gw.url + url) as r:
                    return await r.json()
            found = 0
            for ep in episodes:
                chain = await _history(get, ep)
                _assert_one_chain(chain)
                present = {r["cid"]: r["seq"] for r in chain}
                for e, cid, seq in acked:
                    if e == ep:
                        assert present.get(cid) == seq, f"acknowledged {cid} lost"
                        found += 1
                        CHAOS["found_after_recovery"] += 1
                assert (await get(f"/medicon/v1/episodes/{ep}/verify"))["ok"] is True
    finally:
        assert gw.stop() == 0
    assert found == len(acked) > 0 and server_errors == 0

    orphan = await _orphan_of_a_lost_race(own_kubo, data_dir, patient, episodes)

    def check(*flags: str) -> tuple[subprocess.CompletedProcess, dict]:
        done = subprocess.run([sys.executable, "-m", "gateway", "check", *flags, "--data-dir", data_dir],
                              capture_output=True, text=True,
                              env={**os.environ, **storage_env(data_dir), "MEDICON_KUBO_API_URL": own_kubo.api_url,
                                   "MEDICON_KUBO_GATEWAY_URL": own_kubo.gateway_url,
                                   "MEDICON_KUBO_API_AUTH": own_kubo.api_secret})
        return done, json.loads(done.stdout)

    report, result = check()
    assert report.returncode == 0, report.stdout + report.stderr
    assert result["missing"] == [] and result["broken"] == [] and result["unpinned"] == []
    assert orphan in result["orphans"]  # what --repair is about to remove exists
    repaired, repair = check("--repair")
    assert repaired.returncode == 0 and {"unpinned": orphan} in repair["repaired"]
    _, after = check()
    assert after["orphans"] == [] and after["unpinned"] == []
    assert own_kubo.ipfs("pin", "ls", "--type=recursive", orphan, check=False).returncode != 0  # unpinned
    for _, cid, _ in acked:  # and every acknowledged record still pinned
        assert own_kubo.ipfs("pin", "ls", "--type=recursive", cid, check=False).returncode == 0, cid


async def _orphan_of_a_lost_race(kubo, data_dir: str, patient: str, episodes: list[str]) -> str:
    """What an append that crashed after Kubo stored its record, having lost its position to
    another writer, leaves behind: a signed record node, pinned, for a seq that is taken."""
    from gateway.core.service import RecordService
    cfg = load_config(env=storage_env(data_dir), overrides={
        "kubo.api_url": kubo.api_url, "kubo.gateway_url": kubo.gateway_url, "kubo.api_auth": kubo.api_secret,
        "records.data_dir": data_dir})
    async with RecordService.open(cfg) as service:
        for episode in episodes:  # one with a record after its opening
            found = await service.storage.heads.history(episode, -1, 2)
            if len(found) == 2:
                break
        [first, taken] = found
        record = {**encounter(patient, episode, note="lost the race"), "prev": first.cid, "seq": taken.seq,
                  "recorded_at": taken.recorded_at}
        node = await service.sealer.to_node(record, "token:crashed-writer")
        return await service.kubo.put_block(ipld.encode(node))


async def test_kubo_stopped_mid_burst(aiohttp_client, own_kubo):
    cfg = gateway_config(own_kubo, **{"kubo.connect_timeout": 1.0, "kubo.read_timeout": 2.0})
    c = await app_client(aiohttp_client, cfg)
    patient, ep = uid("p"), uid("e")
    await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, ep))
    acked, statuses = 0, []
    stopped = False
    t0 = time.monotonic()
    for i in range(30):
        if i == 10:
            await asyncio.to_thread(own_kubo.stop)
            stopped = True
        r = await c.post(f"/medicon/v1/episodes/{ep}/records", json=encounter(patient, ep, note=str(i)))
        statuses.append(r.status)
        if r.status == 201:
            acked += 1
        else:
            body = await r.json()
            assert r.status in (502, 503, 504) and body["error"]["message"], body
            assert stopped
    assert time.monotonic() - t0 < 30, "clients must not hang while Kubo is down"
    assert acked == 10 and statuses[10:] and all(s in (502, 503, 504) for s in statuses[10:])
    assert (await c.get("/readyz")).status == 503
    episode = await (await c.get(f"/medicon/v1/episodes/{ep}")).json()
    assert episode["length"] == 11  # heads moved only for acknowledged appends
    await asyncio.to_thread(own_kubo.start)
    r = await c.post(f"/medicon/v1/episodes/{ep}/records", json=encounter(patient, ep, note="after"))
    assert r.status == 201 and (await r.json())["seq"] == 11
    assert (await (await c.get(f"/medicon/v1/episodes/{ep}/verify")).json())["ok"] is True


async def test_faults_do_not_leak_file_descriptors(aiohttp_client, own_kubo):
    cfg = gateway_config(own_kubo, **{"kubo.connect_timeout": 1.0, "kubo.read_timeout": 0.5})
    c = await app_client(aiohttp_client, cfg)
    await c.post("/api/v0/version")
    before = len(os.listdir("/proc/self/fd"))
    os.kill(own_kubo.process.pid, signal.SIGSTOP)
    try:
        for _ in range(20):
            r = await c.post("/api/v0/version")
            assert r.status == 504
    finally:
        os.kill(own_kubo.process.pid, signal.SIGCONT)
    for _ in range(20):
        assert (await c.post("/api/v0/version")).status == 200
    await asyncio.sleep(0.2)
    after = len(os.listdir("/proc/self/fd"))
    assert after - before <= 5, f"{after - before} file descriptors leaked"


async def test_sigterm_drains_in_flight_writes(kubo):
    gw = start_gateway(kubo)
    size = 24 * 1024 * 1024

    async def slow_body():
        for _ in range(24):
            yield os.urandom(1024 * 1024)
            await asyncio.sleep(0.05)

    async with aiohttp.ClientSession(headers=gw.headers) as s:
        form = aiohttp.FormData()
        form.add_field("file", slow_body(), filename="slow.bin")
        upload = asyncio.create_task(s.post(f"{gw.url}/api/v0/add?progress=false", data=form))
        await asyncio.sleep(0.4)
        gw.process.send_signal(signal.SIGTERM)
        r = await upload
        assert r.status == 200, await r.text()
        line = json.loads((await r.text()).splitlines()[-1])
        assert line["Size"] and int(line["Size"]) >= size
    assert await asyncio.to_thread(gw.process.wait, 30) == 0


async def test_repo_gc_on_kubo_never_removes_acknowledged_records(client, kubo):
    patient, ep = uid("p"), uid("e")
    await client.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, ep))
    cids = []
    for i in range(5):
        r = await client.post(f"/medicon/v1/episodes/{ep}/records", json=encounter(patient, ep, note=str(i)))
        cids.append((await r.json())["cid"])
    kubo.ipfs("repo", "gc")
    for cid in cids:
        assert (await client.get(f"/medicon/v1/records/{cid}")).status == 200
    assert (await (await client.get(f"/medicon/v1/episodes/{ep}/verify")).json())["ok"] is True


async def test_trickling_client_is_cut_off(aiohttp_client, kubo):
    """A client that sends its body a byte a second gets 408, and holds no worker for long."""
    cfg = gateway_config(kubo, **{"server.body_timeout": 1.0})
    c = await app_client(aiohttp_client, cfg)
    host, port = c.server.host, c.server.port
    t0 = time.monotonic()
    answer = await trickle_body(host, port, f"POST /api/v0/block/put HTTP/1.1\r\nHost: x\r\n"
                                f"Authorization: Bearer {c.token}\r\nContent-Type: multipart/form-data; boundary=b\r\n",
                                b"--b\r\n", 100)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - t0 < 6


async def test_over_the_concurrency_limit_503_with_retry_after(aiohttp_client, own_kubo):
    from gateway.http.app import INFLIGHT
    cfg = gateway_config(own_kubo, **{"server.max_concurrent_requests": 2, "kubo.read_timeout": 3.0})
    c = await app_client(aiohttp_client, cfg)
    inflight = c.server.app[INFLIGHT]

    async def until(condition) -> None:
        async with asyncio.timeout(10):
            while not condition():
                await asyncio.sleep(0.01)

    os.kill(own_kubo.process.pid, signal.SIGSTOP)  # two requests hang on a paused Kubo
    try:
        hanging = [asyncio.create_task(c.post("/api/v0/version")) for _ in range(2)]
        await until(lambda: inflight.count == 2)
        r = await c.post("/api/v0/version")
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert (await r.json())["Type"] == "error"
        assert (await c.get("/healthz")).status == 200  # probes are never turned away
    finally:
        os.kill(own_kubo.process.pid, signal.SIGCONT)
    for t in hanging:
        await t
    await until(lambda: inflight.count == 0)  # the two are done on the server's side too
    assert (await c.post("/api/v0/version")).status == 200
