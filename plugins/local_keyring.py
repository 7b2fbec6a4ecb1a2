"""Built-in key provider: the local keyring file (``medicon-gateway keys init``, mode 0600),
reloaded when an operator rotates keys or shreds a patient while the gateway runs."""

from __future__ import annotations

import os
import time

from gateway.config import keyring_path
from gateway.hookspecs import hookimpl
from gateway.errors import GatewayError
from gateway.keyring import KeyringError, LocalKeyring


class ReloadingKeyring:
    """``LocalKeyring``, re-read whenever its file changes on disk (``keys rotate``/``shred``
    by the CLI take effect in a running gateway). The file is looked at no more often than every
    ``RECHECK`` seconds: a request touches the keyring a dozen times."""

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

    def __getattr__(self, name):
        return getattr(self._current(), name)


@hookimpl
def medicon_key_provider(config):
    path = keyring_path(config)
    try:
        return ReloadingKeyring(path)
    except FileNotFoundError:
        raise GatewayError(500, f"no keyring at {path}: create one with `medicon-gateway keys init`") from None
    except KeyringError as exc:
        raise GatewayError(500, f"keyring {path}: {exc}") from None
