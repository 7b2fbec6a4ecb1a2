"""Who is asking: the principal an authentication plugin returns for a request."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("admin", "clinician", "lab", "pharmacy", "patient", "auditor", "replicator")


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
