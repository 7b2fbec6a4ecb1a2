"""The bench's two floors measure what they claim, on a real Kubo: the bare aiohttp relay
(bench/relay.py) hands back Kubo's bytes for ``cat`` and ``GET /ipfs`` and streams an ``add``
through; the ``raw_put`` writer stores a record as the dag-cbor block an append would store,
pinned; and read_cost's table computes its ratios from the samples it is given."""

from __future__ import annotations

import json
import os

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from bench import loadgen, read_cost, relay
from gateway.kubo import ipld


@pytest.fixture
async def relay_url(kubo):
    server = TestServer(relay.create_app(kubo.api_url, kubo.gateway_url), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


async def test_relay_returns_kubos_bytes_for_cat_get_and_add(kubo, relay_url):
    data = os.urandom(300_000)
    async with aiohttp.ClientSession(headers=kubo.rpc_headers) as session:
        form = aiohttp.FormData()
        form.add_field("file", data, filename="blob")
        async with session.post(relay_url + "/api/v0/add", data=form) as resp:
            assert resp.status == 200, await resp.text()
            cid = (await resp.json())["Hash"]
        async with session.post(kubo.api_url + "/api/v0/cat", params={"arg": cid}) as resp:
            assert await resp.read() == data  # the add went through the relay whole
        async with session.post(relay_url + "/api/v0/cat", params={"arg": cid}) as resp:
            assert resp.status == 200 and await resp.read() == data
        async with session.get(f"{relay_url}/ipfs/{cid}") as resp:
            assert resp.status == 200 and await resp.read() == data
        async with session.post(relay_url + "/api/v0/cat", params={"arg": "not-a-cid"}) as resp:
            assert resp.status == 500 and "Message" in await resp.json()  # Kubo's own answer, as is


async def test_raw_put_stores_the_records_dag_cbor_block_pinned(kubo):
    doc = loadgen.record_doc("patient-1", "episode-1", 0, 3, "test")
    body = json.dumps(doc, separators=(",", ":")).encode()
    target = {"name": "kubo put", "kind": "raw_put", "url": kubo.api_url, "headers": kubo.rpc_headers}
    block = loadgen.as_raw(target, body)
    assert ipld.decode(ipld.cid_of(block), block) == doc
    assert loadgen.as_raw({"kind": "raw_add"}, body) == body
    async with aiohttp.ClientSession() as session:
        await loadgen.raw_write(session, target, block, "b" + "0" * 20)
        async with session.post(kubo.api_url + "/api/v0/pin/ls", headers=kubo.rpc_headers,
                                params={"arg": ipld.cid_of(block), "type": "recursive"}) as resp:
            assert resp.status == 200, await resp.text()
            assert ipld.cid_of(block) in (await resp.json())["Keys"]


def test_read_cost_table_ratios_come_from_the_samples():
    samples = {"cat 1 kB direct": [1.0, 1.0, 9.0], "cat 1 kB aiohttp relay": [2.0], "cat 1 kB gateway": [4.0],
               "cat 1 kB aiohttp relay CPU": [0.5], "cat 1 kB gateway CPU": [1.5]}
    header, rule, row = read_cost.table(samples)
    assert row == "| cat 1 kB | 1.00 | 2.00 | 4.00 | 0.50× | 0.25× | 0.50 | 1.50 | 1.00 |"
