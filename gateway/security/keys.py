"""What a key provider offers (``medicon_key_provider``): the interface, not an implementation.

The built-in provider (``gateway.core.key_provider.KeyringProvider``, loaded by
``plugins.local_keyring``) keeps its secrets in a local key file and the wrapped data keys in
the gateway's key store; a Vault or KMS plugin returns any object with these methods. Data keys
and other gateways' public keys are looked up on request paths, so those methods are
coroutines (a provider keeps its I/O off the event loop); the rest is in memory.

Several gateways may share one database: each signs with its own key, named in every record
node by ``key_id`` (``key``), and ``verify_key_for`` finds any registered gateway's key. A
provider without ``verify_key_for`` is checked against its own ``verify_key`` only.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


@runtime_checkable
class KeyProvider(Protocol):
    signing_key: Ed25519PrivateKey
    verify_key: Ed25519PublicKey
    key_id: str  # what a record node names the signer's key by

    def pseudonym(self, kind: str, value: str) -> str:
        """A stable keyed pseudonym of ``value`` in the namespace ``kind``."""

    async def data_key_for_patient(self, patient: str, create: bool = True) -> tuple[str, bytes]:
        """(key id, AES-256 key) of the patient's data key, made on first use; raises
        ``KeyShredded`` once the patient was crypto-shredded."""

    async def data_key(self, dek_id: str) -> bytes:
        """The data key stored data names; ``KeyShredded`` if destroyed, ``KeyError`` if unknown."""

    async def verify_key_for(self, key_id: str) -> Ed25519PublicKey | None:
        """The public key of the gateway whose ``key_id`` a record node names (any gateway
        registered with this deployment, this one included); None if none is."""

    async def gateway_of(self, key_id: str) -> str | None:
        """The id of the gateway that signs with ``key_id`` (which site wrote a record)."""


class KeysForOneRead:
    """``keys`` as one read of many records sees it: each data key looked up once. A page of an
    episode's history names its patient's data key once per record, and each lookup is a read
    of the key store; this view lives for one read only, so a patient shredded meanwhile is
    refused on the next read, as with ``keys`` itself. Everything else is ``keys``'."""

    def __init__(self, keys: KeyProvider) -> None:
        self._keys = keys
        self._data_keys: dict[str, bytes] = {}

    def __getattr__(self, name: str):
        return getattr(self._keys, name)

    async def data_key(self, dek_id: str) -> bytes:
        if dek_id not in self._data_keys:
            self._data_keys[dek_id] = await self._keys.data_key(dek_id)
        return self._data_keys[dek_id]
