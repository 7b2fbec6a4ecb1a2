"""The gateway's whole RPC surface in one table: which Kubo commands are forwarded,
which the gateway handles itself (intercepted), and which are refused.

Anything not listed is refused: a new Kubo release adding a command does not open a door.
A refused entry covers its whole subtree (``key`` refuses ``key/gen``, ``key/rm``, ...).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from enum import Enum
from urllib.parse import parse_qsl


class Action(Enum):
    FORWARD = "forward"      # streamed to Kubo unchanged
    INTERCEPT = "intercept"  # handled by the gateway (record semantics hook in here)
    REFUSE = "refuse"        # 403, never reaches Kubo


@dataclass(frozen=True)
class Rule:
    action: Action
    why: str


def _fwd(why: str) -> Rule:
    return Rule(Action.FORWARD, why)


def _intercept(why: str) -> Rule:
    return Rule(Action.INTERCEPT, why)


def _refuse(why: str) -> Rule:
    return Rule(Action.REFUSE, why)


READ = "read"
WRITE = "write"
INFO = "node information"
PURE = "pure function of its arguments"

COMMANDS: dict[str, Rule] = {
    # --- forwarded (or intercepted): the everyday commands IPFS clients use ---
    "version": _fwd(INFO + " (every Kubo CLI call starts with it)"),
    "version/deps": _fwd(INFO),
    "id": _fwd(INFO),
    "add": _intercept("records are appended to their episode; other files pass as blobs"),
    "cat": _intercept("a record CID reads back as the record's JSON"),
    "get": _fwd(READ),
    "ls": _fwd(READ),
    "refs": _fwd(READ),
    "resolve": _fwd(READ),
    "block/get": _fwd(READ),
    "block/stat": _fwd(READ),
    "block/put": _fwd(WRITE),
    "dag/get": _fwd(READ),
    "dag/resolve": _fwd(READ),
    "dag/stat": _fwd(READ),
    "dag/export": _fwd(READ),
    "dag/put": _intercept("a record is appended to its episode; other nodes pass"),
    "dag/import": _fwd(WRITE),
    "pin/add": _fwd(WRITE),
    "pin/ls": _fwd(READ),
    "pin/rm": _fwd(WRITE),
    "pin/update": _fwd(WRITE),
    "pin/verify": _fwd(READ),
    "name/resolve": _fwd(READ),
    "cid/format": _fwd(PURE),
    "cid/base32": _fwd(PURE),
    "cid/bases": _fwd(PURE),
    "cid/codecs": _fwd(PURE),
    "cid/hashes": _fwd(PURE),
    "cid/inspect": _fwd(PURE),
    "multibase/encode": _fwd(PURE),
    "multibase/decode": _fwd(PURE),
    "multibase/transcode": _fwd(PURE),
    "multibase/list": _fwd(PURE),
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


@dataclass(frozen=True)
class Resolved:
    """A request path resolved against ``COMMANDS``."""

    command: str           # canonical command path, e.g. "dag/get"; the raw path if unknown
    rule: Rule
    path_arg: str | None   # a trailing argument given in the path (``/api/v0/cat/<cid>``)


_UNKNOWN = Rule(Action.REFUSE, "not a command this gateway serves")


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
        rule = COMMANDS.get(key)
        if rule is not None and rule.action is Action.REFUSE:
            return Resolved(key, rule, None)
    key = "/".join(parts)
    if key in COMMANDS:
        return Resolved(key, COMMANDS[key], None)
    if len(parts) >= 2:
        parent = "/".join(parts[:-1])
        if parent in COMMANDS:
            return Resolved(parent, COMMANDS[parent], parts[-1])
    return Resolved(key, _UNKNOWN, None)


# Kubo's option aliases for the options the gateway reads.
ALIASES = {"n": "only-hash", "w": "wrap-with-directory", "o": "offset", "l": "length",
           "r": "recursive", "q": "quiet", "Q": "quieter"}


def options(query_string: str, path_arg: str | None) -> dict[str, list[str]]:
    """The request's options as Kubo reads them: aliases folded, the path argument first."""
    out: dict[str, list[str]] = {}
    if path_arg is not None:
        out["arg"] = [path_arg]
    for key, value in parse_qsl(query_string, keep_blank_values=True):
        out.setdefault(ALIASES.get(key, key), []).append(value)
    return out


def flag(opts: dict[str, list[str]], name: str) -> bool:
    """Kubo's booleans: present and empty, or "true" in any case."""
    values = opts.get(name)
    return bool(values) and values[0].lower() in ("", "true", "1")
