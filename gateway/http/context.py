"""What the HTTP layer knows about the request in hand: its id and its authenticated caller."""

from __future__ import annotations

from aiohttp import web

from ..core.access import Caller
from ..security.principal import Principal

REQUEST_ID = web.RequestKey("request_id", str)
CALLER = web.RequestKey("caller", Caller)
# What the arguments of a read command name, as authorized (``rpc.authorize_call``).
READ_TARGETS = web.RequestKey("read_targets", list)


def surface_of(request: web.Request) -> str:
    """The door a request came in by (``api``, ``ipfs``, ``medicon``…): the path's first
    segment, which never names a patient."""
    return request.path.split("/", 2)[1][:32]


def caller_for(request: web.Request, principal: Principal) -> Caller:
    return Caller(principal, request[REQUEST_ID], surface_of(request))


def caller(request: web.Request) -> Caller:
    """The authenticated caller (set by the authentication middleware)."""
    return request[CALLER]
