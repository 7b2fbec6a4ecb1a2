"""Several sites: two gateways × two Kubo nodes in a private swarm × one PostgreSQL.

Site A and site B each run a gateway in front of a Kubo node of their own; the nodes share a
swarm key, peer with each other on loopback and with nobody else. Both gateways share one
PostgreSQL database (heads, tokens, keys, audit) and the same key-encryption key (``keys
export``/``keys join``), each signing with its own key. With ``records.replicas = 2`` each
gateway asks the other's Pinning Service API (``/pinning/v1``, a replicator token) to pin every
record before it moves the head: an acknowledged record is on both nodes. Everything is real:
the Kubo daemons, PostgreSQL, the gateway processes, the SIGKILLs; Kubo's own ``ipfs pin
remote`` client is the client of the pinning service in its compliance test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import (CHAOS, ROOT, STORAGE_URLS, GatewayProcess, bearer, make_token, run_blocking,
                      start_gateway)
from gateway.kubo.node import KuboNode, free_port, private_swarm, start_swarm
from gateway.security.keyring import LocalKeyring
from gateway.storage.postgres import migrate_database
from records_helpers import encounter, opened, uid

WITHIN = 1.0                   # seconds: a revocation or a shredding is seen by the other site
REPLICA_TIMEOUT = 10.0         # records.replica_timeout of both sites
RECORD_DEADLINE = 90.0         # seconds a writer keeps retrying one record (across an outage)
OK_STATUSES = {200, 201}
# What an append may answer while a part is down: 409 (another site moved the head), 502 (the
# gateway's own Kubo is down), 503 (the replica cannot pin), 504 (the replica did not in time).
CLEAN_FAILURES = {409, 502, 503, 504}


@dataclass
class Site:
    name: str
    kubo: KuboNode
    data_dir: str
    port: int
    config: Path
    log: Path
    gateway: GatewayProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.gateway = start_gateway(self.kubo, "--config", str(self.config), "--port", str(self.port),
                                     data_dir=self.data_dir, log=self.log, log_level="INFO")

    def kill(self) -> None:
        self.gateway.process.kill()
        self.gateway.process.wait()

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """``medicon-gateway`` as this site's operator runs it."""
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MEDICON_")},
               "MEDICON_CONFIG": str(self.config), "MEDICON_RECORDS_DATA_DIR": self.data_dir,
               "MEDICON_STORAGE_URL": STORAGE_URLS[self.data_dir], "MEDICON_KUBO_API_URL": self.kubo.api_url,
               "MEDICON_KUBO_GATEWAY_URL": self.kubo.gateway_url, "MEDICON_KUBO_API_AUTH": self.kubo.api_secret}
        return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=300)

    def pins(self) -> set[str]:
        out = self.kubo.ipfs("pin", "ls", "--type=recursive", "--quiet").stdout.decode()
        return set(out.split())


@dataclass
class Cluster:
    url: str
    sites: list[Site]
    token: str                      # an admin token: one token store, good at both sites
    replicator_tokens: dict[str, str] = field(default_factory=dict)

    def ensure_up(self) -> None:
        """Every Kubo and gateway running (a test before may have killed one)."""
        for site in self.sites:
            if site.kubo.process is None or site.kubo.process.poll() is not None:
                site.kubo.start()
        for site in self.sites:
            site.kubo.connect([s.kubo for s in self.sites if s is not site])
        for site in self.sites:
            if site.gateway is None or site.gateway.process.poll() is not None:
                site.start()


def site_config(path: Path, replicas: int, peer: str, endpoint: str, key_file: Path) -> Path:
    path.write_text(f"""
[records]
replicas = {replicas}
replica_timeout = {REPLICA_TIMEOUT}

[[records.replica_services]]
name = "{peer}"
endpoint = "{endpoint}"
key_file = "{key_file}"
""")
    return path


@pytest.fixture(scope="module")
def cluster(postgres, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multisite")
    url = postgres.create_database(f"multisite_{uuid.uuid4().hex}")
    run_blocking(migrate_database(url))
    kubos = start_swarm(private_swarm([tmp / "kubo-a", tmp / "kubo-b"]))
    dirs = [str(tmp / "site-a"), str(tmp / "site-b")]
    LocalKeyring.init(Path(dirs[0]) / "keyring.json", gateway_id="site-a")
    LocalKeyring.load(Path(dirs[0]) / "keyring.json").export(tmp / "bundle.json")
    LocalKeyring.join(Path(dirs[1]) / "keyring.json", tmp / "bundle.json", gateway_id="site-b")
    (tmp / "bundle.json").unlink()
    for d in dirs:
        STORAGE_URLS[d] = url
    ports = [free_port(), free_port()]
    names = ["site-a", "site-b"]
    replicator = {n: make_token(d, name=f"replicator-{n}", role="replicator") for n, d in zip(names, dirs)}
    sites = []
    for i, name in enumerate(names):
        other = 1 - i
        key_file = tmp / f"{name}-replica-key"
        key_file.touch(mode=0o600)
        key_file.write_text(replicator[name])
        config = site_config(tmp / f"{name}.toml", 2, names[other],
                             f"http://127.0.0.1:{ports[other]}/pinning/v1", key_file)
        sites.append(Site(name, kubos[i], dirs[i], ports[i], config, tmp / f"{name}.log"))
    for site in sites:
        site.start()
    c = Cluster(url, sites, make_token(dirs[0], name="writer", role="admin"), replicator)
    yield c
    for site in sites:
        site.stop()
    for node in kubos:
        node.stop()


# --- writing at both sites -------------------------------------------------------------------------

@dataclass
class Burst:
    acked: dict[str, tuple[str, int, str]] = field(default_factory=dict)  # cid -> (episode, seq, site)
    statuses: list[tuple[str, int]] = field(default_factory=list)         # (site, status) of every answer
    connection_errors: int = 0

    def count(self, site: str | None = None) -> int:
        return sum(1 for _, _, s in self.acked.values() if site is None or s == site)


async def open_episodes(cluster: Cluster, n: int) -> tuple[str, list[str]]:
    patient = uid("p")
    episodes = [uid("e") for _ in range(n)]
    async with aiohttp.ClientSession(headers=bearer(cluster.token)) as s:
        for i, ep in enumerate(episodes):
            site = cluster.sites[i % 2]
            async with s.post(f"{site.url}/medicon/v1/patients/{patient}/episodes", json=opened(patient, ep)) as r:
                assert r.status == 201, await r.text()
    return patient, episodes


async def burst(cluster: Cluster, patient: str, episodes: list[str], writers: int, per_writer: int,
                outcome: Burst) -> Burst:
    """``writers`` clients, each appending ``per_writer`` records, every other client at site B,
    each spreading over ``episodes`` (so both sites write to the same episodes at once).
    A record is retried with its Idempotency-Key — at the other site after a connection error —
    until it is acknowledged (201, or 200 for a retry of one acknowledged before)."""
    async def writer(i: int, s: aiohttp.ClientSession) -> None:
        for k in range(per_writer):
            episode = episodes[(i + k) % len(episodes)]
            key = uuid.uuid4().hex
            site_index = i % 2
            deadline = time.monotonic() + RECORD_DEADLINE
            while True:
                site = cluster.sites[site_index]
                try:
                    async with s.post(f"{site.url}/medicon/v1/episodes/{episode}/records",
                                      json=encounter(patient, episode, note=f"w{i}r{k}"),
                                      headers={"Idempotency-Key": key}) as r:
                        body = await r.json()
                        outcome.statuses.append((site.name, r.status))
                        if r.status in OK_STATUSES:
                            outcome.acked[body["cid"]] = (episode, body["seq"], site.name)
                            break
                        assert r.status in CLEAN_FAILURES, (site.name, r.status, body)
                        assert "error" in body and body["error"]["message"], body
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    outcome.connection_errors += 1
                    site_index = 1 - site_index  # that gateway is gone: the other one
                assert time.monotonic() < deadline, f"record w{i}r{k} not acknowledged in {RECORD_DEADLINE}s"
                await asyncio.sleep(0.02 + random.random() * 0.05)

    timeout = aiohttp.ClientTimeout(total=REPLICA_TIMEOUT + 20)
    async with aiohttp.ClientSession(headers=bearer(cluster.token), timeout=timeout) as s:
        await asyncio.gather(*(writer(i, s) for i in range(writers)))
    return outcome


async def assert_replicated_everywhere(cluster: Cluster, episodes: list[str], outcome: Burst) -> None:
    """0 forks, 0 lost: each episode is one chain, the same through both gateways, verifying;
    every acknowledged record is in it at its seq, readable through both gateways, and pinned
    on both Kubo nodes."""
    chains = {}
    async with aiohttp.ClientSession(headers=bearer(cluster.token)) as s:
        for ep in episodes:
            seen = []
            for site in cluster.sites:
                records, cursor = [], None
                while True:
                    query = "?limit=500" + (f"&cursor={cursor}" if cursor else "")
                    async with s.get(f"{site.url}/medicon/v1/episodes/{ep}/history{query}") as r:
                        page = await r.json()
                        assert r.status == 200, page
                    records += page["records"]
                    cursor = page["next"]
                    if cursor is None:
                        break
                async with s.get(f"{site.url}/medicon/v1/episodes/{ep}/verify") as r:
                    verdict = await r.json()
                assert verdict["ok"] is True and verdict["length"] == len(records), (site.name, verdict)
                assert [x["seq"] for x in records] == list(range(len(records))), "a gap or a fork"
                assert all(x["record"]["prev"] == p["cid"] for p, x in zip(records, records[1:])), "a fork"
                seen.append([x["cid"] for x in records])
            assert seen[0] == seen[1], "the two sites disagree on an episode"
            chains[ep] = seen[0]
        for cid, (ep, seq, _) in outcome.acked.items():
            assert chains[ep][seq] == cid, f"acknowledged {cid} lost (seq {seq} of {ep} is another record)"
            for site in cluster.sites:
                async with s.get(f"{site.url}/medicon/v1/records/{cid}") as r:
                    assert r.status == 200, (site.name, await r.text())
    everything = {cid for chain in chains.values() for cid in chain}
    for site in cluster.sites:
        missing = everything - site.pins()
        assert not missing, f"{len(missing)} records are not pinned on {site.name}'s Kubo"
    CHAOS["acknowledged"] += len(outcome.acked)
    CHAOS["found_after_recovery"] += len(outcome.acked)


async def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds}s"
        await asyncio.sleep(0.05)


# --- the tests ---------------------------------------------------------------------------------------

async def test_a_replica_removed_behind_the_gateways_back_is_found_and_repaired_by_check(cluster):
    cluster.ensure_up()
    a, b = cluster.sites
    patient, episodes = await open_episodes(cluster, 1)
    outcome = await burst(cluster, patient, episodes, writers=2, per_writer=2, outcome=Burst())
    victim = next(cid for cid, (_, _, site) in outcome.acked.items() if site == "site-a")
    b.kubo.ipfs("pin", "rm", victim)  # B's replica of a record A wrote, gone
    report = json.loads(a.cli("check").stdout)
    under = report["replicas"]["under_replicated"]
    assert [u["cid"] for u in under] == [victim] and under[0]["pinned_on"] == ["local"], under
    report_b = json.loads(b.cli("check").stdout)
    assert report_b["unpinned"] == [victim]  # B sees its own node lacks it
    repaired = a.cli("check", "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert json.loads(repaired.stdout)["replicas"]["repaired"] == {"site-b": [victim]}
    assert victim in b.pins()
    for site in (a, b):
        done = site.cli("check")
        assert done.returncode == 0 and json.loads(done.stdout)["replicas"]["under_replicated"] == []


async def test_writers_at_both_sites_on_the_same_episodes_fork_nothing_lose_nothing_and_pin_on_both(cluster):
    cluster.ensure_up()
    patient, episodes = await open_episodes(cluster, 4)
    outcome = await burst(cluster, patient, episodes, writers=12, per_writer=8, outcome=Burst())
    assert len(outcome.acked) == 12 * 8
    assert outcome.count("site-a") > 0 and outcome.count("site-b") > 0
    assert {s for _, s in outcome.statuses} <= {200, 201, 409}, "nothing failed while every part was up"
    await assert_replicated_everywhere(cluster, episodes, outcome)
    async with aiohttp.ClientSession(headers=bearer(cluster.token)) as s:
        async with s.get(f"{cluster.sites[1].url}/medicon/v1/episodes/{episodes[0]}/verify") as r:
            signers = (await r.json())["signers"]
    assert set(signers) == {"site-a", "site-b"}, signers  # each site signed what it wrote
    for site in cluster.sites:
        done = site.cli("check")
        report = json.loads(done.stdout)
        assert done.returncode == 0, done.stdout + done.stderr
        assert report["replicas"]["under_replicated"] == [] and report["replicas"]["replicas"] == 2
        other = [s.name for s in cluster.sites if s is not site][0]
        assert report["replicas"]["services"][other]["error"] is None
        assert report["replicas"]["services"][other]["missing"] == 0


async def test_sigkill_of_a_gateway_mid_burst_loses_nothing_acknowledged(cluster):
    """Site B's gateway is killed mid-burst: its in-flight appends get no answer (retried at A
    with the same key), site A cannot replicate to B (503, not acknowledged) until B is back."""
    cluster.ensure_up()
    patient, episodes = await open_episodes(cluster, 3)
    outcome = Burst()
    b = cluster.sites[1]

    async def fault() -> None:
        await wait_for(lambda: len(outcome.acked) >= 15, 60, "15 records acknowledged")
        b.kill()
        at_kill = len(outcome.acked)
        await wait_for(lambda: sum(1 for s, st in outcome.statuses if s == "site-a" and st == 503) >= 3, 30,
                       "appends at site A refused while its replica is down")
        assert len(outcome.acked) - at_kill <= 12  # at most those in flight when it died
        b.start()
    await asyncio.gather(burst(cluster, patient, episodes, writers=12, per_writer=6, outcome=outcome), fault())
    assert len(outcome.acked) == 12 * 6
    assert outcome.connection_errors > 0
    await assert_replicated_everywhere(cluster, episodes, outcome)


async def test_sigkill_of_a_kubo_node_mid_burst_acknowledges_nothing_without_it(cluster):
    """Site B's Kubo is killed mid-burst: B answers 502 (its Kubo is gone), A answers 503 (its
    replica cannot pin); nothing is acknowledged on one node only. After B's Kubo restarts,
    every acknowledged record is on both nodes."""
    cluster.ensure_up()
    patient, episodes = await open_episodes(cluster, 3)
    outcome = Burst()
    a, b = cluster.sites

    async def fault() -> None:
        await wait_for(lambda: len(outcome.acked) >= 15, 60, "15 records acknowledged")
        b.kubo.kill()
        await wait_for(lambda: {(s, st) for s, st in outcome.statuses} >= {("site-a", 503), ("site-b", 502)}, 30,
                       "both sites refusing appends while B's Kubo is down")
        b.kubo.start()
        b.kubo.connect([a.kubo])
    await asyncio.gather(burst(cluster, patient, episodes, writers=12, per_writer=6, outcome=outcome), fault())
    assert len(outcome.acked) == 12 * 6
    await assert_replicated_everywhere(cluster, episodes, outcome)
    for site in cluster.sites:
        done = site.cli("check")
        assert json.loads(done.stdout)["replicas"]["under_replicated"] == [], done.stdout


async def test_revocation_and_shredding_at_one_site_are_seen_at_the_other_within_a_second(cluster):
    cluster.ensure_up()
    a, b = cluster.sites
    name = f"courier-{uuid.uuid4().hex[:6]}"
    made = a.cli("token", "create", name, "--role", "clinician")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().split("=", 1)[1]
    patient, episode = uid("p"), uid("e")
    async with aiohttp.ClientSession() as s:
        async def status(site: Site) -> int:
            async with s.post(f"{site.url}/api/v0/version", headers=bearer(token)) as r:
                return r.status
        assert [await status(a), await status(b)] == [200, 200]
        assert a.cli("token", "revoke", name).returncode == 0
        start = time.monotonic()
        while await status(b) != 401:
            assert time.monotonic() - start < WITHIN, "revocation not seen at site B within a second"
            await asyncio.sleep(0.01)

        headers = bearer(cluster.token)
        async with s.post(f"{a.url}/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode),
                          headers=headers) as r:
            cid = (await r.json())["cid"]
        async with s.get(f"{b.url}/medicon/v1/records/{cid}", headers=headers) as r:
            assert r.status == 200  # B holds the patient's data key in memory now
        assert a.cli("keys", "shred", "--patient", patient).returncode == 0
        start = time.monotonic()
        while True:
            async with s.get(f"{b.url}/medicon/v1/records/{cid}", headers=headers) as r:
                if r.status == 410:
                    break
            assert time.monotonic() - start < WITHIN, "shredding not seen at site B within a second"
            await asyncio.sleep(0.01)


async def test_reads_at_either_site_find_a_record_only_the_other_node_holds(cluster, aiohttp_client):
    """With records.replicas = 1 a record is on its writer's node only; a read at the other
    site is answered all the same: its Kubo fetches the block from the peer over bitswap."""
    from conftest import app_client, gateway_config
    cluster.ensure_up()
    a, b = cluster.sites
    apps = []
    for site in (a, b):
        cfg = gateway_config(site.kubo, **{"storage.url": cluster.url, "records.data_dir": site.data_dir})
        apps.append(await app_client(aiohttp_client, cfg))
    writer, reader = apps
    patient, episode = uid("p"), uid("e")
    r = await writer.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
    assert r.status == 201, await r.text()
    cid = (await r.json())["cid"]
    assert cid in a.pins() and not b.kubo.ipfs("block", "stat", "--offline", cid, check=False).returncode == 0
    r = await reader.get(f"/medicon/v1/records/{cid}")
    assert r.status == 200 and (await r.json())["record"]["patient"] == patient
    r = await reader.get(f"/medicon/v1/episodes/{episode}/verify")
    assert (await r.json())["ok"] is True



async def test_a_clinical_records_block_goes_to_the_other_node_in_answer_to_its_want_have(cluster):
    """Replicating a record is one bitswap exchange, not a want-have then a want-block (each of
    which may wait out bitswap's 20 ms between messages to a peer): the block of a record as
    large as the clinical mix's largest (6 kB) is within the size both running nodes send in
    answer to a want-have (Kubo's Internal.Bitswap.WantHaveReplaceSize, default 1024 bytes,
    which a sealed record of a few hundred bytes already exceeds)."""
    cluster.ensure_up()
    patient, episode = uid("p"), uid("e")
    async with aiohttp.ClientSession(headers=bearer(cluster.token)) as s:
        site = cluster.sites[0]
        async with s.post(f"{site.url}/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode)) as r:
            assert r.status == 201, await r.text()
        async with s.post(f"{site.url}/medicon/v1/episodes/{episode}/records",
                          json=encounter(patient, episode, note="HbA1c 6.1 %, fasting. " * 260)) as r:
            assert r.status == 201, await r.text()
            cid = (await r.json())["cid"]
    size = json.loads(site.kubo.ipfs("block", "stat", "--enc=json", cid).stdout)["Size"]
    assert size > 6000, f"the record's block is {size} bytes, not the size this test is about"
    for node in (s.kubo for s in cluster.sites):
        setting = node.ipfs("config", "Internal.Bitswap.WantHaveReplaceSize", check=False)
        replace = int(setting.stdout) if setting.returncode == 0 else 1024  # unset: Kubo's default
        assert size <= replace, f"a {size}-byte record block needs a want-block after the want-have"

def blocks_received(node: KuboNode) -> int:
    """How many blocks the node has had from its peers over bitswap."""
    return json.loads(node.ipfs("bitswap", "stat", "--enc=json").stdout)["BlocksReceived"]


async def test_a_records_block_travels_with_its_pin_request_once_the_replica_says_it_takes_blocks(cluster):
    """After one answer saying so (PinStatus info), site A sends each record's block in its
    pin request, and site B pins those bytes: B's node fetches none of them by bitswap (one
    message per 20 ms to a peer), yet every one is pinned there."""
    cluster.ensure_up()
    a, b = cluster.sites
    patient, episode = uid("p"), uid("e")
    async with aiohttp.ClientSession(headers=bearer(cluster.token)) as s:
        async with s.post(f"{a.url}/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode)) as r:
            assert r.status == 201, await r.text()  # the first answer of B's service may come first
        before, cids = blocks_received(b.kubo), []
        for k in range(5):
            async with s.post(f"{a.url}/medicon/v1/episodes/{episode}/records",
                              json=encounter(patient, episode, note=f"pushed {k}")) as r:
                assert r.status == 201, await r.text()
                cids.append((await r.json())["cid"])
    assert blocks_received(b.kubo) == before, "site B fetched the records' blocks by bitswap"
    assert set(cids) <= b.pins()


async def test_a_block_sent_with_a_pin_request_is_pinned_only_if_it_is_the_block_its_cid_names(cluster):
    """The extension's bytes are checked, never believed: another block's bytes, bytes that are
    not base64, a block above the limit or of a CID that is not dag-cbor are the spec's 400,
    and nothing is pinned; the right bytes are pinned though no peer holds the block and no
    origin is given."""
    from gateway.core.replication import BLOCK_FIELD, MAX_PUSHED_BLOCK, TAKES_BLOCKS
    from gateway.kubo import ipld
    cluster.ensure_up()
    a, b = cluster.sites
    api = f"{b.url}/pinning/v1"
    replicator = bearer(make_token(b.data_dir, role="replicator"))
    block = ipld.encode({"note": uuid.uuid4().hex})
    other = ipld.encode({"note": uuid.uuid4().hex})
    cid = ipld.cid_of(block)
    raw_cid = a.kubo.ipfs("block", "put", input=block).stdout.decode().strip()  # the same bytes, raw codec
    big = ipld.encode({"note": "x" * MAX_PUSHED_BLOCK})

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()
    async with aiohttp.ClientSession(headers=replicator) as s:
        for bad in ({"cid": cid, BLOCK_FIELD: b64(other)}, {"cid": cid, BLOCK_FIELD: b64(block)[:-4] + "!!!!"},
                    {"cid": cid, BLOCK_FIELD: 7}, {"cid": raw_cid, BLOCK_FIELD: b64(block)},
                    {"cid": ipld.cid_of(big), BLOCK_FIELD: b64(big)}):
            async with s.post(f"{api}/pins", json=bad) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["reason"] == "BAD_REQUEST", body
                assert BLOCK_FIELD in body["error"]["details"]
        async with s.get(f"{api}/pins", params={"cid": f"{cid},{raw_cid}", "status": "queued,pinning,pinned,failed"}) as r:
            assert (await r.json())["count"] == 0, "a refused request was kept"
        assert cid not in b.pins() and raw_cid not in b.pins()
        before = blocks_received(b.kubo)
        async with s.post(f"{api}/pins", json={"cid": cid, BLOCK_FIELD: b64(block)}) as r:
            status = await r.json()
            assert r.status == 202 and status["status"] == "pinned", status
        assert status["info"][TAKES_BLOCKS[0]] == TAKES_BLOCKS[1]
    assert cid in b.pins() and blocks_received(b.kubo) == before
    assert b.kubo.ipfs("block", "get", cid).stdout == block


async def kubo_calls(site: Site, token: str, command: str) -> float:
    """How many ``command`` calls the site's gateway has made to its Kubo (its /metrics)."""
    async with aiohttp.ClientSession(headers=bearer(token)) as s:
        async with s.get(f"{site.url}/metrics") as r:
            assert r.status == 200, await r.text()
            text = await r.text()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "medicon_kubo_call_duration_seconds_count" and sample.labels["command"] == command)


async def test_a_chain_written_in_one_batch_is_asked_of_a_replica_in_chain_order(cluster, tmp_path):
    """With the pipeline, a record and its ``prev`` can be written in one batch. A service sent
    blocks is asked for a record only once it answered for its ``prev``, so each is pinned
    alone there: no ``pin/add`` (which walks the whole chain below it, fetching what it lacks
    by bitswap), nothing fetched. Sent all at once, a record's request could be worked on
    before its ``prev`` was pinned."""
    from gateway.config import RecordsConfig, ReplicaService
    from gateway.core.replication import Replication
    from gateway.kubo import ipld
    cluster.ensure_up()
    a, b = cluster.sites
    (tmp_path / "replicator").write_text(make_token(b.data_dir, role="replicator"))
    replication = Replication(RecordsConfig(replicas=2, replica_services=(ReplicaService(
        name="site-b", endpoint=f"{b.url}/pinning/v1", key_file=str(tmp_path / "replicator")),)), None)
    blocks = [ipld.encode({"note": uuid.uuid4().hex})]
    for n in range(8):
        blocks.append(ipld.encode({"note": uuid.uuid4().hex, "n": n, "prev": {"/": ipld.cid_of(blocks[-1])}}))
    cids = [ipld.cid_of(block) for block in blocks]
    for block in blocks:  # stored and pinned at their origin, as the append path leaves them
        a.kubo.ipfs("block", "put", "--cid-codec=dag-cbor", "--pin=true", input=block)
    try:
        await replication.ensure({cids[0]: blocks[0]})  # B's answer says it takes blocks
        pin_adds, received = await kubo_calls(b, cluster.token, "pin/add"), blocks_received(b.kubo)
        await replication.ensure(dict(zip(cids[1:], blocks[1:])), dict(zip(cids[2:], cids[1:])))
    finally:
        await replication.close()
    assert set(cids) <= b.pins()
    assert await kubo_calls(b, cluster.token, "pin/add") == pin_adds, "a record was pinned by walking its chain"
    assert blocks_received(b.kubo) == received


async def test_a_sent_block_whose_chain_is_not_all_pinned_is_stored_before_the_chain_is_fetched(cluster):
    """A record's request reaching a service whose node lacks the record's ``prev``: the service
    stores the block it was sent, then ``pin/add`` fetches only what is missing below it —
    here the ``prev``, one block by bitswap, not the record as well."""
    from gateway.core.replication import BLOCK_FIELD
    from gateway.kubo import ipld
    cluster.ensure_up()
    a, b = cluster.sites
    prev = ipld.encode({"note": uuid.uuid4().hex})
    block = ipld.encode({"note": uuid.uuid4().hex, "prev": {"/": ipld.cid_of(prev)}})
    for data in (prev, block):
        a.kubo.ipfs("block", "put", "--cid-codec=dag-cbor", "--pin=true", input=data)
    received = blocks_received(b.kubo)
    async with aiohttp.ClientSession(headers=bearer(make_token(b.data_dir, role="replicator"))) as s:
        pin = {"cid": ipld.cid_of(block), "origins": [], BLOCK_FIELD: base64.b64encode(block).decode()}
        async with s.post(f"{b.url}/pinning/v1/pins", json=pin) as r:
            status = await r.json()
            assert r.status == 202 and status["status"] == "pinned", status
    assert ipld.cid_of(block) in b.pins()  # recursively: its prev is held below it
    assert blocks_received(b.kubo) == received + 1, "the block sent with the request was fetched as well"


# --- the Pinning Service API, as a spec-compliant service --------------------------------------------

def test_kubos_own_pin_remote_client_pins_through_a_gateway(cluster):
    """Kubo's ``ipfs pin remote`` (its go client of the Pinning Service API) against site B's
    gateway: add (waits for pinned), ls, service ls --stat, rm; node B fetches from node A."""
    cluster.ensure_up()
    a, b = cluster.sites
    service = f"site-b-{uuid.uuid4().hex[:6]}"
    token = make_token(b.data_dir, role="replicator")
    a.kubo.ipfs("pin", "remote", "service", "add", service, f"{b.url}/pinning/v1", token)
    cid = a.kubo.ipfs("block", "put", "--pin=true", input=uuid.uuid4().bytes * 100).stdout.decode().strip()
    assert cid not in b.pins()
    added = a.kubo.ipfs("pin", "remote", "add", f"--service={service}", "--name=scan", cid, check=False)
    assert added.returncode == 0, added.stderr
    assert b"Status: pinned" in added.stdout and cid in b.pins()
    listed = a.kubo.ipfs("pin", "remote", "ls", f"--service={service}", f"--cid={cid}",
                         "--status=queued,pinning,pinned,failed").stdout.decode()
    assert listed.split("\t")[:3] == [cid, "pinned", "scan\n"] or listed.strip().split("\t") == [cid, "pinned", "scan"]
    stat = a.kubo.ipfs("pin", "remote", "service", "ls", "--stat").stdout.decode()
    assert any(line.startswith(service) and "invalid" not in line for line in stat.splitlines()), stat
    removed = a.kubo.ipfs("pin", "remote", "rm", f"--service={service}", f"--cid={cid}", check=False)
    assert removed.returncode == 0, removed.stderr
    assert cid not in b.pins()  # not a record: its last request gone, the node unpins it
    wrong = a.kubo.ipfs("pin", "remote", "service", "add", f"{service}-bad", f"{b.url}/pinning/v1",
                        "mdc_" + "A" * 43)
    assert wrong.returncode == 0
    stat = a.kubo.ipfs("pin", "remote", "service", "ls", "--stat").stdout.decode()
    assert any(line.startswith(f"{service}-bad") and "invalid" in line for line in stat.splitlines()), stat


async def test_the_pinning_api_answers_as_the_spec_says(cluster):
    cluster.ensure_up()
    a, b = cluster.sites
    api = f"{b.url}/pinning/v1"
    replicator = bearer(make_token(b.data_dir, role="replicator"))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{api}/pins") as r:
            body = await r.json()
            assert r.status == 401 and body["error"]["reason"] == "UNAUTHORIZED", body
        for role, scope in (("clinician", {}), ("replicator", {"patients": ["p-1"]})):
            token = make_token(b.data_dir, role=role, **scope)
            async with s.get(f"{api}/pins", headers=bearer(token)) as r:
                assert r.status == 403 and (await r.json())["error"]["reason"] == "FORBIDDEN"
        for bad in ({"cid": "not-a-cid"}, {"name": "x"}, [], {"cid": "bafkqaaa", "origins": "x"},
                    {"cid": "bafkqaaa", "meta": {"k": 1}}, {"cid": "bafkqaaa", "name": "n" * 256}):
            async with s.post(f"{api}/pins", json=bad, headers=replicator) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["reason"] == "BAD_REQUEST", (bad, body)
        for query in ("limit=0", "limit=1001", "status=gone", "match=fuzzy", "before=yesterday",
                      "cid=" + ",".join(["bafkqaaa"] * 11), "meta=[1]"):
            async with s.get(f"{api}/pins?{query}", headers=replicator) as r:
                assert r.status == 400 and (await r.json())["error"]["reason"] == "BAD_REQUEST", query
        async with s.get(f"{api}/pins/no-such-request", headers=replicator) as r:
            assert r.status == 404 and (await r.json())["error"]["reason"] == "NOT_FOUND"

        made = []
        for i in range(3):
            cid = a.kubo.ipfs("block", "put", "--pin=true", input=uuid.uuid4().bytes).stdout.decode().strip()
            async with s.post(f"{api}/pins", json={"cid": cid, "name": f"Batch-{i}", "meta": {"run": "t1"},
                                                   "origins": [a.kubo.swarm_multiaddr]}, headers=replicator) as r:
                status = await r.json()
                assert r.status == 202, status
            assert status["status"] == "pinned" and status["pin"]["cid"] == cid
            assert status["delegates"] and all("/p2p/" + b.kubo.peer_id in d for d in status["delegates"])
            assert status["created"].endswith("Z")
            made.append(status)
        async with s.get(f"{api}/pins?meta=" + json.dumps({"run": "t1"}) + "&limit=2", headers=replicator) as r:
            page = await r.json()
        assert page["count"] == 3 and [x["requestid"] for x in page["results"]] == [m["requestid"] for m in made[::-1][:2]]
        async with s.get(f"{api}/pins", params={"meta": json.dumps({"run": "t1"}), "before": page["results"][-1]["created"]},
                         headers=replicator) as r:
            rest = await r.json()
        assert [x["requestid"] for x in rest["results"]] == [made[0]["requestid"]]
        async with s.get(f"{api}/pins", params={"name": "batch", "match": "ipartial", "limit": "10"},
                         headers=replicator) as r:
            assert {x["requestid"] for x in (await r.json())["results"]} >= {m["requestid"] for m in made}
        async with s.get(f"{api}/pins", params={"name": "batch-1", "match": "exact"}, headers=replicator) as r:
            assert (await r.json())["count"] == 0  # exact is case-sensitive

        # Replace: the old request is gone, the new CID pinned, the old one unpinned after.
        new_cid = a.kubo.ipfs("block", "put", "--pin=true", input=uuid.uuid4().bytes).stdout.decode().strip()
        async with s.post(f"{api}/pins/{made[0]['requestid']}", json={"cid": new_cid}, headers=replicator) as r:
            replaced = await r.json()
            assert r.status == 202 and replaced["requestid"] != made[0]["requestid"], replaced
        async with s.get(f"{api}/pins/{made[0]['requestid']}", headers=replicator) as r:
            assert r.status == 404
        assert new_cid in b.pins() and made[0]["pin"]["cid"] not in b.pins()

        # A pin removed on the node behind the service's back reads failed, never pinned.
        b.kubo.ipfs("pin", "rm", made[1]["pin"]["cid"])
        async with s.get(f"{api}/pins/{made[1]['requestid']}", headers=replicator) as r:
            assert (await r.json())["status"] == "failed"

        # The records the node's own gateway holds are reported when asked by CID, and stay.
        patient, episode = uid("p"), uid("e")
        async with s.post(f"{b.url}/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode),
                          headers=bearer(cluster.token)) as r:
            record = (await r.json())["cid"]
        async with s.get(f"{api}/pins", params={"cid": record}, headers=replicator) as r:
            held = await r.json()
        assert held["count"] >= 1 and all(x["pin"]["cid"] == record and x["status"] == "pinned" for x in held["results"])
        for result in held["results"]:
            async with s.delete(f"{api}/pins/{result['requestid']}", headers=replicator) as r:
                assert r.status in (202, 403)
        assert record in b.pins(), "a record's pin belongs to the gateway"
        async with s.delete(f"{api}/pins/{made[2]['requestid']}", headers=replicator) as r:
            assert r.status == 202 and await r.read() == b""
        assert made[2]["pin"]["cid"] not in b.pins()


async def test_a_pin_request_a_killed_gateway_left_unfinished_is_resumed_by_the_next(cluster):
    """A request still ``pinning`` when its gateway died (here: written into the store as a
    killed gateway leaves it) is taken up by the next gateway of the same node, and pinned."""
    from gateway.storage.model import PinRequest
    from gateway.storage.postgres import open_postgres_storage
    cluster.ensure_up()
    a, b = cluster.sites
    cid = a.kubo.ipfs("block", "put", "--pin=true", input=uuid.uuid4().bytes * 10).stdout.decode().strip()
    requestid = uuid.uuid4().hex
    b.kill()
    storage = await open_postgres_storage(cluster.url, pool_min=1, pool_max=1)
    try:
        await storage.pins.add(PinRequest(requestid, b.kubo.peer_id, cid, "pinning", time.time_ns() // 1000,
                                          "token:replicator-site-a", "left over", (a.kubo.swarm_multiaddr,)))
    finally:
        await storage.close()
    assert cid not in b.pins()
    b.start()
    headers = bearer(cluster.replicator_tokens["site-a"])
    async with aiohttp.ClientSession(headers=headers) as s:
        deadline = time.monotonic() + 30
        while True:
            async with s.get(f"{b.url}/pinning/v1/pins/{requestid}") as r:
                status = (await r.json())["status"]
            if status == "pinned":
                break
            assert status == "pinning" and time.monotonic() < deadline, status
            await asyncio.sleep(0.1)
    assert cid in b.pins()
