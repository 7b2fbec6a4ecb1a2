"""``/api/v0/<command>``: Kubo's RPC API, through the command table.

A request is classified by the table (``commands.resolve``) and refused if the table says so;
its arguments and options are parsed against the entry's allow-list (``rpccall.parse_call``),
its body checked against the entry's body policy, the caller authorized for the access the
entry names — every argument, and what a path in it ends at — and the parsed call handed to the
entry's handler, which sends Kubo a request rebuilt from it. Nothing else reaches Kubo.
"""

from __future__ import annotations

from aiohttp import web

from ..core.service import CONTENT, STRUCTURE, root_of
from ..errors import Forbidden, Invalid
from . import commands
from .appkeys import SERVICE
from .body import check_body_size, read_body_chunk
from .commands import Access, Action
from .context import READ_TARGETS, caller
from .errors import HTTPError
from .proxy import check_origin
from .rpccall import Body, Call, parse_call

async def rpc(request: web.Request) -> web.StreamResponse:
    if request.method != "POST":
        raise HTTPError(405, f"{request.method} is not allowed: the RPC API takes POST", headers={"Allow": "POST"})
    check_origin(request)
    resolved = commands.resolve(request.path[len("/api/v0/"):])
    entry = resolved.entry
    if entry.action is Action.REFUSE or entry.handler is None:
        raise Forbidden(f"command {resolved.command!r} is refused by the gateway: {entry.why}")
    call = parse_call(resolved.command, entry, resolved.path_arg, request.rel_url.raw_query_string)
    check_body_size(request)
    if entry.body is Body.NONE:
        await _refuse_body(request, call)
    await authorize_call(request, call)
    return await entry.handler(request, call)


async def _refuse_body(request: web.Request, call: Call) -> None:
    """Kubo reads arguments from the lines of a body too (``cat``, ``ls``, ``refs``,
    ``pin/add``…), where the gateway would not have authorized them: a command that reads no
    files gets no body at all. An empty one is fine (some clients send it)."""
    if request.body_exists and await read_body_chunk(request, 1):
        raise Invalid(f"{call.command} takes no request body: pass its arguments as ?arg=…")


async def authorize_call(request: web.Request, call: Call) -> None:
    """Authorize a call by the access its table entry names. ``PER_PART`` commands (``add``,
    ``dag/put``) are authorized part by part by their handlers."""
    service, who = request.app[SERVICE], caller(request)
    access = call.entry.access
    if access is Access.NODE:
        await service.authorize(who, "node:info")
    elif access in (Access.CONTENT, Access.STRUCTURE):
        if not call.args:  # pin/ls without arguments: every pin of the node
            await service.authorize(who, "raw:read", {"kind": "raw"})
            return
        request[READ_TARGETS] = await service.authorize_read(
            who, CONTENT if access is Access.CONTENT else STRUCTURE, call.args)
    elif access is Access.RAW_READ:
        await service.authorize(who, "raw:read", {"kind": "raw"})
    elif access is Access.RAW_WRITE:
        for arg in call.args:
            root_of(arg)  # a CID or an /ipfs path, or 400
        await service.authorize(who, "raw:write", {"kind": "raw"})
    elif access is not Access.PER_PART:
        raise Forbidden(f"command {call.command!r} has no access rule")
