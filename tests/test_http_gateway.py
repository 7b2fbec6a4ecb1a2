"""``/ipfs`` and ``/ipns`` through the gateway: Kubo's HTTP gateway semantics preserved."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def sample(kubo):
    data = b"<html><body>hello gateway</body></html>\n" * 100
    return kubo.ipfs("add", "-Q", "--cid-version=1", input=data).stdout.decode().strip(), data


async def test_get_with_headers(client, sample):
    cid, data = sample
    r = await client.get(f"/ipfs/{cid}")
    assert r.status == 200
    assert await r.read() == data
    assert r.headers["Etag"] == f'"{cid}"'
    assert r.headers["X-Ipfs-Path"] == f"/ipfs/{cid}"
    assert "immutable" in r.headers["Cache-Control"]
    assert r.headers["Content-Type"].startswith("text/html")
    assert r.headers["Accept-Ranges"] == "bytes"


async def test_conditional_get(client, sample):
    cid, _ = sample
    r = await client.get(f"/ipfs/{cid}", headers={"If-None-Match": f'"{cid}"'})
    assert r.status == 304
    assert await r.read() == b""


async def test_head(client, sample):
    cid, data = sample
    r = await client.head(f"/ipfs/{cid}")
    assert r.status == 200
    assert int(r.headers["Content-Length"]) == len(data)
    assert await r.read() == b""


async def test_range(client, sample):
    cid, data = sample
    r = await client.get(f"/ipfs/{cid}", headers={"Range": "bytes=10-19"})
    assert r.status == 206
    assert await r.read() == data[10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{len(data)}"


async def test_raw_and_car_formats(client, sample):
    cid, _ = sample
    r = await client.get(f"/ipfs/{cid}?format=raw")
    assert r.status == 200 and r.headers["Content-Type"] == "application/vnd.ipld.raw"
    r = await client.get(f"/ipfs/{cid}", headers={"Accept": "application/vnd.ipld.car"})
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/vnd.ipld.car")


async def test_directory_paths(client, kubo, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.json").write_text('{"ok": true}')
    root = kubo.ipfs("add", "-r", "-Q", str(tmp_path / "d")).stdout.decode().strip()
    r = await client.get(f"/ipfs/{root}/x.json")
    assert r.status == 200 and json.loads(await r.read()) == {"ok": True}
    r = await client.get(f"/ipfs/{root}/missing.json")
    assert r.status == 404


async def test_gateway_is_read_only(client, sample):
    cid, _ = sample
    r = await client.post(f"/ipfs/{cid}", data=b"x")
    assert r.status == 405
    body = await r.json()
    assert body["Type"] == "error" and "not allowed" in body["Message"]


async def test_no_fetch_for_unknown_content(client):
    """A valid CID this node does not have: Kubo's gateway (NoFetch) does not go looking for it,
    and the client hears so at once, as a not-found in Kubo's shape, never a hang."""
    import asyncio
    import time
    started = time.monotonic()
    async with asyncio.timeout(5):
        r = await client.get("/ipfs/bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy")
        body = await r.json()
    assert r.status == 404 and body["Type"] == "error" and "not found locally" in body["Message"]
    assert time.monotonic() - started < 5


async def test_bad_cid_is_a_client_error(client):
    r = await client.get("/ipfs/not-a-cid")
    assert 400 <= r.status < 500


async def test_ipns_path_is_proxied(client, kubo):
    """Kubo's own refusal (offline, it cannot resolve the name: a plain-text 500) reaches the
    client as the request's error, in Kubo's JSON shape, with Kubo's message."""
    import aiohttp
    path = "/ipns/k51qzi5uqu5dlvj2baxnqndepeb86cbk3ng7n3i46uzyxzyqj2xjonzllnv0v8"
    async with aiohttp.ClientSession() as s:
        async with s.get(kubo.gateway_url + path) as direct:
            assert direct.status == 500
            message = (await direct.text()).strip()
    r = await client.get(path)
    assert r.status == 400
    assert await r.json() == {"Message": message, "Code": 1, "Type": "error"}


async def test_a_directory_indexed_as_a_sealed_attachment_is_served_as_kubo_serves_it(client, kubo, tmp_path):
    """Earlier versions indexed the wrapping directory of sealed attachments as a sealed blob;
    reading it must not be a 5xx: it holds no sealed blob, so Kubo's own answer is given."""
    from gateway.http.appkeys import SERVICE
    from gateway.storage.model import Blob

    (tmp_path / "wrapped").mkdir()
    (tmp_path / "wrapped" / "ciphertext.bin").write_bytes(b"\x00not a sealed blob" * 50)
    directory = kubo.ipfs("add", "-Q", "-r", "--cid-version=1", str(tmp_path / "wrapped")).stdout.decode().strip()
    await client.server.app[SERVICE].storage.heads.add_blobs([Blob(directory, "patient-old", True)])

    listing = await client.get(f"/ipfs/{directory}/")
    assert listing.status == 200, await listing.text()
    assert "ciphertext.bin" in await listing.text()
    cat = await client.post(f"/api/v0/cat?arg={directory}")
    assert cat.status < 500, await cat.text()
    assert "directory" in (await cat.json())["Message"]


async def test_a_car_of_content_the_node_does_not_hold_is_a_404_not_an_empty_200(client, sample):
    """Kubo starts a CAR (200 and its header) before it looks for the blocks; the gateway checks
    the block the path ends at first. Content that is held still comes back as a CAR."""
    cid, _ = sample
    missing = "bafyreicsub2siselbvukvdk3sf4aidawgi6v7ag7risvcknpuuaypwo3ga"  # a digest nobody stored
    for target, headers in ((f"/ipfs/{missing}?format=car", {}),
                            (f"/ipfs/{missing}", {"Accept": "application/vnd.ipld.car"}),
                            (f"/ipfs/{cid}/no/such/path?format=car", {})):
        r = await client.get(target, headers=headers)
        assert r.status == 404, (target, r.status, await r.read())
    r = await client.get(f"/ipfs/{cid}?format=car")
    assert r.status == 200 and len(await r.read()) > 100
