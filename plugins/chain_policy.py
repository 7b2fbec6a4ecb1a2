"""Built-in link-chaining policies: how a record's ``prev`` is decided against the head."""

from __future__ import annotations

from gateway.errors import Conflict
from gateway.hookspecs import hookimpl


def strict(given_prev: str | None, head: str) -> str:
    """The client must name the current head as ``prev``: it proves it saw the latest record."""
    if given_prev is None:
        raise Conflict(f"prev is required by the strict chain policy (current head {head})")
    if given_prev != head:
        raise Conflict(f"stale prev {given_prev}: the current head is {head}")
    return head


def auto(given_prev: str | None, head: str) -> str:
    """The gateway fills ``prev`` in; a ``prev`` the client gives must still be the head."""
    if given_prev is not None and given_prev != head:
        raise Conflict(f"stale prev {given_prev}: the current head is {head}")
    return head


@hookimpl
def medicon_chain_policies():
    return {"strict": strict, "auto": auto}
