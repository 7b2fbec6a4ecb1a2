"""Built-in authorization: roles, each with the actions it may take, within its patient and
episode scope. Deny by default: an action not listed for a role is never allowed."""

from __future__ import annotations

from gateway.hookspecs import hookimpl

_CARE = frozenset({"record:write", "record:read", "blob:write", "blob:read", "chain:read", "verify", "node:info"})

PERMISSIONS: dict[str, frozenset[str]] = {
    "admin": frozenset({"*"}),
    "clinician": _CARE,
    "lab": _CARE,
    "pharmacy": _CARE,
    "patient": frozenset({"record:read", "blob:read", "chain:read", "node:info"}),
    "auditor": frozenset({"chain:read", "verify", "audit:read", "node:info"}),
    "replicator": frozenset({"chain:read", "raw:read", "raw:write", "node:info"}),
}


def in_scope(principal, resource) -> bool:
    """A scoped principal reaches only its patients (and episodes); a resource that names no
    patient is outside every patient scope."""
    patient, episode = resource.get("patient"), resource.get("episode")
    if principal.patients is not None and patient not in principal.patients:
        return False
    if principal.episodes is not None and episode is not None and episode not in principal.episodes:
        return False
    return True


@hookimpl
def medicon_authorize(principal, action, resource):
    allowed = PERMISSIONS.get(principal.role, frozenset())
    if "*" not in allowed and action not in allowed:
        return False
    if action in ("node:info", "raw:read", "raw:write", "audit:read", "admin"):
        return True
    return in_scope(principal, resource)
