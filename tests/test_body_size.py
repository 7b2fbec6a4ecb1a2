"""``server.max_body_size``: a request body past the limit gets 413 in Kubo's error shape on every
door that carries bytes to Kubo (the pass-through proxy, a blob ``add``, a sealed attachment), whether
it announces its size (``Content-Length``, refused before a byte is read or Kubo is asked) or not
(chunked, counted as it arrives and cut off). Nothing of a refused upload is left pinned in Kubo;
an upload under the limit works as before."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket

import aiohttp
import pytest

from conftest import app_client, gateway_config
from records_helpers import uid

KiB = 1024
MiB = 1024 * KiB
LIMIT = 1 * MiB
BOUNDARY = "body-size-boundary"


def form(payload: bytes, name: str = "scan.bin") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + payload + f"\r\n--{BOUNDARY}--\r\n".encode()


FORM = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


async def chunked(data: bytes, size: int = 64 * KiB, pause: float = 0.0):
    """``data`` as an async iterator: aiohttp sends it with ``Transfer-Encoding: chunked``, no
    ``Content-Length`` (``pause`` seconds between chunks)."""
    for i in range(0, len(data), size):
        yield data[i:i + size]
        if pause:
            await asyncio.sleep(pause)


def body_of(how: str, data: bytes):
    return data if how == "content-length" else chunked(data)


async def kubo_error(r, status: int) -> dict:
    assert r.status == status, await r.text()
    body = json.loads(await r.text())
    assert set(body) == {"Message", "Code", "Type"} and body["Type"] == "error", body
    return body


def recursive_pins(kubo) -> set[str]:
    return set(json.loads(kubo.ipfs("pin", "ls", "--type=recursive", "--enc=json").stdout)["Keys"])


def present(kubo, cid: str) -> bool:
    return kubo.ipfs("block", "stat", "--offline", cid, check=False).returncode == 0


def only_hash(kubo, payload: bytes) -> str:
    """The CID Kubo gives these bytes as a file (what the gateway's ``add`` would store)."""
    return kubo.ipfs("add", "--only-hash", "-Q", input=payload).stdout.decode().strip()


def raw_cid(data: bytes) -> str:
    """CIDv1, raw codec, sha2-256, base32: what ``block/put`` names ``data``."""
    raw = bytes([0x01, 0x55, 0x12, 0x20]) + hashlib.sha256(data).digest()
    return "b" + base64.b32encode(raw).decode().rstrip("=").lower()


@pytest.fixture
async def small(aiohttp_client, kubo):
    """An admin client of a gateway whose body limit is 1 MiB."""
    return await app_client(aiohttp_client, gateway_config(kubo, **{"server.max_body_size": LIMIT}))


@pytest.mark.parametrize("how", ["content-length", "chunked"])
async def test_blob_add_over_the_limit_is_413_and_nothing_is_pinned(small, kubo, how):
    payload = os.urandom(2 * MiB)
    cid = only_hash(kubo, payload)
    pins = recursive_pins(kubo)
    r = await small.post("/api/v0/add", data=body_of(how, form(payload)), headers=FORM)
    body = await kubo_error(r, 413)
    assert str(LIMIT) in body["Message"]
    assert not present(kubo, cid)
    assert recursive_pins(kubo) == pins
    # under the limit, the same door stores and pins the file as before
    payload = os.urandom(LIMIT // 2)
    r = await small.post("/api/v0/add", data=body_of(how, form(payload)), headers=FORM)
    assert r.status == 200, await r.text()
    added = json.loads((await r.text()).splitlines()[-1])["Hash"]
    assert added == only_hash(kubo, payload) and added in recursive_pins(kubo)


@pytest.mark.parametrize("how", ["content-length", "chunked"])
async def test_sealed_attachment_over_the_limit_is_413_and_nothing_is_pinned(small, kubo, how):
    patient = uid("p")
    pins = recursive_pins(kubo)
    payload = os.urandom(2 * MiB)
    r = await small.post("/api/v0/add", data=body_of(how, form(payload)),
                         headers={**FORM, "X-Medicon-Patient": patient})
    await kubo_error(r, 413)
    assert recursive_pins(kubo) == pins
    payload = os.urandom(LIMIT // 2)
    r = await small.post("/api/v0/add", data=body_of(how, form(payload)),
                         headers={**FORM, "X-Medicon-Patient": patient})
    assert r.status == 200, await r.text()
    sealed = json.loads((await r.text()).splitlines()[-1])["Hash"]
    assert recursive_pins(kubo) - pins == {sealed}
    assert sealed != only_hash(kubo, payload)  # Kubo holds ciphertext
    r = await small.post(f"/api/v0/cat?arg={sealed}")
    assert r.status == 200 and await r.read() == payload


@pytest.mark.parametrize("how", ["content-length", "chunked"])
async def test_pass_through_block_put_over_the_limit_is_413_and_not_stored(aiohttp_client, kubo, how):
    """``block/put`` is forwarded as it comes (Kubo takes blocks up to 1 MiB, so the limit here
    is smaller): a body past the limit never reaches Kubo whole."""
    limit = 256 * KiB
    c = await app_client(aiohttp_client, gateway_config(kubo, **{"server.max_body_size": limit}))
    block = os.urandom(limit + 64 * KiB)
    r = await c.post("/api/v0/block/put?cid-codec=raw", data=body_of(how, form(block)), headers=FORM)
    body = await kubo_error(r, 413)
    assert str(limit) in body["Message"]
    assert not present(kubo, raw_cid(block))
    block = os.urandom(limit // 2)
    r = await c.post("/api/v0/block/put?cid-codec=raw", data=body_of(how, form(block)), headers=FORM)
    assert r.status == 200, await r.text()
    assert json.loads(await r.text())["Key"] == raw_cid(block) and present(kubo, raw_cid(block))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command, headers", [
    ("add", {}), ("add", {"X-Medicon-Patient": "p-1"}), ("block/put", {}), ("dag/import", {}),
    ("dag/put", {}),
])
async def test_announced_length_over_the_limit_is_refused_before_kubo_is_asked(aiohttp_client, kubo,
                                                                                command, headers):
    """Kubo's API here is a closed port: any request that got as far as Kubo would answer 502."""
    port = _closed_port()
    cfg = gateway_config(kubo, **{"server.max_body_size": LIMIT, "kubo.api_url": f"http://127.0.0.1:{port}"})
    c = await app_client(aiohttp_client, cfg)
    r = await c.post(f"/api/v0/{command}", data=form(b"x" * LIMIT), headers={**FORM, **headers})
    await kubo_error(r, 413)
    small = form(b"x" * (LIMIT // 4))
    r = await c.post(f"/api/v0/{command}", data=small, headers={**FORM, **headers})
    assert r.status == 502, await r.text()  # under the limit: on to Kubo, which is not there


async def test_chunked_body_past_the_limit_of_the_rest_api_and_dag_put(aiohttp_client, kubo):
    """Doors that read a body whole are bounded by it too (here below their own record limit)."""
    limit = 64 * KiB
    c = await app_client(aiohttp_client, gateway_config(kubo, **{"server.max_body_size": limit}))
    node = json.dumps({"pad": "x" * (2 * limit)}).encode()
    r = await c.post("/api/v0/dag/put", data=chunked(form(node), 8 * KiB), headers=FORM)
    await kubo_error(r, 413)
    patient = uid("p")
    r = await c.post(f"/medicon/v1/patients/{patient}/episodes", data=chunked(node, 8 * KiB),
                     headers={"Content-Type": "application/json"})
    assert r.status == 413 and (await r.json())["error"]["status"] == 413


async def test_past_the_limit_after_kubo_began_answering_the_transfer_fails(small, kubo):
    """With ``progress=true`` Kubo answers while the upload still comes in: once the body passes
    the limit the upload is cut off and so is the answer, which the client sees as a failed
    transfer, never as a completed add; the file is not pinned."""
    payload = os.urandom(3 * MiB)
    cid = only_hash(kubo, payload)
    pins = recursive_pins(kubo)
    status, text = None, ""
    try:
        async with small.post("/api/v0/add?progress=true", data=chunked(form(payload), 16 * KiB, 0.005),
                              headers=FORM, timeout=aiohttp.ClientTimeout(total=30)) as r:
            status = r.status
            text = await r.text()
        assert status == 413, (status, text[-300:])
    except aiohttp.ClientPayloadError:
        pass  # the answer had begun (200): it is cut off without its final chunk
    assert '"Hash"' not in text
    assert not present(kubo, cid)
    assert recursive_pins(kubo) == pins
