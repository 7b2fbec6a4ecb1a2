"""Built-in key provider: the local keyring file (``medicon-gateway keys init``, mode 0600),
reloaded when an operator rotates keys or shreds a patient while the gateway runs."""

from __future__ import annotations

import asyncio
import os
import threading
import time

from gateway.config import keyring_path
from gateway.errors import StorageFull, Unavailable, is_out_of_space
from gateway.hookspecs import hookimpl
from gateway.security.keyring import KeyringError, LocalKeyring


class LocalKeyProvider:
    """``gateway.security.keys.KeyProvider`` over a ``LocalKeyring`` file, re-read whenever the
    file changes on disk (``keys rotate``/``shred`` by the CLI take effect in a running
    gateway). The file is looked at no more often than every ``RECHECK`` seconds; a new
    patient's key is written (and fsynced) off the event loop, one at a time, each time on the
    keyring as the file holds it then: two keys made on two copies of the keyring (one loaded
    before the other's write) would each write a file without the other's key, and the records
    sealed with the lost key could never be read."""

    RECHECK = 0.05

    def __init__(self, path) -> None:
        self.path = path
        self._ring = LocalKeyring.load(path)
        self._stamp = _stamp(path)
        self._checked = time.monotonic()
        self._writing = threading.Lock()

    def _current(self) -> LocalKeyring:
        now = time.monotonic()
        if now - self._checked < self.RECHECK:
            return self._ring
        self._checked = now
        try:
            stamp = _stamp(self.path)
        except OSError:
            return self._ring
        if stamp != self._stamp:
            self._ring, self._stamp = LocalKeyring.load(self.path), stamp
        return self._ring

    @property
    def signing_key(self):
        return self._current().signing_key

    @property
    def verify_key(self):
        return self._current().verify_key

    def pseudonym(self, kind: str, value: str) -> str:
        return self._current().pseudonym(kind, value)

    async def data_key_for_patient(self, patient: str, create: bool = True) -> tuple[str, bytes]:
        ring = self._current()
        try:
            return ring.data_key_for_patient(patient, create=False)  # known: in memory
        except KeyError:
            if not create:
                raise
        try:
            return await asyncio.to_thread(self._new_data_key, patient)
        except OSError as exc:  # the keyring file could not be rewritten: nothing was stored
            if is_out_of_space(exc):
                raise StorageFull("the gateway's data volume is full: the keyring cannot store a new "
                                  "patient's data key") from None
            raise Unavailable(f"the keyring cannot store a new patient's data key ({exc.strerror})") from None

    def _new_data_key(self, patient: str) -> tuple[str, bytes]:
        """(In a worker thread.) The patient's data key, made and written on the newest keyring."""
        with self._writing:
            stamp = _stamp(self.path)
            ring = self._ring if stamp == self._stamp else LocalKeyring.load(self.path)
            made = ring.data_key_for_patient(patient, True)
            self._ring, self._stamp = ring, _stamp(self.path)
            return made

    async def data_key(self, dek_id: str) -> bytes:
        return self._current().data_key(dek_id)


def _stamp(path) -> tuple[int, int]:
    """What changes whenever the keyring file is rewritten (always by rename: a new inode)."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


@hookimpl
def medicon_key_provider(config):
    path = keyring_path(config)
    try:
        return LocalKeyProvider(path)
    except FileNotFoundError:
        raise Unavailable(f"no keyring at {path}: create one with `medicon-gateway keys init`") from None
    except KeyringError as exc:
        raise Unavailable(f"keyring {path}: {exc}") from None
