"""``server.workers``: several gateway processes on one port (SO_REUSEPORT) over PostgreSQL.
Connections spread over the workers; appends to one episode through all of them make one
chain with no conflict answered to a client that named no position; a worker that dies is
replaced while the others serve; SIGTERM stops them all cleanly; SQLite refuses workers."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import STORAGE_URLS, bearer, new_data_dir, run_blocking, start_gateway
from gateway.config import ConfigError, load_config
from records_helpers import encounter, opened, uid


def test_workers_need_a_storage_several_processes_share(tmp_path):
    with pytest.raises(ConfigError, match=r"'server.workers' \(MEDICON_SERVER_WORKERS\).*storage.url.*one process"):
        load_config(env={"MEDICON_SERVER_WORKERS": "2", "MEDICON_RECORDS_DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="server.workers"):
        load_config(env={"MEDICON_SERVER_WORKERS": "0"})
    one = load_config(env={"MEDICON_RECORDS_DATA_DIR": str(tmp_path)})
    assert one.server.workers == 1
    shared = load_config(env={"MEDICON_SERVER_WORKERS": "3", "MEDICON_STORAGE_URL": "postgresql://u:p@127.0.0.1:1/db"})
    assert shared.server.workers == 3
    with pytest.raises(ConfigError, match=r"'records.pipeline' \(MEDICON_RECORDS_PIPELINE\).*no turns between processes"):
        load_config(env={"MEDICON_SERVER_WORKERS": "2", "MEDICON_STORAGE_URL": "postgresql://u:p@127.0.0.1:1/db",
                         "MEDICON_RECORDS_PIPELINE": "true"})


def _workers_of(supervisor: int) -> list[int]:
    """The supervisor's child processes (Linux: /proc/<pid>/task/<pid>/children)."""
    text = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text()
    return [int(pid) for pid in text.split()]


def _established_on(pid: int, port: int) -> int:
    """Connections accepted on ``port`` that process ``pid`` holds (its fds against /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    held = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                held += 1
    return held


def _wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def two_workers(kubo, postgres_db):
    from gateway.storage.postgres import migrate_database
    data_dir = new_data_dir()
    run_blocking(migrate_database(postgres_db))
    STORAGE_URLS[data_dir] = postgres_db
    gw = start_gateway(kubo, data_dir=data_dir, env={"MEDICON_SERVER_WORKERS": "2", "MEDICON_STORAGE_URL": postgres_db})
    try:
        yield gw
    finally:
        gw.stop()
        STORAGE_URLS.pop(data_dir, None)


async def _hold_connections(url: str, token: str, count: int):
    """``count`` keep-alive connections, each having made one request; (sessions, statuses)."""
    sessions = [aiohttp.ClientSession(headers=bearer(token)) for _ in range(count)]

    async def one(session):
        async with session.get(url + "/medicon/v1/whoami") as r:
            await r.read()
            return r.status
    return sessions, await asyncio.gather(*(one(s) for s in sessions))


def test_connections_spread_over_the_workers_and_a_dead_worker_is_replaced(two_workers):
    gw = two_workers
    port = int(gw.url.rsplit(":", 1)[1])
    workers = _wait_for(lambda: len(_workers_of(gw.process.pid)) == 2 and _workers_of(gw.process.pid), "two workers")

    async def spread():
        sessions, statuses = await _hold_connections(gw.url, gw.token, 24)
        try:
            assert statuses == [200] * 24
            return {pid: _established_on(pid, port) for pid in workers}
        finally:
            await asyncio.gather(*(s.close() for s in sessions))
    held = asyncio.run(spread())
    assert sum(held.values()) == 24 and all(n > 0 for n in held.values()), held

    victim, survivor = workers
    os.kill(victim, signal.SIGKILL)
    replaced = _wait_for(lambda: (set(_workers_of(gw.process.pid)) - {victim, survivor}), "a replacement worker")
    assert survivor in _workers_of(gw.process.pid)

    async def still_served():
        async with aiohttp.ClientSession(headers=bearer(gw.token)) as s:
            for _ in range(20):  # fresh connections: the replacement or the survivor takes each
                async with s.get(gw.url + "/medicon/v1/whoami", headers={"Connection": "close"}) as r:
                    assert r.status == 200
    asyncio.run(still_served())
    assert len(replaced) == 1

    children = _workers_of(gw.process.pid)
    assert gw.stop() == 0, "the supervisor did not exit cleanly on SIGTERM"
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_metrics_show_every_workers_requests_whichever_worker_answers(two_workers):
    from prometheus_client.parser import text_string_to_metric_families
    gw = two_workers
    _wait_for(lambda: len(_workers_of(gw.process.pid)) == 2, "two workers")

    async def run():
        async with aiohttp.ClientSession(headers=bearer(gw.token)) as s:
            for _ in range(40):  # a fresh connection each: the kernel spreads them over the workers
                async with s.get(gw.url + "/medicon/v1/whoami", headers={"Connection": "close"}) as r:
                    assert r.status == 200
            scrapes = []
            for _ in range(10):
                async with s.get(gw.url + "/metrics", headers={"Connection": "close"}) as r:
                    assert r.status == 200
                    scrapes.append(await r.text())
        return scrapes

    seen = []
    for text in asyncio.run(run()):
        samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
        whoami = sum(x.value for x in samples if x.name == "medicon_http_requests_total"
                     and x.labels.get("route") == "/medicon/v1/whoami" and x.labels.get("status") == "200")
        in_flight = [x.value for x in samples if x.name == "medicon_http_requests_in_flight"]
        workers = {x.labels.get("worker") for x in samples if x.name == "process_resident_memory_bytes"}
        seen.append((whoami, in_flight, workers))
    # every scrape counts all 40 (a worker alone served about half), the in-flight gauge is the
    # sum over the workers (the scrape itself), and each worker's memory is there under its number
    assert all(entry == (40.0, [1.0], {"1", "2"}) for entry in seen), seen


def test_appends_to_one_episode_through_both_workers_make_one_chain(two_workers):
    gw = two_workers
    patient, episode = uid("p"), uid("e")

    async def run():
        async with aiohttp.ClientSession(headers=bearer(gw.token)) as s:
            async with s.post(f"{gw.url}/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode)) as r:
                assert r.status == 201, await r.text()
        # a connection per client, so the kernel spreads them over the workers
        clients = [aiohttp.ClientSession(headers=bearer(gw.token)) for _ in range(8)]
        try:
            async def writer(s, n):
                answers = []
                for i in range(6):
                    async with s.post(f"{gw.url}/medicon/v1/episodes/{episode}/records",
                                      json=encounter(patient, episode, note=f"w{n}-{i}")) as r:
                        answers.append((r.status, await r.text()))
                return answers
            results = await asyncio.gather(*(writer(s, n) for n, s in enumerate(clients)))
        finally:
            await asyncio.gather(*(s.close() for s in clients))
        async with aiohttp.ClientSession(headers=bearer(gw.token)) as s:
            async with s.get(f"{gw.url}/medicon/v1/episodes/{episode}/history", params={"limit": "100"}) as r:
                history = (await r.json())["records"]
            async with s.get(f"{gw.url}/medicon/v1/episodes/{episode}/verify") as r:
                verdict = await r.json()
        return [a for answers in results for a in answers], history, verdict
    answers, history, verdict = asyncio.run(run())
    refused = [a for a in answers if a[0] != 201]
    assert not refused, refused[:3]  # no 409: an unnamed append is linked again, not refused
    assert [r["seq"] for r in history] == list(range(49))
    notes = sorted(r["record"]["body"]["notes"] for r in history[1:])
    assert notes == sorted(f"w{n}-{i}" for n in range(8) for i in range(6))
    assert verdict.get("ok") is True, verdict


def test_a_worker_that_cannot_start_stops_the_gateway(kubo, tmp_path):
    """A database nobody listens on: every worker fails while starting; the supervisor gives
    up after a few tries with a non-zero status instead of restarting forever."""
    import socket
    import subprocess
    import sys
    from conftest import ROOT
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    data_dir = new_data_dir()
    env = {**os.environ, "MEDICON_KUBO_API_URL": kubo.api_url, "MEDICON_KUBO_GATEWAY_URL": kubo.gateway_url,
           "MEDICON_KUBO_API_AUTH": kubo.api_secret, "MEDICON_RECORDS_DATA_DIR": data_dir,
           "MEDICON_SERVER_WORKERS": "2", "MEDICON_STORAGE_URL": f"postgresql://u:secretpw@127.0.0.1:{dead}/db",
           "MEDICON_STORAGE_CONNECT_TIMEOUT": "2"}
    proc = subprocess.run([sys.executable, "-m", "gateway", "--log-level", "WARNING", "serve", "--port", "0"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "MEDICON_GATEWAY_URL" not in proc.stdout
    assert "while starting, 3 times in a row" in proc.stderr
    assert "secretpw" not in proc.stderr


async def test_turns_never_take_the_pool_from_the_appends_that_hold_them(aiohttp_client, kubo, postgres_db):
    """A pool of 2: at most one connection holds a turn, the other is left for the appends'
    own work. 24 appends at once over 8 episodes all land; none waits out the pool."""
    from conftest import app_client, gateway_config
    from gateway.storage.postgres import migrate_database
    await migrate_database(postgres_db)
    cfg = gateway_config(kubo, **{"storage.url": postgres_db, "storage.pool_max": 2, "storage.pool_min": 1,
                                  "storage.connect_timeout": 5})
    STORAGE_URLS[cfg.records.data_dir] = postgres_db
    try:
        c = await app_client(aiohttp_client, cfg)
        patient = uid("p")
        episodes = [uid("e") for _ in range(8)]
        for episode in episodes:
            r = await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
            assert r.status == 201, await r.text()

        async def append(episode, n):
            r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode, note=f"n{n}"))
            return r.status, await r.text()
        answers = await asyncio.wait_for(
            asyncio.gather(*(append(episodes[i % 8], i) for i in range(24))), 60)
        assert [a for a in answers if a[0] != 201] == []  # a starved pool answers 503 after 5 s
        for episode in episodes:
            assert (await (await c.get(f"/medicon/v1/episodes/{episode}")).json())["length"] == 4
    finally:
        STORAGE_URLS.pop(cfg.records.data_dir, None)


def test_a_killed_supervisors_metrics_directory_is_removed_by_the_next(tmp_path):
    """SIGKILL skips the supervisor's clean-up: the next supervisor removes what it left (the
    directory names its pid), and keeps those of supervisors still running."""
    import subprocess
    import sys
    from gateway.workers import METRICS_DIR_PREFIX, remove_stale_metrics_dirs
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no process has now (reaped)
    stale = tmp_path / f"{METRICS_DIR_PREFIX}{gone.pid}-abc"
    (stale / "sub").mkdir(parents=True)
    (stale / "counter_1.db").write_bytes(b"x")
    running = tmp_path / f"{METRICS_DIR_PREFIX}{os.getpid()}-def"
    running.mkdir()
    unrelated = tmp_path / f"{METRICS_DIR_PREFIX}notapid-ghi"
    unrelated.mkdir()
    assert remove_stale_metrics_dirs(str(tmp_path)) == [stale]
    assert not stale.exists() and running.exists() and unrelated.exists()


def test_a_stale_metrics_directory_removed_meanwhile_does_not_stop_a_supervisor(tmp_path, monkeypatch):
    """Two supervisors starting at once may both find one stale directory: the one that finds
    it gone before it looks at its owner skips it instead of failing to start."""
    from pathlib import Path
    from gateway.workers import METRICS_DIR_PREFIX, remove_stale_metrics_dirs
    stale = tmp_path / f"{METRICS_DIR_PREFIX}999999999-abc"
    stale.mkdir()
    real_stat, looks = Path.stat, []

    def removed_meanwhile(self, *args, **kwargs):
        if self == stale:
            looks.append(self)
            if len(looks) == 2:  # after is_dir() saw it, before its owner is read
                stale.rmdir()  # the other supervisor got there first
        return real_stat(self, *args, **kwargs)
    monkeypatch.setattr(Path, "stat", removed_meanwhile)
    assert remove_stale_metrics_dirs(str(tmp_path)) == []
    assert len(looks) == 2 and not stale.exists()
