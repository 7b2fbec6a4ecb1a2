"""Built-in key provider: the local keyring file (``medicon-gateway keys init``, mode 0600),
reloaded when an operator rotates keys or shreds a patient while the gateway runs."""

from __future__ import annotations

import asyncio
import os
import time

from gateway.config import keyring_path
from gateway.errors import Unavailable
from gateway.hookspecs import hookimpl
from gateway.security.keyring import KeyringError, LocalKeyring


class LocalKeyProvider:
    """``gateway.security.keys.KeyProvider`` over a ``LocalKeyring`` file, re-read whenever the
    file changes on disk (``keys rotate``/``shred`` by the CLI take effect in a running
    gateway). The file is looked at no more often than every ``RECHECK`` seconds; a new
    patient's key is written (and fsynced) off the event loop."""

    RECHECK = 0.05

    def __init__(self, path) -> None:
        self.path = path
        self._ring = LocalKeyring.load(path)
        self._stamp = os.stat(path).st_mtime_ns
        self._checked = time.monotonic()

    def _current(self) -> LocalKeyring:
        now = time.monotonic()
        if now - self._checked < self.RECHECK:
            return self._ring
        self._checked = now
        try:
            stamp = os.stat(self.path).st_mtime_ns
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
        return await asyncio.to_thread(ring.data_key_for_patient, patient, True)

    async def data_key(self, dek_id: str) -> bytes:
        return self._current().data_key(dek_id)


@hookimpl
def medicon_key_provider(config):
    path = keyring_path(config)
    try:
        return LocalKeyProvider(path)
    except FileNotFoundError:
        raise Unavailable(f"no keyring at {path}: create one with `medicon-gateway keys init`") from None
    except KeyringError as exc:
        raise Unavailable(f"keyring {path}: {exc}") from None
