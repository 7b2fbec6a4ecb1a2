"""The vocabulary of the RPC command table (``Command``: action, access, options, arguments,
body policy, handler), an RPC call as the gateway understood it, and the one request to Kubo
rebuilt from it.

Kubo reads options by any alias, ignores unknown ones, picks between a name and its alias at
random, parses integers in any base, and takes arguments from the path, the query and the body.
The gateway reads a request once, the way Kubo would, refuses what it does not understand, and
sends Kubo only what it parsed: the canonical command path, the ``arg`` values it authorized
and the allowed options with their values normalised. Nothing of the client's query string,
headers or body framing reaches Kubo as sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Awaitable, Callable
from urllib.parse import quote, unquote_to_bytes

from aiohttp import web

from ..errors import Invalid

# Go's strconv.ParseInt/ParseUint with base 0: sign, 0x/0o/0b prefixes, leading-0 octal, "_".
_GO_INT = re.compile(r"[+-]?(0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+|[0-9][0-9_]*)")
# Go's time.ParseDuration, positive only (an unparsable timeout makes Kubo answer an empty 200).
_GO_DURATION = re.compile(r"([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h))*")
_BOOL = {"": True, "1": True, "t": True, "true": True, "0": False, "f": False, "false": False}
_RANGES = {"int": (-(2**31), 2**31 - 1), "uint": (0, 2**32 - 1), "int64": (-(2**63), 2**63 - 1),
           "uint64": (0, 2**64 - 1)}


@dataclass(frozen=True)
class Option:
    """One option a command accepts: its canonical name, aliases, Kubo type, and whether it is
    passed on to Kubo (options only the CLI reads are checked and dropped)."""

    name: str
    kind: str                       # bool, int, uint, int64, uint64, string, strings, duration
    aliases: tuple[str, ...] = ()
    forward: bool = True
    choices: tuple[str, ...] = ()   # for strings: the only values allowed (empty: any)
    # An option the gateway refuses to let a caller turn on (``nocopy``): accepted only with
    # this harmless value, which clients such as ipfshttpclient send by default.
    only: Any = None

    def parse(self, given: str, values: list[str]) -> Any:
        if self.kind == "strings":
            return values
        if len(values) > 1:
            raise Invalid(f"option {given!r} is given {len(values)} times; it takes one value")
        value = values[0]
        if self.kind == "bool":
            parsed = _BOOL.get(value.lower())
            if parsed is None:
                raise Invalid(f"option {given!r} takes a boolean (true or false), not {value[:40]!r}")
            if self.only is not None and parsed is not self.only:
                raise Invalid(f"option {given!r} is refused by the gateway: it would write or reach outside "
                              f"the record chains (only {str(self.only).lower()} is accepted)")
            return parsed
        if self.kind in _RANGES:
            number = _go_int(value)
            low, high = _RANGES[self.kind]
            if number is None or not low <= number <= high:
                raise Invalid(f"option {given!r} takes a {self.kind} ({low}..{high}), not {value[:40]!r}")
            return number
        if self.kind == "duration":
            if not _GO_DURATION.fullmatch(value) or not any(c in "123456789" for c in value):
                raise Invalid(f"option {given!r} takes a positive duration such as 30s or 2m, not {value[:40]!r}")
            return value
        if self.choices and value not in self.choices:
            raise Invalid(f"option {given!r} takes one of {', '.join(self.choices)}, not {value[:40]!r}")
        return value

    def wire(self, value: Any) -> list[str]:
        """The value as sent to Kubo: booleans as true/false, numbers in decimal."""
        if self.kind == "strings":
            return list(value)
        if self.kind == "bool":
            return ["true" if value else "false"]
        return [str(value)]


def _go_int(text: str) -> int | None:
    if not _GO_INT.fullmatch(text) or "__" in text or text.endswith("_"):
        return None
    body = text.lstrip("+-")
    if body[:2].lower() not in ("0x", "0o", "0b") and len(body) > 1 and body[0] == "0" and "_" not in body:
        body = "0o" + body[1:]  # Go reads a leading 0 as octal
    try:
        value = int(("-" if text.startswith("-") else "") + body, 0)
    except ValueError:
        return None
    return value


def options(*specs: str, forward: bool = True, only: Any = None) -> dict[str, Option]:
    """Options from compact specs: ``"offset:int64/o"`` (name, type, aliases after ``/``)."""
    out = {}
    for spec in specs:
        head, _, aliases = spec.partition("/")
        name, _, kind = head.partition(":")
        out[name] = Option(name, kind, tuple(a for a in aliases.split(",") if a), forward, only=only)
    return out


class Body(Enum):
    NONE = "none"    # no request body: arguments come from the path and the query only
    FILES = "files"  # a multipart/form-data body of files, re-framed part by part


@dataclass(frozen=True)
class Args:
    """How many string arguments a command takes (``most`` None: any number)."""

    least: int = 0
    most: int | None = 0

    def check(self, command: str, given: list[str]) -> None:
        if len(given) < self.least:
            raise Invalid(f"{command} needs {'an argument' if self.least == 1 else f'{self.least} arguments'} "
                          f"(?arg=...)")
        if self.most is not None and len(given) > self.most:
            allowed = "no arguments" if self.most == 0 else "one argument" if self.most == 1 else f"{self.most} arguments"
            raise Invalid(f"{command} takes {allowed}, not {len(given)}")


class Action(Enum):
    FORWARD = "forward"      # sent to Kubo as parsed, answer streamed back
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


# Options every command accepts (go-ipfs-cmds' root options). Those only the CLI reads are
# checked and dropped; ``api-auth`` (the CLI may send its credential here) is never passed on.
GLOBAL: dict[str, Option] = {
    "encoding": Option("encoding", "string", ("enc",), choices=("json",)),
    "stream-channels": Option("stream-channels", "bool"),
    "timeout": Option("timeout", "duration"),
    "offline": Option("offline", "bool"),
    "local": Option("local", "bool", ("L",)),
    "cid-base": Option("cid-base", "string"),
    "upgrade-cidv0-in-output": Option("upgrade-cidv0-in-output", "bool"),
    **options("api-auth:string", "debug:bool/D", "help:bool", "h:bool", "config:string/c",
              "config-file:string", "repo-dir:string", forward=False),
}


Handler = Callable[[web.Request, "Call"], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Command:
    action: Action
    why: str
    access: Access = Access.NONE
    handler: Handler | None = None
    options: dict[str, Option] = field(default_factory=dict)
    args: Args = field(default_factory=Args)
    body: Body = Body.NONE
    # Kubo's X-Content-Length is the exact length of the body (cat), so a shorter stream is a
    # failure it could only report in a trailer; for ``get`` it is the content's size instead.
    exact_length: bool = False

    def option(self, name: str) -> Option | None:
        """The option ``name`` (a name or an alias, case-sensitive as in Kubo), or None."""
        return _lookup(self.options, name) or _lookup(GLOBAL, name)


def _lookup(table: dict[str, Option], name: str) -> Option | None:
    found = table.get(name)
    if found is not None:
        return found
    return next((o for o in table.values() if name in o.aliases), None)


@dataclass(frozen=True)
class Call:
    """A request the gateway understood: the command, its arguments (from the path and the
    query; never from a body) and its options, parsed and typed."""

    command: str
    entry: Command
    args: list[str]
    options: dict[str, Any] = field(default_factory=dict)

    def flag(self, name: str) -> bool:
        return bool(self.options.get(name, False))

    def upstream_query(self, *, args: list[str] | None = None) -> str:
        """The query Kubo gets: the arguments, then every forwarded option, percent-encoded."""
        pairs = [("arg", a) for a in (self.args if args is None else args)]
        for name, value in self.options.items():
            option = self.entry.option(name)
            if option.forward:
                pairs += [(name, v) for v in option.wire(value)]
        return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)


def raw_query_pairs(raw_query: str) -> list[tuple[str, str]]:
    """The query's pairs, percent-decoded once (``+`` is a space, as Go's ParseQuery reads it).
    A malformed escape or a value that is not UTF-8 is refused: Kubo would read it otherwise."""
    pairs = []
    for part in raw_query.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        pairs.append((_decode(key), _decode(value)))
    return pairs


def _decode(text: str) -> str:
    if re.search(r"%(?![0-9a-fA-F]{2})", text):
        raise Invalid(f"malformed percent-encoding in the query: {text[:60]!r}")
    try:
        return unquote_to_bytes(text.replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("the query is not UTF-8") from None


def parse_call(command: str, entry: Command, path_arg: str | None, raw_query: str) -> Call:
    """Read a request's arguments and options exactly once, against the command's allow-list."""
    args = [] if path_arg is None else [path_arg]
    given: dict[str, tuple[str, list[str]]] = {}  # canonical name -> (name as given, values)
    for key, value in raw_query_pairs(raw_query):
        if key == "arg":
            args.append(value)
            continue
        option = entry.option(key)
        if option is None:
            raise Invalid(f"unknown option {key[:60]!r} for {command}: the gateway passes on only the "
                          f"options it knows (see GET /medicon/v1/commands)")
        seen = given.get(option.name)
        if seen is not None and seen[0] != key:
            raise Invalid(f"option {option.name!r} is given twice, as {seen[0]!r} and {key!r}")
        given.setdefault(option.name, (key, []))[1].append(value)
    parsed = {name: entry.option(name).parse(as_given, values) for name, (as_given, values) in given.items()}
    entry.args.check(command, args)
    return Call(command, entry, args, parsed)
