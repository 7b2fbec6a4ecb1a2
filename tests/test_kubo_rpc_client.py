"""The JS kubo-rpc-client (the real npm package, in Node) through the gateway must see what it
sees on Kubo directly: same CIDs, same bytes, same entries. Plain (non-record) content only.

tests/js/parity.mjs runs every operation once per target and prints one JSON line each; each
test below compares one operation's two lines, and where the answer is known from the input
(the bytes added, the files of the directory), checks it against that too.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import tarfile

import pytest

from conftest import ROOT
from known_gateway_bugs import GatewayOnlyFailure

JS_DIR = ROOT / "tests" / "js"
PARITY_SCRIPT = JS_DIR / "parity.mjs"
NOT_INSTALLED = ("kubo-rpc-client is not installed in tests/js: run `make setup` "
                 "(it runs `npm ci --prefix tests/js`).")


def run_parity(api: str, authorization: str | None, spec: dict) -> dict[str, dict]:
    """Every operation of parity.mjs against ``api``, by name."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is required for the kubo-rpc-client tests: install Node.js 20 or "
                    "newer with npm, then run `make setup`.")
    if not (JS_DIR / "node_modules" / "kubo-rpc-client" / "package.json").is_file():
        pytest.fail(NOT_INSTALLED)
    done = subprocess.run([node, str(PARITY_SCRIPT)], cwd=JS_DIR, capture_output=True, text=True,
                          input=json.dumps({**spec, "api": api, "authorization": authorization}),
                          timeout=300)
    assert done.returncode == 0, f"parity.mjs failed:\n{done.stderr}"
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    return {line["op"]: line for line in lines}


@pytest.fixture(scope="module")
def spec() -> dict:
    """Fresh random content for this run, so no answer can come from an earlier one."""
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()
    tag = os.urandom(6).hex()
    files = {
        "tree/lab report.txt": f"plain test text {tag}\n".encode(),
        "tree/big.bin": os.urandom(600 * 1024 + 11),  # several chunks, a multi-block file
        "tree/nested/deeper/notes.md": f"# notes {tag}\n".encode(),
        "tree/nested/empty.txt": b"",
    }
    return {
        "blob": b64(os.urandom(300 * 1024 + 5)),
        "block": b64(f"raw block {tag}".encode()),
        "files": [{"path": path, "content": b64(data)} for path, data in files.items()],
        "root": "tree",
        "object": {"kind": "parity", "tag": tag, "nested": {"list": [1, 2, 3]}, "flag": True},
        "contents": files,
    }


@pytest.fixture(scope="module")
def results(kubo, gateway, spec) -> dict[str, dict[str, dict]]:
    """Through the gateway first, so its writes are not answered by content Kubo already had."""
    wire = {k: v for k, v in spec.items() if k != "contents"}
    return {"gateway": run_parity(gateway.url, f"Bearer {gateway.token}", wire),
            "kubo": run_parity(kubo.api_url, kubo.rpc_headers.get("Authorization"), wire)}


def both_ok(results, op: str):
    via_gw, direct = results["gateway"][op], results["kubo"][op]
    assert direct["ok"], f"{op} failed directly on Kubo: {direct['error']}"
    if not via_gw["ok"]:
        raise GatewayOnlyFailure(f"{op} failed through the gateway: {via_gw['error']}")
    return via_gw["result"], direct["result"]


def tar_entries(encoded: str) -> dict[str, tuple[str, bytes | None]]:
    """A tar stream's entries: path → (kind, content of a file)."""
    entries = {}
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(encoded)), mode="r:") as tar:
        for member in tar.getmembers():
            if member.isdir():
                entries[member.name] = ("dir", None)
            else:
                assert member.isfile(), f"unexpected tar entry type for {member.name}"
                entries[member.name] = ("file", tar.extractfile(member).read())
    return entries


def test_add_bytes_same_cid(results, spec):
    gw, direct = both_ok(results, "add-bytes")
    assert gw == direct
    assert gw["size"] > len(base64.b64decode(spec["blob"]))  # the file node, chunked


def test_add_directory_same_entries(results, spec):
    gw, direct = both_ok(results, "add-directory")
    assert gw == direct
    paths = {entry["path"] for entry in gw}
    assert set(spec["contents"]) | {"tree", "tree/nested", "tree/nested/deeper"} == paths


def test_cat_same_bytes(results, spec):
    gw, direct = both_ok(results, "cat")
    assert gw == direct == spec["blob"]


def test_cat_path_with_a_space_same_bytes(results, spec):
    gw, direct = both_ok(results, "cat-path-with-space")
    assert base64.b64decode(gw) == spec["contents"]["tree/lab report.txt"]
    assert gw == direct


def test_get_same_tar_entries(results, spec):
    gw, direct = both_ok(results, "get")
    root = next(e["cid"] for e in results["kubo"]["add-directory"]["result"] if e["path"] == "tree")
    expected = {path.replace("tree", root, 1): ("file", data)
                for path, data in spec["contents"].items()}
    expected.update({root + sub: ("dir", None) for sub in ("", "/nested", "/nested/deeper")})
    assert tar_entries(direct) == expected
    assert tar_entries(gw) == expected


def test_ls_same_entries(results, spec):
    gw, direct = both_ok(results, "ls")
    assert gw == direct
    assert {(e["name"], e["type"]) for e in gw} == {
        ("lab report.txt", "file"), ("big.bin", "file"), ("nested", "dir")}


def test_refs_recursive_same_list(results):
    gw, direct = both_ok(results, "refs-recursive")
    assert gw == direct
    added = {e["cid"] for e in results["kubo"]["add-directory"]["result"] if e["path"] != "tree"}
    assert added <= set(gw)
    assert len(gw) > len(added)  # big.bin's chunks too


def test_dag_put_dag_cbor_input_same_cid(results):
    gw, direct = both_ok(results, "dag-put-cbor")
    assert gw == direct and gw.startswith("bafyrei")


def test_dag_get_dag_cbor_same_value(results, spec):
    gw, direct = both_ok(results, "dag-get-cbor")
    assert gw == direct
    assert gw == {**spec["object"], "file": {"/": results["kubo"]["add-bytes"]["result"]["cid"]}}


def test_dag_get_with_path_same_value(results):
    gw, direct = both_ok(results, "dag-get-cbor-path")
    assert gw == direct
    assert gw["value"] == 2


def test_dag_put_dag_json_same_cid(results):
    gw, direct = both_ok(results, "dag-put-json")
    assert gw == direct and gw.startswith("baguqeera")
    assert gw != results["kubo"]["dag-put-cbor"]["result"]


def test_dag_get_dag_json_same_value(results, spec):
    gw, direct = both_ok(results, "dag-get-json")
    assert gw == direct
    assert gw == {**spec["object"], "file": {"/": results["kubo"]["add-bytes"]["result"]["cid"]}}


def test_block_put_get_stat_same_answers(results, spec):
    put_gw, put_direct = both_ok(results, "block-put")
    assert put_gw == put_direct
    get_gw, get_direct = both_ok(results, "block-get")
    assert get_gw == get_direct == spec["block"]
    stat_gw, stat_direct = both_ok(results, "block-stat")
    assert stat_gw == stat_direct == {"cid": put_gw, "size": len(base64.b64decode(spec["block"]))}


def test_pin_add_ls_rm_same_answers(results):
    block = results["kubo"]["block-put"]["result"]
    for op in ("pin-add", "pin-rm"):
        gw, direct = both_ok(results, op)
        assert gw == direct == block
    gw, direct = both_ok(results, "pin-ls")
    assert gw == direct == [{"cid": block, "type": "recursive"}]
    after_gw, after_direct = results["gateway"]["pin-ls-after-rm"], results["kubo"]["pin-ls-after-rm"]
    assert not after_direct["ok"] and "not pinned" in after_direct["error"]
    assert not after_gw["ok"] and "not pinned" in after_gw["error"]


def test_version_same(results):
    gw, direct = both_ok(results, "version")
    assert gw == direct
    assert gw["version"].count(".") == 2


def test_id_same_node(results):
    gw, direct = both_ok(results, "id")
    assert gw == direct
    assert gw["id"] and gw["agentVersion"].startswith("kubo/")


def test_refused_command_is_an_error_through_the_gateway(results, kubo):
    direct = results["kubo"]["config-get"]
    assert direct["ok"], f"config get failed directly on Kubo: {direct['error']}"
    assert direct["result"] == results["kubo"]["id"]["result"]["id"]
    via_gw = results["gateway"]["config-get"]
    assert not via_gw["ok"], "config get went through the gateway"
    assert "refused" in via_gw["error"]
