"""The local key file: a gateway's secrets, one small JSON file, mode 0600.

Holds what must never reach the database:

* KEKs (key-encryption keys) ``[{id, key, created, active, retired}]``: the patients' data keys
  are wrapped by them in the key store (``gateway.storage``), so a copy of the database alone
  opens nothing. Every gateway sharing a database holds the same KEKs. One is active; during a
  rotation a new one is *prepared* (neither active nor retired), then made active while the
  old ones are *retired* until every data key is re-wrapped;
* the pseudonym key (HMAC), never rotated, because pseudonyms must stay stable — shared by
  every gateway of a database, or they would not find each other's patients;
* this gateway's Ed25519 signing key (raw seed) and its name (``gateway_id``): its own, never
  shared; its public key is registered in the key store so every gateway checks its records.

The per-patient data keys (DEKs) are not here: they live wrapped in the key store, so a new
patient costs one insert, not a rewrite of this file. A version 1 file (DEKs and tombstones
inside) still loads; its DEKs are moved into the key store on start
(``KeyringProvider.attach``) and the file is rewritten without them.

Every change is written atomically (temp file, fsync, rename, fsync dir): a crash leaves either
the old or the new file. Changes are rare: ``keys init``, ``join``, ``rotate``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import socket
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import Erased
from . import crypto

FORMAT_VERSION = 2
LEGACY_VERSION = 1  # DEKs in the file: loaded, and migrated into the key store on start
BUNDLE_KIND = "medicon-key-bundle"
PATIENT = "patient"  # the pseudonym kind of patient ids
GATEWAY_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class KeyShredded(Erased):
    """The patient's data key was destroyed (crypto-shredding): the data is gone for good."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("this patient's data was erased (crypto-shredded): it can never be read again",
                         reason=detail or None)


class KeyringError(Exception):
    """The key file is missing, unsafe or malformed, or does not fit the key store."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def wrap_aad(dek_id: str, pseudonym: str) -> bytes:
    """Associated data of a wrapped DEK: a wrapped key cannot be moved to another id or patient."""
    return crypto.canonical_json(["medicon/dek-wrap/v1", dek_id, pseudonym])


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """The id a record node names its signer's key by (``key``)."""
    return hashlib.sha256(crypto.public_key_to_bytes(public_key)).hexdigest()[:16]


def registration_mac(pseudonym_key: bytes, key_id: str, gateway_id: str, public_key: bytes) -> bytes:
    """What proves a gateway registration was made by a holder of the deployment's shared
    secret (the pseudonym key, which the database never sees)."""
    mac_key = hmac.new(pseudonym_key, b"medicon/gateway-registration/v1", hashlib.sha256).digest()
    return hmac.new(mac_key, crypto.canonical_json([key_id, gateway_id, b64(public_key)]), hashlib.sha256).digest()


def pseudonym_check(pseudonym_key: bytes) -> str:
    """A value every gateway with the same pseudonym key computes alike; reveals nothing of it."""
    return crypto.pseudonym(pseudonym_key, "medicon/check", "pseudonym-key")


def check_gateway_id(gateway_id: str) -> str:
    if not (1 <= len(gateway_id) <= 64) or not set(gateway_id) <= GATEWAY_ID_CHARS:
        raise KeyringError(f"invalid gateway id {gateway_id[:80]!r}: 1-64 letters, digits, '-', '_' or '.'")
    return gateway_id


def default_gateway_id() -> str:
    name = "".join(c for c in socket.gethostname() if c in GATEWAY_ID_CHARS)[:48]
    return f"{name or 'gateway'}-{secrets.token_hex(3)}"


def _new_kek(active: bool) -> dict[str, Any]:
    return {"id": f"kek-{secrets.token_hex(8)}", "key": b64(crypto.new_key()), "created": now_iso(),
            "active": active}


@dataclass(frozen=True)
class LegacyKeys:
    """What a version 1 file held beside its secrets: ``deks`` {pseudonym: {dek_id, kek_id,
    wrapped}} and ``shredded`` {pseudonym: {dek_ids, at}}, waiting to move to the key store."""

    deks: dict[str, dict[str, str]]
    shredded: dict[str, dict[str, Any]]

    def __bool__(self) -> bool:
        return bool(self.deks or self.shredded)


class LocalKeyring:
    """The key file of one gateway. Create with ``init`` (or ``join`` from a bundle), open with
    ``load``. Immutable once loaded: a change writes the file and returns the new state."""

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.path = path
        active = [k for k in doc["keks"] if k["active"]]
        if len(active) != 1:
            raise ValueError("a keyring needs exactly one active KEK")
        self._doc = doc
        self.keks: dict[str, bytes] = {k["id"]: unb64(k["key"]) for k in doc["keks"]}
        self.active_kek_id: str = active[0]["id"]
        self.retired: frozenset[str] = frozenset(k["id"] for k in doc["keks"] if k.get("retired"))
        self.pseudonym_key: bytes = unb64(doc["pseudonym_key"])
        self.signing_key: Ed25519PrivateKey = crypto.private_key_from_bytes(unb64(doc["signing_key"]))
        self.verify_key: Ed25519PublicKey = self.signing_key.public_key()
        self.key_id = key_id_of(self.verify_key)
        self.gateway_id: str = check_gateway_id(doc.get("gateway_id") or f"gateway-{self.key_id[:8]}")
        self.legacy = LegacyKeys(dict(doc.get("deks") or {}), dict(doc.get("shredded") or {}))
        for ps, entry in self.legacy.deks.items():
            if not isinstance(ps, str) or not {"dek_id", "kek_id", "wrapped"} <= set(entry):
                raise ValueError("a data key entry lacks dek_id, kek_id or wrapped")

    # --- the file ------------------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike[str], gateway_id: str | None = None) -> LocalKeyring:
        """Create a new key file at ``path`` (mode 0600): a new KEK, pseudonym key and signing
        key. Refuses to overwrite: losing a key file loses every record sealed under it."""
        doc = {
            "version": FORMAT_VERSION,
            "gateway_id": check_gateway_id(default_gateway_id() if gateway_id is None else gateway_id),
            "keks": [_new_kek(active=True)],
            "pseudonym_key": b64(crypto.new_key()),
            "signing_key": b64(crypto.private_key_to_bytes(Ed25519PrivateKey.generate())),
        }
        return cls._create(Path(path), doc)

    @classmethod
    def join(cls, path: str | os.PathLike[str], bundle: str | os.PathLike[str],
             gateway_id: str | None = None) -> LocalKeyring:
        """Create this gateway's key file from another site's bundle (``keys export``): the same
        KEKs and pseudonym key, a signing key and gateway id of its own."""
        shared = read_bundle(bundle)
        doc = {
            "version": FORMAT_VERSION,
            "gateway_id": check_gateway_id(default_gateway_id() if gateway_id is None else gateway_id),
            "keks": shared["keks"],
            "pseudonym_key": shared["pseudonym_key"],
            "signing_key": b64(crypto.private_key_to_bytes(Ed25519PrivateKey.generate())),
        }
        return cls._create(Path(path), doc)

    @classmethod
    def _create(cls, path: Path, doc: dict[str, Any]) -> LocalKeyring:
        ring = cls(path, doc)  # validates before anything is written
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _write_temp(path, doc)
        try:
            os.link(tmp, path)  # atomic, and fails if path exists (unlike rename)
        except FileExistsError:
            raise KeyringError(f"{path} already exists; refusing to overwrite a keyring") from None
        finally:
            os.unlink(tmp)
        _fsync_dir(path.parent)
        return ring

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LocalKeyring:
        """Open an existing key file; refuses one that group or others could read or write."""
        path = Path(path)
        doc = _read_private(path, "keyring")
        if doc.get("version") not in (FORMAT_VERSION, LEGACY_VERSION):
            raise KeyringError(f"keyring {path} has unsupported version {doc.get('version')!r}")
        try:
            return cls(path, doc)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyringError(f"keyring {path} is malformed: {exc}") from None

    def stamp(self) -> int | None:
        """The file's modification time (ns): another process changed it when this differs."""
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None

    def _commit(self, doc: dict[str, Any]) -> LocalKeyring:
        ring = type(self)(self.path, doc)
        tmp = _write_temp(self.path, doc)
        try:
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        _fsync_dir(self.path.parent)
        return ring

    def _copy(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._doc))

    # --- changes -------------------------------------------------------------------------------

    def without_legacy(self) -> LocalKeyring:
        """The file in version 2: its DEKs and tombstones are in the key store now."""
        doc = self._copy()
        doc.pop("deks", None)
        doc.pop("shredded", None)
        doc["version"] = FORMAT_VERSION
        doc.setdefault("gateway_id", self.gateway_id)
        return self._commit(doc)

    def prepared_kek(self) -> str | None:
        """The newest KEK neither active nor retired: made by a rotation that is staged (other
        gateways must get it first) or was interrupted before it switched."""
        waiting = [k for k in self._doc["keks"] if not k["active"] and not k.get("retired")]
        return max(waiting, key=lambda k: k["created"])["id"] if waiting else None

    def with_new_kek(self) -> LocalKeyring:
        """A new KEK beside the current ones, not active yet."""
        doc = self._copy()
        doc["keks"].append(_new_kek(active=False))
        return self._commit(doc)

    def activated(self, kek_id: str) -> LocalKeyring:
        """``kek_id`` active, every other KEK retired (kept until the data keys are re-wrapped)."""
        doc = self._copy()
        for k in doc["keks"]:
            k["active"], k["retired"] = k["id"] == kek_id, k["id"] != kek_id
        return self._commit(doc)

    def keeping_only(self, kek_id: str) -> LocalKeyring:
        """Drop every KEK but ``kek_id`` (after a rotation re-wrapped every data key)."""
        doc = self._copy()
        doc["keks"] = [dict(k, active=True, retired=False) for k in doc["keks"] if k["id"] == kek_id]
        return self._commit(doc)

    def merged(self, bundle: str | os.PathLike[str], *, prune: bool) -> LocalKeyring:
        """Take the bundle's KEKs (``keys join`` into an existing file); ``prune`` also drops
        the KEKs the bundle no longer holds. The pseudonym key must be the same."""
        shared = read_bundle(bundle)
        if unb64(shared["pseudonym_key"]) != self.pseudonym_key:
            raise KeyringError("the bundle comes from another deployment: its pseudonym key differs")
        doc = self._copy()
        theirs = {k["id"]: k for k in shared["keks"]}
        mine = {k["id"]: k for k in doc["keks"]}
        for kek_id, k in theirs.items():
            if kek_id in mine and mine[kek_id]["key"] != k["key"]:
                raise KeyringError(f"the bundle's KEK {kek_id} differs from the one of this file")
        if prune:
            keep = theirs
        else:  # this file's own active KEK stays active: the key store decides which one wraps
            keep = {**{i: dict(k, active=False) for i, k in theirs.items()}, **mine}
        doc["keks"] = list(keep.values())
        return self._commit(doc)

    def export(self, out: str | os.PathLike[str]) -> Path:
        """Write the shared secrets (KEKs, pseudonym key; no signing key) to a new 0600 file
        for ``keys join`` at another site."""
        out = Path(out)
        doc = {"version": FORMAT_VERSION, "kind": BUNDLE_KIND, "keks": self._doc["keks"],
               "pseudonym_key": self._doc["pseudonym_key"]}
        tmp = _write_temp(out, doc)
        try:
            os.link(tmp, out)
        except FileExistsError:
            raise KeyringError(f"{out} already exists; refusing to overwrite it") from None
        finally:
            os.unlink(tmp)
        return out

    # --- keys ----------------------------------------------------------------------------------

    def pseudonym(self, kind: str, value: str) -> str:
        """Stable keyed pseudonym (see ``crypto.pseudonym``)."""
        return crypto.pseudonym(self.pseudonym_key, kind, value)

    def wrap(self, dek_id: str, pseudonym: str, dek: bytes, kek_id: str) -> bytes:
        return crypto.seal(dek, self.keks[kek_id], wrap_aad(dek_id, pseudonym))

    def unwrap(self, dek_id: str, pseudonym: str, kek_id: str, wrapped: bytes) -> bytes:
        kek = self.keks.get(kek_id)
        if kek is None:
            raise KeyringError(f"data key {dek_id} is wrapped by KEK {kek_id}, which the key file "
                               f"{self.path} does not hold: deploy the current key file "
                               "(`medicon-gateway keys export` at a site that has it, `keys join` here)")
        try:
            return crypto.open_sealed(wrapped, kek, wrap_aad(dek_id, pseudonym))
        except crypto.DecryptError:
            raise KeyringError(f"data key {dek_id} does not unwrap: the key store or key file was "
                               "altered") from None


def read_bundle(path: str | os.PathLike[str]) -> dict[str, Any]:
    doc = _read_private(Path(path), "key bundle")
    try:
        if doc.get("kind") != BUNDLE_KIND or doc.get("version") != FORMAT_VERSION:
            raise ValueError("not a key bundle of `medicon-gateway keys export`")
        keks = doc["keks"]
        if sum(1 for k in keks if k["active"]) != 1 or any(len(unb64(k["key"])) != 32 for k in keks):
            raise ValueError("its KEKs are malformed")
        unb64(doc["pseudonym_key"])
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyringError(f"key bundle {path} is malformed: {exc}") from None
    return doc


def _read_private(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & 0o077:
                raise KeyringError(
                    f"{what} {path} is accessible by group/others (mode {stat.S_IMODE(mode):04o}); "
                    f"it holds the gateway's keys: run `chmod 600 {path}`")
            raw = f.read()
    except FileNotFoundError:
        raise KeyringError(f"no {what} at {path}; create one first") from None
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise KeyringError(f"{what} {path} is malformed: {exc}") from None
    if not isinstance(doc, dict):
        raise KeyringError(f"{what} {path} is malformed: not a JSON object")
    return doc


def _write_temp(path: Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` to a fresh 0600 file next to ``path`` and fsync it; returns its path."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # born private: no chmod race
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(doc, indent=2, sort_keys=True).encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
