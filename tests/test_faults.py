"""Kubo down, paused or dying mid-stream: clean, quick errors and recovery without restart."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest

from gateway.http.app import create_app
from conftest import app_client, gateway_config


@pytest.fixture
async def fault_client(aiohttp_client, own_kubo):
    cfg = gateway_config(own_kubo, **{"kubo.connect_timeout": 1.0, "kubo.read_timeout": 1.5})
    return await app_client(aiohttp_client, cfg)


async def test_kubo_stopped_gives_502_then_recovers(fault_client, own_kubo):
    r = await fault_client.post("/api/v0/version")
    assert r.status == 200
    own_kubo.stop()

    t0 = time.monotonic()
    r = await fault_client.post("/api/v0/version")
    assert time.monotonic() - t0 < 3
    assert r.status == 502
    assert await r.json() == {"Message": "Kubo is not reachable", "Code": 0, "Type": "error"}
    r = await fault_client.get("/ipfs/bafkqaaa")
    assert r.status == 502
    r = await fault_client.get("/readyz")
    assert r.status == 503 and (await r.json())["status"] == "not ready"
    r = await fault_client.get("/healthz")
    assert r.status == 200

    own_kubo.start()  # same repo, same ports
    r = await fault_client.post("/api/v0/version")
    assert r.status == 200
    r = await fault_client.get("/readyz")
    assert r.status == 200 and (await r.json())["kubo"]


async def test_kubo_paused_gives_504_within_the_timeout(fault_client, own_kubo):
    os.kill(own_kubo.process.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = await fault_client.post("/api/v0/version")
        elapsed = time.monotonic() - t0
        assert r.status == 504, await r.text()
        body = await r.json()
        assert body["Type"] == "error" and "did not answer" in body["Message"]
        assert elapsed < 5
        r = await fault_client.get("/readyz")
        assert r.status == 503
    finally:
        os.kill(own_kubo.process.pid, signal.SIGCONT)
    r = await fault_client.post("/api/v0/version")
    assert r.status == 200


async def _cat_while_kubo_dies(fault_client, own_kubo, cid: str) -> int:
    """Read ``cat`` of ``cid`` through the gateway, killing Kubo after the first chunk: the
    transfer must fail (never end as if complete). Returns the bytes received."""
    received = 0
    with pytest.raises(aiohttp.ClientPayloadError):
        r = await fault_client.post(f"/api/v0/cat?arg={cid}")
        assert r.status == 200
        async for chunk in r.content.iter_chunked(64 * 1024):
            if received == 0:
                own_kubo.process.kill()
                await asyncio.to_thread(own_kubo.process.wait)  # dead before reading on
            received += len(chunk)
    own_kubo.process = None
    return received


async def test_kubo_dying_mid_stream_is_a_failed_transfer(fault_client, own_kubo):
    """Never a silently truncated body that looks complete."""
    data = os.urandom(48 * 1024 * 1024)
    cid = own_kubo.ipfs("add", "-Q", input=data).stdout.decode().strip()
    assert await _cat_while_kubo_dies(fault_client, own_kubo, cid) < len(data)


async def test_gateway_serves_again_after_a_failed_stream(fault_client, own_kubo):
    """After a stream broke mid-way (Kubo killed under it), the same gateway answers 502 while
    Kubo is down and streams whole again once it is back: no restart, no stuck connection."""
    data = os.urandom(32 * 1024 * 1024)
    cid = own_kubo.ipfs("add", "-Q", input=data).stdout.decode().strip()
    assert await _cat_while_kubo_dies(fault_client, own_kubo, cid) < len(data)
    r = await fault_client.post("/api/v0/version")
    assert r.status == 502
    own_kubo.start()
    r = await fault_client.post(f"/api/v0/cat?arg={cid}")
    assert r.status == 200 and await r.read() == data
