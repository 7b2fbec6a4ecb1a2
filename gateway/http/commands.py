"""The gateway's whole RPC surface in one table.

For every Kubo command: whether the gateway serves it (forwarded, intercepted) or refuses it
with a reason; the access it needs; the options it allows, with their types; how many
arguments it takes (arguments come only from the path and the ``arg`` query parameter); whether
it takes a body (only commands that read files do, and their multipart body is re-framed part
by part); and its handler. The request Kubo gets is rebuilt from this entry and what was parsed
against it (``rpccall``). Anything not in the table is refused: a new Kubo release adding a
command or an option does not open a door.

Options are Kubo v0.42's own (names, aliases and types read from ``core/commands``), less
those that write outside the record chains or reach the host or the network on a caller's
behalf: ``add``'s ``to-files`` (MFS) is refused outright; ``nocopy``/``fscache`` (filestore and
urlstore references to node-local files and URLs) and every ``fast-provide-*`` (announcing to
the DHT) are accepted only as ``false``, which clients send by default.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from . import intercepts, raw_writes
from .proxy import forward_rpc
from .rpccall import Access, Action, Args, Body, Command, Handler, options


def _serve(action: Action, access: Access, why: str, handler: Handler, *specs: str, cli: tuple[str, ...] = (),
           off: tuple[str, ...] = (), args: Args = Args(), body: Body = Body.NONE,
           exact_length: bool = False) -> Command:
    """``specs``: options passed on; ``cli``: read only by a client (the Kubo CLI, or sent by
    kubo-rpc-client and ignored by Kubo), checked and dropped; ``off``: booleans accepted only
    as false."""
    return Command(action, why, access, handler, {**options(*specs), **options(*cli, forward=False),
                                                  **options(*off, only=False)}, args, body, exact_length)


PROVIDE = ("fast-provide-root:bool", "fast-provide-dag:bool", "fast-provide-wait:bool")


def _fwd(access: Access, why: str, *specs: str, **kw) -> Command:
    return _serve(Action.FORWARD, access, why, forward_rpc, *specs, **kw)


def _intercept(access: Access, handler: Handler, why: str, *specs: str, **kw) -> Command:
    return _serve(Action.INTERCEPT, access, why, handler, *specs, **kw)


def _refuse(why: str) -> Command:
    return Command(Action.REFUSE, why)


READ = "read"
WRITE = "write"
INFO = "node information"
CONFIRMED = "a write: what Kubo answers is confirmed stored (and pinned) before the answer completes"
PURE = "pure function of its arguments"
NODE, CONTENT, STRUCTURE = Access.NODE, Access.CONTENT, Access.STRUCTURE
RAW_READ, RAW_WRITE, PER_PART = Access.RAW_READ, Access.RAW_WRITE, Access.PER_PART
NONE_, ONE, SOME, ANY = Args(0, 0), Args(1, 1), Args(1, None), Args(0, None)
FILES = Body.FILES
VERSION = ("number:bool/n", "commit:bool", "repo:bool", "all:bool")

COMMANDS: dict[str, Command] = {
    # --- served: the everyday commands IPFS clients use ---
    "version": _fwd(NODE, INFO + " (every Kubo CLI call starts with it)", *VERSION),
    "version/deps": _fwd(NODE, INFO, *VERSION),
    "id": _fwd(NODE, INFO + " (this node only: looking up other peers reaches the network)",
               "format:string/f", "peerid-base:string"),
    "add": _intercept(PER_PART, intercepts.add, "records are appended to their episode; other files pass as blobs",
                      "empty-dirs:bool/E", "silent:bool", "progress:bool/p", "only-hash:bool/n",
                      "wrap-with-directory:bool/w", "pin:bool", "pin-name:string", "cid-version:int",
                      "hash:string", "raw-leaves:bool", "chunker:string/s", "trickle:bool/t",
                      "max-file-links:int", "max-directory-links:int", "max-hamt-fanout:int", "inline:bool",
                      "inline-limit:int", "preserve-mode:bool", "preserve-mtime:bool", "mode:uint",
                      "mtime:int64", "mtime-nsecs:uint",
                      cli=("recursive:bool/r", "dereference-args:bool", "stdin-name:string", "hidden:bool/H",
                           "ignore:strings", "ignore-rules-path:string", "dereference-symlinks:bool",
                           "quiet:bool/q", "quieter:bool/Q"),
                      off=("nocopy:bool", "fscache:bool", *PROVIDE), body=FILES),
    "cat": _intercept(CONTENT, intercepts.cat, "a record CID reads back as the record's JSON, an attachment as "
                      "its plaintext", "offset:int64/o", "length:int64/l", "progress:bool/p", args=SOME,
                      exact_length=True),
    "get": _intercept(CONTENT, intercepts.get, "a tar of ciphertext is useless: sealed attachments are refused",
                      "archive:bool/a", "compress:bool/C", "compression-level:int/l", "progress:bool/p",
                      cli=("output:string/o",), args=ONE),
    "ls": _fwd(STRUCTURE, READ, "headers:bool/v", "resolve-type:bool", "size:bool", "stream:bool/s", "long:bool/l",
               args=SOME),
    "refs": _fwd(STRUCTURE, READ, "format:string", "edges:bool/e", "unique:bool/u", "recursive:bool/r",
                 "max-depth:int", args=SOME),
    "resolve": _fwd(STRUCTURE, READ, "recursive:bool/r", "dht-record-count:int/dhtrc", "dht-timeout:string/dhtt",
                    args=ONE),
    "block/get": _fwd(STRUCTURE, READ, cli=("path:string", "localResolve:bool"), args=ONE),
    "block/stat": _fwd(STRUCTURE, READ, args=ONE),
    "block/put": _intercept(RAW_WRITE, raw_writes.block_put, CONFIRMED, "cid-codec:string", "mhtype:string", "mhlen:int", "pin:bool",
                      "allow-big-block:bool", "format:string/f", body=FILES),
    "dag/get": _fwd(STRUCTURE, READ, "output-codec:string", args=ONE),
    "dag/resolve": _fwd(STRUCTURE, READ, cli=("path:string",), args=ONE),
    "dag/stat": _fwd(STRUCTURE, READ, "progress:bool/p", args=SOME),
    "dag/export": _fwd(STRUCTURE, READ, "progress:bool/p", "local-only:bool", args=ONE),
    "dag/put": _intercept(PER_PART, intercepts.dag_put, "a record is appended to its episode; other nodes pass",
                          "store-codec:string", "input-codec:string", "pin:bool", "hash:string",
                          "allow-big-block:bool", body=FILES),
    "dag/import": _intercept(RAW_WRITE, raw_writes.dag_import, CONFIRMED, "pin-roots:bool", "local-only:bool", "silent:bool", "stats:bool",
                       "allow-big-block:bool", off=PROVIDE, body=FILES),
    "pin/add": _intercept(RAW_WRITE, raw_writes.pin_add, CONFIRMED, "recursive:bool/r", "name:string/n", "progress:bool", off=PROVIDE,
                    cli=("stream:bool", "metadata:string"), args=SOME),
    "pin/ls": _fwd(STRUCTURE, READ, "type:string/t", "quiet:bool/q", "name:string/n", "stream:bool/s",
                   "names:bool", cli=("paths:strings",), args=ANY),
    "pin/rm": _intercept(RAW_WRITE, intercepts.pin_rm, "pins of records and attachments belong to the gateway",
                         "recursive:bool/r", args=SOME),
    "pin/update": _intercept(RAW_WRITE, intercepts.pin_update, "pins of records and attachments belong to the "
                             "gateway", "unpin:bool", off=PROVIDE, args=Args(2, 2)),
    "pin/verify": _fwd(RAW_READ, READ, "verbose:bool", "quiet:bool/q"),
    "name/resolve": _fwd(RAW_READ, READ, "recursive:bool/r", "nocache:bool/n", "dht-record-count:uint/dhtrc",
                         "dht-timeout:string/dhtt", "stream:bool/s", args=Args(0, 1)),
    "cid/format": _fwd(NODE, PURE, "f:string", "v:string", "mc:string", "b:string", args=SOME),
    "cid/base32": _fwd(NODE, PURE, args=SOME),
    "cid/bases": _fwd(NODE, PURE, "prefix:bool", "numeric:bool"),
    "cid/codecs": _fwd(NODE, PURE, "numeric:bool/n", "supported:bool/s"),
    "cid/hashes": _fwd(NODE, PURE, "numeric:bool/n", "supported:bool/s"),
    "cid/inspect": _fwd(NODE, PURE, args=ONE),
    "multibase/encode": _fwd(NODE, PURE, "b:string", body=FILES),
    "multibase/decode": _fwd(NODE, PURE, body=FILES),
    "multibase/transcode": _fwd(NODE, PURE, "b:string", body=FILES),
    "multibase/list": _fwd(NODE, PURE, "prefix:bool", "numeric:bool"),
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


@dataclass(frozen=True)
class Resolved:
    """A request path resolved against ``COMMANDS``."""

    command: str           # canonical command path, e.g. "dag/get"; the raw path if unknown
    entry: Command
    path_arg: str | None   # a trailing argument given in the path (``/api/v0/cat/<cid>``)


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


def describe() -> list[dict]:
    """The table as data (``GET /medicon/v1/commands``): what a client may send, and why not."""
    out = []
    for name, entry in sorted(COMMANDS.items()):
        item = {"command": name, "action": entry.action.value, "why": entry.why}
        if entry.action is not Action.REFUSE:
            item |= {"access": entry.access.value, "body": entry.body.value,
                     "arguments": {"least": entry.args.least, "most": entry.args.most},
                     "options": [{"name": o.name, "aliases": list(o.aliases), "type": o.kind}
                                 for o in entry.options.values() if o.forward]}
        out.append(item)
    return out
