"""API tokens: random bearer secrets for services, scripts and the Kubo CLI.

A token is ``mdc_`` + base64url(32 random bytes) (256 bits). The store keeps only its SHA-256
(hex): a fast hash is right for a 256-bit random secret (nothing to brute-force), and it makes
every lookup one indexed ``SELECT`` on the hash. The plaintext is returned once, by ``create``,
and never stored, listed or logged.

This module is the token *format* and the rules a new token must meet; where tokens are kept
is the storage layer's business (``gateway.storage``). Nothing is cached: a revocation takes
effect on the very next request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterable

from ..errors import Invalid
from .principal import ROLES, Principal

TOKEN_PREFIX = "mdc_"
TOKEN_BYTES = 32
# base64url without padding of 32 bytes is exactly 43 characters.
_TOKEN_RE = re.compile(r"^mdc_[A-Za-z0-9_-]{43}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")
_ID_RE = re.compile(r"^tok_[0-9a-f]{8}$")
# last_used_at is bookkeeping, not security: written at most once a minute per token, so a
# busy token does not turn every request into a database write.
LAST_USED_GRANULARITY = 60.0


class TokenError(Invalid):
    """A token cannot be created as asked (bad name, role or scope; name taken)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def looks_like_token(value: str) -> bool:
    """True for values of this store's format (``mdc_`` prefix); they are ours to judge."""
    return value.startswith(TOKEN_PREFIX)


def generate_token() -> str:
    raw = secrets.token_bytes(TOKEN_BYTES)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_token(token: str) -> bytes | None:
    """The random bytes of a well-formed token, or None."""
    if not _TOKEN_RE.match(token):
        return None
    try:
        raw = base64.urlsafe_b64decode(token[len(TOKEN_PREFIX):] + "=")
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == TOKEN_BYTES else None


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``15m``, ``3600s``, ``2w`` (a bare number is seconds)."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", text.lower())
    if not match or int(match.group(1)) == 0:
        raise TokenError(f"invalid duration {text!r}: expected a positive number with s, m, h, d or w")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2) or "s"])


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


@dataclass(frozen=True)
class TokenInfo:
    """A token's public description: everything but the secret (and its hash)."""

    id: str
    name: str
    role: str
    patients: tuple[str, ...] | None
    episodes: tuple[str, ...] | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def status(self, now: datetime | None = None) -> str:
        """``active``, ``expired`` or ``revoked``."""
        now = now or datetime.now(timezone.utc)
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def scope(self) -> str:
        parts = []
        if self.patients is not None:
            parts.append("patients=" + ",".join(self.patients))
        if self.episodes is not None:
            parts.append("episodes=" + ",".join(self.episodes))
        return " ".join(parts) or "all"

    def to_dict(self) -> dict:
        iso = lambda d: None if d is None else d.isoformat()  # noqa: E731
        return {"id": self.id, "name": self.name, "role": self.role,
                "patients": None if self.patients is None else list(self.patients),
                "episodes": None if self.episodes is None else list(self.episodes),
                "created_at": iso(self.created_at), "expires_at": iso(self.expires_at),
                "revoked_at": iso(self.revoked_at), "last_used_at": iso(self.last_used_at),
                "status": self.status()}


@dataclass(frozen=True)
class AuthResult:
    """The outcome of checking a token. ``reason`` (``ok``, ``malformed``, ``unknown``,
    ``revoked``, ``expired``) and ``token_id`` are for logs; neither is a secret."""

    principal: Principal | None
    reason: str
    token_id: str | None = None


def _scope(kind: str, values: Iterable[str] | None) -> tuple[str, ...] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise TokenError(f"{kind} must be non-empty strings")
        if value not in out:
            out.append(value)
    if not out:
        raise TokenError(f"an empty {kind} list grants nothing; leave it out for no restriction")
    return tuple(out)


@dataclass(frozen=True)
class NewToken:
    """A token about to be created, its name, role and scope checked."""

    name: str
    role: str
    patients: tuple[str, ...] | None
    episodes: tuple[str, ...] | None
    expires_in: timedelta | None

    @classmethod
    def checked(cls, name: str, role: str, patients: Iterable[str] | None = None,
                episodes: Iterable[str] | None = None, expires_in: timedelta | None = None) -> "NewToken":
        if not isinstance(name, str) or not _NAME_RE.match(name) or _ID_RE.match(name):
            raise TokenError(f"invalid token name {name!r}: letters, digits and . _ @ : - "
                             "(at most 128, not of the form tok_xxxxxxxx)")
        if role not in ROLES:
            raise TokenError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
        patients_t = _scope("patients", patients)
        episodes_t = _scope("episodes", episodes)
        if role == "patient" and (patients_t is None or len(patients_t) != 1):
            raise TokenError("a patient token must be scoped to exactly one patient")
        if expires_in is not None and expires_in.total_seconds() <= 0:
            raise TokenError("expires_in must be positive")
        return cls(name, role, patients_t, episodes_t, expires_in)


def new_token_id() -> str:
    return "tok_" + secrets.token_hex(4)


def principal_of(info: TokenInfo) -> Principal:
    """Who a live token speaks for."""
    return Principal(
        id=f"token:{info.name}", role=info.role,
        patients=None if info.patients is None else frozenset(info.patients),
        episodes=None if info.episodes is None else frozenset(info.episodes),
        via="token", claims={"token_id": info.id, "token_name": info.name})


def last_use_due(info: TokenInfo, now: float) -> bool:
    """Whether a use at ``now`` is written as the token's last use (``LAST_USED_GRANULARITY``)."""
    last = None if info.last_used_at is None else info.last_used_at.timestamp()
    return last is None or now - last >= LAST_USED_GRANULARITY


def judge(info: TokenInfo | None, now: float) -> AuthResult:
    """The outcome of presenting a well-formed token whose stored description is ``info``."""
    if info is None:
        return AuthResult(None, "unknown")
    if info.revoked_at is not None:
        return AuthResult(None, "revoked", info.id)
    if info.expires_at is not None and info.expires_at.timestamp() <= now:
        return AuthResult(None, "expired", info.id)
    return AuthResult(principal_of(info), "ok", info.id)
