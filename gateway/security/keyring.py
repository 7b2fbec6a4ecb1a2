"""The local key provider: one JSON keyring file, mode 0600, for a single gateway process.

Holds the gateway's secrets:

* KEKs (key-encryption keys) ``[{id, key, created, active}]`` — exactly one active;
* the pseudonym key (HMAC), never rotated, because pseudonyms must stay stable;
* the Ed25519 signing key (raw seed);
* per-patient DEKs (data keys), AES-256-GCM-wrapped by the active KEK with
  AAD = canonical_json(["medicon/dek-wrap/v1", dek_id, pseudonym]), so a wrapped key cannot be
  moved to another id or patient — ``{"deks": {pseudonym: {dek_id, kek_id, wrapped}}}``;
* tombstones of shredded patients ``{"shredded": {pseudonym: {dek_ids, at}}}``.

Patients appear only as pseudonyms: the file names no patient. Per-patient DEKs make erasure
cheap (crypto-shredding: destroy one key, and every copy of that patient's data on IPFS becomes
noise). Caveats of a *local* file: the KEKs sit next to what they wrap, so wrapping buys key
rotation and a seam for a KMS rather than extra secrecy; and shredding or rotating is only as
final as the destruction of older copies of this file (backups, snapshots).

Every change is written atomically (temp file, fsync, rename, fsync dir) and applied in memory
only after it is on disk, so a crash leaves either the old or the new keyring.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import Erased
from . import crypto

FORMAT_VERSION = 1
PATIENT = "patient"  # the pseudonym kind of patient ids


class KeyShredded(Erased):
    """The patient's data key was destroyed (crypto-shredding): the data is gone for good."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("this patient's data was erased (crypto-shredded): it can never be read again",
                         reason=detail or None)


class KeyringError(Exception):
    """The keyring file is missing, unsafe or malformed."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _wrap_aad(dek_id: str, pseudonym: str) -> bytes:
    return crypto.canonical_json(["medicon/dek-wrap/v1", dek_id, pseudonym])


def _new_kek() -> dict[str, Any]:
    return {"id": f"kek-{secrets.token_hex(8)}", "key": _b64(crypto.new_key()), "created": _now(), "active": True}


class LocalKeyring:
    """Keys for one gateway. Create with ``init``, open with ``load``; methods are thread-safe
    (a lock around changes) so blocking calls may be moved to ``asyncio.to_thread``."""

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._cache: dict[str, bytes] = {}  # dek_id -> unwrapped DEK
        self._apply(doc)

    # --- file ----------------------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike[str]) -> LocalKeyring:
        """Create a new keyring at ``path`` (mode 0600). Refuses to overwrite: losing a keyring
        loses every record encrypted under it."""
        path = Path(path)
        doc = {
            "version": FORMAT_VERSION,
            "keks": [_new_kek()],
            "pseudonym_key": _b64(crypto.new_key()),
            "signing_key": _b64(crypto.private_key_to_bytes(Ed25519PrivateKey.generate())),
            "deks": {},
            "shredded": {},
        }
        tmp = _write_temp(path, doc)
        try:
            os.link(tmp, path)  # atomic, and fails if path exists (unlike rename)
        except FileExistsError:
            raise KeyringError(f"{path} already exists; refusing to overwrite a keyring") from None
        finally:
            os.unlink(tmp)
        _fsync_dir(path.parent)
        return cls(path, doc)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LocalKeyring:
        """Open an existing keyring; refuses one that group or others could read or write."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                if mode & 0o077:
                    raise KeyringError(
                        f"keyring {path} is accessible by group/others (mode {stat.S_IMODE(mode):04o}); "
                        f"it holds every key of the gateway: run `chmod 600 {path}`"
                    )
                raw = f.read()
        except FileNotFoundError:
            raise KeyringError(f"no keyring at {path}; create one first") from None
        try:
            doc = json.loads(raw)
            if doc.get("version") != FORMAT_VERSION:
                raise KeyringError(f"keyring {path} has unsupported version {doc.get('version')!r}")
            return cls(path, doc)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyringError(f"keyring {path} is malformed: {exc}") from None

    def _apply(self, doc: dict[str, Any]) -> None:
        """Adopt ``doc`` as the current state (validating what later calls rely on)."""
        active = [k for k in doc["keks"] if k["active"]]
        if len(active) != 1:
            raise ValueError("a keyring needs exactly one active KEK")
        keks = {k["id"]: _unb64(k["key"]) for k in doc["keks"]}
        signing = crypto.private_key_from_bytes(_unb64(doc["signing_key"]))
        dek_index = {e["dek_id"]: ps for ps, e in doc["deks"].items()}
        shredded = {d for t in doc["shredded"].values() for d in t["dek_ids"]}
        self._doc, self._keks, self._active = doc, keks, active[0]["id"]
        self._pseudonym_key = _unb64(doc["pseudonym_key"])
        self._dek_index, self._shredded_ids = dek_index, shredded
        self.signing_key: Ed25519PrivateKey = signing
        self.verify_key: Ed25519PublicKey = signing.public_key()

    def _commit(self, doc: dict[str, Any]) -> None:
        tmp = _write_temp(self.path, doc)
        try:
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        self._apply(doc)  # on disk now: memory must follow even if the dir fsync fails
        _fsync_dir(self.path.parent)

    # --- keys ----------------------------------------------------------------------------------

    @property
    def active_kek_id(self) -> str:
        return self._active

    def pseudonym(self, kind: str, value: str) -> str:
        """Stable keyed pseudonym (see ``crypto.pseudonym``)."""
        return crypto.pseudonym(self._pseudonym_key, kind, value)

    def data_key_for_patient(self, patient: str, create: bool = True) -> tuple[str, bytes]:
        """(dek_id, key) of the patient's DEK, creating and persisting one if missing (unless
        ``create`` is false: KeyError). KeyShredded once the patient was shredded — for good."""
        ps = self.pseudonym(PATIENT, patient)
        with self._lock:
            if ps in self._doc["shredded"]:
                raise KeyShredded(f"data key of patient {ps} was shredded")
            entry = self._doc["deks"].get(ps)
            if entry is not None:
                return entry["dek_id"], self._unwrap(ps, entry)
            if not create:
                raise KeyError(f"no data key for patient {ps}")
            dek_id, dek = f"dek-{secrets.token_hex(12)}", crypto.new_key()
            doc = _copy(self._doc)
            doc["deks"][ps] = self._wrap(dek_id, ps, dek, self._active, self._keks[self._active])
            self._commit(doc)
            self._cache[dek_id] = dek
            return dek_id, dek

    def data_key(self, dek_id: str) -> bytes:
        """The DEK named by stored data. KeyShredded if destroyed, KeyError if never known.
        Fits ``crypto.decrypt_stream``'s ``key_for``."""
        with self._lock:
            if dek_id in self._shredded_ids:
                raise KeyShredded(f"data key {dek_id} was shredded")
            ps = self._dek_index.get(dek_id)
            if ps is None:
                raise KeyError(f"unknown data key {dek_id}")
            return self._unwrap(ps, self._doc["deks"][ps])

    def rotate(self, progress: Callable[[str, int, int], None] | None = None) -> str:
        """Make a new active KEK, re-wrap every DEK with it and drop the old KEKs. The DEKs — and
        so all stored data — are unchanged. Returns the new KEK id. ``progress("data keys",
        done, total)`` is told of each re-wrapped key (the CLI's progress bar)."""
        with self._lock:
            deks = {ps: (e["dek_id"], self._unwrap(ps, e)) for ps, e in self._doc["deks"].items()}
            kek = _new_kek()
            kek_key = _unb64(kek["key"])
            doc = _copy(self._doc)
            doc["keks"] = [kek]
            doc["deks"] = {}
            for done, (ps, (i, dek)) in enumerate(deks.items(), 1):
                doc["deks"][ps] = self._wrap(i, ps, dek, kek["id"], kek_key)
                if progress is not None:
                    progress("data keys", done, len(deks))
            self._commit(doc)
            return kek["id"]

    def shred_patient(self, patient: str) -> int:
        """Destroy the patient's DEK and leave a tombstone (pseudonym + dek ids) so later reads
        raise KeyShredded rather than KeyError. Idempotent; returns how many DEKs were destroyed."""
        ps = self.pseudonym(PATIENT, patient)
        with self._lock:
            doc = _copy(self._doc)
            entry = doc["deks"].pop(ps, None)
            destroyed = [entry["dek_id"]] if entry else []
            tomb = doc["shredded"].setdefault(ps, {"dek_ids": [], "at": _now()})
            tomb["dek_ids"] = sorted(set(tomb["dek_ids"]) | set(destroyed))
            self._commit(doc)
            for dek_id in destroyed:
                self._cache.pop(dek_id, None)
            return len(destroyed)

    @staticmethod
    def _wrap(dek_id: str, ps: str, dek: bytes, kek_id: str, kek: bytes) -> dict[str, str]:
        sealed = crypto.seal(dek, kek, _wrap_aad(dek_id, ps))
        return {"dek_id": dek_id, "kek_id": kek_id, "wrapped": _b64(sealed)}

    def _unwrap(self, ps: str, entry: dict[str, str]) -> bytes:
        dek_id = entry["dek_id"]
        dek = self._cache.get(dek_id)
        if dek is None:
            kek = self._keks.get(entry["kek_id"])
            if kek is None:
                raise KeyringError(f"data key {dek_id} is wrapped by unknown KEK {entry['kek_id']}")
            try:
                dek = crypto.open_sealed(_unb64(entry["wrapped"]), kek, _wrap_aad(dek_id, ps))
            except crypto.DecryptError:
                raise KeyringError(f"data key {dek_id} does not unwrap: keyring corrupted") from None
            self._cache[dek_id] = dek
        return dek


def _copy(doc: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(doc))


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
