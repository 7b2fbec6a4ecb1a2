"""Who is asking: the principal an authentication plugin returns for a request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

ROLES = ("admin", "clinician", "lab", "pharmacy", "patient", "auditor", "replicator", "monitor")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    ``patients`` / ``episodes``: the scope, or None for no restriction by that dimension
    (a ``patient`` role is always scoped to its own patient id). ``via`` names the plugin and
    credential kind (``token``, ``jwt``) for the audit log; ``id`` never holds a secret.
    """

    id: str
    role: str
    patients: frozenset[str] | None = None
    episodes: frozenset[str] | None = None
    via: str = ""
    claims: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r} (known: {', '.join(ROLES)})")

    @property
    def scoped(self) -> bool:
        return self.patients is not None or self.episodes is not None

    def sees(self, resource: Mapping[str, Any]) -> bool:
        """Whether ``resource`` is inside this principal's scope. Every dimension restricts: a
        scope of episodes admits only resources that name one of them (never a whole patient,
        nor an attachment, which belongs to no episode), a scope of patients only resources of
        those patients; a resource that names neither is outside every scope."""
        if self.patients is not None and resource.get("patient") not in self.patients:
            return False
        if self.episodes is not None and resource.get("episode") not in self.episodes:
            return False
        return True
