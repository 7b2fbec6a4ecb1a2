"""The gateway's whole RPC surface in one table: for every Kubo command, whether the gateway
serves it and how (forwarded, intercepted, or refused with a reason), the access it needs, and
its handler.

Anything not listed is refused: a new Kubo release adding a command does not open a door.
A refused entry covers its whole subtree (``key`` refuses ``key/gen``, ``key/rm``, ...).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from enum import Enum
from typing import Awaitable, Callable

from aiohttp import web

from . import intercepts
from .proxy import forward_rpc
from .rpccall import Resolved

Handler = Callable[[web.Request, Resolved], Awaitable[web.StreamResponse]]


class Action(Enum):
    FORWARD = "forward"      # streamed to Kubo as parsed
    INTERCEPT = "intercept"  # handled by the gateway (record semantics hook in here)
    REFUSE = "refuse"        # 403, never reaches Kubo


class Access(Enum):
    """What a command reaches, and so what the caller must be allowed."""

    NODE = "node"            # node information, pure functions: any authenticated caller
    CONTENT = "content"      # plaintext of what its arguments name (cat, get, /ipfs/<cid>)
    STRUCTURE = "structure"  # blocks, links and DAGs (dag/get, block/get, refs, ?format=car)
    PER_PART = "per part"    # add, dag/put: each part authorized by its handler as a record
                             # (record:write), an attachment (blob:write) or raw data (raw:write)
    RAW_READ = "raw_read"    # the node's whole state, not tied to the gateway's index
    RAW_WRITE = "raw_write"  # blocks, CARs and pins outside the record chains
    NONE = "none"            # refused: never reaches an authorization


@dataclass(frozen=True)
class Command:
    action: Action
    why: str
    access: Access = Access.NONE
    handler: Handler | None = None


def _fwd(access: Access, why: str) -> Command:
    return Command(Action.FORWARD, why, access, forward_rpc)


def _intercept(access: Access, handler: Handler, why: str) -> Command:
    return Command(Action.INTERCEPT, why, access, handler)


def _refuse(why: str) -> Command:
    return Command(Action.REFUSE, why)


READ = "read"
WRITE = "write"
INFO = "node information"
PURE = "pure function of its arguments"
NODE, CONTENT, STRUCTURE = Access.NODE, Access.CONTENT, Access.STRUCTURE
RAW_READ, RAW_WRITE, PER_PART = Access.RAW_READ, Access.RAW_WRITE, Access.PER_PART

COMMANDS: dict[str, Command] = {
    # --- served: the everyday commands IPFS clients use ---
    "version": _fwd(NODE, INFO + " (every Kubo CLI call starts with it)"),
    "version/deps": _fwd(NODE, INFO),
    "id": _fwd(NODE, INFO),
    "add": _intercept(PER_PART, intercepts.add, "records are appended to their episode; other files pass as blobs"),
    "cat": _intercept(CONTENT, intercepts.cat, "a record CID reads back as the record's JSON"),
    "get": _intercept(CONTENT, intercepts.get, "a tar of ciphertext is useless: sealed attachments are refused"),
    "ls": _fwd(STRUCTURE, READ),
    "refs": _fwd(STRUCTURE, READ),
    "resolve": _fwd(STRUCTURE, READ),
    "block/get": _fwd(STRUCTURE, READ),
    "block/stat": _fwd(STRUCTURE, READ),
    "block/put": _fwd(RAW_WRITE, WRITE),
    "dag/get": _fwd(STRUCTURE, READ),
    "dag/resolve": _fwd(STRUCTURE, READ),
    "dag/stat": _fwd(STRUCTURE, READ),
    "dag/export": _fwd(STRUCTURE, READ),
    "dag/put": _intercept(PER_PART, intercepts.dag_put, "a record is appended to its episode; other nodes pass"),
    "dag/import": _fwd(RAW_WRITE, WRITE),
    "pin/add": _fwd(RAW_WRITE, WRITE),
    "pin/ls": _fwd(STRUCTURE, READ),
    "pin/rm": _fwd(RAW_WRITE, WRITE),
    "pin/update": _fwd(RAW_WRITE, WRITE),
    "pin/verify": _fwd(RAW_READ, READ),
    "name/resolve": _fwd(RAW_READ, READ),
    "cid/format": _fwd(NODE, PURE),
    "cid/base32": _fwd(NODE, PURE),
    "cid/bases": _fwd(NODE, PURE),
    "cid/codecs": _fwd(NODE, PURE),
    "cid/hashes": _fwd(NODE, PURE),
    "cid/inspect": _fwd(NODE, PURE),
    "multibase/encode": _fwd(NODE, PURE),
    "multibase/decode": _fwd(NODE, PURE),
    "multibase/transcode": _fwd(NODE, PURE),
    "multibase/list": _fwd(NODE, PURE),
    # --- refused: administration, networking, mutable state outside record chains ---
    "config": _refuse("node configuration is administration, not an API for clients"),
    "shutdown": _refuse("stops the node"),
    "key": _refuse("node keys are secrets"),
    "swarm": _refuse("peer connections are administration"),
    "bootstrap": _refuse("peer list is administration"),
    "p2p": _refuse("opens TCP tunnels through the node"),
    "repo": _refuse("repo/gc deletes data; repo maintenance is administration"),
    "diag": _refuse("diagnostics reveal node internals"),
    "log": _refuse("logging control is administration"),
    "update": _refuse("node binary updates are administration"),
    "mount": _refuse("mounts FUSE filesystems on the node host"),
    "files": _refuse("MFS is shared mutable state outside the record chains"),
    "filestore": _refuse("references files on the node host"),
    "urlstore": _refuse("makes the node fetch arbitrary URLs"),
    "name/publish": _refuse("publishes with the node's keys"),
    "name/pubsub": _refuse("IPNS over pubsub is administration"),
    "name/get": _refuse("raw IPNS records are not needed by clients"),
    "name/put": _refuse("raw IPNS records are not needed by clients"),
    "name/inspect": _refuse("raw IPNS records are not needed by clients"),
    "pin/remote": _refuse("remote pinning services hold credentials"),
    "block/rm": _refuse("deletes data"),
    "routing": _refuse("DHT writes and lookups are administration"),
    "dht": _refuse("DHT access is administration"),
    "provide": _refuse("announcing content is administration"),
    "pubsub": _refuse("pubsub is not part of the record API"),
    "ping": _refuse("reaches other peers"),
    "stats": _refuse("node statistics reveal usage"),
    "object": _refuse("deprecated object API"),
    "tar": _refuse("deprecated"),
    "dns": _refuse("makes the node resolve names"),
    "version/check": _refuse("asks the network for newer Kubo releases"),
    "bitswap": _refuse("exchange internals and reprovide control are administration"),
    "daemon": _refuse("not an RPC command"),
    "init": _refuse("not an RPC command"),
    "commands": _refuse("lists the node's full surface, not the gateway's"),
    "refs/local": _refuse("lists every block in the node, not only the caller's"),
}

_UNKNOWN = _refuse("not a command this gateway serves")


def resolve(raw: str) -> Resolved:
    """Classify the (already decoded) part of a path after ``/api/v0/`` the way Kubo routes it.

    Kubo routes on the decoded, cleaned path and lets the last segment be an argument of the
    command before it; classify the same way, so the command checked is the command run.
    """
    cleaned = posixpath.normpath("/" + raw).strip("/")
    parts = [p for p in cleaned.split("/") if p]
    # A refused group covers its whole subtree, whatever follows.
    for depth in range(1, len(parts) + 1):
        key = "/".join(parts[:depth])
        entry = COMMANDS.get(key)
        if entry is not None and entry.action is Action.REFUSE:
            return Resolved(key, entry, None)
    key = "/".join(parts)
    if key in COMMANDS:
        return Resolved(key, COMMANDS[key], None)
    if len(parts) >= 2:
        parent = "/".join(parts[:-1])
        if parent in COMMANDS:
            return Resolved(parent, COMMANDS[parent], parts[-1])
    return Resolved(key, _UNKNOWN, None)
