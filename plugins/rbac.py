"""Built-in authorization: roles, each with the actions it may take, within its patient and
episode scope. Deny by default: an action not listed for a role is never allowed, and a scoped
principal never reaches what lies outside its scope (raw node data and the audit log included,
which name no patient)."""

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
    # Replication: raw node data, and the Pinning Service API of the node (replica:pin).
    "replicator": frozenset({"chain:read", "raw:read", "raw:write", "node:info", "replica:pin"}),
    # Prometheus: /metrics and nothing else (counts and latencies, no patient's data).
    "monitor": frozenset({"metrics:read"}),
}
# Actions on the node as a whole rather than on a patient's data.
NODE_WIDE = frozenset({"raw:read", "raw:write", "audit:read", "metrics:read", "admin", "replica:pin"})


@hookimpl
def medicon_authorize(principal, action, resource):
    allowed = PERMISSIONS.get(principal.role, frozenset())
    if "*" not in allowed and action not in allowed:
        return False
    if action == "node:info":
        return True
    if action in NODE_WIDE:
        return not principal.scoped
    return principal.sees(resource)
