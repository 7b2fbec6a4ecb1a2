"""The Kubo CLI as a client, pointed at the gateway, must behave as it does against Kubo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import ipfs_cli


def both(kubo, gateway, *args, **kw):
    """Run the same CLI command through the gateway and directly against Kubo."""
    via_gw = ipfs_cli(gateway, *args, **kw)
    direct = ipfs_cli(kubo, *args, **kw)
    assert via_gw.returncode == 0, via_gw.stderr.decode()
    assert direct.returncode == 0, direct.stderr.decode()
    return via_gw, direct


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "sub dir").mkdir(parents=True)
    (root / "a.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "sub dir" / "b.txt").write_text("patient-free test content\n")
    (root / "empty").write_bytes(b"")
    return root


def test_add_file_same_cid(kubo, gateway, tree):
    gw, direct = both(kubo, gateway, "add", "-Q", str(tree / "a.bin"))
    assert gw.stdout.strip() and gw.stdout == direct.stdout


def test_add_with_options_same_cid(kubo, gateway, tree):
    args = ("add", "-Q", "--cid-version=1", "--raw-leaves", "--chunker=size-65536", str(tree / "a.bin"))
    gw, direct = both(kubo, gateway, *args)
    assert gw.stdout.decode().startswith("bafk") or gw.stdout.decode().startswith("bafy")
    assert gw.stdout == direct.stdout


def test_add_directory_and_get(kubo, gateway, tree, tmp_path):
    gw, direct = both(kubo, gateway, "add", "-r", "-Q", str(tree))
    assert gw.stdout == direct.stdout
    root = gw.stdout.decode().strip()
    out = tmp_path / "out"
    got = ipfs_cli(gateway, "get", "-o", str(out), root)
    assert got.returncode == 0, got.stderr
    assert (out / "a.bin").read_bytes() == (tree / "a.bin").read_bytes()
    assert (out / "sub dir" / "b.txt").read_text() == "patient-free test content\n"
    assert (out / "empty").read_bytes() == b""


def test_cat_same_bytes(kubo, gateway, tree):
    cid = ipfs_cli(gateway, "add", "-Q", str(tree / "a.bin")).stdout.decode().strip()
    gw, direct = both(kubo, gateway, "cat", cid)
    assert gw.stdout == (tree / "a.bin").read_bytes() == direct.stdout
    part, _ = both(kubo, gateway, "cat", "--offset=100", "--length=50", cid)
    assert part.stdout == (tree / "a.bin").read_bytes()[100:150]


def test_stdin_add(kubo, gateway):
    gw, direct = both(kubo, gateway, "add", "-Q", input=b"from stdin\n")
    assert gw.stdout == direct.stdout


def test_dag_put_get(kubo, gateway):
    doc = json.dumps({"kind": "test", "n": 7, "nested": {"list": [1, 2, 3]}}).encode()
    gw, direct = both(kubo, gateway, "dag", "put", input=doc)
    cid = gw.stdout.decode().strip()
    assert cid.startswith("bafy") and gw.stdout == direct.stdout
    got, direct_got = both(kubo, gateway, "dag", "get", cid)
    assert json.loads(got.stdout) == json.loads(doc) == json.loads(direct_got.stdout)
    path, _ = both(kubo, gateway, "dag", "get", f"{cid}/nested/list/1")
    assert json.loads(path.stdout) == 2


def test_pin_ls_and_block_stat(kubo, gateway, tree):
    cid = ipfs_cli(gateway, "add", "-Q", str(tree / "sub dir" / "b.txt")).stdout.decode().strip()
    gw, direct = both(kubo, gateway, "pin", "ls", "--type=recursive", cid)
    assert cid in gw.stdout.decode() and gw.stdout == direct.stdout
    gw, direct = both(kubo, gateway, "block", "stat", cid)
    assert gw.stdout == direct.stdout and b"Size:" in gw.stdout


def test_pin_add_rm(kubo, gateway):
    cid = ipfs_cli(gateway, "add", "-Q", "--pin=false", input=b"pin me\n").stdout.decode().strip()
    assert ipfs_cli(gateway, "pin", "add", cid).returncode == 0
    assert cid in ipfs_cli(kubo, "pin", "ls", "--type=recursive").stdout.decode()
    assert ipfs_cli(gateway, "pin", "rm", cid).returncode == 0
    assert cid not in ipfs_cli(kubo, "pin", "ls", "--type=recursive").stdout.decode()


def test_version_and_id(kubo, gateway):
    gw, direct = both(kubo, gateway, "version", "--number")
    assert gw.stdout == direct.stdout
    gw, direct = both(kubo, gateway, "id", "-f", "<id>")
    assert gw.stdout == direct.stdout


@pytest.mark.parametrize("args", [
    ("config", "show"),
    ("shutdown",),
    ("key", "list"),
    ("swarm", "peers"),
    ("bootstrap", "list"),
    ("repo", "gc"),
    ("files", "ls", "/"),
])
def test_refused_commands_fail_with_a_clear_message(gateway, args):
    result = ipfs_cli(gateway, *args)
    assert result.returncode != 0
    assert b"refused by the gateway" in result.stderr, result.stderr
