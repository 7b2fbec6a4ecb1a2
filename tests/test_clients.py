"""Other real clients through the gateway: ipfshttpclient, aiohttp, curl; and streaming."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import urllib.parse

import aiohttp
import ipfshttpclient
import pytest

from conftest import start_gateway

MiB = 1024 * 1024


@pytest.fixture
def ipfs(gateway):
    # ipfshttpclient.connect() refuses Kubo >= 0.8 by its version check; the Client itself works.
    with ipfshttpclient.Client(f"{gateway.multiaddr}/http", headers=gateway.headers) as c:
        yield c


def test_ipfshttpclient_bytes_and_files(ipfs, kubo, tmp_path):
    cid = ipfs.add_bytes(b"hello from ipfshttpclient\n")
    assert ipfs.cat(cid) == b"hello from ipfshttpclient\n"
    assert kubo.ipfs("cat", cid).stdout == b"hello from ipfshttpclient\n"

    f = tmp_path / "note.txt"
    f.write_text("a file\n")
    res = ipfs.add(str(f))
    assert res["Name"] == "note.txt" and ipfs.cat(res["Hash"]) == b"a file\n"
    assert [link["Hash"] for link in ipfs.ls(ipfs.add(str(tmp_path), recursive=True)[-1]["Hash"])["Objects"][0]["Links"]] == [res["Hash"]]


def test_ipfshttpclient_json_and_version(ipfs):
    cid = ipfs.add_json({"a": 1, "b": [True, None]})
    assert ipfs.get_json(cid) == {"a": 1, "b": [True, None]}
    assert ipfs.version()["Version"].count(".") == 2


def test_ipfshttpclient_sees_refusals_as_errors(ipfs):
    with pytest.raises(ipfshttpclient.exceptions.ErrorResponse, match="refused by the gateway"):
        ipfs.config.get()


def test_curl_add_and_cat(gateway, tmp_path):
    curl = shutil.which("curl")
    assert curl, "curl is needed for this test"
    f = tmp_path / "c.txt"
    f.write_text("curl says hi\n")
    auth = ["-H", f"Authorization: Bearer {gateway.token}"]
    out = subprocess.run([curl, "-sf", *auth, "-X", "POST", "-F", f"file=@{f}", f"{gateway.url}/api/v0/add"],
                         capture_output=True, check=True).stdout
    cid = json.loads(out)["Hash"]
    body = subprocess.run([curl, "-sf", *auth, "-X", "POST", f"{gateway.url}/api/v0/cat?arg={cid}"],
                          capture_output=True, check=True).stdout
    assert body == b"curl says hi\n"
    body = subprocess.run([curl, "-sf", *auth, f"{gateway.url}/ipfs/{cid}"], capture_output=True, check=True).stdout
    assert body == b"curl says hi\n"


def _pattern(size: int, seed: bytes = b"medicon"):
    """Deterministic, incompressible-looking bytes, generated without holding them."""
    block = hashlib.sha256(seed).digest() * 8192  # 256 KiB
    sent = 0
    while sent < size:
        chunk = block[: min(len(block), size - sent)]
        block = hashlib.sha256(block[:64]).digest() + block[32:]
        sent += len(chunk)
        yield chunk


async def _add_streamed(url: str, size: int, headers: dict) -> str:
    async def gen():
        for chunk in _pattern(size):
            yield chunk
    form = aiohttp.FormData()
    form.add_field("file", gen(), filename="big.bin", content_type="application/octet-stream")
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.post(f"{url}/api/v0/add?pin=true&quieter=true", data=form) as r:
            assert r.status == 200, await r.text()
            lines = [json.loads(line) for line in (await r.text()).splitlines()]
    return lines[-1]["Hash"]


async def _sha_of(url: str, method: str, path: str, headers=None) -> tuple[str, int, int]:
    h, n = hashlib.sha256(), 0
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url + path, headers=headers or {}) as r:
            status = r.status
            async for chunk in r.content.iter_chunked(1 << 20):
                h.update(chunk)
                n += len(chunk)
    return h.hexdigest(), n, status


async def test_64mib_add_and_read_back_byte_identical_with_flat_memory(kubo):
    """Streams both ways: the gateway's peak RSS must not grow with the 64 MiB body."""
    size = 64 * MiB
    expected = hashlib.sha256(b"".join(_pattern(size))).hexdigest()
    gw = start_gateway(kubo)
    try:
        await _sha_of(gw.url, "POST", "/api/v0/version", gw.headers)
        baseline = gw.rss_peak_kib()
        cid = await _add_streamed(gw.url, size, gw.headers)
        digest, n, status = await _sha_of(gw.url, "POST", f"/api/v0/cat?arg={cid}", gw.headers)
        assert (status, n, digest) == (200, size, expected)
        digest, n, status = await _sha_of(gw.url, "GET", f"/ipfs/{cid}", gw.headers)
        assert (status, n, digest) == (200, size, expected)
        growth_mib = (gw.rss_peak_kib() - baseline) / 1024
        assert growth_mib < 24, f"gateway peak RSS grew {growth_mib:.1f} MiB for a 64 MiB body"
    finally:
        assert gw.stop() == 0
    # same CID as Kubo itself computes for these bytes
    direct = kubo.ipfs("add", "-Q", "--only-hash", input=b"".join(_pattern(size))).stdout.decode().strip()
    assert direct == cid


async def test_range_on_large_file(kubo, gateway):
    size = 8 * MiB
    data = b"".join(_pattern(size, b"range"))
    cid = kubo.ipfs("add", "-Q", input=data).stdout.decode().strip()
    async with aiohttp.ClientSession(headers=gateway.headers) as s:
        for rng, want in [("bytes=0-99", data[:100]), ("bytes=5000000-5000999", data[5000000:5001000]),
                          (f"bytes={size - 10}-", data[-10:]), ("bytes=-300", data[-300:])]:
            async with s.get(f"{gateway.url}/ipfs/{cid}", headers={"Range": rng}) as r:
                assert r.status == 206, rng
                assert await r.read() == want, rng
                assert r.headers["Content-Range"].endswith(f"/{size}")


def test_path_argument_form(gateway, kubo):
    cid = kubo.ipfs("add", "-Q", input=b"path arg\n").stdout.decode().strip()
    import requests
    r = requests.post(f"{gateway.url}/api/v0/cat/{cid}", headers=gateway.headers)
    assert r.status_code == 200 and r.content == b"path arg\n"
    r = requests.post(f"{gateway.url}/api/v0/dag/get/{urllib.parse.quote(cid)}", headers=gateway.headers)
    assert r.status_code == 200


def test_gzip_encoded_upload_is_stored_decoded(gateway, kubo):
    """A client may send its body Content-Encoding: gzip; Kubo gets (and hashes) the bytes."""
    import gzip
    import requests
    payload = b"gzip on the wire, plain bytes in IPFS\n" * 100
    boundary = "gz-boundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"g.txt\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    for command in ("add", "block/put"):
        r = requests.post(f"{gateway.url}/api/v0/{command}", data=gzip.compress(form), timeout=30,
                          headers={**gateway.headers, "Content-Encoding": "gzip",
                                   "Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 200, r.text
        cid = r.json()["Hash" if command == "add" else "Key"]
        args = ["cat", cid] if command == "add" else ["block", "get", cid]
        assert kubo.ipfs(*args).stdout == payload
