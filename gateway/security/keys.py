"""What a key provider offers (``medicon_key_provider``): the interface, not an implementation.

The built-in provider is the local keyring file (``gateway.security.keyring.LocalKeyring``,
loaded by ``plugins.local_keyring``); a Vault or KMS plugin returns any object with these
methods. Data keys are looked up and made on request paths, so those two methods are
coroutines (a provider keeps its I/O off the event loop); the rest is in memory.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


@runtime_checkable
class KeyProvider(Protocol):
    signing_key: Ed25519PrivateKey
    verify_key: Ed25519PublicKey

    def pseudonym(self, kind: str, value: str) -> str:
        """A stable keyed pseudonym of ``value`` in the namespace ``kind``."""

    async def data_key_for_patient(self, patient: str, create: bool = True) -> tuple[str, bytes]:
        """(key id, AES-256 key) of the patient's data key, made on first use; raises
        ``KeyShredded`` once the patient was crypto-shredded."""

    async def data_key(self, dek_id: str) -> bytes:
        """The data key stored data names; ``KeyShredded`` if destroyed, ``KeyError`` if unknown."""
