"""gateway.security.keyring.LocalKeyring: file safety, DEK lifecycle, KEK rotation, crypto-shredding."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gateway.security import crypto
from gateway.security.keyring import KeyringError, KeyShredded, LocalKeyring

PATIENTS = ["patient-0042-Smith", "Jöns Ünicode-Ærø", "P-777"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "keyring.json"


@pytest.fixture
def kr(path: Path) -> LocalKeyring:
    return LocalKeyring.init(path)


def test_init_creates_private_file_whatever_the_umask(path: Path) -> None:
    old = os.umask(0)
    try:
        kr = LocalKeyring.init(path)
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    doc = json.loads(path.read_bytes())
    assert [k["id"] for k in doc["keks"]] == [kr.active_kek_id]
    assert doc["keks"][0]["active"] is True and doc["deks"] == {}
    assert sorted(os.listdir(path.parent)) == ["keyring.json"]  # no temp files left


def test_init_refuses_to_overwrite(kr: LocalKeyring, path: Path) -> None:
    kr.data_key_for_patient("P-1")
    before = path.read_bytes()
    with pytest.raises(KeyringError, match="refusing to overwrite"):
        LocalKeyring.init(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["keyring.json"]


@pytest.mark.parametrize("perm", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_load_refuses_files_others_can_access(kr: LocalKeyring, path: Path, perm: int) -> None:
    os.chmod(path, perm)
    with pytest.raises(KeyringError, match=r"chmod 600") as info:
        LocalKeyring.load(path)
    assert f"{perm:04o}" in str(info.value)
    os.chmod(path, 0o600)
    LocalKeyring.load(path)
    os.chmod(path, 0o400)  # stricter is fine
    LocalKeyring.load(path)


def test_load_reports_missing_and_malformed_files(path: Path) -> None:
    with pytest.raises(KeyringError, match="no keyring"):
        LocalKeyring.load(path)
    for content in (b"not json", b"[]", b'{"version": 1}', b'{"version": 99}'):
        path.write_bytes(content)
        os.chmod(path, 0o600)
        with pytest.raises(KeyringError):
            LocalKeyring.load(path)


def test_file_names_no_patient(kr: LocalKeyring, path: Path) -> None:
    for p in PATIENTS:
        kr.data_key_for_patient(p)
    kr.shred_patient(PATIENTS[0])
    kr.rotate()
    raw = path.read_bytes()
    text = raw.decode("utf-8")
    for p in PATIENTS:
        assert p.encode() not in raw
        assert json.dumps(p)[1:-1] not in text  # nor its JSON-escaped form
        assert p.lower() not in text.lower()
    doc = json.loads(raw)
    expected = {kr.pseudonym("patient", p) for p in PATIENTS}
    assert set(doc["deks"]) | set(doc["shredded"]) == expected


def test_dek_is_created_once_and_stable_across_reload(kr: LocalKeyring, path: Path) -> None:
    ids = {p: kr.data_key_for_patient(p) for p in PATIENTS}
    assert len({dek for _, dek in ids.values()}) == len(PATIENTS)
    assert all(len(dek) == 32 for _, dek in ids.values())
    assert kr.data_key_for_patient(PATIENTS[0]) == ids[PATIENTS[0]]
    assert mode(path) == 0o600
    again = LocalKeyring.load(path)
    for p, (dek_id, dek) in ids.items():
        assert again.data_key_for_patient(p, create=False) == (dek_id, dek)
        assert again.data_key(dek_id) == dek
    assert again.pseudonym("patient", "x") == kr.pseudonym("patient", "x")
    assert sorted(os.listdir(path.parent)) == ["keyring.json"]


def test_unknown_keys_raise_key_error(kr: LocalKeyring, path: Path) -> None:
    with pytest.raises(KeyError):
        kr.data_key_for_patient("nobody", create=False)
    with pytest.raises(KeyError):
        kr.data_key("dek-unknown")
    assert json.loads(path.read_bytes())["deks"] == {}  # create=False wrote nothing


def test_rotate_rewraps_every_dek(kr: LocalKeyring, path: Path) -> None:
    ids = {p: kr.data_key_for_patient(p) for p in PATIENTS}
    old_doc = json.loads(path.read_bytes())
    old_kek = old_doc["keks"][0]
    new_id = kr.rotate()
    assert new_id != old_kek["id"] and kr.active_kek_id == new_id
    raw = path.read_text()
    assert old_kek["id"] not in raw and old_kek["key"] not in raw
    doc = json.loads(raw)
    assert [(k["id"], k["active"]) for k in doc["keks"]] == [(new_id, True)]
    for ps, entry in doc["deks"].items():
        assert entry["kek_id"] == new_id
        assert entry["wrapped"] != old_doc["deks"][ps]["wrapped"]
    assert mode(path) == 0o600
    for keyring in (kr, LocalKeyring.load(path)):  # from cache and unwrapped afresh
        for p, (dek_id, dek) in ids.items():
            assert keyring.data_key_for_patient(p, create=False) == (dek_id, dek)
            assert keyring.data_key(dek_id) == dek
    # New DEKs use the new KEK, and rotating again still works.
    kr.data_key_for_patient("P-new")
    third = kr.rotate()
    assert third not in (new_id, old_kek["id"])
    again = LocalKeyring.load(path)
    assert again.active_kek_id == third
    assert all(again.data_key(i) == d for i, d in ids.values())


def test_rotate_keeps_stored_data_readable(kr: LocalKeyring, path: Path) -> None:
    dek_id, dek = kr.data_key_for_patient("P-1")
    sealed = crypto.seal(b"record", dek, b"aad")
    blob = crypto.encrypt_blob(b"attachment" * 10_000, dek, dek_id, 1024)
    kr.rotate()
    again = LocalKeyring.load(path)
    assert crypto.open_sealed(sealed, again.data_key(dek_id), b"aad") == b"record"
    assert crypto.decrypt_blob(blob, again.data_key) == b"attachment" * 10_000


def test_shred_patient(kr: LocalKeyring, path: Path) -> None:
    ids = {p: kr.data_key_for_patient(p) for p in PATIENTS}
    victim, dek_id = PATIENTS[0], ids[PATIENTS[0]][0]
    blob = crypto.encrypt_blob(b"scan", ids[victim][1], dek_id)
    assert kr.shred_patient(victim) == 1
    assert kr.shred_patient(victim) == 0  # idempotent
    for keyring in (kr, LocalKeyring.load(path)):
        with pytest.raises(KeyShredded):
            keyring.data_key_for_patient(victim)  # not even re-created
        with pytest.raises(KeyShredded):
            keyring.data_key_for_patient(victim, create=False)
        with pytest.raises(KeyShredded):
            keyring.data_key(dek_id)
        with pytest.raises(KeyShredded):  # surfaces through decryption, for a 410
            crypto.decrypt_blob(blob, keyring.data_key)
        for p in PATIENTS[1:]:
            assert keyring.data_key_for_patient(p, create=False) == ids[p]
            assert keyring.data_key(ids[p][0]) == ids[p][1]
    doc = json.loads(path.read_bytes())
    ps = kr.pseudonym("patient", victim)
    assert ps not in doc["deks"]
    assert doc["shredded"][ps]["dek_ids"] == [dek_id]
    assert dek_id not in kr._cache  # nor kept unwrapped in memory
    # The wrapped DEK is gone from the file, and rotation does not bring it back.
    kr.rotate()
    with pytest.raises(KeyShredded):
        LocalKeyring.load(path).data_key(dek_id)


def test_shredding_a_patient_without_a_dek_blocks_future_keys(kr: LocalKeyring, path: Path) -> None:
    assert kr.shred_patient("P-never") == 0
    with pytest.raises(KeyShredded):
        LocalKeyring.load(path).data_key_for_patient("P-never")


def test_signing_key_persists(kr: LocalKeyring, path: Path) -> None:
    sig = crypto.sign(kr.signing_key, {"record": 1})
    again = LocalKeyring.load(path)
    assert crypto.verify_signature(again.verify_key, {"record": 1}, sig)
    assert crypto.public_key_to_bytes(again.verify_key) == crypto.public_key_to_bytes(kr.verify_key)
    other = LocalKeyring.init(path.with_name("other.json"))
    assert not crypto.verify_signature(other.verify_key, {"record": 1}, sig)
    assert other.pseudonym("patient", "x") != kr.pseudonym("patient", "x")


def test_wrapped_deks_are_bound_to_their_patient_and_id(kr: LocalKeyring, path: Path) -> None:
    """Editing the file to hand patient A's wrapped key to patient B must not go unnoticed."""
    kr.data_key_for_patient("A")
    kr.data_key_for_patient("B")
    doc = json.loads(path.read_bytes())
    a, b = kr.pseudonym("patient", "A"), kr.pseudonym("patient", "B")
    doc["deks"][a]["wrapped"], doc["deks"][b]["wrapped"] = doc["deks"][b]["wrapped"], doc["deks"][a]["wrapped"]
    path.write_text(json.dumps(doc))
    tampered = LocalKeyring.load(path)
    with pytest.raises(KeyringError):
        tampered.data_key_for_patient("A")
    with pytest.raises(KeyringError):
        tampered.data_key(doc["deks"][b]["dek_id"])
