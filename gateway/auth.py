"""Authenticate every request; authorize every action on every path that can reach bytes.

Authentication and authorization are plugin hooks (``medicon_authenticate``,
``medicon_authorize``); this module asks them and enforces the answers: no principal → 401,
no plugin saying yes (or any saying no) → 403. Deny by default. Every decision is an audit
event, refused credentials included (with a reason, never the credential).

``ACCESS`` maps every RPC command the gateway forwards or intercepts to the kind of access it
needs; a command without an entry cannot be served (the test suite checks the two tables
agree).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from enum import Enum
from typing import Any

from aiohttp import web

from . import plugins
from .appkeys import CONFIG, KEYRING, KUBO, PLUGINS, STORE
from .errors import GatewayError
from .principal import Principal

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
# Routes, by name, served without a credential: the timeline UI's static files (gateway/ui.py),
# the sign-in page and its code. They hold no data; the UI reads everything through /medicon/v1
# with the bearer token the user types in.
PUBLIC_ROUTES = frozenset({"medicon-ui", "medicon-ui-asset"})
PRINCIPAL = "medicon.principal"
REQUEST_ID = "medicon.request_id"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="medicon-gateway", Basic realm="medicon-gateway"'}


class Access(Enum):
    NODE = "node"            # node information, pure functions: any authenticated caller
    CONTENT = "content"      # plaintext of what its arguments name (cat, get, /ipfs/<cid>)
    STRUCTURE = "structure"  # blocks, links and DAGs (dag/get, block/get, refs, ?format=car)
    ADD = "add"              # records (record:write) or attachments (blob:write), per part
    DAG_PUT = "dag_put"      # a record (record:write) or any other node (raw:write)
    RAW_READ = "raw_read"    # the node's whole state, not tied to the gateway's index
    RAW_WRITE = "raw_write"  # blocks, CARs and pins outside the record chains


ACCESS: dict[str, Access] = {
    "version": Access.NODE, "version/deps": Access.NODE, "id": Access.NODE,
    "cid/format": Access.NODE, "cid/base32": Access.NODE, "cid/bases": Access.NODE,
    "cid/codecs": Access.NODE, "cid/hashes": Access.NODE, "cid/inspect": Access.NODE,
    "multibase/encode": Access.NODE, "multibase/decode": Access.NODE,
    "multibase/transcode": Access.NODE, "multibase/list": Access.NODE,
    "cat": Access.CONTENT, "get": Access.CONTENT,
    "ls": Access.STRUCTURE, "refs": Access.STRUCTURE, "resolve": Access.STRUCTURE,
    "block/get": Access.STRUCTURE, "block/stat": Access.STRUCTURE,
    "dag/get": Access.STRUCTURE, "dag/resolve": Access.STRUCTURE, "dag/stat": Access.STRUCTURE,
    "dag/export": Access.STRUCTURE, "pin/ls": Access.STRUCTURE,
    "add": Access.ADD, "dag/put": Access.DAG_PUT,
    "block/put": Access.RAW_WRITE, "dag/import": Access.RAW_WRITE,
    "pin/add": Access.RAW_WRITE, "pin/rm": Access.RAW_WRITE, "pin/update": Access.RAW_WRITE,
    "pin/verify": Access.RAW_READ, "name/resolve": Access.RAW_READ,
}

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_FLICKR = "123456789abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
# CIDv0, or a CIDv1 in one of the multibases clients use (base64 has + and =)
_CID_TEXT = re.compile(r"Qm[1-9A-HJ-NP-Za-km-z]{44}|[bBfFkKzZmMuU][0-9A-Za-z_+=-]{4,}")
MAX_CID_TEXT = 512  # far above any real CID (a sha2-512 CIDv1 in base16 is ~140 characters)


def _base_n(text: str, alphabet: str) -> bytes:
    """Big-endian base-N with leading zero digits as zero bytes (base58 and base36)."""
    value = 0
    for char in text:
        digit = alphabet.find(char)
        if digit < 0:
            raise ValueError(f"{char!r} is not a digit of this base")
        value = value * len(alphabet) + digit
    zeros = len(text) - len(text.lstrip(alphabet[0]))
    return b"\0" * zeros + (value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b"")


def _b64(text: str, altchars: bytes) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=altchars, validate=True)


_MULTIBASE = {
    "b": lambda t: base64.b32decode(t.upper() + "=" * (-len(t) % 8)) if t == t.lower() else _bad(),
    "B": lambda t: base64.b32decode(t + "=" * (-len(t) % 8)) if t == t.upper() else _bad(),
    "f": lambda t: bytes.fromhex(t) if t == t.lower() else _bad(),
    "F": lambda t: bytes.fromhex(t) if t == t.upper() else _bad(),
    "k": lambda t: _base_n(t, _B36),
    "K": lambda t: _base_n(t.lower(), _B36) if t == t.upper() else _bad(),
    "z": lambda t: _base_n(t, _B58),
    "Z": lambda t: _base_n(t, _B58_FLICKR),
    "m": lambda t: _b64(t, b"+/") if "=" not in t else _bad(),
    "M": lambda t: _b64(t, b"+/"),
    "u": lambda t: _b64(t, b"-_") if "=" not in t else _bad(),
    "U": lambda t: _b64(t, b"-_"),
}


def _bad() -> bytes:
    raise ValueError("wrong letter case for this multibase")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def is_cid(text: str) -> bool:
    """``text`` decodes as a CID the way Kubo (go-cid) decodes one: a CIDv0 (base58btc
    sha2-256 multihash, bare or multibase-encoded) or a multibase CIDv1 whose version, codec and
    multihash (code, length, digest) are all there and agree, with nothing after them."""
    if len(text) > MAX_CID_TEXT or not _CID_TEXT.fullmatch(text):
        return False
    try:
        if text.startswith("Qm"):
            raw = _base_n(text, _B58)
            return len(raw) == 34 and raw[:2] == b"\x12\x20"
        raw = _MULTIBASE[text[0]](text[1:])
        if raw[:2] == b"\x12\x20":
            return len(raw) == 34
        version, pos = _varint(raw, 0)
        if version != 1:
            return False
        _codec, pos = _varint(raw, pos)
        _hash, pos = _varint(raw, pos)
        length, pos = _varint(raw, pos)
        return len(raw) - pos == length
    except (ValueError, KeyError, binascii.Error):
        return False


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """No principal, no service: 401 everywhere but the health probes. A refusal is audited
    before it is answered, whichever plugin refused and why."""
    request[REQUEST_ID] = request.headers.get("X-Request-Id", "")[:64] or uuid.uuid4().hex
    if request.path in PUBLIC_PATHS or request.match_info.route.name in PUBLIC_ROUTES:
        return await handler(request)
    try:
        found = await plugins.call(request.app[PLUGINS], "medicon_authenticate", request=request)
    except GatewayError as err:  # a plugin refused the credentials (or could not judge them)
        reason = err.reason or ("refused" if err.status == 401 else f"failed ({err.status})")
        await audit(request, None, "authenticate", _credentials(request), False, reason=reason)
        raise
    if not found:
        reason = "unrecognised" if "Authorization" in request.headers else "missing"
        await audit(request, None, "authenticate", _credentials(request), False, reason=reason)
        raise GatewayError(401, "authentication required: send Authorization: Bearer <token>",
                           headers=CHALLENGE)
    request[PRINCIPAL] = found[0][1]
    return await handler(request)


def _credentials(request: web.Request) -> dict[str, Any]:
    """The audited resource of an authentication: the credentials' scheme, if a known one (the
    rest of the header is the secret, and an unknown first word may be one too)."""
    header = request.headers.get("Authorization")
    if header is None:
        return {"kind": "credentials"}
    scheme = header.strip().partition(" ")[0].lower()
    return {"kind": "credentials", "scheme": scheme if scheme in ("bearer", "basic") else "other"}


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


async def authorize(request: web.Request, action: str, resource: dict[str, Any] | None = None) -> None:
    """Ask every authorization plugin; allow only if one says yes and none says no."""
    who = principal(request)
    resource = resource or {}
    votes = await plugins.call(request.app[PLUGINS], "medicon_authorize", principal=who,
                               action=action, resource=resource)
    allowed = bool(votes) and all(vote for _, vote in votes)
    await audit(request, who, action, resource, allowed)
    if not allowed:
        raise GatewayError(403, f"{who.role} {who.id!r} is not allowed to {action} this resource")


PSEUDONYMISED = ("patient", "episode", "cid")


async def audit(request: web.Request, who: Principal | None, action: str,
                resource: dict[str, Any], allowed: bool, *, reason: str | None = None) -> None:
    """One audit event per decision. Patient, episode and CID become keyed pseudonyms here, so
    no audit plugin ever sees an identifier; the path is left out for the same reason.
    ``reason`` says why credentials were refused (``revoked``, ``expired``, …)."""
    keyring = request.app[KEYRING]
    shown = {k: (keyring.pseudonym(k, _text(v)) if k in PSEUDONYMISED else v)
             for k, v in resource.items() if v is not None}
    event = {
        "time": time.time(), "request_id": request[REQUEST_ID],
        "principal": who.id if who else None, "role": who.role if who else None,
        "action": action, "resource": shown,
        "decision": "allow" if allowed else "deny", "path": request.path.split("/", 3)[1],
    }
    if reason is not None:
        event["reason"] = reason
    await plugins.call(request.app[PLUGINS], "medicon_audit_event", event=event,
                       config=request.app[CONFIG])


def _text(value: Any) -> str:
    """An identifier as pseudonymisable text, whatever a hostile request made of it (a
    number, an unpaired surrogate): pseudonyms are taken over UTF-8."""
    text = value if isinstance(value, str) else str(value)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# --- what a CID or a path names ----------------------------------------------------------------

def root_of(arg: str) -> tuple[str | None, bool]:
    """(root CID, has a path below it) of an argument such as ``/ipfs/<cid>/a/b``.

    ``None`` for anything that is not an immutable ``/ipfs`` root (``/ipns/…`` names).
    """
    if arg.startswith("/ipns/") or arg.startswith("ipns/"):
        return None, True
    if any(seg in (".", "..") for seg in arg.split("/")):
        # Kubo cleans them away, so the root checked here would not be the root read there
        raise GatewayError(400, f"dot segments are not allowed in paths: {arg[:100]!r}")
    path = arg.removeprefix("/ipfs/").removeprefix("ipfs/").lstrip("/")
    root, _, rest = path.partition("/")
    if not is_cid(root):
        raise GatewayError(400, f"invalid CID or path {arg[:100]!r}")
    return root, bool(rest.strip("/"))


async def resource_of(app: web.Application, cid: str | None) -> dict[str, Any]:
    """What the gateway knows of ``cid``: a record (patient, episode), an attachment
    (patient), or nothing (a raw CID the gateway did not write)."""
    if cid is None:
        return {"kind": "raw"}
    store = app[STORE]
    record = await store.record(cid)
    if record is not None:
        return {"kind": "record", "cid": cid, "patient": record.patient, "episode": record.episode}
    blob = await store.blob(cid)
    if blob is not None:
        return {"kind": "blob", "cid": cid, "patient": blob.patient}
    return {"kind": "raw", "cid": cid}


def _action(access: Access, resource: dict[str, Any]) -> str:
    kind = resource["kind"]
    if kind == "raw":
        return "raw:read"
    if access is Access.CONTENT:
        return f"{kind}:read"
    return "chain:read"


async def authorize_read(request: web.Request, access: Access, args: list[str]) -> list[dict[str, Any]]:
    """Authorize a read of every argument; a path below an allowed root is resolved in Kubo
    and its target, when the gateway knows it, must be allowed too."""
    resources = []
    for arg in args:
        cid, has_path = root_of(arg)
        resource = await resource_of(request.app, cid)
        await authorize(request, _action(access, resource), resource)
        if has_path and cid is not None and resource["kind"] != "raw":
            target = await request.app[KUBO].resolve_path(arg if arg.startswith("/") else "/ipfs/" + arg)
            if target is not None and target != cid:
                inner = await resource_of(request.app, target)
                if inner["kind"] != "raw":
                    await authorize(request, _action(access, inner), inner)
        resources.append(resource)
    return resources


async def authorize_command(request: web.Request, command: str, access: Access,
                            opts: dict[str, list[str]]) -> None:
    """Authorize an RPC command by its kind of access. ``add`` and ``dag/put`` are authorized
    part by part where they are intercepted."""
    if access is Access.NODE:
        await authorize(request, "node:info")
    elif access in (Access.CONTENT, Access.STRUCTURE):
        args = opts.get("arg", [])
        if not args:
            if command == "pin/ls":  # every pin of the node
                await authorize(request, "raw:read", {"kind": "raw"})
                return
            raise GatewayError(400, f"argument is required for {command}")
        await authorize_read(request, access, args)
    elif access is Access.RAW_READ:
        await authorize(request, "raw:read", {"kind": "raw"})
    elif access is Access.RAW_WRITE:
        await authorize(request, "raw:write", {"kind": "raw"})
