"""Who is asking, may they, and the audit event of every decision.

Authorization is a plugin hook (``medicon_authorize``); this module asks it and enforces the
answer: no plugin saying yes, or any saying no, is ``Forbidden`` (deny by default). Every
decision, and every refused credential, is one audit event (``medicon_audit_event``) in which
patient, episode and CID are keyed pseudonyms, so no audit plugin ever sees an identifier.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from dataclasses import dataclass
from typing import Any

from ..errors import Forbidden
from ..security.keys import KeyProvider
from ..security.principal import Principal
from .plugins import PluginHost

PSEUDONYMISED = ("patient", "episode", "cid")

# The allow decisions of the current request whose audit events are still being written, when
# the caller chose to overlap them with the work they allow (``deferring_audits``).
_deferred: contextvars.ContextVar[list[asyncio.Future] | None] = contextvars.ContextVar(
    "medicon_deferred_audits", default=None)


# Reads whose whole effect is an answer: their events may be written while the answer is
# fetched. A write is audited before it is made (an audit log that cannot take the event stops
# the write rather than leaving one the client was told failed), and a read of the audit log
# itself after its own event is stored, so the page shows the reader's own access.
DEFERRABLE = frozenset({"raw:read", "record:read", "blob:read", "chain:read", "node:info"})
# Writes whose effect is one commit point the record service controls (an episode's head
# move): their events are written while the record is sealed and stored in Kubo, and the
# service settles them right before the head moves (``settle_audits``; on the pipelined path
# the pipeline waits for them, ``take_audits``) — a record whose event cannot be stored is not
# appended; its stored block loses its pin like any append that fails.
DEFERRABLE_UNTIL_COMMIT = frozenset({"record:write"})


def deferring_audits() -> None:
    """From here on in this task (one request), the audit event of an allowed read is written
    while the read goes on — its call to Kubo overlaps the audit log's fsync — instead of
    before it, and that of a record append while the record is stored (settled before its
    head moves). The caller must ``await settle_audits()`` before the first byte of
    an answer: nothing is disclosed, and nothing acknowledged, before its event is stored.
    Refusals are still audited before they are answered."""
    _deferred.set([])


async def settle_audits() -> None:
    """Wait for this request's deferred audit events; the first failure (a full or lost audit
    store) is raised, so the answer becomes that error instead of the allowed one."""
    pending = _taken()
    if pending:
        await _all_stored(pending)


def take_audits() -> asyncio.Future | None:
    """This request's deferred audit events as one future, taken from the request: done once
    all are stored, failed with the first failure. For a commit made away from the request
    (the pipeline moves heads in batches), which waits for it instead of the request waiting
    first; whoever takes it must see it settled before answering."""
    pending = _taken()
    if not pending:
        return None
    stored = asyncio.ensure_future(_all_stored(pending))
    stored.add_done_callback(_retrieve)
    return stored


def _taken() -> list[asyncio.Future] | None:
    """This request's deferred events, now off its list."""
    pending = _deferred.get()
    if pending:
        _deferred.set([])
    return pending


async def _all_stored(pending: list[asyncio.Future]) -> None:
    failures = [r for r in await asyncio.gather(*pending, return_exceptions=True) if isinstance(r, BaseException)]
    if failures:
        raise failures[0]


def _retrieve(future: asyncio.Future) -> None:
    """A deferred event whose request went away (client gone) is still written; its failure
    is the store's to report, not an unretrieved-exception warning."""
    if not future.cancelled():
        future.exception()


@dataclass(frozen=True)
class Caller:
    """A principal making one request: ``request_id`` ties its audit events together and
    ``surface`` says which door it came in by (``api``, ``medicon``, ``ipfs``…)."""

    principal: Principal
    request_id: str
    surface: str


class Authorizer:
    def __init__(self, plugins: PluginHost, keys: KeyProvider, service: Any) -> None:
        self._plugins = plugins
        self._keys = keys
        self._service = service

    async def authorize(self, caller: Caller, action: str, resource: dict[str, Any] | None = None) -> None:
        """Ask every authorization plugin; allow only if one says yes and none says no."""
        who = caller.principal
        resource = resource or {}
        votes = await self._plugins.call("medicon_authorize", principal=who, action=action, resource=resource)
        allowed = bool(votes) and all(votes)
        await self.audit(caller.request_id, caller.surface, who, action, resource, allowed)
        if not allowed:
            raise Forbidden(f"{who.role} {who.id!r} is not allowed to {action} this resource")

    async def allowed(self, caller: Caller, action: str, resource: dict[str, Any]) -> bool:
        """``authorize`` as a yes or no (the decision is audited all the same)."""
        try:
            await self.authorize(caller, action, resource)
        except Forbidden:
            return False
        return True

    async def audit(self, request_id: str, surface: str, who: Principal | None, action: str,
                    resource: dict[str, Any], allowed: bool, *, reason: str | None = None) -> None:
        """One audit event per decision. ``reason`` says why credentials were refused
        (``revoked``, ``expired``, …); the path is left out (it may name a patient)."""
        shown = {k: (self._keys.pseudonym(k, _text(v)) if k in PSEUDONYMISED else v)
                 for k, v in resource.items() if v is not None}
        event = {
            "time": time.time(), "request_id": request_id,
            "principal": who.id if who else None, "role": who.role if who else None,
            "action": action, "resource": shown,
            "decision": "allow" if allowed else "deny", "path": surface,
        }
        if reason is not None:
            event["reason"] = reason
        pending = _deferred.get()
        if allowed and pending is not None and (action in DEFERRABLE or action in DEFERRABLE_UNTIL_COMMIT):
            written = asyncio.ensure_future(self._plugins.call("medicon_audit_event", event=event, service=self._service))
            written.add_done_callback(_retrieve)
            pending.append(written)
            return
        await self._plugins.call("medicon_audit_event", event=event, service=self._service)


def _text(value: Any) -> str:
    """An identifier as pseudonymisable text, whatever a hostile request made of it (a
    number, an unpaired surrogate): pseudonyms are taken over UTF-8."""
    text = value if isinstance(value, str) else str(value)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
