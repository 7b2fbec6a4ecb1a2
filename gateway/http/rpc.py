"""``/api/v0/<command>``: Kubo's RPC API, through the command table.

A request is classified by the table (``commands.resolve``), refused if the table says so,
authorized by the access its entry names, and handed to the entry's handler. Nothing else
reaches Kubo.
"""

from __future__ import annotations

from aiohttp import web

from ..core.service import CONTENT, STRUCTURE
from ..errors import Forbidden, Invalid
from . import commands
from .appkeys import SERVICE
from .body import check_body_size
from .commands import Access, Action
from .context import caller
from .errors import HTTPError
from .proxy import check_origin
from .rpccall import Resolved, options


async def rpc(request: web.Request) -> web.StreamResponse:
    if request.method != "POST":
        raise HTTPError(405, f"{request.method} is not allowed: the RPC API takes POST", headers={"Allow": "POST"})
    check_origin(request)
    resolved = commands.resolve(request.path[len("/api/v0/"):])
    entry = resolved.entry
    if entry.action is Action.REFUSE or entry.handler is None:
        raise Forbidden(f"command {resolved.command!r} is refused by the gateway: {entry.why}")
    check_body_size(request)
    await authorize_command(request, resolved)
    return await entry.handler(request, resolved)


async def authorize_command(request: web.Request, resolved: Resolved) -> None:
    """Authorize an RPC command by the access its table entry names. ``PER_PART`` commands
    (``add``, ``dag/put``) are authorized part by part by their handlers."""
    service, who = request.app[SERVICE], caller(request)
    access = resolved.entry.access
    if access is Access.NODE:
        await service.authorize(who, "node:info")
    elif access in (Access.CONTENT, Access.STRUCTURE):
        args = options(request.query_string, resolved.path_arg).get("arg", [])
        if not args:
            if resolved.command == "pin/ls":  # every pin of the node
                await service.authorize(who, "raw:read", {"kind": "raw"})
                return
            raise Invalid(f"argument is required for {resolved.command}")
        await service.authorize_read(who, CONTENT if access is Access.CONTENT else STRUCTURE, args)
    elif access is Access.RAW_READ:
        await service.authorize(who, "raw:read", {"kind": "raw"})
    elif access is Access.RAW_WRITE:
        await service.authorize(who, "raw:write", {"kind": "raw"})
    elif access is not Access.PER_PART:
        raise Forbidden(f"command {resolved.command!r} has no access rule")
