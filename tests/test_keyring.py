"""Keys: the local key file (KEKs, pseudonym key, signing key; 0600) and the patients' wrapped
data keys in the key store — embedded SQLite and real PostgreSQL alike (``key_store`` runs each
store test on both): O(1) enrolment, rotation in batches, crypto-shredding seen by every
gateway, migration of version 1 keyring files, and several gateways sharing one store."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import postgres_rows, sqlite_rows
from gateway.errors import Unavailable
from gateway.security import crypto
from gateway.security.keyring import (KeyringError, KeyShredded, LocalKeyring, b64, key_id_of,
                                      pseudonym_check, registration_mac, wrap_aad)
from gateway.core.key_provider import KeyringProvider, RotationBlocked
from gateway.storage.model import KeyState
from gateway.storage.postgres import open_postgres_storage
from gateway.storage.sqlite import open_sqlite_storage

PATIENTS = ["patient-0042-Smith", "Jöns Ünicode-Ærø", "P-777"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "keyring.json"


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request, tmp_path):
    """(name, storage, raw SQL runner) of a fresh key store on each backend."""
    if request.param == "sqlite":
        storage = await open_sqlite_storage(tmp_path / "stores")

        async def sql(query: str, *args):
            return sqlite_rows(tmp_path / "stores" / "keys.sqlite3", query, *args)
    else:
        url = request.getfixturevalue("postgres_db")
        storage = await open_postgres_storage(url)

        async def sql(query: str, *args):
            return await postgres_rows(url, query, *args)
    yield request.param, storage, sql
    await storage.close()


@pytest.fixture
def key_store(backend):
    return backend[1].keys


async def gateway(path: Path, store) -> KeyringProvider:
    """A gateway's key provider over ``path``, attached to ``store`` (what start-up does)."""
    provider = KeyringProvider(path)
    await provider.attach(store)
    return provider


# --- the key file ------------------------------------------------------------------------------

def test_init_creates_private_file_whatever_the_umask(path: Path) -> None:
    old = os.umask(0)
    try:
        ring = LocalKeyring.init(path, gateway_id="site-a")
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    doc = json.loads(path.read_bytes())
    assert doc["version"] == 2 and doc["gateway_id"] == "site-a" == ring.gateway_id
    assert [k["id"] for k in doc["keks"]] == [ring.active_kek_id]
    assert "deks" not in doc and "shredded" not in doc  # data keys live in the key store
    assert sorted(os.listdir(path.parent)) == ["keyring.json"]  # no temp files left


def test_init_refuses_to_overwrite(path: Path) -> None:
    LocalKeyring.init(path)
    before = path.read_bytes()
    with pytest.raises(KeyringError, match="refusing to overwrite"):
        LocalKeyring.init(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["keyring.json"]


@pytest.mark.parametrize("perm", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_load_refuses_files_others_can_access(path: Path, perm: int) -> None:
    LocalKeyring.init(path)
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
    for content in (b"not json", b"[]", b'{"version": 1}', b'{"version": 2}', b'{"version": 99}'):
        path.write_bytes(content)
        os.chmod(path, 0o600)
        with pytest.raises(KeyringError):
            LocalKeyring.load(path)


def test_invalid_gateway_ids_are_refused(path: Path) -> None:
    for bad in ("", "has space", "x" * 65, "site/a"):
        with pytest.raises(KeyringError, match="invalid gateway id"):
            LocalKeyring.init(path, gateway_id=bad)
    assert not path.exists()


# --- data keys in the key store ------------------------------------------------------------------

async def test_a_new_patient_is_one_row_and_never_a_file_rewrite(path: Path, backend) -> None:
    _, storage, sql = backend
    LocalKeyring.init(path)
    before, stamp = path.read_bytes(), path.stat().st_mtime_ns
    a = await gateway(path, storage.keys)
    made = {p: await a.data_key_for_patient(p) for p in PATIENTS}
    made |= {f"bulk-{i}": await a.data_key_for_patient(f"bulk-{i}") for i in range(50)}
    assert path.read_bytes() == before and path.stat().st_mtime_ns == stamp
    assert await storage.keys.count() == len(made)
    assert len({dek for _, dek in made.values()}) == len(made)
    assert all(len(dek) == 32 for _, dek in made.values())
    assert await a.data_key_for_patient(PATIENTS[0]) == made[PATIENTS[0]]  # made once
    again = await gateway(path, storage.keys)  # a restart: nothing cached, everything found
    for patient, (dek_id, dek) in made.items():
        assert await again.data_key_for_patient(patient, create=False) == (dek_id, dek)
        assert await again.data_key(dek_id) == dek
    rows = await sql("SELECT pseudonym, wrapped FROM patient_keys")
    dump = repr(rows)
    for patient in PATIENTS:  # the store names patients only by pseudonym, keys only wrapped
        assert patient not in dump and json.dumps(patient)[1:-1] not in dump
        assert made[patient][1] not in b"".join(bytes(w) for _, w in rows)
    assert {ps for ps, _ in rows} == {a.pseudonym("patient", p) for p in made}


async def test_unknown_keys_raise_key_error(path: Path, key_store) -> None:
    LocalKeyring.init(path)
    a = await gateway(path, key_store)
    with pytest.raises(KeyError):
        await a.data_key_for_patient("nobody", create=False)
    with pytest.raises(KeyError):
        await a.data_key("dek-unknown")
    assert await key_store.count() == 0  # create=False wrote nothing


async def test_two_gateways_making_one_patients_key_at_once_agree(path: Path, backend) -> None:
    _, storage, _ = backend
    LocalKeyring.init(path)
    a, b = await gateway(path, storage.keys), await gateway(path, storage.keys)
    for i in range(20):
        first, second = await asyncio.gather(a.data_key_for_patient(f"p{i}"), b.data_key_for_patient(f"p{i}"))
        assert first == second
    assert await storage.keys.count() == 20


async def test_the_cache_of_unwrapped_keys_is_bounded(path: Path, key_store) -> None:
    LocalKeyring.init(path)
    provider = KeyringProvider(path, cache_size=5)
    await provider.attach(key_store)
    made = [await provider.data_key_for_patient(f"p{i}") for i in range(12)]
    assert len(provider._cache) == 5
    for dek_id, dek in made:  # evicted ones are unwrapped again
        assert await provider.data_key(dek_id) == dek
    assert len(provider._cache) == 5


async def test_wrapped_keys_are_bound_to_their_patient_and_id(path: Path, backend) -> None:
    """Handing patient A's wrapped key to patient B in the database must not go unnoticed."""
    _, storage, sql = backend
    LocalKeyring.init(path)
    a = await gateway(path, storage.keys)
    dek_a, _ = await a.data_key_for_patient("A")
    dek_b, _ = await a.data_key_for_patient("B")
    [(wrapped_a,)] = await sql("SELECT wrapped FROM patient_keys WHERE dek_id = $1", dek_a)
    [(wrapped_b,)] = await sql("SELECT wrapped FROM patient_keys WHERE dek_id = $1", dek_b)
    await sql("UPDATE patient_keys SET wrapped = $1 WHERE dek_id = $2", wrapped_b, dek_a)
    await sql("UPDATE patient_keys SET wrapped = $1 WHERE dek_id = $2", wrapped_a, dek_b)
    fresh = await gateway(path, storage.keys)  # nothing unwrapped in memory yet
    with pytest.raises(Unavailable, match="cannot unwrap"):
        await fresh.data_key_for_patient("A")
    with pytest.raises(Unavailable, match="cannot unwrap"):
        await fresh.data_key(dek_b)


# --- crypto-shredding ------------------------------------------------------------------------------

async def test_shredding_on_one_gateway_is_refused_by_another_at_once(path: Path, backend) -> None:
    _, storage, sql = backend
    LocalKeyring.init(path)
    a, b = await gateway(path, storage.keys), await gateway(path, storage.keys)
    made = {p: await a.data_key_for_patient(p) for p in PATIENTS}
    victim, (dek_id, dek) = PATIENTS[0], made[PATIENTS[0]]
    assert await b.data_key(dek_id) == dek  # b has it unwrapped in its cache now
    assert await a.shred_patient(victim) == 1
    assert await a.shred_patient(victim) == 0  # idempotent
    for provider in (b, a, await gateway(path, storage.keys)):
        with pytest.raises(KeyShredded):
            await provider.data_key(dek_id)
        with pytest.raises(KeyShredded):
            await provider.data_key_for_patient(victim)  # not even re-created
        with pytest.raises(KeyShredded):
            await provider.data_key_for_patient(victim, create=False)
        for p in PATIENTS[1:]:
            assert await provider.data_key_for_patient(p, create=False) == made[p]
    assert dek_id not in b._cache  # nor kept unwrapped in memory
    rows = await sql("SELECT dek_id, kek_id, wrapped FROM patient_keys WHERE pseudonym = $1",
                     a.pseudonym("patient", victim))
    assert rows == [(dek_id, None, None)]  # a tombstone: the id stays, the key is gone
    await a.rotate()  # rotation does not bring it back
    with pytest.raises(KeyShredded):
        await (await gateway(path, storage.keys)).data_key(dek_id)


async def test_shredding_a_patient_without_a_key_blocks_future_keys(path: Path, key_store) -> None:
    LocalKeyring.init(path)
    a = await gateway(path, key_store)
    assert await a.shred_patient("P-never") == 0
    with pytest.raises(KeyShredded):
        await a.data_key_for_patient("P-never")
    assert await key_store.count() == 0


# --- rotation --------------------------------------------------------------------------------------

async def test_rotate_rewraps_every_key_in_batches_and_drops_the_old_kek(path: Path, backend) -> None:
    _, storage, sql = backend
    ring = LocalKeyring.init(path)
    old_kek, old_key = ring.active_kek_id, b64(ring.keks[ring.active_kek_id])
    a = await gateway(path, storage.keys)
    made = {f"p{i}": await a.data_key_for_patient(f"p{i}") for i in range(25)}
    before = dict(await sql("SELECT dek_id, wrapped FROM patient_keys"))
    sealed = crypto.seal(b"record", made["p0"][1], b"aad")
    seen: list[tuple[int, int]] = []
    new_kek = await a.rotate(batch=10, progress=lambda done, total: seen.append((done, total)))
    assert new_kek != old_kek
    assert seen == [(10, 25), (20, 25), (25, 25)]
    text = path.read_text()
    assert old_kek not in text and old_key not in text and mode(path) == 0o600
    assert [k["id"] for k in json.loads(text)["keks"]] == [new_kek]
    after = await sql("SELECT dek_id, kek_id, wrapped FROM patient_keys")
    assert {kek for _, kek, _ in after} == {new_kek}
    assert all(bytes(w) != bytes(before[d]) for d, _, w in after)
    assert (await storage.keys.state()).active_kek == new_kek
    fresh = await gateway(path, storage.keys)  # unwrapped afresh, with the new KEK
    for patient, (dek_id, dek) in made.items():
        assert await fresh.data_key_for_patient(patient, create=False) == (dek_id, dek)
    assert crypto.open_sealed(sealed, await fresh.data_key(made["p0"][0]), b"aad") == b"record"
    await fresh.data_key_for_patient("after-rotation")
    assert await storage.keys.count(not_wrapped_by=new_kek) == 0
    assert await fresh.rotate() not in (new_kek, old_kek)  # and again


async def test_an_interrupted_rotation_is_finished_by_the_next(path: Path, key_store) -> None:
    LocalKeyring.init(path)
    a = await gateway(path, key_store)
    made = {f"p{i}": await a.data_key_for_patient(f"p{i}") for i in range(7)}

    def crash(done: int, total: int) -> None:
        raise KeyboardInterrupt("operator pressed ^C")
    with pytest.raises(KeyboardInterrupt):
        await a.rotate(batch=3, progress=crash)
    half = LocalKeyring.load(path)
    target = half.active_kek_id
    assert len(half.keks) == 2 and (await key_store.state()).active_kek == target
    assert 0 < await key_store.count(not_wrapped_by=target) < 7
    b = await gateway(path, key_store)  # meanwhile, keys of both KEKs open and new ones work
    assert all([await b.data_key(i) == d for i, d in made.values()])
    await b.data_key_for_patient("during")
    assert await a.rotate(batch=3) == target
    assert list(LocalKeyring.load(path).keks) == [target]
    assert await key_store.count(not_wrapped_by=target) == 0


# --- version 1 keyring files ----------------------------------------------------------------------

def write_v1_keyring(path: Path, patients: list[str], shredded: list[str]) -> dict:
    """A keyring file as versions before the key store wrote it: DEKs and tombstones inside."""
    kek, pseudo_key = crypto.new_key(), crypto.new_key()
    signing = crypto.private_key_to_bytes(Ed25519PrivateKey.generate())
    deks, made = {}, {}
    for i, patient in enumerate(patients):
        ps = crypto.pseudonym(pseudo_key, "patient", patient)
        dek_id, dek = f"dek-v1-{i:04d}", crypto.new_key()
        deks[ps] = {"dek_id": dek_id, "kek_id": "kek-v1", "wrapped": b64(crypto.seal(dek, kek, wrap_aad(dek_id, ps)))}
        made[patient] = (dek_id, dek)
    tombs = {crypto.pseudonym(pseudo_key, "patient", p): {"dek_ids": [f"dek-gone-{i}"], "at": "2025-01-01T00:00:00+00:00"}
             for i, p in enumerate(shredded)}
    doc = {"version": 1, "keks": [{"id": "kek-v1", "key": b64(kek), "created": "2025-01-01", "active": True}],
           "pseudonym_key": b64(pseudo_key), "signing_key": b64(signing), "deks": deks, "shredded": tombs}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    return made


async def test_a_version_1_keyring_moves_into_the_key_store_on_start(path: Path, key_store) -> None:
    made = write_v1_keyring(path, PATIENTS + [f"bulk-{i}" for i in range(30)], shredded=["gone-1", "gone-2"])
    old = json.loads(path.read_text())
    a = await gateway(path, key_store)
    assert a.moved == {"keys": 33, "tombstones": 2}
    doc = json.loads(path.read_text())
    assert doc["version"] == 2 and "deks" not in doc and "shredded" not in doc and mode(path) == 0o600
    for field in ("keks", "pseudonym_key", "signing_key"):
        assert doc[field] == old[field]  # the file's own secrets are kept as they were
    assert await key_store.count() == 33
    fresh = await gateway(path, key_store)
    assert fresh.moved == {"keys": 0, "tombstones": 0}  # once only
    for patient, (dek_id, dek) in made.items():
        assert await fresh.data_key_for_patient(patient, create=False) == (dek_id, dek)
    for gone in ("gone-1", "gone-2"):
        with pytest.raises(KeyShredded):
            await fresh.data_key_for_patient(gone)
    with pytest.raises(KeyShredded):
        await fresh.data_key("dek-gone-0")
    assert a.key_id == fresh.key_id  # the same signing key




# --- several gateways, one key store ---------------------------------------------------------------

async def test_joined_gateways_share_data_keys_but_sign_with_their_own(tmp_path: Path, key_store) -> None:
    site_a, site_b, bundle = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "bundle.json"
    LocalKeyring.init(site_a, gateway_id="site-a")
    a = await gateway(site_a, key_store)
    dek = await a.data_key_for_patient("P-1")
    LocalKeyring.load(site_a).export(bundle)
    assert mode(bundle) == 0o600
    exported = json.loads(bundle.read_text())
    assert "signing_key" not in exported and "gateway_id" not in exported
    LocalKeyring.join(site_b, bundle, gateway_id="site-b")
    b = await gateway(site_b, key_store)
    assert await b.data_key_for_patient("P-1") == dek
    assert b.pseudonym("episode", "E-1") == a.pseudonym("episode", "E-1")
    assert a.key_id != b.key_id
    assert {(g.gateway_id, g.key_id) for g in await key_store.gateways()} == {("site-a", a.key_id),
                                                                              ("site-b", b.key_id)}
    signed = crypto.sign(b.signing_key, {"record": 1})
    key = await a.verify_key_for(b.key_id)
    assert key is not None and crypto.verify_signature(key, {"record": 1}, signed)
    assert await a.gateway_of(b.key_id) == "site-b" and await b.gateway_of(a.key_id) == "site-a"
    assert await a.verify_key_for("0123456789abcdef") is None


async def test_a_key_file_of_another_deployment_is_refused(tmp_path: Path, key_store) -> None:
    LocalKeyring.init(tmp_path / "a.json")
    await gateway(tmp_path / "a.json", key_store)
    LocalKeyring.init(tmp_path / "other.json")
    with pytest.raises(KeyringError, match="another deployment"):
        await gateway(tmp_path / "other.json", key_store)
    state = await key_store.state()
    assert state.pseudonym_check == pseudonym_check(LocalKeyring.load(tmp_path / "a.json").pseudonym_key)


async def test_rotation_waits_until_every_gateway_holds_the_new_kek(tmp_path: Path, key_store) -> None:
    site_a, site_b = tmp_path / "a.json", tmp_path / "b.json"
    LocalKeyring.init(site_a, gateway_id="site-a")
    a = await gateway(site_a, key_store)
    made = await a.data_key_for_patient("P-1")
    LocalKeyring.load(site_a).export(tmp_path / "bundle-1.json")
    LocalKeyring.join(site_b, tmp_path / "bundle-1.json", gateway_id="site-b")
    b = await gateway(site_b, key_store)
    with pytest.raises(RotationBlocked, match="site-b"):
        await a.rotate()
    prepared = LocalKeyring.load(site_a).prepared_kek()
    assert prepared and (await key_store.state()).active_kek != prepared  # nothing switched yet
    LocalKeyring.load(site_a).export(tmp_path / "bundle-2.json")
    LocalKeyring.load(site_b).merged(tmp_path / "bundle-2.json", prune=False)
    b.reload()
    await b.register()
    assert await a.rotate() == prepared
    # b's file still names the old KEK active: its new keys are wrapped by the store's active one
    made_b = await b.data_key_for_patient("P-2")
    assert await a.data_key_for_patient("P-2") == made_b
    assert await b.data_key_for_patient("P-1") == made
    assert await key_store.count(not_wrapped_by=prepared) == 0


async def test_a_gateway_without_the_active_kek_is_refused_until_it_gets_it(tmp_path: Path, key_store) -> None:
    site_a, site_b = tmp_path / "a.json", tmp_path / "b.json"
    LocalKeyring.init(site_a, gateway_id="site-a")
    a = await gateway(site_a, key_store)
    await a.data_key_for_patient("P-1")
    LocalKeyring.load(site_a).export(tmp_path / "bundle-1.json")
    LocalKeyring.join(site_b, tmp_path / "bundle-1.json", gateway_id="site-b")
    await gateway(site_b, key_store)
    await a.rotate(force=True)  # site-b is gone, its operator says
    with pytest.raises(KeyringError, match="lacks the key-encryption key"):
        await gateway(site_b, key_store)
    LocalKeyring.load(site_a).export(tmp_path / "bundle-2.json")
    LocalKeyring.load(site_b).merged(tmp_path / "bundle-2.json", prune=True)
    b = await gateway(site_b, key_store)
    assert await b.data_key_for_patient("P-1") == await a.data_key_for_patient("P-1")


async def test_a_bundle_of_another_deployment_is_refused(tmp_path: Path) -> None:
    LocalKeyring.init(tmp_path / "a.json")
    LocalKeyring.init(tmp_path / "other.json").export(tmp_path / "other-bundle.json")
    with pytest.raises(KeyringError, match="another deployment"):
        LocalKeyring.load(tmp_path / "a.json").merged(tmp_path / "other-bundle.json", prune=False)
    (tmp_path / "not-a-bundle.json").write_text("{}")
    os.chmod(tmp_path / "not-a-bundle.json", 0o600)
    with pytest.raises(KeyringError, match="malformed"):
        LocalKeyring.join(tmp_path / "c.json", tmp_path / "not-a-bundle.json")
    assert not (tmp_path / "c.json").exists()


async def test_the_key_state_is_set_by_the_first_gateway(path: Path, key_store) -> None:
    assert await key_store.state() is None
    ring = LocalKeyring.init(path)
    await gateway(path, key_store)
    assert await key_store.state() == KeyState(ring.active_kek_id, pseudonym_check(ring.pseudonym_key))


async def test_a_signing_key_written_into_the_database_by_hand_is_not_trusted(tmp_path: Path, backend) -> None:
    """Who can write the database but holds no key file cannot make its own signatures pass:
    a registration counts only with a MAC under the deployment's shared secret."""
    name, storage, sql = backend
    LocalKeyring.init(tmp_path / "a.json")
    a = await gateway(tmp_path / "a.json", storage.keys)
    intruder = Ed25519PrivateKey.generate()
    public = crypto.public_key_to_bytes(intruder.public_key())
    kid = key_id_of(intruder.public_key())
    other_secret = LocalKeyring.init(tmp_path / "other.json").pseudonym_key
    for mac in (b"", b"\0" * 32, registration_mac(other_secret, kid, "rogue", public)):
        await sql("DELETE FROM gateway_keys WHERE key_id = $1", kid)
        if name == "sqlite":
            await sql("INSERT INTO gateway_keys VALUES ($1, 'rogue', $2, '[]', '2026-01-01', $3)", kid, public, mac)
        else:
            await sql("INSERT INTO gateway_keys (key_id, gateway_id, public_key, kek_ids, mac)"
                      " VALUES ($1, 'rogue', $2, '{}', $3)", kid, public, mac)
        fresh = await gateway(tmp_path / "a.json", storage.keys)
        assert await fresh.verify_key_for(kid) is None and await fresh.gateway_of(kid) is None
    assert await a.verify_key_for(a.key_id) is not None


def test_migrate_moves_a_version_1_keyring_into_the_key_store(tmp_path: Path) -> None:
    made = write_v1_keyring(tmp_path / "keyring.json", PATIENTS, shredded=["gone"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDICON_")}
    done = subprocess.run([sys.executable, "-m", "gateway", "migrate", "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "3 data key(s) and 1 tombstone(s) moved into the key store" in done.stderr
    doc = json.loads((tmp_path / "keyring.json").read_text())
    assert doc["version"] == 2 and "deks" not in doc
    stored = dict(sqlite3.connect(tmp_path / "keys.sqlite3").execute("SELECT dek_id, kek_id FROM patient_keys"))
    assert {dek_id for dek_id, _ in made.values()} | {"dek-gone-0"} == set(stored)
    assert stored["dek-gone-0"] is None
