"""Everyday Kubo CLI commands through the gateway and directly on Kubo: same output, same files.

Each command runs first through the gateway (so its writes are not answered by content Kubo
already had), then directly; outputs are compared with each other and, where the input tells
the answer (the files added), with that too.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from conftest import ipfs_cli
from known_gateway_bugs import GatewayOnlyFailure


def both(kubo, gateway, *args):
    """The same CLI command through the gateway, then directly on Kubo; both must succeed."""
    via_gw = ipfs_cli(gateway, *args)
    direct = ipfs_cli(kubo, *args)
    assert direct.returncode == 0, f"directly on Kubo: {direct.stderr.decode()}"
    if via_gw.returncode != 0:
        raise GatewayOnlyFailure(f"through the gateway: {via_gw.stderr.decode()}")
    return via_gw.stdout, direct.stdout


def files_under(root: Path) -> dict[str, bytes | None]:
    """A tree on disk: relative path → file content (None for a directory)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def tar_members(data: bytes) -> dict[str, bytes | None]:
    """A tar archive: member path → file content (None for a directory)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else None)
                for m in tar.getmembers()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Nested directories, a multi-block file and a name with a space; fresh random content."""
    root = tmp_path_factory.mktemp("parity") / "study"
    (root / "images" / "2024").mkdir(parents=True)
    (root / "lab report.txt").write_text(f"plain lab text {os.urandom(8).hex()}\n")
    (root / "images" / "2024" / "scan.bin").write_bytes(os.urandom(700 * 1024 + 3))
    (root / "images" / "index.md").write_text("# images\n")
    (root / "empty.txt").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def added(kubo, gateway, tree) -> dict[str, str]:
    """`add -r` through the gateway and directly: same lines; path → CID."""
    gw, direct = both(kubo, gateway, "add", "-r", str(tree))
    assert gw == direct
    cids = {}
    for line in gw.decode().splitlines():
        word, cid, path = line.split(" ", 2)
        assert word == "added"
        cids[path] = cid
    return cids


def test_add_recursive_same_cids_for_every_entry(added, tree):
    expected = {"study"} | {f"study/{p}" for p in files_under(tree)}
    assert set(added) == expected


def test_cat_path_with_a_space_same_bytes(kubo, gateway, added, tree):
    gw, direct = both(kubo, gateway, "cat", f"/ipfs/{added['study']}/lab report.txt")
    assert gw == direct == (tree / "lab report.txt").read_bytes()


def test_get_archive_same_tar(kubo, gateway, added, tree, tmp_path):
    root = added["study"]
    gw_tar, direct_tar = tmp_path / "gw.tar", tmp_path / "direct.tar"
    via_gw = ipfs_cli(gateway, "get", "-a", "-o", str(gw_tar), root)
    direct = ipfs_cli(kubo, "get", "-a", "-o", str(direct_tar), root)
    assert direct.returncode == 0, direct.stderr.decode()
    expected = {root: None} | {f"{root}/{p}": data for p, data in files_under(tree).items()}
    assert tar_members(direct_tar.read_bytes()) == expected
    if via_gw.returncode != 0:
        raise GatewayOnlyFailure(via_gw.stderr.decode())
    assert tar_members(gw_tar.read_bytes()) == expected


def test_get_archive_compressed_same_tar(kubo, gateway, added, tree, tmp_path):
    root = added["study"]
    gw_gz, direct_gz = tmp_path / "gw.tar.gz", tmp_path / "direct.tar.gz"
    via_gw = ipfs_cli(gateway, "get", "-a", "-C", "-o", str(gw_gz), root)
    direct = ipfs_cli(kubo, "get", "-a", "-C", "-o", str(direct_gz), root)
    assert direct.returncode == 0, direct.stderr.decode()
    expected = {root: None} | {f"{root}/{p}": data for p, data in files_under(tree).items()}
    assert tar_members(gzip.decompress(direct_gz.read_bytes())) == expected
    if via_gw.returncode != 0:
        raise GatewayOnlyFailure(via_gw.stderr.decode())
    assert tar_members(gzip.decompress(gw_gz.read_bytes())) == expected


def test_get_compressed_file_same_bytes(kubo, gateway, added, tree, tmp_path):
    cid = added["study/images/2024/scan.bin"]
    gw_gz, direct_gz = tmp_path / "gw.gz", tmp_path / "direct.gz"
    via_gw = ipfs_cli(gateway, "get", "-C", "-o", str(gw_gz), cid)
    direct = ipfs_cli(kubo, "get", "-C", "-o", str(direct_gz), cid)
    assert direct.returncode == 0, direct.stderr.decode()
    expected = (tree / "images" / "2024" / "scan.bin").read_bytes()
    assert gzip.decompress(direct_gz.read_bytes()) == expected
    if via_gw.returncode != 0:
        raise GatewayOnlyFailure(via_gw.stderr.decode())
    assert gzip.decompress(gw_gz.read_bytes()) == expected


def test_get_output_dir_same_tree(kubo, gateway, added, tree, tmp_path):
    """Each into its own destination (one command for both would let the second overwrite)."""
    via_gw = ipfs_cli(gateway, "get", "-o", str(tmp_path / "gw"), added["study"])
    direct = ipfs_cli(kubo, "get", "-o", str(tmp_path / "direct"), added["study"])
    assert direct.returncode == 0, direct.stderr.decode()
    assert via_gw.returncode == 0, via_gw.stderr.decode()
    assert files_under(tmp_path / "gw") == files_under(tmp_path / "direct") == files_under(tree)


def test_ls_same_listing(kubo, gateway, added):
    gw, direct = both(kubo, gateway, "ls", added["study"])
    assert gw == direct
    names = sorted(line.split(None, 2)[2].rstrip("/") for line in gw.decode().splitlines())
    assert names == ["empty.txt", "images", "lab report.txt"]


def test_refs_recursive_same_list(kubo, gateway, added):
    gw, direct = both(kubo, gateway, "refs", "-r", added["study"])
    assert gw == direct
    refs = gw.decode().split()
    assert {cid for path, cid in added.items() if path != "study"} <= set(refs)
    assert len(refs) > len(added)  # the scan's chunks too


def test_dag_get_with_path_same_node(kubo, gateway, added):
    gw, direct = both(kubo, gateway, "dag", "get", f"{added['study']}/images/2024")
    assert gw == direct
    node = json.loads(gw)
    assert [link["Name"] for link in node["Links"]] == ["scan.bin"]
    assert node["Links"][0]["Hash"] == {"/": added["study/images/2024/scan.bin"]}


def test_block_stat_same(kubo, gateway, added):
    cid = added["study/images/index.md"]
    gw, direct = both(kubo, gateway, "block", "stat", cid)
    assert gw == direct
    assert gw.decode().splitlines()[0] == f"Key: {cid}"


def test_pin_ls_same(kubo, gateway, added):
    gw, direct = both(kubo, gateway, "pin", "ls", added["study"])
    assert gw == direct == f"{added['study']} recursive\n".encode()


def test_cid_base32_same(kubo, gateway, added):
    cid_v0 = added["study/lab report.txt"]
    assert cid_v0.startswith("Qm")
    gw, direct = both(kubo, gateway, "cid", "base32", cid_v0)
    assert gw == direct
    assert gw.decode().strip().startswith("bafybei")


def test_version_same(kubo, gateway):
    gw, direct = both(kubo, gateway, "version")
    assert gw == direct
    assert gw.decode().startswith("ipfs version 0.")
