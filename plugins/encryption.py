"""Built-in record encryption: AES-256-GCM under the patient's data key, the node's clear
part as associated data (so clear metadata cannot be swapped between records)."""

from __future__ import annotations

import base64

from gateway.errors import Unavailable
from gateway.hookspecs import hookimpl
from gateway.security import crypto


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@hookimpl
async def medicon_encrypt_record(payload, aad, patient, keys):
    dek_id, dek = await keys.data_key_for_patient(patient)
    return {"dek": dek_id, "sealed": _b64(crypto.seal(payload, dek, aad + dek_id.encode()))}


@hookimpl
def medicon_decrypt_record(node, aad, keys):
    if "sealed" not in node or "dek" not in node:
        return None
    return _open(node, aad, keys)


async def _open(node, aad, keys) -> bytes:
    try:
        dek = await keys.data_key(node["dek"])
    except KeyError:
        raise Unavailable("the record's data key is unknown to this gateway") from None
    try:
        return crypto.open_sealed(_unb64(node["sealed"]), dek, aad + node["dek"].encode())
    except (crypto.DecryptError, ValueError):
        raise Unavailable("the record does not decrypt: the block was altered") from None
