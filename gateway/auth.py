"""Authenticate every request; authorize every action on every path that can reach bytes.

Authentication and authorization are plugin hooks (``medicon_authenticate``,
``medicon_authorize``); this module asks them and enforces the answers: no principal → 401,
no plugin saying yes (or any saying no) → 403. Deny by default. Every decision is an audit
event.

``ACCESS`` maps every RPC command the gateway forwards or intercepts to the kind of access it
needs; a command without an entry cannot be served (the test suite checks the two tables
agree).
"""

from __future__ import annotations

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

_CID = re.compile(r"^(Qm[1-9A-HJ-NP-Za-km-z]{44}|[bBfFkKzZmMuU][0-9A-Za-z_-]{4,})$")


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """No principal, no service: 401 everywhere but the health probes."""
    request[REQUEST_ID] = request.headers.get("X-Request-Id", "")[:64] or uuid.uuid4().hex
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    found = await plugins.call(request.app[PLUGINS], "medicon_authenticate", request=request)
    if not found:
        await audit(request, None, "authenticate", {}, False)
        raise GatewayError(401, "authentication required: send Authorization: Bearer <token>",
                           headers=CHALLENGE)
    request[PRINCIPAL] = found[0][1]
    return await handler(request)


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
                resource: dict[str, Any], allowed: bool) -> None:
    """One audit event per decision. Patient, episode and CID become keyed pseudonyms here, so
    no audit plugin ever sees an identifier; the path is left out for the same reason."""
    keyring = request.app[KEYRING]
    shown = {k: (keyring.pseudonym(k, v) if k in PSEUDONYMISED else v)
             for k, v in resource.items() if v is not None}
    event = {
        "time": time.time(), "request_id": request[REQUEST_ID],
        "principal": who.id if who else None, "role": who.role if who else None,
        "action": action, "resource": shown,
        "decision": "allow" if allowed else "deny", "path": request.path.split("/", 3)[1],
    }
    await plugins.call(request.app[PLUGINS], "medicon_audit_event", event=event,
                       config=request.app[CONFIG])


# --- what a CID or a path names ----------------------------------------------------------------

def root_of(arg: str) -> tuple[str | None, bool]:
    """(root CID, has a path below it) of an argument such as ``/ipfs/<cid>/a/b``.

    ``None`` for anything that is not an immutable ``/ipfs`` root (``/ipns/…`` names).
    """
    if arg.startswith("/ipns/") or arg.startswith("ipns/"):
        return None, True
    path = arg.removeprefix("/ipfs/").removeprefix("ipfs/").lstrip("/")
    root, _, rest = path.partition("/")
    if not _CID.match(root):
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
