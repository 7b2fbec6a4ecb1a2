"""The door: the gateway forwards only what it understood, and decides on what it authorized.

An adversarial suite, one section per class of hole an independent test found, each with
several variants of its own: arguments smuggled in bodies, options the gateway did not model,
decryption decided by the target instead of the caller, scopes failing open, answers leaking
other patients' data, record pins removed, and patient-supplied names reaching Kubo in clear.
Everything runs against a real Kubo; what Kubo holds afterwards is checked on Kubo itself.
"""

from __future__ import annotations

import json
import subprocess

import aiohttp
import pytest

from conftest import app_client, bearer, gateway_config, make_token
from gateway.http.commands import COMMANDS, Action, Body
from records_helpers import encounter, opened, uid

pytestmark = pytest.mark.asyncio


def form(*parts: tuple[str, bytes, str | None]) -> aiohttp.FormData:
    """A multipart form: (filename, bytes, content type) per part."""
    data = aiohttp.FormData()
    for filename, content, ctype in parts:
        data.add_field("file", content, filename=filename, content_type=ctype or "application/octet-stream")
    return data


async def kubo_error(r: aiohttp.ClientResponse, status: int, needle: str = "") -> str:
    body = await r.json()
    assert r.status == status and body["Type"] == "error", (r.status, body)
    assert needle in body["Message"], body
    return body["Message"]


@pytest.fixture
async def world(aiohttp_client, kubo):
    """Two patients, each with an episode, a record and a sealed attachment; a directory made on
    Kubo itself (never indexed by the gateway) linking to each attachment; tokens of several
    kinds."""
    cfg = gateway_config(kubo)
    admin = await app_client(aiohttp_client, cfg)
    out = {"admin": admin, "cfg": cfg, "kubo": kubo, "base": str(admin.make_url(""))}
    for name in ("A", "B"):
        patient, episode = uid(f"p{name}"), uid(f"e{name}")
        assert (await admin.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))).status == 201
        r = await admin.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode))
        record = (await r.json())["cid"]
        r = await admin.post("/api/v0/add", data=form(("scan.txt", f"scan of {name} {uid('x')}".encode(), "text/plain")),
                             headers={"X-Medicon-Patient": patient})
        blob = json.loads(await r.text())["Hash"]
        folder = f"/door-{uid('d')}"
        kubo.ipfs("files", "mkdir", folder)
        kubo.ipfs("files", "cp", f"/ipfs/{blob}", f"{folder}/scan.txt")
        directory = kubo.ipfs("files", "stat", "--hash", folder).stdout.decode().strip()
        out[name] = {"patient": patient, "episode": episode, "record": record, "blob": blob, "dir": directory}
    out["clinician_a"] = make_token(cfg, role="clinician", patients=[out["A"]["patient"]])
    out["replicator"] = make_token(cfg, role="replicator")
    return out


async def as_(world, token: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(base_url=world["base"], headers=bearer(token))


# --- 1. arguments from the body -----------------------------------------------------------------

READ_COMMANDS = sorted(name for name, entry in COMMANDS.items()
                       if entry.action is not Action.REFUSE and entry.body is Body.NONE)


async def test_commands_that_read_no_files_take_no_body(world):
    """Kubo reads arguments from the lines of a body (cat, ls, refs, pin/add…): a body reaching
    Kubo would carry arguments the gateway never authorized. Every command without file
    arguments refuses a body, in every framing, before anything reaches Kubo."""
    own, other = world["A"], world["B"]
    bodies = [
        (lambda: form(("", f"{other['dir']}\n{other['blob']}\n".encode(), "text/plain")), None),
        (lambda: f"{other['blob']}\n".encode(), "text/plain"),
        (lambda: b"--x\r\nContent-Disposition: form-data; name=\"arg\"\r\n\r\n" + other["blob"].encode()
         + b"\r\n--x--\r\n", "multipart/form-data; boundary=x"),
    ]
    async with await as_(world, world["clinician_a"]) as s:
        for command in READ_COMMANDS:
            query = "" if COMMANDS[command].args.most == 0 else f"?arg={own['record']}"
            if command == "pin/update":
                query += f"&arg={own['blob']}"
            for body, ctype in bodies:
                headers = {"Content-Type": ctype} if ctype else {}
                async with s.post(f"/api/v0/{command}{query}", data=body(), headers=headers) as r:
                    message = await kubo_error(r, 400, "takes no request body")
                    assert other["dir"] not in message and other["blob"] not in message, command


async def test_ls_with_a_smuggled_directory_lists_nothing_of_it(world):
    """The example found: ``ls?arg=<own CID>`` with another patient's directory in the body."""
    other = world["B"]
    async with await as_(world, world["replicator"]) as s:
        async with s.post(f"/api/v0/ls?arg={world['A']['dir']}",
                          data=form(("", other["dir"].encode(), "text/plain"))) as r:
            text = await r.text()
            assert r.status == 400 and other["blob"] not in text


async def test_an_empty_body_is_not_a_body(world):
    async with await as_(world, world["clinician_a"]) as s:
        async with s.post(f"/api/v0/cat?arg={world['A']['record']}", data=b"") as r:
            assert r.status == 200


# --- 2. options the gateway does not model -------------------------------------------------------

async def test_add_to_files_never_writes_mfs(world):
    kubo = world["kubo"]
    before = kubo.ipfs("files", "ls", "/").stdout
    name = uid("mfs")
    for query in (f"to-files=/{name}", f"to-files=%2F{name}", f"nocopy=true", "fscache=true",
                  "fast-provide-root=true"):
        r = await world["admin"].post(f"/api/v0/add?{query}", data=form(("x.txt", b"x", None)))
        await kubo_error(r, 400)
    assert kubo.ipfs("files", "ls", "/").stdout == before


async def test_an_unknown_option_is_a_400_on_every_command(world):
    """Including a JS client's per-call ``headers`` (serialised as ``[object Object]``), which once
    gave a 502 that blamed Kubo."""
    for command, query in [(c, q) for c in sorted(n for n, e in COMMANDS.items() if e.action is not Action.REFUSE)
                           for q in ("headers=%5Bobject+Object%5D", "Arg=x", "nonsense=1", "ARG=x")]:
        r = await world["admin"].post(f"/api/v0/{command}?{query}")
        # ls has an option named ``headers`` (a boolean): there the value is what is refused
        await kubo_error(r, 400, "option")


@pytest.mark.parametrize("query, needle", [
    ("offset=1.0", "int64"), ("offset=0x1g", "int64"), ("length=-9223372036854775809", "int64"),
    ("progress=maybe", "boolean"), ("offset=1&o=1", "given twice"), ("length=1&length=2", "2 times"),
    ("timeout=1", "duration"), ("timeout=-1s", "duration"), ("encoding=cbor", "json"),
])
async def test_ill_typed_options_are_400_before_kubo(world, query, needle):
    r = await world["admin"].post(f"/api/v0/cat?arg={world['A']['blob']}&{query}")
    await kubo_error(r, 400, needle)


async def test_well_typed_options_pass_normalised(world):
    """The control: Go's integer forms and any-case booleans are read as Kubo reads them."""
    r = await world["admin"].post(f"/api/v0/cat?arg={world['A']['blob']}&o=0x2&l=0b11&progress=TRUE&timeout=30s")
    assert r.status == 200 and (await r.read()) == b"an "


# --- 3. decryption decided by the caller, not the target -----------------------------------------

async def test_a_path_through_an_unindexed_directory_is_authorized_for_its_target(world):
    """An admin may read a sealed attachment through any path (and gets plaintext); a
    replicator may read raw nodes but never a patient's attachment, however it is named."""
    b = world["B"]
    async with await as_(world, world["replicator"]) as s:
        for method, path in [("POST", f"/api/v0/cat?arg=/ipfs/{b['dir']}/scan.txt"),
                             ("GET", f"/ipfs/{b['dir']}/scan.txt"),
                             ("POST", f"/api/v0/cat?arg={b['blob']}"), ("GET", f"/ipfs/{b['blob']}")]:
            async with s.request(method, path) as r:
                assert r.status == 403, (path, await r.text())
        async with s.post(f"/api/v0/ls?arg={b['dir']}") as r:  # the structure is raw data: allowed
            assert r.status == 200
    r = await world["admin"].post(f"/api/v0/cat?arg=/ipfs/{b['dir']}/scan.txt")
    assert r.status == 200 and (await r.read()).startswith(b"scan of B")


async def test_a_node_the_caller_put_linking_to_an_attachment(world):
    """A replicator puts its own dag-json node whose link points at another patient's sealed
    attachment, then reads through it: refused, not decrypted."""
    b = world["B"]
    async with await as_(world, world["replicator"]) as s:
        node = json.dumps({"see": {"/": b["blob"]}}).encode()
        async with s.post("/api/v0/dag/put", data=form(("n", node, "application/json"))) as r:
            assert r.status == 200, await r.text()
            mine = (await r.json())["Cid"]["/"]
        for method, path in [("POST", f"/api/v0/cat?arg=/ipfs/{mine}/see"), ("GET", f"/ipfs/{mine}/see"),
                             ("POST", f"/api/v0/get?arg=/ipfs/{mine}/see")]:
            async with s.request(method, path) as r:
                assert r.status == 403, (path, await r.text())


async def test_every_spelling_of_an_attachment_cid_is_the_attachment(world, kubo):
    """The same CID in base36 or base58 (CIDv0) is the same attachment, decided the same way."""
    blob = world["B"]["blob"]
    spellings = {kubo.ipfs("cid", "format", "-b", base, "-v", "1", blob).stdout.decode().strip()
                 for base in ("base36", "base32", "base58btc")} | {blob}
    async with await as_(world, world["replicator"]) as s:
        for cid in spellings:
            async with s.post(f"/api/v0/cat?arg={cid}") as r:
                assert r.status == 403, cid
    for cid in spellings:
        r = await world["admin"].post(f"/api/v0/cat?arg={cid}")
        assert r.status == 200 and (await r.read()).startswith(b"scan of B"), cid


# --- 4. scopes restrict on every dimension --------------------------------------------------------

async def test_an_episode_scope_without_a_patient_reaches_only_its_episode(world):
    a, b = world["A"], world["B"]
    token = make_token(world["cfg"], role="clinician", episodes=[a["episode"]])
    async with await as_(world, token) as s:
        async with s.get(f"/medicon/v1/records/{a['record']}") as r:
            assert r.status == 200  # the control
        for method, path, status in [
            ("GET", f"/medicon/v1/records/{b['record']}", 404),
            ("GET", f"/medicon/v1/episodes/{b['episode']}", 404),
            ("GET", f"/medicon/v1/episodes/{b['episode']}/history", 404),
            ("GET", f"/medicon/v1/patients/{b['patient']}/episodes", 403),
            ("POST", f"/api/v0/cat?arg={b['record']}", 403), ("POST", f"/api/v0/cat?arg={b['blob']}", 403),
            ("GET", f"/ipfs/{b['record']}", 403), ("POST", f"/api/v0/dag/get?arg={b['record']}", 403),
        ]:
            async with s.request(method, path) as r:
                assert r.status == status, (path, r.status, await r.text())
        for patient in (b["patient"], a["patient"]):  # an attachment belongs to no episode
            async with s.post("/api/v0/add", data=form(("x.txt", b"x", None)),
                              headers={"X-Medicon-Patient": patient}) as r:
                assert r.status == 403, patient


async def test_a_scoped_principal_gets_no_node_wide_access(world):
    """Raw node data and the audit log name no patient, so they lie outside every scope."""
    token = make_token(world["cfg"], role="admin", patients=[world["A"]["patient"]])
    async with await as_(world, token) as s:
        for method, path in [("POST", f"/api/v0/ls?arg={world['A']['dir']}"), ("GET", "/medicon/v1/audit"),
                             ("POST", "/api/v0/pin/ls")]:
            async with s.request(method, path) as r:
                assert r.status == 403, path
        async with s.get(f"/medicon/v1/records/{world['A']['record']}") as r:
            assert r.status == 200


# --- 5. answers leak nothing outside the caller's scope -------------------------------------------

async def test_conflicts_with_another_patients_episode_tell_nothing(world):
    a, b = world["A"], world["B"]
    unknown = uid("e")
    async with await as_(world, world["clinician_a"]) as s:
        async with s.post(f"/medicon/v1/patients/{a['patient']}/episodes", json=opened(a["patient"], b["episode"])) as r:
            body = await r.json()
            assert r.status == 409 and "current" not in body["error"]
            text = json.dumps(body)
            for secret in (b["patient"], b["record"], "length"):
                assert secret not in text, secret
        answers = []
        for episode in (b["episode"], unknown):
            async with s.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(a["patient"], episode)) as r:
                answers.append((r.status, (await r.json())["error"]["message"].replace(episode, "E")))
        assert answers[0] == answers[1] and answers[0][0] == 404
        # through the RPC doors: the same answer as for an episode that does not exist
        rpc = []
        for episode in (b["episode"], unknown):
            record = json.dumps(encounter(a["patient"], episode)).encode()
            async with s.post("/api/v0/dag/put", data=form(("r.json", record, "application/json"))) as r:
                rpc.append((r.status, (await r.json())["Message"].replace(episode, "E")))
        assert rpc[0] == rpc[1] and rpc[0][0] == 409 and b["patient"] not in json.dumps(rpc)


# --- 6. record pins belong to the gateway ---------------------------------------------------------

def pinned(kubo, cid: str) -> bool:
    return kubo.ipfs("pin", "ls", "--type=recursive", cid, check=False).returncode == 0


async def test_record_and_attachment_pins_cannot_be_removed(world):
    a, kubo = world["A"], world["kubo"]
    spare = json.loads(await (await world["admin"].post("/api/v0/add", data=form(("s", b"spare " + uid("s").encode(), None)))).text())["Hash"]
    async with await as_(world, world["replicator"]) as s:
        for query in (f"pin/rm?arg={a['record']}", f"pin/rm?arg={a['blob']}", f"pin/rm?arg=/ipfs/{a['dir']}/scan.txt",
                      f"pin/rm?arg={spare}&arg={a['record']}", f"pin/update?arg={a['record']}&arg={spare}",
                      f"pin/update?arg={a['blob']}&arg={spare}&unpin=true"):
            async with s.post(f"/api/v0/{query}") as r:
                await kubo_error(r, 403, "pinned by the gateway")
        assert pinned(kubo, a["record"]) and pinned(kubo, a["blob"]) and pinned(kubo, spare)
        async with s.post("/api/v0/add?pin=false", data=form(("t", b"target " + uid("t").encode(), None))) as r:
            target = json.loads(await r.text())["Hash"]
        async with s.post(f"/api/v0/pin/update?arg={a['record']}&arg={target}&unpin=false") as r:
            assert r.status == 200, await r.text()  # moving without unpinning leaves the record pinned
        async with s.post(f"/api/v0/pin/rm?arg={spare}") as r:
            assert r.status == 200  # raw data is the replicator's to manage
    assert pinned(kubo, a["record"]) and not pinned(kubo, spare)


# --- 7. no patient-supplied name reaches Kubo in clear --------------------------------------------

@pytest.mark.parametrize("case", ["wrap", "directory", "symlink", "nested name", "pin-name"])
async def test_names_that_would_reach_kubo_in_clear_are_refused(world, case):
    patient = world["A"]["patient"]
    name = f"secret-{uid('n')}"
    query, parts = "", [(f"{name}.txt", b"x", None)]
    if case == "wrap":
        query = "wrap-with-directory=true"
    elif case == "directory":
        parts = [(name, b"", "application/x-directory"), (f"{name}/a.txt", b"x", None)]
    elif case == "symlink":
        parts = [(name, b"/etc/" + name.encode(), "application/symlink")]
    elif case == "nested name":
        parts = [(f"{name}/a.txt", b"x", None)]
    else:
        query = f"pin-name={name}"
    r = await world["admin"].post(f"/api/v0/add?{query}", data=form(*parts), headers={"X-Medicon-Patient": patient})
    await kubo_error(r, 400, "in clear")
    assert name.encode() not in _everything_in(world["kubo"])


async def test_a_sealed_attachments_name_never_reaches_kubo(world):
    """The file name a client gives reaches Kubo as a neutral position, and the client still
    sees its own name in the answer (the Kubo CLI prints it)."""
    name = f"{uid('results')} of patient.pdf"
    r = await world["admin"].post("/api/v0/add", data=form((name, b"%PDF-1.4 " + uid("pdf").encode(), "application/pdf")),
                                  headers={"X-Medicon-Patient": world["A"]["patient"]})
    answer = json.loads(await r.text())
    assert r.status == 200 and answer["Name"] == name
    assert name.encode() not in _everything_in(world["kubo"])
    assert name.encode() not in (world["kubo"].repo / "daemon.log").read_bytes()


def _everything_in(kubo) -> bytes:
    """Every block Kubo holds, and its MFS and pin names."""
    cids = kubo.ipfs("refs", "local").stdout.decode().split()
    blocks = [kubo.ipfs("block", "get", c).stdout for c in cids]
    pins = kubo.ipfs("pin", "ls", "--names").stdout
    return b"".join(blocks) + pins
