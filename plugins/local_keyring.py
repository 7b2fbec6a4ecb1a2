"""Built-in key provider: the local key file (``medicon-gateway keys init`` or ``keys join``,
mode 0600) for the KEKs, the pseudonym key and this gateway's signing key; the patients'
wrapped data keys in the gateway's key store (``gateway.core.key_provider``). Attached to the
key store when the gateway starts, which also moves an old keyring file's data keys into it."""

from __future__ import annotations

from gateway.config import keyring_path
from gateway.errors import Unavailable
from gateway.hookspecs import hookimpl
from gateway.security.keyring import KeyringError
from gateway.core.key_provider import KeyringProvider


@hookimpl
def medicon_key_provider(config):
    path = keyring_path(config)
    try:
        return KeyringProvider(path)
    except FileNotFoundError:
        raise Unavailable(f"no keyring at {path}: create one with `medicon-gateway keys init`") from None
    except KeyringError as exc:
        raise Unavailable(f"keyring {path}: {exc}") from None


@hookimpl
async def medicon_startup(service):
    if isinstance(service.keys, KeyringProvider):
        try:
            await service.keys.attach(service.storage.keys)
        except KeyringError as exc:
            raise Unavailable(str(exc)) from None
