"""Nothing acknowledged is lost at the Kubo edge: full disks (Kubo's and the gateway's), check
--repair while gateways write, the same Idempotency-Key in flight twice, clock-skewed writers,
and a block store that fsyncs.

The full-disk tests mount small tmpfs volumes (the suite runs as root); where mounting is not
possible they are skipped, saying why.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import CHAOS, app_client, bearer, chaos_scale, gateway_config, start_gateway, store_sql
from gateway.config import load_config
from gateway.core.check import check
from gateway.kubo import ipld
from gateway.kubo.node import KuboNode
from gateway.security.keyring import LocalKeyring
from records_helpers import encounter, opened, uid

MiB = 1 << 20


# --- helpers -------------------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(size: int):
    """A tmpfs of ``size`` bytes mounted on a fresh directory, unmounted afterwards; the test is
    skipped (with the reason) where this process may not mount."""
    where = Path(tempfile.mkdtemp(prefix="medicon-tmpfs-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs to fill (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
        shutil.rmtree(where, ignore_errors=True)


@contextlib.contextmanager
def kubo_on_a_small_disk(size: int):
    """A Kubo node whose repository is on a tmpfs of ``size`` bytes: (the volume, the node)."""
    with tmpfs(size) as volume:
        node = KuboNode(volume / "repo")
        node.start()
        try:
            yield volume, node
        finally:
            node.stop()


def kubo_keeps_its_write_error(node: KuboNode) -> bool:
    """Whether Kubo, asked directly, still cannot store and pin a small block (then it is
    Kubo's own state, not the gateway's, that refuses writes)."""
    done = node.ipfs("block", "put", "--pin=true", input=os.urandom(64), check=False)
    if done.returncode != 0:
        return True
    node.ipfs("pin", "rm", done.stdout.decode().strip())
    return False


def fill(volume: Path, leave: int) -> Path:
    """Fill ``volume`` with a file of zeros until it is full, then give back ``leave`` bytes.
    Returns the file: removing it frees the space again."""
    filler = volume / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = b"\0" * MiB
        while True:
            try:
                os.write(fd, chunk)
            except OSError:
                if len(chunk) == 4096:
                    break
                chunk = chunk[:4096]
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return filler


def recursive_pins(node: KuboNode) -> set[str]:
    out = node.ipfs("pin", "ls", "--type=recursive", "--quiet").stdout.decode().split()
    return set(out)


def record_pins_not_indexed(node: KuboNode, indexed: set[str]) -> set[str]:
    """Pinned dag-cbor nodes the gateway's index does not hold (record nodes are the only
    dag-cbor nodes these tests pin)."""
    return {cid for cid in recursive_pins(node) if cid.startswith("bafyrei")} - indexed


async def history(session: aiohttp.ClientSession, base: str, episode: str) -> list[dict]:
    records, cursor = [], None
    while True:
        url = f"{base}/medicon/v1/episodes/{episode}/history?limit=500" + (f"&cursor={cursor}" if cursor else "")
        async with session.get(url) as r:
            assert r.status == 200, await r.text()
            page = await r.json()
        records += page["records"]
        cursor = page["next"]
        if cursor is None:
            return records


class Tally:
    """Answers by status; 507s are expected while a disk is full and counted apart from 5xx."""

    def __init__(self) -> None:
        self.statuses: collections.Counter = collections.Counter()
        self.messages: collections.Counter = collections.Counter()

    def add(self, status: int, message: str = "") -> None:
        self.statuses[status] += 1
        if status >= 400:
            self.messages[(status, message[:160])] += 1

    def report_chaos(self) -> None:
        CHAOS["storage_full"] = CHAOS.get("storage_full", 0) + self.statuses[507]
        CHAOS["server_errors"] += sum(n for s, n in self.statuses.items() if s >= 500 and s != 507)


def error_message(body: dict) -> str:
    return body.get("error", {}).get("message") or body.get("Message") or ""


async def verify_all(session: aiohttp.ClientSession, base: str, episodes: list[str], acked: dict[str, str]) -> None:
    """Every acknowledged record is in its episode's chain, readable, and every chain verifies."""
    found = 0
    for episode in episodes:
        chain = await history(session, base, episode)
        assert [r["seq"] for r in chain] == list(range(len(chain)))
        for older, newer in zip(chain, chain[1:]):
            if newer["record"]["prev"] != older["cid"]:
                CHAOS["forks"] += 1
                raise AssertionError(f"fork in {episode} at seq {newer['seq']}")
        cids = {r["cid"] for r in chain}
        mine = [cid for cid, ep in acked.items() if ep == episode]
        lost = [cid for cid in mine if cid not in cids]
        assert not lost, f"acknowledged records lost from {episode}: {lost[:3]}"
        found += len(mine)
        async with session.get(f"{base}/medicon/v1/episodes/{episode}/verify") as r:
            verdict = await r.json()
        assert verdict["ok"] is True, verdict
    CHAOS["acknowledged"] += len(acked)
    CHAOS["found_after_recovery"] += found


# --- 1. Kubo's disk fills mid-burst --------------------------------------------------------------

async def test_kubo_repo_filling_mid_burst_acknowledges_only_what_it_stored(aiohttp_client):
    """64 writers over 8 episodes while Kubo's repository (a small tmpfs) fills: every answer
    is a 201 for a record Kubo holds and has pinned, or a 507 saying Kubo's repository is full;
    no chain ever links to a block that is not there, and writes resume once space is freed."""
    with kubo_on_a_small_disk(48 * MiB) as (volume, node):
        cfg = gateway_config(node)
        c = await app_client(aiohttp_client, cfg)
        patient = uid("p")
        episodes = [uid("e") for _ in range(8)]
        for ep in episodes:
            r = await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, ep))
            assert r.status == 201, await r.text()
        filler = fill(volume, leave=2 * MiB)
        acked: dict[str, str] = {}
        tally = Tally()
        full_seen = asyncio.Event()

        async def writer(i: int) -> None:
            ep = episodes[i % len(episodes)]
            for n in range(chaos_scale(12)):
                r = await c.post(f"/medicon/v1/episodes/{ep}/records",
                                 json=encounter(patient, ep, note=f"w{i}n{n}" + "x" * 900))
                body = await r.json()
                tally.add(r.status, error_message(body))
                if r.status == 201:
                    acked[body["cid"]] = ep
                else:
                    full_seen.set()

        async def attachments() -> list[tuple[int, str | None]]:
            """Attachments added while the disk fills: complete answers only for stored roots."""
            out = []
            for n in range(chaos_scale(8)):
                form = aiohttp.FormData()  # two files: the second may find the disk full
                for k in range(2):
                    form.add_field("file", os.urandom(400_000), filename=f"scan-{n}-{k}.bin")
                # sealed attachments of the patient, and raw files, alternately
                headers = {"X-Medicon-Patient": patient} if n % 2 == 0 else {}
                try:
                    r = await c.post("/api/v0/add", data=form, headers=headers)
                    text = await r.text()
                except aiohttp.ClientPayloadError:
                    out.append((-1, []))  # aborted: the client knows it failed
                    continue
                tally.add(r.status, text if r.status != 200 else "")
                roots = [json.loads(line)["Hash"] for line in text.splitlines()] if r.status == 200 else []
                if r.status == 200:
                    assert len(roots) == 2, text
                out.append((r.status, roots))
            return out

        added, *_ = await asyncio.gather(attachments(), *(writer(i) for i in range(64)))
        assert full_seen.is_set() and acked, f"the disk never filled, or nothing fitted: {tally.statuses}"
        assert set(tally.statuses) <= {200, 201, 507}, tally.messages
        assert all("Kubo's repository is full" in m for (s, m) in tally.messages if s == 507), tally.messages

        # every acknowledged record and attachment is in Kubo's blockstore and pinned
        pins = recursive_pins(node)
        assert set(acked) <= pins, "an acknowledged record is not pinned"
        for status, roots in added:
            if status == 200:
                assert set(roots) <= pins, "an add that completed left a root unpinned"
        assert record_pins_not_indexed(node, set(acked) | await _indexed(c)) == set(), \
            "a record node pinned by a failed append was left behind"

        filler.unlink()  # space again: writes resume without restarting the gateway
        if kubo_keeps_its_write_error(node):
            # Kubo's pin store (leveldb) may keep the error a write met on the full disk until
            # Kubo restarts (README, Reliability): shown on Kubo itself, bypassing the gateway.
            node.stop()
            node.start()
            CHAOS["kubo_restarts"] += 1
        for ep in episodes:
            r = await c.post(f"/medicon/v1/episodes/{ep}/records", json=encounter(patient, ep, note="after"))
            assert r.status == 201, await r.text()
            acked[(await r.json())["cid"]] = ep
        session = c.session
        base = str(c.make_url("")).rstrip("/")
        await verify_all(session, base, episodes, acked)
        report = await check(cfg)
        assert report["missing"] == [] and report["broken"] == [] and report["unpinned"] == [], report
        tally.report_chaos()


async def test_an_add_failing_after_kubo_answered_never_completes_for_the_client(aiohttp_client):
    """Kubo answers an add's first file, then runs out of space on the second: the failure is
    only in a trailer. The client's answer is cut off (never a complete answer without the
    second root), and the sealed first file is neither indexed nor left pinned."""
    with kubo_on_a_small_disk(48 * MiB) as (volume, node):
        cfg = gateway_config(node)
        c = await app_client(aiohttp_client, cfg)
        patient = uid("p")
        fill(volume, leave=1 * MiB)
        before = recursive_pins(node)
        form = aiohttp.FormData()
        form.add_field("file", os.urandom(200_000), filename="small.bin")
        form.add_field("file", os.urandom(6 * MiB), filename="large.bin")
        with pytest.raises(aiohttp.ClientPayloadError):
            r = await c.post("/api/v0/add", data=form, headers={"X-Medicon-Patient": patient})
            assert r.status == 200  # Kubo's 200 came with the first file's result
            await r.read()
        assert recursive_pins(node) == before, "a sealed file of the failed add stays pinned"
        assert store_sql(cfg.records.data_dir, "heads", "SELECT COUNT(*) FROM blobs") == [(0,)], \
            "a failed add was indexed"


async def test_a_dag_put_kubo_failed_after_answering_never_completes_for_the_client(client, kubo):
    """Two nodes in one dag/put, the second not JSON: Kubo answers 200 with the first's CID,
    then fails (trailer only) before it commits either. The client's answer is cut off, and
    the CID it would have been told is indeed not in Kubo; one good node goes through."""
    def form(*parts: bytes) -> aiohttp.FormData:
        data = aiohttp.FormData()
        for n, part in enumerate(parts):
            data.add_field("file", part, filename=f"node{n}.json", content_type="application/octet-stream")
        return data
    first = json.dumps({"unique": uid("n")}).encode()
    with pytest.raises(aiohttp.ClientPayloadError):
        r = await client.post("/api/v0/dag/put?pin=true", data=form(first, b"{not json"))
        assert r.status == 200
        await r.read()
    direct = kubo.ipfs("dag", "put", "--input-codec=dag-json", "--store-codec=dag-cbor", "--pin=false",
                       "--offline", input=first).stdout.decode().strip()  # its CID (now stored, unpinned)
    assert direct not in recursive_pins(kubo)
    r = await client.post("/api/v0/dag/put?pin=true", data=form(json.dumps({"unique": uid("n")}).encode()))
    assert r.status == 200
    assert json.loads(await r.text())["Cid"]["/"] in recursive_pins(kubo)


async def _indexed(c) -> set[str]:
    from gateway.http.appkeys import SERVICE
    heads = c.server.app[SERVICE].storage.heads
    return {r.cid for e in await heads.episodes_after("", 10**6) for r in await heads.history(e.id, -1, e.length)}


# --- 7. the gateway's own data volume fills mid-burst --------------------------------------------

def _indexed_cids(data_dir: Path) -> set[str]:
    return {row[0] for row in store_sql(data_dir, "heads", "SELECT cid FROM records")}


async def test_gateway_data_volume_filling_mid_burst_answers_507_and_recovers_at_once(own_kubo):
    """The head store, audit log, tokens and keyring on a small volume that fills while 64
    writers append (to existing episodes, and opening episodes of new patients, whose data keys
    go into the keyring): every answer is a 201, or a 507 saying the gateway's data volume is
    full; no record node is left pinned for a failed append; writes resume as soon as there is
    room, without a restart."""
    with tmpfs(16 * MiB) as volume:
        data_dir = volume / "data"
        data_dir.mkdir()
        LocalKeyring.init(data_dir / "keyring.json")
        gw = start_gateway(own_kubo, data_dir=str(data_dir))
        try:
            async with aiohttp.ClientSession(headers=gw.headers) as s:
                patient = uid("p")
                episodes = [uid("e") for _ in range(8)]
                for ep in episodes:
                    async with s.post(f"{gw.url}/medicon/v1/patients/{patient}/episodes",
                                      json=opened(patient, ep)) as r:
                        assert r.status == 201, await r.text()
                filler = fill(volume, leave=384 * 1024)
                acked: dict[str, str] = {}
                tally = Tally()

                async def writer(i: int) -> None:
                    for n in range(chaos_scale(10)):
                        if (i + n) % 4 == 0:  # a new patient: a data key written to the keyring
                            other, ep = uid("p"), uid("e")
                            url, doc = f"{gw.url}/medicon/v1/patients/{other}/episodes", opened(other, ep)
                        else:
                            ep = episodes[i % len(episodes)]
                            url, doc = f"{gw.url}/medicon/v1/episodes/{ep}/records", encounter(patient, ep, note=f"{i}.{n}")
                        async with s.post(url, json=doc) as r:
                            body = await r.json()
                            tally.add(r.status, error_message(body))
                            if r.status == 201:
                                acked[body["cid"]] = ep
                    async with s.get(f"{gw.url}/healthz") as r:
                        assert r.status == 200

                await asyncio.gather(*(writer(i) for i in range(64)))
                assert tally.statuses[507], f"the volume never filled: {tally.statuses}"
                assert set(tally.statuses) <= {201, 507}, tally.messages
                for (status, message), _ in tally.messages.items():
                    assert status == 507 and ("the gateway's data volume is full" in message
                                              or "a disk the gateway writes to is full" in message), message

                filler.unlink()  # room again: the very next writes succeed
                for ep in episodes:
                    async with s.post(f"{gw.url}/medicon/v1/episodes/{ep}/records",
                                      json=encounter(patient, ep, note="after")) as r:
                        assert r.status == 201, await r.text()
                        acked[(await r.json())["cid"]] = ep
                await verify_all(s, gw.url, episodes, {c: e for c, e in acked.items() if e in episodes})
                for cid, ep in acked.items():
                    if ep not in episodes:  # the new patients' episodes, one acknowledged record each
                        async with s.get(f"{gw.url}/medicon/v1/records/{cid}") as r:
                            assert r.status == 200, f"acknowledged opening {cid} lost"
        finally:
            assert gw.stop() == 0
        assert record_pins_not_indexed(own_kubo, _indexed_cids(data_dir)) == set(), \
            "a record node pinned by a failed append was left behind"
        tally.report_chaos()


async def test_data_keys_made_at_once_for_many_new_patients_all_reach_the_keyring(own_kubo):
    """Episodes of 64 new patients opened at once: each patient's data key is written to the
    keyring file, none lost to another write made on an older copy of the keyring — after a
    restart (keys read from the file alone) every acknowledged record still opens."""
    data_dir = tempfile.mkdtemp(prefix="medicon-test-")
    LocalKeyring.init(Path(data_dir) / "keyring.json")
    acked: list[str] = []
    for _round in range(min(chaos_scale(3), 8)):  # (each new key rewrites the whole keyring file)
        gw = start_gateway(own_kubo, data_dir=data_dir)
        try:
            async with aiohttp.ClientSession(headers=gw.headers) as s:
                async def open_one(i: int) -> None:
                    patient, ep = uid("p"), uid("e")
                    async with s.post(f"{gw.url}/medicon/v1/patients/{patient}/episodes", json=opened(patient, ep)) as r:
                        assert r.status == 201, await r.text()
                        acked.append((await r.json())["cid"])
                await asyncio.gather(*(open_one(i) for i in range(64)))
        finally:
            assert gw.stop() == 0
    gw = start_gateway(own_kubo, data_dir=data_dir)
    try:
        async with aiohttp.ClientSession(headers=gw.headers) as s:
            for cid in acked:
                async with s.get(f"{gw.url}/medicon/v1/records/{cid}") as r:
                    assert r.status == 200, f"acknowledged record {cid} no longer opens: {await r.text()}"
    finally:
        assert gw.stop() == 0


# --- 2. check --repair while gateways write ------------------------------------------------------

async def _orphan(cfg, episode: str | None, patient: str) -> str:
    """A record node stored and pinned by an append whose head never moved — what a gateway
    killed between the two leaves behind. ``episode`` None: an opening of an episode that was
    never created."""
    from gateway.core import chain
    from gateway.core.records import normalise
    from gateway.core.service import RecordService
    async with RecordService.open(cfg) as service:
        if episode is None:
            doc = opened(patient, uid("e"))
            current = None
        else:
            doc = encounter(patient, episode, note="crashed append")
            current = await service.storage.heads.get_episode(episode)
        record = chain.link(normalise(doc), current, service._policy_for(doc["schema"]))
        return await service.kubo.put_block(ipld.encode(await service.sealer.to_node(record, "token:crashed")))


async def test_check_repair_in_a_loop_during_a_burst_never_unpins_an_acknowledged_record(own_kubo):
    data_dir = tempfile.mkdtemp(prefix="medicon-test-")
    LocalKeyring.init(Path(data_dir) / "keyring.json")
    cfg = load_config(env={}, overrides={"kubo.api_url": own_kubo.api_url, "kubo.gateway_url": own_kubo.gateway_url,
                                         "kubo.api_auth": own_kubo.api_secret,
                                         "records.data_dir": data_dir})
    gw = start_gateway(own_kubo, data_dir=data_dir)
    acked: dict[str, str] = {}
    reports: list[dict] = []
    try:
        async with aiohttp.ClientSession(headers=gw.headers) as s:
            patient = uid("p")
            episodes = [uid("e") for _ in range(8)]
            for ep in episodes:
                async with s.post(f"{gw.url}/medicon/v1/patients/{patient}/episodes", json=opened(patient, ep)) as r:
                    assert r.status == 201
                    acked[(await r.json())["cid"]] = ep
            orphans = {await _orphan(cfg, episodes[0], patient), await _orphan(cfg, episodes[1], patient)}
            undecided = await _orphan(cfg, None, patient)
            tally = Tally()
            writing = True

            async def writer(i: int) -> None:
                ep = episodes[i % len(episodes)]
                for n in range(chaos_scale(15)):
                    async with s.post(f"{gw.url}/medicon/v1/episodes/{ep}/records",
                                      json=encounter(patient, ep, note=f"{i}.{n}")) as r:
                        body = await r.json()
                        tally.add(r.status, error_message(body))
                        if r.status == 201:
                            acked[body["cid"]] = ep

            async def checker() -> None:
                while writing or len(reports) < 3:
                    reports.append(await check(cfg, repair=True))

            checking = asyncio.create_task(checker())
            await asyncio.gather(*(writer(i) for i in range(64)))
            writing = False
            await checking
            assert set(tally.statuses) == {201}, tally.messages
            assert len(reports) >= 3
            said_orphan = {cid for report in reports for cid in report["orphans"]}
            assert said_orphan & set(acked) == set(), "check took an acknowledged record for an orphan"
            assert orphans <= said_orphan, "the crashed appends' nodes were never recognised as orphans"
            assert undecided in reports[-1]["pending"] and undecided not in said_orphan
            pins = recursive_pins(own_kubo)
            assert set(acked) <= pins, "an acknowledged record lost its pin"
            assert not (orphans & pins) and undecided in pins
            own_kubo.ipfs("repo", "gc")
            await verify_all(s, gw.url, episodes, acked)
            tally.report_chaos()
    finally:
        assert gw.stop() == 0


# --- 3, 4. one Idempotency-Key, several requests ---------------------------------------------------

async def test_one_idempotency_key_fired_concurrently_is_one_append(aiohttp_client, own_kubo):
    """The same keyed request 20 times at once, to one gateway and to a second gateway on the
    same head store (another process's requests meet only in the store): one 201, the rest the
    original (200), never a 500, and no record node left pinned by the losers."""
    from gateway.http.app import create_app
    cfg = gateway_config(own_kubo)
    first = await app_client(aiohttp_client, cfg)
    second = await aiohttp_client(create_app(cfg), headers=bearer(first.token))  # the same caller
    patient, ep = uid("p"), uid("e")
    r = await first.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, ep))
    assert r.status == 201
    tally = Tally()
    for round_ in range(chaos_scale(3)):
        key = f"key-{uid('k')}"
        doc = encounter(patient, ep, note=f"once {round_}")

        async def send(i: int) -> tuple[int, dict]:
            c = (first, second)[i % 2]
            r = await c.post(f"/medicon/v1/episodes/{ep}/records", json=doc, headers={"Idempotency-Key": key})
            body = await r.json()
            tally.add(r.status, error_message(body))
            return r.status, body
        answers = await asyncio.gather(*(send(i) for i in range(20)))
        statuses = sorted(status for status, _ in answers)
        assert statuses == [200] * 19 + [201], tally.messages
        assert len({body["cid"] for _, body in answers}) == 1
    episode = await (await first.get(f"/medicon/v1/episodes/{ep}")).json()
    assert episode["length"] == 1 + chaos_scale(3)
    assert record_pins_not_indexed(own_kubo, _indexed_cids(Path(cfg.records.data_dir))) == set()
    tally.report_chaos()


async def test_one_key_two_different_requests_at_once_is_one_append_and_422s(aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo))
    patient, ep = uid("p"), uid("e")
    await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, ep))
    key = f"key-{uid('k')}"
    answers = await asyncio.gather(*(c.post(f"/medicon/v1/episodes/{ep}/records", headers={"Idempotency-Key": key},
                                            json=encounter(patient, ep, note=f"different {i}")) for i in range(10)))
    statuses = sorted(r.status for r in answers)
    assert statuses == [201] + [422] * 9
    assert (await (await c.get(f"/medicon/v1/episodes/{ep}")).json())["length"] == 2
    # the key is the caller's, whatever the episode: the same key on appends to 6 episodes
    others = [uid("e") for _ in range(6)]
    for other in others:
        await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, other))
    key = f"key-{uid('k')}"
    answers = await asyncio.gather(*(c.post(f"/medicon/v1/episodes/{other}/records", headers={"Idempotency-Key": key},
                                            json=encounter(patient, other)) for other in others))
    assert sorted(r.status for r in answers) == [201] + [422] * 5


async def test_an_episode_opened_without_an_id_twice_at_once_and_retried_is_one_episode(aiohttp_client, kubo):
    """A double-submitted open (no episode id, one Idempotency-Key): one episode, the second
    answer is the first's; a later retry too (the id is derived from the key and the caller)."""
    c = await app_client(aiohttp_client, gateway_config(kubo))
    patient = uid("p")
    doc = {k: v for k, v in opened(patient, "unused").items() if k not in ("patient", "episode")}
    key = f"open-{uid('k')}"

    async def open_it():
        r = await c.post(f"/medicon/v1/patients/{patient}/episodes", json=doc, headers={"Idempotency-Key": key})
        return r.status, await r.json()
    answers = await asyncio.gather(open_it(), open_it())
    assert sorted(s for s, _ in answers) == [200, 201], answers
    ids = {body["episode"]["id"] for _, body in answers}
    assert len(ids) == 1
    status, retried = await open_it()
    assert status == 200 and retried["cid"] == answers[0][1]["cid"]
    listed = await (await c.get(f"/medicon/v1/patients/{patient}/episodes")).json()
    assert [e["id"] for e in listed["episodes"]] == list(ids)
    # the same key from another caller is another request: another episode
    other = await app_client(aiohttp_client, gateway_config(kubo))
    r = await other.post(f"/medicon/v1/patients/{patient}/episodes", json=doc, headers={"Idempotency-Key": key})
    assert r.status == 201 and (await r.json())["episode"]["id"] not in ids
    # without a key, each open is a new episode
    r1, r2 = await asyncio.gather(*(c.post(f"/medicon/v1/patients/{patient}/episodes", json=doc) for _ in range(2)))
    assert r1.status == r2.status == 201
    assert (await r1.json())["episode"]["id"] != (await r2.json())["episode"]["id"]


async def test_keyed_retries_after_the_gateway_was_killed_return_the_original_or_append_once(own_kubo):
    """Keyed appends, the gateway SIGKILLed in the middle, every request sent again with its
    key to a new gateway: each key ends up as exactly one record (the retry answers 200 with the
    original where the first attempt committed, 201 where it never did), never a 5xx."""
    data_dir = tempfile.mkdtemp(prefix="medicon-test-")
    LocalKeyring.init(Path(data_dir) / "keyring.json")
    gw = start_gateway(own_kubo, data_dir=data_dir)
    patient, ep = uid("p"), uid("e")
    keys = [f"k-{uid('r')}" for _ in range(chaos_scale(40))]
    first: dict[str, str] = {}
    async with aiohttp.ClientSession(headers=gw.headers) as s:
        async with s.post(f"{gw.url}/medicon/v1/patients/{patient}/episodes", json=opened(patient, ep)) as r:
            assert r.status == 201
        some = asyncio.Event()

        async def send(key: str) -> None:
            try:
                async with s.post(f"{gw.url}/medicon/v1/episodes/{ep}/records", headers={"Idempotency-Key": key},
                                  json=encounter(patient, ep, note=key)) as r:
                    if r.status == 201:
                        first[key] = (await r.json())["cid"]
                        if len(first) >= 5:
                            some.set()
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                pass  # killed under this request
        tasks = [asyncio.create_task(send(k)) for k in keys]
        await asyncio.wait_for(some.wait(), 30)
        gw.process.send_signal(signal.SIGKILL)
        await asyncio.gather(*tasks)
    gw.process.wait()
    caller = gw.headers  # a key is the caller's: the retries come from the same one
    gw = start_gateway(own_kubo, data_dir=data_dir)
    tally = Tally()
    try:
        async with aiohttp.ClientSession(headers=caller) as s:
            for key in keys:
                async with s.post(f"{gw.url}/medicon/v1/episodes/{ep}/records", headers={"Idempotency-Key": key},
                                  json=encounter(patient, ep, note=key)) as r:
                    body = await r.json()
                    tally.add(r.status, error_message(body))
                    assert r.status in (200, 201), body
                    if key in first:
                        assert r.status == 200 and body["cid"] == first[key]
            chain = await history(s, gw.url, ep)
            notes = [r["record"]["body"]["notes"] for r in chain[1:]]
            assert sorted(notes) == sorted(keys), "a key was appended twice, or not at all"
            CHAOS["acknowledged"] += len(first)
            CHAOS["found_after_recovery"] += len([k for k in first if k in notes])
    finally:
        assert gw.stop() == 0
    tally.report_chaos()


# --- 5. writers with clocks ahead ------------------------------------------------------------------

def _in(seconds: float) -> str:
    import datetime as dt
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def test_a_record_dated_past_the_clock_skew_bound_is_refused_naming_the_bound(aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo))
    patient, ep = uid("p"), uid("e")
    await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, ep))
    r = await c.post(f"/medicon/v1/episodes/{ep}/records", json=encounter(patient, ep, recorded_at=_in(600)))
    body = await r.json()
    assert r.status == 400 and "records.max_clock_skew" in body["error"]["message"]
    assert "300 s" in body["error"]["message"]
    # the same through the Kubo surface: a 400 in Kubo's shape
    form = aiohttp.FormData()
    form.add_field("file", json.dumps(encounter(patient, ep, recorded_at=_in(600))).encode(), filename="r.json")
    r = await c.post("/api/v0/add", data=form)
    assert r.status == 400 and "records.max_clock_skew" in (await r.json())["Message"]
    # nothing was appended, and everyone else's appends go on
    r = await c.post(f"/medicon/v1/episodes/{ep}/records", json=encounter(patient, ep))
    assert r.status == 201 and (await r.json())["seq"] == 1


async def test_the_bound_is_configurable(aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo, **{"records.max_clock_skew": 5.0}))
    patient, ep = uid("p"), uid("e")
    await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, ep))
    r = await c.post(f"/medicon/v1/episodes/{ep}/records", json=encounter(patient, ep, recorded_at=_in(60)))
    assert r.status == 400 and "at most 5 s ahead" in (await r.json())["error"]["message"]
    r = await c.post(f"/medicon/v1/episodes/{ep}/records", json=encounter(patient, ep, recorded_at=_in(2)))
    assert r.status == 201


async def test_a_clock_ahead_within_the_bound_does_not_hold_other_writers_off(aiohttp_client, kubo):
    """A record dated two minutes ahead is accepted; the gateway's own stamps for the appends
    after it never fall before it (no 409 for writers that let the gateway stamp), while a
    writer that stamps a time before it is told so (409). Concurrent writers with clocks ahead
    and behind: only 201, 400 (too far ahead) and 409 (before the last record), and one chain."""
    c = await app_client(aiohttp_client, gateway_config(kubo))
    patient, ep = uid("p"), uid("e")
    await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, ep))
    ahead = _in(120)
    r = await c.post(f"/medicon/v1/episodes/{ep}/records", json=encounter(patient, ep, recorded_at=ahead))
    assert r.status == 201
    r = await c.post(f"/medicon/v1/episodes/{ep}/records", json=encounter(patient, ep))
    assert r.status == 201 and (await r.json())["record"]["recorded_at"] == ahead
    r = await c.post(f"/medicon/v1/episodes/{ep}/records", json=encounter(patient, ep, recorded_at=_in(0)))
    assert r.status == 409

    tally = Tally()

    async def writer(i: int) -> None:
        skew = (-30, 0, 60, 200, 900, None)[i % 6]
        for _ in range(chaos_scale(4)):
            doc = encounter(patient, ep, note=str(i))
            if skew is not None:
                doc["recorded_at"] = _in(skew)
            r = await c.post(f"/medicon/v1/episodes/{ep}/records", json=doc)
            tally.add(r.status, error_message(await r.json()))
    await asyncio.gather(*(writer(i) for i in range(24)))
    assert set(tally.statuses) <= {201, 400, 409} and tally.statuses[201], tally.messages
    assert all("max_clock_skew" in m for (s, m) in tally.messages if s == 400)
    verdict = await (await c.get(f"/medicon/v1/episodes/{ep}/verify")).json()
    assert verdict["ok"] is True
    tally.report_chaos()


# --- 6. Kubo's block store fsyncs ------------------------------------------------------------------

def test_the_managed_kubo_fsyncs_its_blocks(kubo, tmp_path):
    spec = json.loads((kubo.repo / "config").read_text())["Datastore"]["Spec"]
    flatfs = [m for m in spec["mounts"] if m["type"] == "flatfs"]
    assert flatfs and all(m["sync"] is True for m in flatfs)  # `ipfs init` wrote false
    assert kubo.version() is not None  # and Kubo runs with it
    # a repo of the `flatfs-measure` kind (the block store one level down) is synced too
    node = KuboNode(tmp_path / "repo")
    subprocess.run([str(node.binary), "init", "--empty-repo", "--profile", "test,flatfs-measure"], env=node.env,
                   check=True, capture_output=True)
    node.init()
    spec = json.loads((node.repo / "config").read_text())["Datastore"]["Spec"]
    assert [m["child"]["sync"] for m in spec["mounts"] if m["child"]["type"] == "flatfs"] == [True]


# --- raw writes: what Kubo streams back is confirmed before the answer completes -----------------

def _files(*parts: bytes) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for n, part in enumerate(parts):
        data.add_field("file", part, filename=f"part{n}", content_type="application/octet-stream")
    return data


async def test_a_block_put_kubo_failed_after_answering_never_completes_for_the_client(client, kubo):
    """Two blocks in one block/put, the second over Kubo's block limit: Kubo answers 200 with
    the first block's key, then fails in a trailer. The client's answer is cut off, never a
    finished write; two good blocks come back confirmed stored and pinned."""
    with pytest.raises(aiohttp.ClientPayloadError):
        r = await client.post("/api/v0/block/put?pin=true", data=_files(os.urandom(1000), os.urandom(3 * MiB)))
        assert r.status == 200  # Kubo's 200 came with the first block's key
        await r.read()
    good = [os.urandom(2000), os.urandom(3000)]
    r = await client.post("/api/v0/block/put?pin=true", data=_files(*good))
    assert r.status == 200, await r.text()
    keys = [json.loads(line)["Key"] for line in (await r.text()).splitlines()]
    assert len(keys) == 2 and set(keys) <= recursive_pins(kubo)
    assert [kubo.ipfs("block", "get", key).stdout for key in keys] == good


async def test_a_car_import_answers_only_roots_kubo_holds_and_pinned(client, kubo):
    """dag/import: each root Kubo answers is confirmed stored and pinned; with ``silent`` the
    client gets no lines, and the roots are still confirmed (and pinned)."""
    roots = []
    for silent in (False, True):
        node = json.dumps({"import": uid("car")}).encode()
        root = kubo.ipfs("dag", "put", "--input-codec=dag-json", "--pin=false", "--offline",
                         input=node).stdout.decode().strip()
        car = kubo.ipfs("dag", "export", root).stdout
        kubo.ipfs("block", "rm", root)  # the import must bring it back
        r = await client.post(f"/api/v0/dag/import?silent={str(silent).lower()}", data=_files(car))
        assert r.status == 200, await r.text()
        text = await r.text()
        if silent:
            assert text == ""
        else:
            assert json.loads(text.splitlines()[0])["Root"]["Cid"]["/"] == root
        roots.append(root)
    assert set(roots) <= recursive_pins(kubo)


async def test_pin_add_answers_only_pins_kubo_holds(client, kubo):
    """pin/add (with the progress Kubo streams before it knows the outcome): the answer ends
    with pins that are in Kubo's pin set; a pin Kubo cannot make is an error, never a 200."""
    cid = kubo.ipfs("add", "-Q", "--pin=false", input=os.urandom(3 * MiB)).stdout.decode().strip()
    r = await client.post(f"/api/v0/pin/add?arg={cid}&progress=true")
    assert r.status == 200, await r.text()
    lines = [json.loads(line) for line in (await r.text()).splitlines()]
    assert lines[-1]["Pins"] == [cid] and cid in recursive_pins(kubo)
    missing = kubo.ipfs("add", "-Q", "--only-hash", input=os.urandom(5000)).stdout.decode().strip()
    r = await client.post(f"/api/v0/pin/add?arg={missing}&progress=true")
    assert 400 <= r.status < 500 and "not found" in (await r.json())["Message"]
    assert missing not in recursive_pins(kubo)
