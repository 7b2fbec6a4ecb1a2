"""Domain errors: what went wrong, in words, with no HTTP in them.

Every layer raises these; the HTTP layer (``gateway.http.errors``) maps each class to a status
and renders it in the shape of the surface it was asked on (Kubo's ``{"Message","Code","Type"}``
on ``/api/v0`` and ``/ipfs``, ``{"error": {...}}`` on ``/medicon/v1``). Plugins raise them too
(``from gateway.errors import Forbidden``).

``message`` is shown to the client, so it never holds a secret or a patient identifier the
caller did not send. ``details`` are rendered beside it on the gateway's own API (``problems``
of an invalid record, ``current`` of a conflict). ``reason`` is a short cause for the audit log
only (``revoked``, ``expired``), never rendered.
"""

from __future__ import annotations

import errno
from typing import Any, Mapping


class MediconError(Exception):
    """Base of every error the gateway answers with instead of a result."""

    def __init__(self, message: str, *, details: Mapping[str, Any] | None = None,
                 reason: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.reason = reason
        self.retry_after = retry_after

    def with_message(self, message: str) -> "MediconError":
        """The same error (class, details, reason) saying ``message``."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        Exception.__init__(clone, message)
        clone.message = message
        return clone


class Invalid(MediconError):
    """The request or the record is malformed or breaks a rule; nothing was stored."""


class Unauthenticated(MediconError):
    """No credential, or one that is not (or no longer) valid."""


class Forbidden(MediconError):
    """The caller is known but may not do this."""


class NotFound(MediconError):
    """Nothing of that name, or nothing the caller may know of."""


class Conflict(MediconError):
    """The request does not fit the state as it stands (a chain conflict)."""


class Erased(MediconError):
    """The data was crypto-shredded: it can never be read again."""


class TooLarge(MediconError):
    """A body or a record past its configured limit."""


class IdempotencyKeyReused(MediconError):
    """An ``Idempotency-Key`` sent again with a different request."""


class Busy(MediconError):
    """Over a limit of the gateway's own (concurrent requests); retry shortly."""


class Unavailable(MediconError):
    """A part the gateway depends on (Kubo, its storage) is unreachable or answered wrongly."""


class NotReplicated(Unavailable):
    """A record could not be pinned on as many nodes as ``records.replicas`` asks; it was not
    acknowledged (retry: the replica may be back)."""


class TimedOut(MediconError):
    """A part the gateway depends on did not answer in time."""


class StorageFull(MediconError):
    """A volume the gateway writes to is full; nothing was acknowledged."""


def is_out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` is the operating system saying a disk is full (ENOSPC) or a quota is
    used up (EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class Internal(MediconError):
    """The gateway's (or a plugin's) own failure."""
