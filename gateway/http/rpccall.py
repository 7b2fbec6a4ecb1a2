"""An RPC call as the gateway understood it: the command the path names, and its options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

if TYPE_CHECKING:
    from .commands import Command


@dataclass(frozen=True)
class Resolved:
    """A request path resolved against the command table."""

    command: str           # canonical command path, e.g. "dag/get"; the raw path if unknown
    entry: "Command"
    path_arg: str | None   # a trailing argument given in the path (``/api/v0/cat/<cid>``)


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
