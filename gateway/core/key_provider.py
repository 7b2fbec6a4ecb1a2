"""The built-in key provider: secrets from the local key file, data keys in the key store.

``KeyringProvider`` implements ``keys.KeyProvider`` over a ``LocalKeyring`` file (KEKs,
pseudonym key, this gateway's signing key) and a ``storage.KeyStore`` (wrapped data keys,
tombstones, registered gateway keys), in the embedded SQLite files or in PostgreSQL alike:

* a new patient costs one insert into the key store (off the event loop), whatever the number
  of patients — no file is rewritten;
* every lookup of a data key reads its row (one indexed read), so a patient shredded by any
  gateway or by the CLI is refused (``KeyShredded``, 410) on the next lookup everywhere; the
  unwrapped keys are kept in a bounded LRU cache, so a lookup costs no unwrap;
* signatures are checked against every registered gateway's public key (``verify_key_for``),
  so records written by any gateway of the database verify on each of them.

Several gateways sharing a database must hold the same KEKs and pseudonym key, each with a
signing key of its own: ``keys export`` at the first site, ``keys join`` at the others. A
gateway whose key file does not fit the key store (another pseudonym key, or without the
active KEK) refuses to start instead of writing keys no other gateway can read.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import Unavailable
from ..storage.base import KeyStore
from ..storage.model import GatewayKey, KeyConflict, KeyState, PatientKey
from ..security import crypto
from ..security.keyring import (PATIENT, KeyringError, KeyShredded, LocalKeyring, key_id_of, pseudonym_check,
                      registration_mac, unb64)

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (keys re-wrapped so far, keys to re-wrap)


class RotationBlocked(KeyringError):
    """Other gateways of the database do not hold the new KEK yet."""


class KeyringProvider:
    """A gateway's keys; usable once ``attach``-ed to the key store (at start-up)."""

    RECHECK = 0.05        # seconds between looks at the key file's modification time
    CACHE_SIZE = 10_000   # unwrapped data keys kept in memory (32 bytes each, plus their ids)
    IMPORT_BATCH = 10_000

    def __init__(self, path: str | Path, *, cache_size: int = CACHE_SIZE) -> None:
        self.path = Path(path)
        ring = LocalKeyring.load(self.path)
        self._ring, self._stamp, self._checked = ring, ring.stamp(), time.monotonic()
        self.signing_key: Ed25519PrivateKey = ring.signing_key
        self.verify_key: Ed25519PublicKey = ring.verify_key
        self.key_id: str = ring.key_id
        self.gateway_id: str = ring.gateway_id
        self._pseudonym_key = ring.pseudonym_key
        self._store: KeyStore | None = None
        self.moved = {"keys": 0, "tombstones": 0}  # what ``attach`` took from an old key file
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_size = cache_size
        self._verifiers: dict[str, tuple[Ed25519PublicKey, str]] = {self.key_id: (self.verify_key, self.gateway_id)}

    # --- the key file --------------------------------------------------------------------------

    @property
    def ring(self) -> LocalKeyring:
        """The key file as it is now: re-read when another process (``keys rotate``, ``keys
        join --update``) changed it. Only its KEKs are taken: the signing key and pseudonym key
        of a running gateway never change."""
        now = time.monotonic()
        if now - self._checked >= self.RECHECK:
            self._checked = now
            self._reload(force=False)
        return self._ring

    def _reload(self, *, force: bool) -> LocalKeyring:
        stamp = self._ring.stamp()
        if stamp is None or (stamp == self._stamp and not force):
            return self._ring
        try:
            ring = LocalKeyring.load(self.path)
        except KeyringError as exc:
            log.error("key file changed but does not load; keeping the keys in memory: %s", exc)
            return self._ring
        if ring.pseudonym_key != self._pseudonym_key:
            log.error("key file %s now holds another pseudonym key; ignoring it", self.path)
            return self._ring
        self._ring, self._stamp = ring, stamp
        return ring

    def reload(self) -> LocalKeyring:
        """Read the key file again now (its KEKs)."""
        return self._reload(force=True)

    def _ring_with(self, kek_id: str) -> LocalKeyring:
        ring = self.ring
        return ring if kek_id in ring.keks else self._reload(force=True)

    @property
    def store(self) -> KeyStore:
        if self._store is None:
            raise Unavailable("the key provider is not attached to a key store (the gateway is starting)")
        return self._store

    # --- start-up ------------------------------------------------------------------------------

    async def attach(self, store: KeyStore) -> dict[str, int]:
        """Bind to the key store: check this key file fits it (or set it up, for the first
        gateway), move a version 1 file's data keys into it, register this gateway's signing
        key. Returns what was migrated: {"keys": n, "tombstones": n}."""
        ring = self.ring
        check = pseudonym_check(ring.pseudonym_key)
        state = await store.state() or await store.init_state(KeyState(ring.active_kek_id, check))
        if state.pseudonym_check != check:
            raise KeyringError(f"the key file {self.path} belongs to another deployment than the key store: "
                               "its pseudonym key differs. A gateway joining a shared database needs the "
                               "first site's keys: `medicon-gateway keys export` there, `keys join` here")
        if state.active_kek not in self._ring_with(state.active_kek).keks:
            raise KeyringError(f"the key file {self.path} lacks the key-encryption key {state.active_kek} "
                               "the key store uses: deploy the current keys (`keys export` at a site that "
                               "has them, `keys join --update` here)")
        self._store = store
        self.moved = await self._migrate_legacy()
        await self.register()
        return self.moved

    async def _migrate_legacy(self) -> dict[str, int]:
        ring = self.ring
        if not ring.legacy:
            return {"keys": 0, "tombstones": 0}
        live = [PatientKey(ps, e["dek_id"], e["kek_id"], unb64(e["wrapped"])) for ps, e in ring.legacy.deks.items()]
        dead = [PatientKey(ps, (t.get("dek_ids") or [None])[0], None, None)
                for ps, t in ring.legacy.shredded.items()]
        for key in live:  # a key that would not open later is refused now, before anything moves
            ring.unwrap(key.dek_id, key.pseudonym, key.kek_id, key.wrapped)
        rows = live + dead
        for start in range(0, len(rows), self.IMPORT_BATCH):
            await self.store.import_keys(rows[start:start + self.IMPORT_BATCH])
        try:
            self._ring = ring.without_legacy()
            self._stamp = self._ring.stamp()
        except OSError as exc:  # a read-only mount: moved all the same, and again (a no-op) next start
            log.warning("data keys moved into the key store, but %s could not be rewritten without them: %s",
                        self.path, exc)
        log.info("moved %d data keys and %d tombstones from %s into the key store", len(live), len(dead), self.path)
        return {"keys": len(live), "tombstones": len(dead)}

    async def register(self) -> GatewayKey:
        """Register (or refresh) this gateway's public key and the KEKs its file holds."""
        public = crypto.public_key_to_bytes(self.verify_key)
        try:
            return await self.store.register_gateway(GatewayKey(
                self.key_id, self.gateway_id, public, tuple(sorted(self.ring.keks)),
                mac=registration_mac(self._pseudonym_key, self.key_id, self.gateway_id, public)))
        except KeyConflict as exc:
            raise KeyringError(f"{exc}; this key file's gateway id is {self.gateway_id!r}") from None

    # --- KeyProvider ---------------------------------------------------------------------------

    def pseudonym(self, kind: str, value: str) -> str:
        return crypto.pseudonym(self._pseudonym_key, kind, value)

    async def data_key_for_patient(self, patient: str, create: bool = True) -> tuple[str, bytes]:
        """(key id, key) of the patient's data key; a new patient gets one (one insert).
        ``KeyShredded`` once the patient was shredded, ``KeyError`` if unknown and not created."""
        ps = self.pseudonym(PATIENT, patient)
        key = await self.store.patient_key(ps)
        if key is None:
            if not create:
                raise KeyError(f"no data key for patient {ps}")
            key = await self._new_key(ps)
        return key.dek_id, self._open(key)

    async def data_key(self, dek_id: str) -> bytes:
        """The data key stored data names: ``KeyShredded`` if destroyed, ``KeyError`` if unknown."""
        key = await self.store.key_by_id(dek_id)
        if key is None:
            raise KeyError(f"unknown data key {dek_id}")
        return self._open(key)

    async def _new_key(self, ps: str) -> PatientKey:
        dek_id, dek = f"dek-{secrets.token_hex(12)}", crypto.new_key()
        kek_id = self.ring.active_kek_id
        for _ in range(3):
            try:
                key = await self.store.add_patient_key(
                    PatientKey(ps, dek_id, kek_id, self._ring_with(kek_id).wrap(dek_id, ps, dek, kek_id)))
            except KeyConflict as conflict:  # a rotation moved the active KEK: wrap with that one
                kek_id = conflict.state.active_kek if conflict.state else kek_id
                if kek_id not in self._ring_with(kek_id).keks:
                    raise Unavailable("this gateway cannot make data keys: its key file lacks the active "
                                      f"key-encryption key {kek_id} (deploy the current key file)") from None
                continue
            if key.dek_id == dek_id:
                self._remember(dek_id, dek)
            return key
        raise Unavailable("the key-encryption key kept changing while a data key was made; retry")

    def _open(self, key: PatientKey) -> bytes:
        if key.shredded:
            if key.dek_id is not None:
                self._cache.pop(key.dek_id, None)
            raise KeyShredded(f"data key of patient {key.pseudonym} was shredded")
        dek = self._cache.get(key.dek_id)
        if dek is not None:
            self._cache.move_to_end(key.dek_id)
            return dek
        try:
            dek = self._ring_with(key.kek_id).unwrap(key.dek_id, key.pseudonym, key.kek_id, key.wrapped)
        except KeyringError as exc:
            log.error("%s", exc)
            raise Unavailable("this gateway cannot unwrap the patient's data key: its key file does not fit "
                              "the key store (see the gateway's log)") from None
        self._remember(key.dek_id, dek)
        return dek

    def _remember(self, dek_id: str, dek: bytes) -> None:
        self._cache[dek_id] = dek
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def verify_key_for(self, key_id: str) -> Ed25519PublicKey | None:
        """The public key of the registered gateway whose key id a record names; None if no
        gateway of this deployment registered it (a row without a valid ``mac`` was not written
        by one). Registrations are never withdrawn, so a key found once is kept."""
        found = await self._verifier(key_id)
        return None if found is None else found[0]

    async def gateway_of(self, key_id: str) -> str | None:
        """Which gateway (its id) signs with the key ``key_id``."""
        found = await self._verifier(key_id)
        return None if found is None else found[1]

    async def _verifier(self, key_id: str) -> tuple[Ed25519PublicKey, str] | None:
        found = self._verifiers.get(key_id)
        if found is None and self._store is not None and isinstance(key_id, str):
            row = await self._store.gateway_key(key_id)
            if row is not None and self._genuine(row):
                found = self._verifiers[key_id] = (crypto.public_key_from_bytes(row.public_key), row.gateway_id)
        return found

    def _genuine(self, row: GatewayKey) -> bool:
        expected = registration_mac(self._pseudonym_key, row.key_id, row.gateway_id, row.public_key)
        try:
            named = key_id_of(crypto.public_key_from_bytes(row.public_key)) == row.key_id
        except ValueError:
            named = False
        if named and hmac.compare_digest(expected, row.mac):
            return True
        log.warning("the key store holds a registration of key %s that no gateway of this deployment made; "
                    "its signatures are not accepted", row.key_id)
        return False

    # --- operations (the ``keys`` CLI) ---------------------------------------------------------

    async def shred_patient(self, patient: str, *, erase: Iterable[Any] = ()) -> int:
        """Destroy the patient's data key and leave a tombstone, for every gateway at once; then
        erase the patient's rows from each store of ``erase`` (``erase_patient(pseudonym)``:
        the FHIR search index). Idempotent; how many keys were destroyed."""
        pseudonym = self.pseudonym(PATIENT, patient)
        destroyed = await self.store.shred(pseudonym)
        self._cache.clear()
        for store in erase:
            await store.erase_patient(pseudonym)
        return destroyed

    async def rotate(self, *, batch: int = 1000, progress: Progress | None = None, force: bool = False) -> str:
        """A new key-encryption key: made (or taken, if a rotation was prepared or interrupted),
        made active in the key store, every live data key re-wrapped with it in batches of
        ``batch`` (one transaction each, ``progress`` told after each), then the old KEKs
        dropped from the key file. The data keys — so all stored data — stay the same.

        With other gateways registered, each must hold the new KEK first (``RotationBlocked``
        says which do not, unless ``force``): the first run prepares it, ``keys export`` and
        ``keys join --update`` carry it to them, the next run rotates."""
        ring, state = self.ring, await self.store.state()
        if state.active_kek == ring.active_kek_id and ring.retired and ring.prepared_kek() is None:
            target = state.active_kek  # an interrupted rotation: finish it
        else:
            target = ring.prepared_kek()
            if target is None:
                ring = self._ring = ring.with_new_kek()
                self._stamp, target = ring.stamp(), ring.prepared_kek()
            await self.register()
            lacking = [g.gateway_id for g in await self.store.gateways()
                       if g.key_id != self.key_id and target not in g.kek_ids]
            if lacking and not force:
                raise RotationBlocked(
                    f"new key-encryption key {target} is prepared, but gateway(s) {', '.join(sorted(lacking))} "
                    "do not hold it yet: run `medicon-gateway keys export --out FILE` here and `keys join "
                    "--update FILE` at each of them, then `keys rotate` again (or --force, if they are gone)")
            if state.active_kek != target:
                await self.store.set_active_kek(target, expected=state.active_kek)
            ring = self._ring = ring.activated(target)
            self._stamp = ring.stamp()

        total, done = await self.store.count(not_wrapped_by=target), 0

        def rewrap(keys: list[PatientKey]) -> list[bytes]:
            return [ring.wrap(k.dek_id, k.pseudonym, ring.unwrap(k.dek_id, k.pseudonym, k.kek_id, k.wrapped), target)
                    for k in keys]
        while True:  # passes until no key is left under an old KEK (imports may add some)
            after: str | None = ""
            while after is not None:
                after, changed = await self.store.rewrap(target, rewrap, after=after, limit=batch)
                done += changed
                if progress is not None and (changed or after is None):
                    progress(done, max(total, done))
            if await self.store.count(not_wrapped_by=target) == 0:
                break
        self._ring = ring.keeping_only(target)
        self._stamp = self._ring.stamp()
        await self.register()
        return target
