"""Security acceptance: authentication, per-patient authorization on every path that reaches
bytes, encryption before Kubo, key rotation and crypto-shredding, signatures and the audit chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import aiohttp
import pytest

from conftest import (app_client, audit_sql, audit_store_bytes, bearer, gateway_config, ipfs_cli,
                      make_token, storage_env)
from gateway.http.commands import COMMANDS, Access, Action
from records_helpers import encounter, opened, uid

MiB = 1024 * 1024


def test_every_served_command_has_an_access_rule_and_a_handler():
    for name, entry in COMMANDS.items():
        if entry.action is Action.REFUSE:
            assert entry.access is Access.NONE and entry.handler is None, name
        else:
            assert entry.access is not Access.NONE and entry.handler is not None, name


async def test_no_credentials_401_everywhere_but_health(client, kubo):
    async with aiohttp.ClientSession() as anon:
        base = str(client.make_url(""))
        for method, path in [("POST", "/api/v0/version"), ("POST", "/api/v0/cat?arg=bafkqaaa"),
                             ("GET", "/ipfs/bafkqaaa"), ("GET", "/medicon/v1/openapi.json"),
                             ("GET", "/medicon/v1/audit"), ("POST", "/api/v0/config/show")]:
            async with anon.request(method, base + path) as r:
                assert r.status == 401, path
                assert "Bearer" in r.headers["WWW-Authenticate"]
        for path in ("/healthz", "/readyz"):
            async with anon.get(base + path) as r:
                assert r.status == 200, path
        async with anon.post(base + "/api/v0/version", headers=bearer("mdc_" + "A" * 43)) as r:
            assert r.status == 401


async def test_revoked_token_is_refused_at_once(aiohttp_client, kubo):
    from conftest import BlockingTokens as TokenStore, token_path
    cfg = gateway_config(kubo)
    c = await app_client(aiohttp_client, cfg)
    assert (await c.post("/api/v0/version")).status == 200
    with TokenStore(token_path(cfg.records.data_dir)) as store:
        name = [t.name for t in store.list()][0]
        store.revoke(name)
    assert (await c.post("/api/v0/version")).status == 401


def test_kubo_cli_with_api_auth_bearer_and_basic(gateway):
    ok = ipfs_cli(gateway, "id", "-f", "<id>")
    assert ok.returncode == 0, ok.stderr
    basic = ipfs_cli(gateway.multiaddr, "id", "-f", "<id>", extra=("--api-auth", f"basic:me:{gateway.token}"))
    assert basic.returncode == 0 and basic.stdout == ok.stdout, basic.stderr
    none = ipfs_cli(gateway.multiaddr, "id")
    assert none.returncode != 0 and b"authentication required" in none.stderr


def test_token_never_in_logs(kubo, tmp_path):
    """The gateway's own log (its stderr, at DEBUG) and its audit log hold no part of a token,
    whatever carried it: the CLI's header, the ``api-auth`` query, a wrong token."""
    from conftest import start_gateway
    log = tmp_path / "gateway.log"
    gw = start_gateway(kubo, log=log, log_level="DEBUG")
    try:
        assert ipfs_cli(gw, "add", "-Q", input=b"log test").returncode == 0
        import requests
        requests.post(f"{gw.url}/api/v0/version?api-auth=bearer:{gw.token}")
        requests.post(f"{gw.url}/api/v0/version", headers=bearer(gw.token + "x"))
        requests.post(f"{gw.url}/api/v0/cat?arg=bafkqaaa&api-auth={gw.token}", headers=bearer(gw.token))
    finally:
        gw.stop()
    text = log.read_text()
    assert "medicon" in text  # the log was written (DEBUG lines of the gateway's own)
    dump = "\n".join(row[0] for row in audit_sql(gw.data_dir, "SELECT event FROM audit"))
    assert dump
    for where in (text, dump):
        assert gw.token not in where and gw.token[4:20] not in where and gw.token[-16:] not in where


def test_kubo_rpc_takes_only_the_gateway(kubo, gateway):
    """A process beside Kubo cannot use its RPC API: the managed node (as `dev` and the tests
    run it) takes only callers presenting its secret, which the gateway holds."""
    import requests
    for path in ("/api/v0/version", "/api/v0/id", "/api/v0/pin/ls", "/api/v0/config/show", "/api/v0/repo/gc"):
        for headers in ({}, bearer("not-the-secret"), {"Authorization": "Basic Og=="}):
            assert requests.post(kubo.api_url + path, headers=headers, timeout=10).status_code == 403, path
    assert requests.post(kubo.api_url + "/api/v0/version", headers=kubo.rpc_headers, timeout=10).status_code == 200
    assert requests.post(gateway.url + "/api/v0/version", headers=gateway.headers, timeout=10).status_code == 200
    assert kubo.api_secret not in requests.post(gateway.url + "/api/v0/version", headers=gateway.headers).text


def _raw_exchange(port: int, data: bytes) -> bytes:
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return answer


def test_malformed_requests_never_echo_or_log_a_credential(kubo, tmp_path):
    """aiohttp answers a request it cannot parse with the offending bytes, and logs them: with
    a folded, bare-LF, over-long or otherwise malformed header that is the credential. Every such
    request gets Kubo's error shape with a fixed message, and the log (at DEBUG) holds no byte
    of the token."""
    from conftest import start_gateway
    log = tmp_path / "gateway.log"
    gw = start_gateway(kubo, log=log, log_level="DEBUG")
    token = gw.token.encode()
    cases = {
        "folded header": b"POST /api/v0/version HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\r\n " + token + b"\r\n\r\n",
        "bare LF": b"POST /api/v0/version HTTP/1.1\nHost: x\nAuthorization: Bearer " + token + b"\n\n",
        "over-long header": b"POST /api/v0/version HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token
                            + b"A" * 20000 + b"\r\n\r\n",
        "control byte": b"POST /api/v0/version HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token
                        + b"\x00\x01\r\n\r\n",
        "token as a header name": b"POST /api/v0/version HTTP/1.1\r\nHost: x\r\n" + token + b" x: y\r\n\r\n",
        "over-long request line": b"POST /api/v0/version?api-auth=bearer:" + token + b"&x=" + b"A" * 20000
                                  + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "bad method": b"P\x01ST /api/v0/version?api-auth=" + token + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "bad version": b"POST /api/v0/version?api-auth=" + token + b" HTTP/9.9x\r\nHost: x\r\n\r\n",
    }
    try:
        for name, data in cases.items():
            answer = _raw_exchange(gw.port, data)
            assert answer[:10] in (b"HTTP/1.1 4", b"HTTP/1.0 4"), (name, answer[:200])
            assert b'"Type": "error"' in answer, (name, answer[:300])
            for fragment in (token, token[4:20], token[-16:]):
                assert fragment not in answer, name
    finally:
        gw.stop()
    logged = log.read_bytes()
    assert b"refused a malformed request" in logged  # the log was written, and said what happened
    for fragment in (token, token[4:20], token[-16:]):
        assert fragment not in logged


# --- per-patient access on every read path ------------------------------------------------------

@pytest.fixture
async def two_patients(aiohttp_client, kubo, tmp_path):
    """Patients A and B, each with an episode, a record and a sealed attachment, and a directory
    made on Kubo itself (never indexed by the gateway) that links to the attachment; an admin
    client and a clinician scoped to A."""
    cfg = gateway_config(kubo)
    admin = await app_client(aiohttp_client, cfg)
    out = {"admin": admin, "cfg": cfg}
    for name in ("A", "B"):
        patient, episode = uid(f"p{name}"), uid(f"e{name}")
        await admin.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
        r = await admin.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode))
        record = (await r.json())["cid"]
        form = aiohttp.FormData()
        form.add_field("file", f"scan of {name}".encode(), filename="scan.txt", content_type="text/plain")
        r = await admin.post("/api/v0/add", data=form, headers={"X-Medicon-Patient": patient})
        text = await r.text()
        [item] = map(json.loads, text.splitlines())
        assert item["Name"] == "scan.txt", text
        out[name] = {"patient": patient, "episode": episode, "record": record, "blob": item["Hash"],
                     "dir": _directory_linking(kubo, item["Hash"], "scan.txt")}
    out["token"] = make_token(cfg, role="clinician", patients=[out["A"]["patient"]])
    return out


def _directory_linking(kubo, cid: str, name: str) -> str:
    """A directory made on Kubo directly (bypassing the gateway) with ``cid`` under ``name``."""
    folder = f"/dir-{uid('d')}"
    kubo.ipfs("files", "mkdir", folder)
    kubo.ipfs("files", "cp", f"/ipfs/{cid}", f"{folder}/{name}")
    return kubo.ipfs("files", "stat", "--hash", folder).stdout.decode().strip()


def _read_paths(x):
    rec, blob = x["record"], x["blob"]
    return [
        ("POST", f"/api/v0/cat?arg={rec}"), ("POST", f"/api/v0/cat?arg={blob}"), ("POST", f"/api/v0/cat/{blob}"),
        ("POST", f"/api/v0/refs?arg={rec}&recursive=true"),
        ("POST", f"/api/v0/block/get?arg={rec}"), ("POST", f"/api/v0/block/stat?arg={blob}"),
        ("POST", f"/api/v0/dag/get?arg={rec}"), ("POST", f"/api/v0/dag/get?arg={rec}/prev"),
        ("POST", f"/api/v0/dag/export?arg={rec}"), ("POST", f"/api/v0/dag/resolve?arg={rec}/prev"),
        ("POST", f"/api/v0/dag/stat?arg={rec}"), ("POST", f"/api/v0/pin/ls?arg={rec}"),
        ("GET", f"/ipfs/{rec}"), ("GET", f"/ipfs/{blob}"),
        ("GET", f"/ipfs/{rec}?format=raw"), ("GET", f"/ipfs/{rec}?format=car"),
        ("GET", f"/ipfs/{blob}?format=raw"),
        ("GET", f"/medicon/v1/records/{rec}"), ("GET", f"/medicon/v1/episodes/{x['episode']}"),
        ("GET", f"/medicon/v1/episodes/{x['episode']}/history"),
        ("GET", f"/medicon/v1/patients/{x['patient']}/episodes"),
    ]


# Reads by id of what lies outside the caller's scope are not found, as if unknown.
NOT_FOUND_OUTSIDE = ("/medicon/v1/records/", "/medicon/v1/episodes/")


async def test_clinician_of_a_is_refused_b_on_every_read_path(two_patients):
    admin, a, b = two_patients["admin"], two_patients["A"], two_patients["B"]
    base = str(admin.make_url(""))
    async with aiohttp.ClientSession(headers=bearer(two_patients["token"])) as clinician:
        for method, path in _read_paths(b):
            async with clinician.request(method, base + path) as r:
                expected = 404 if path.startswith(NOT_FOUND_OUTSIDE) else 403
                assert r.status == expected, (path, r.status, await r.text())
        # through a directory the gateway never indexed, to A's and to B's attachment alike:
        # the directory is raw node data, which a clinician may not read
        for x in (a, b):
            for method, path in [("POST", f"/api/v0/cat?arg=/ipfs/{x['dir']}/scan.txt"),
                                 ("GET", f"/ipfs/{x['dir']}/scan.txt"), ("POST", f"/api/v0/ls?arg={x['dir']}"),
                                 ("POST", f"/api/v0/resolve?arg=/ipfs/{x['dir']}/scan.txt")]:
                async with clinician.request(method, base + path) as r:
                    assert r.status == 403, (path, r.status, await r.text())
        for accept in ("application/vnd.ipld.raw", "application/vnd.ipld.car", "application/vnd.ipld.dag-json"):
            async with clinician.get(base + f"/ipfs/{b['record']}", headers={"Accept": accept}) as r:
                assert r.status == 403, accept
        for method, path in _read_paths(a):
            async with clinician.request(method, base + path) as r:
                assert r.status in (200, 206), (path, r.status, await r.text())
        # a CID the gateway did not write: raw access only
        async with clinician.post(base + "/api/v0/cat?arg=bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy") as r:
            assert r.status == 403


async def test_clinician_of_a_cannot_write_b(two_patients):
    admin, b = two_patients["admin"], two_patients["B"]
    base = str(admin.make_url(""))
    async with aiohttp.ClientSession(headers=bearer(two_patients["token"])) as clinician:
        async with clinician.post(base + f"/medicon/v1/episodes/{b['episode']}/records",
                                  json=encounter(b["patient"], b["episode"])) as r:
            assert r.status == 404  # outside its scope: as if it did not exist
        form = aiohttp.FormData()
        form.add_field("file", json.dumps(encounter(b["patient"], b["episode"])).encode(), filename="r.json")
        async with clinician.post(base + "/api/v0/dag/put", data=form) as r:
            assert r.status == 403
        form = aiohttp.FormData()
        form.add_field("file", b"attachment for B", filename="x.txt")
        async with clinician.post(base + "/api/v0/add", data=form, headers={"X-Medicon-Patient": b["patient"]}) as r:
            assert r.status == 403
        async with clinician.post(base + f"/medicon/v1/patients/{b['patient']}/episodes",
                                  json=opened(b["patient"], uid("e"))) as r:
            assert r.status == 403
        form = aiohttp.FormData()
        form.add_field("file", b"raw block", filename="x")
        async with clinician.post(base + "/api/v0/block/put", data=form) as r:
            assert r.status == 403
    length = (await (await admin.get(f"/medicon/v1/episodes/{b['episode']}")).json())["length"]
    assert length == 2


async def test_roles(two_patients, aiohttp_client):
    admin, a = two_patients["admin"], two_patients["A"]
    base = str(admin.make_url(""))
    cfg = two_patients["cfg"]
    checks = {
        "auditor": [("GET", f"/medicon/v1/episodes/{a['episode']}", 200), ("GET", f"/medicon/v1/records/{a['record']}", 403),
                    ("POST", f"/api/v0/cat?arg={a['blob']}", 403), ("GET", "/medicon/v1/audit", 200),
                    ("GET", f"/medicon/v1/episodes/{a['episode']}/verify", 200)],
        "replicator": [("POST", f"/api/v0/dag/export?arg={a['record']}", 200), ("POST", f"/api/v0/cat?arg={a['blob']}", 403),
                       ("GET", f"/ipfs/{a['record']}", 403), ("POST", f"/api/v0/block/get?arg={a['blob']}", 200),
                       ("GET", "/medicon/v1/audit", 403)],
        "patient": [("GET", f"/medicon/v1/records/{a['record']}", 200), ("POST", f"/api/v0/cat?arg={a['blob']}", 200),
                    ("POST", f"/medicon/v1/episodes/{a['episode']}/records", 403),
                    ("GET", f"/medicon/v1/records/{two_patients['B']['record']}", 404)],
    }
    for role, expectations in checks.items():
        token = make_token(cfg, role=role, patients=[a["patient"]] if role == "patient" else None)
        async with aiohttp.ClientSession(headers=bearer(token)) as s:
            for method, path, status in expectations:
                kw = {"json": encounter(a["patient"], a["episode"])} if method == "POST" and "medicon" in path else {}
                async with s.request(method, base + path, **kw) as r:
                    assert r.status == status, (role, path, r.status, await r.text())


# --- encryption -------------------------------------------------------------------------------

async def test_marker_never_reaches_kubo_in_clear(aiohttp_client, own_kubo):
    marker = "MARKER-" + os.urandom(6).hex()
    c = await app_client(aiohttp_client, gateway_config(own_kubo))
    patient, episode = uid("p"), uid("e")
    await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
    cids = []
    for i in range(100):
        r = await c.post(f"/medicon/v1/episodes/{episode}/records",
                         json=encounter(patient, episode, note=f"{marker} #{i}"))
        assert r.status == 201
        cids.append((await r.json())["cid"])
    attachment = (marker.encode() + os.urandom(1000)) * (10 * MiB // 1013)
    form = aiohttp.FormData()
    form.add_field("file", attachment, filename="big.bin")
    r = await c.post("/api/v0/add", data=form, headers={"X-Medicon-Patient": patient})
    blob = json.loads((await r.text()).splitlines()[-1])["Hash"]

    blocks = own_kubo.ipfs("refs", "local").stdout.decode().split()
    assert len(blocks) > 140
    for block in blocks:
        data = own_kubo.ipfs("block", "get", block).stdout
        assert marker.encode() not in data and patient.encode() not in data, block
    # authorized reads give the plaintext back
    got = await (await c.get(f"/medicon/v1/records/{cids[42]}")).json()
    assert got["record"]["body"]["notes"] == f"{marker} #42"
    r = await c.post(f"/api/v0/cat?arg={blob}")
    assert r.status == 200 and await r.read() == attachment


async def test_range_read_of_a_100mib_sealed_attachment(aiohttp_client, own_kubo):
    c = await app_client(aiohttp_client, gateway_config(own_kubo))
    size = 100 * MiB
    seed = os.urandom(1 << 20)

    def byte_at(lo: int, hi: int) -> bytes:  # the content is seed repeated
        out = bytearray()
        pos = lo
        while pos < hi:
            off = pos % len(seed)
            take = min(len(seed) - off, hi - pos)
            out += seed[off:off + take]
            pos += take
        return bytes(out)

    async def gen():
        for i in range(size // len(seed)):
            yield seed
    form = aiohttp.FormData()
    form.add_field("file", gen(), filename="scan.dcm", content_type="application/dicom")
    patient = uid("p")
    r = await c.post("/api/v0/add", data=form, headers={"X-Medicon-Patient": patient})
    assert r.status == 200
    blob = json.loads((await r.text()).splitlines()[-1])["Hash"]
    for rng, lo, hi in [("bytes=0-99", 0, 100), ("bytes=52428700-52429799", 52428700, 52429800),
                        (f"bytes={size - 5000}-", size - 5000, size), ("bytes=-17", size - 17, size),
                        ("bytes=65530-65545", 65530, 65546)]:
        r = await c.get(f"/ipfs/{blob}", headers={"Range": rng})
        assert r.status == 206, (rng, await r.text())
        assert r.headers["Content-Range"] == f"bytes {lo}-{hi - 1}/{size}"
        assert r.headers["Content-Type"] == "application/dicom"
        assert await r.read() == byte_at(lo, hi), rng
    r = await c.head(f"/ipfs/{blob}")
    assert int(r.headers["Content-Length"]) == size
    r = await c.get(f"/ipfs/{blob}", headers={"Range": f"bytes={size}-"})
    assert r.status == 416


async def test_rotation_then_shredding(aiohttp_client, kubo):
    cfg = gateway_config(kubo)
    c = await app_client(aiohttp_client, cfg)
    made = {}
    for name in ("A", "B"):
        patient, episode = uid("p"), uid("e")
        r = await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
        form = aiohttp.FormData()
        form.add_field("file", f"attachment {name}".encode(), filename="a.txt")
        r2 = await c.post("/api/v0/add", data=form, headers={"X-Medicon-Patient": patient})
        made[name] = (patient, (await r.json())["cid"], json.loads(await r2.text())["Hash"])
    cli = [sys.executable, "-m", "gateway", "keys"]
    env = {**os.environ, **storage_env(cfg.records.data_dir)}
    rotated = subprocess.run([*cli, "rotate", "--data-dir", cfg.records.data_dir], capture_output=True, text=True,
                             env=env)
    assert rotated.returncode == 0, rotated.stderr
    for name, (_, rec, blob) in made.items():
        assert (await c.get(f"/medicon/v1/records/{rec}")).status == 200
        assert await (await c.post(f"/api/v0/cat?arg={blob}")).read() == f"attachment {name}".encode()
    shred = subprocess.run([*cli, "shred", "--patient", made["A"][0], "--data-dir", cfg.records.data_dir],
                           capture_output=True, text=True, env=env)
    assert shred.returncode == 0, shred.stderr
    _, rec_a, blob_a = made["A"]
    r = await c.get(f"/medicon/v1/records/{rec_a}")
    assert r.status == 410 and "erased" in (await r.json())["error"]["message"]
    r = await c.post(f"/api/v0/cat?arg={rec_a}")
    assert r.status == 410 and (await r.json())["Type"] == "error"
    assert (await c.get(f"/ipfs/{blob_a}")).status == 410
    assert (await c.get(f"/medicon/v1/records/{made['B'][1]}")).status == 200
    assert await (await c.post(f"/api/v0/cat?arg={made['B'][2]}")).read() == b"attachment B"


# --- signatures and audit -----------------------------------------------------------------------

async def test_forged_block_fails_verify(client, kubo):
    patient, episode = uid("p"), uid("e")
    r = await client.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
    head = (await r.json())["cid"]
    real = json.loads(kubo.ipfs("dag", "get", head).stdout)
    forged = {**real, "seq": 1, "prev": {"/": head}, "schema": encounter("x", "y")["schema"]}
    forged_cid = kubo.ipfs("dag", "put", input=json.dumps(forged).encode()).stdout.decode().strip()
    verdict = await (await client.get(f"/medicon/v1/episodes/{episode}/verify?head={forged_cid}")).json()
    assert verdict["ok"] is False and verdict["break"]["cid"] == forged_cid
    assert "signature" in verdict["break"]["problem"]
    assert (await (await client.get(f"/medicon/v1/episodes/{episode}/verify")).json())["ok"] is True


async def test_a_claimed_head_must_be_a_cid_never_a_path_kubo_would_resolve(client):
    """``verify?head=`` is passed to Kubo: a path or an ``/ipns`` name there would have Kubo
    walk into another DAG or resolve a name on the network. Only a CID is taken (in any of its
    spellings); anything else is a 400 in the gateway's error shape."""
    patient, episode = uid("p"), uid("e")
    head = (await (await client.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))).json())["cid"]
    for claimed in (f"/ipfs/{head}", f"/ipfs/{head}/prev", "/ipns/example.org", "ipns/k51qzi5uqu5dl",
                    "not-a-cid", head + "/x", "", " " + head):
        r = await client.get(f"/medicon/v1/episodes/{episode}/verify", params={"head": claimed})
        body = await r.json()
        assert r.status == 400 and "head must be a CID" in body["error"]["message"], (claimed, r.status, body)
    upper = (await client.get(f"/medicon/v1/episodes/{episode}/verify", params={"head": head.upper()}))
    verdict = await upper.json()  # the same CID spelled in base32 upper case: the walk runs
    assert upper.status == 200 and verdict["ok"] is True and verdict["checked"] == 1, verdict


async def test_audit_chain_one_event_per_decision_and_verifies(aiohttp_client, kubo):
    cfg = gateway_config(kubo)
    c = await app_client(aiohttp_client, cfg)
    auditor = make_token(cfg, role="auditor")
    patient, episode = uid("p"), uid("e")
    await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
    before = (await (await c.get("/medicon/v1/audit?limit=1000")).json())["entries"]
    await c.post("/api/v0/version")
    await c.get(f"/medicon/v1/episodes/{episode}")
    r = await c.get("/medicon/v1/audit?limit=1000", headers=bearer(auditor))
    entries = r.status == 200 and (await r.json())["entries"]
    new = entries[len(before):]
    # (the admin's audit read is in `before`: decided before the page was read) version,
    # the episode read, then the auditor's own audit read
    assert [e["action"] for e in new] == ["node:info", "chain:read", "audit:read"]
    assert all(e["decision"] == "allow" for e in new)
    dump = json.dumps(entries)
    assert patient not in dump and episode not in dump
    verdict = await (await c.get("/medicon/v1/audit/verify", headers=bearer(auditor))).json()
    assert verdict["ok"] is True and verdict["entries"] == len(entries) + 1
    audit_sql(cfg.records.data_dir, "UPDATE audit SET event = replace(event, 'allow', 'deny') WHERE seq = 2")
    # an entry edited before the last checkpoint, its stored hash left alone: the full walk
    # re-hashes it (the checkpoint walk is tested in test_audit_verify.py)
    verdict = await (await c.get("/medicon/v1/audit/verify?full=1", headers=bearer(auditor))).json()
    assert verdict["ok"] is False and verdict["break"]["seq"] == 2


async def _audit_entries(c, auditor: str) -> list[dict]:
    r = await c.get("/medicon/v1/audit?limit=1000", headers=bearer(auditor))
    assert r.status == 200, await r.text()
    return (await r.json())["entries"]


async def test_refused_credentials_are_audited_once_without_the_credential(aiohttp_client, kubo, tmp_path,
                                                                          monkeypatch):
    """Each refused credential adds exactly one deny event (action ``authenticate``, no
    principal, a reason) before the 401, and no part of the credential reaches the audit log."""
    import base64
    import secrets
    import time as _time
    from datetime import timedelta

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    from conftest import BlockingTokens as TokenStore, token_path

    cfg = gateway_config(kubo)
    c = await app_client(aiohttp_client, cfg)
    auditor = make_token(cfg, role="auditor")
    revoked = make_token(cfg, name="to-revoke", role="clinician")
    with TokenStore(token_path(cfg.records.data_dir)) as store:
        assert store.revoke("to-revoke")
    # an hour ago, for a minute: expired now
    with TokenStore(token_path(cfg.records.data_dir), clock=lambda: _time.time() - 3600) as store:
        expired, _ = store.create("expired", "clinician", expires_in=timedelta(minutes=1))
    # OIDC/JWT on: one key in the JWKS, a token signed by another, and an expired one
    key, other = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [RSAAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"kid": "k1"}]}))
    issuer, audience = "https://idp.example/realm", "medicon-gateway"
    for name, value in {"ISSUER": issuer, "AUDIENCE": audience, "JWKS": str(jwks)}.items():
        monkeypatch.setenv(f"MEDICON_JWT_{name}", value)
    now = int(_time.time())
    claims = {"iss": issuer, "aud": audience, "sub": "dr-x", "iat": now, "exp": now + 300,
              "medicon_role": "clinician"}
    forged_jwt = jwt.encode(claims, other, algorithm="RS256", headers={"kid": "k1"})
    expired_jwt = jwt.encode(claims | {"iat": now - 7200, "exp": now - 3600}, key, algorithm="RS256",
                             headers={"kid": "k1"})
    unknown = "mdc_" + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    garbage = "garbage-" + secrets.token_hex(24)
    cases = [
        ({"Authorization": f"Bearer {revoked}"}, "revoked", "bearer", revoked),
        ({"Authorization": "Basic " + base64.b64encode(f"me:{revoked}".encode()).decode()}, "revoked",
         "basic", revoked),
        ({"Authorization": f"Bearer {expired}"}, "expired", "bearer", expired),
        ({"Authorization": f"Bearer {unknown}"}, "unknown", "bearer", unknown),
        ({"Authorization": f"Bearer mdc_{garbage}"}, "malformed", "bearer", garbage),
        ({"Authorization": f"Bearer {garbage}"}, "malformed", "bearer", garbage),  # not a JWT
        ({"Authorization": f"Bearer {forged_jwt}"}, "bad signature", "bearer", forged_jwt),
        ({"Authorization": f"Bearer {expired_jwt}"}, "expired", "bearer", expired_jwt),
        ({"Authorization": garbage}, "unrecognised", "other", garbage),
        ({}, "missing", None, None),
    ]
    secrets_seen = []
    async with aiohttp.ClientSession() as anon:  # no default Authorization header
        base = str(c.make_url(""))
        for headers, reason, scheme, secret in cases:
            before = await _audit_entries(c, auditor)
            async with anon.post(base + "/api/v0/version", headers=headers) as r:
                assert r.status == 401, (reason, await r.text())
                if secret is not None:
                    assert secret not in await r.text()
            new = (await _audit_entries(c, auditor))[len(before):]
            denies = [e for e in new if e["decision"] == "deny"]
            assert len(denies) == 1, (reason, new)
            [event] = denies
            assert event["action"] == "authenticate" and event["principal"] is None and event["role"] is None
            assert event["reason"] == reason, (reason, event)
            assert event["resource"] == ({"kind": "credentials", "scheme": scheme} if scheme else
                                         {"kind": "credentials"})
            if secret is not None:
                secrets_seen.append(secret)
    verdict = await (await c.get("/medicon/v1/audit/verify", headers=bearer(auditor))).json()
    assert verdict["ok"] is True
    # the reason is part of the chain: editing it breaks verification
    data_dir = cfg.records.data_dir
    [(seq,)] = audit_sql(data_dir, "SELECT seq FROM audit WHERE event LIKE '%\"revoked\"%' ORDER BY seq LIMIT 1")
    dump = audit_store_bytes(data_dir)
    for secret in secrets_seen:
        for part in (secret, secret[4:20], secret[-16:]):
            assert part.encode() not in dump, f"part of a credential ({part[:4]}…) is in the audit log"
    audit_sql(data_dir, "UPDATE audit SET event = replace(event, '\"revoked\"', '\"expired\"') WHERE seq = $1", seq)
    verdict = await (await c.get("/medicon/v1/audit/verify?full=1", headers=bearer(auditor))).json()
    assert verdict["ok"] is False and verdict["break"]["seq"] == seq
