"""API tokens: random bearer secrets for services, scripts and the Kubo CLI.

A token is ``mdc_`` + base64url(32 random bytes) (256 bits). The store keeps only its SHA-256
(hex): a fast hash is right for a 256-bit random secret (nothing to brute-force), and it makes
every lookup one indexed ``SELECT`` on the hash. The plaintext is returned once, by ``create``,
and never stored, listed or logged.

The store is one SQLite file, ``<records.data_dir>/tokens.sqlite3``, shared by the gateway and
the ``medicon-gateway token`` CLI. Nothing is cached: a revocation by the CLI (another process)
takes effect on the very next request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable

from .principal import ROLES, Principal

TOKEN_PREFIX = "mdc_"
TOKEN_BYTES = 32
# base64url without padding of 32 bytes is exactly 43 characters.
_TOKEN_RE = re.compile(r"^mdc_[A-Za-z0-9_-]{43}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")
_ID_RE = re.compile(r"^tok_[0-9a-f]{8}$")
FILENAME = "tokens.sqlite3"
# last_used_at is bookkeeping, not security: write it at most once a minute per token, so a
# busy token does not turn every request into a database write.
LAST_USED_GRANULARITY = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    token_hash   TEXT NOT NULL UNIQUE,
    role         TEXT NOT NULL,
    patients     TEXT,             -- JSON list, NULL = no restriction
    episodes     TEXT,             -- JSON list, NULL = no restriction
    created_at   REAL NOT NULL,    -- Unix seconds
    expires_at   REAL,
    revoked_at   REAL,
    last_used_at REAL
);
-- A name names one live token; a revoked token's name may be given to its replacement.
CREATE UNIQUE INDEX IF NOT EXISTS tokens_live_name ON tokens(name) WHERE revoked_at IS NULL;
"""


class TokenError(ValueError):
    """A token cannot be created as asked (bad name, role or scope; name taken)."""


def token_path(data_dir: str | os.PathLike[str]) -> Path:
    """Where the token store of a gateway with ``records.data_dir = data_dir`` lives."""
    return Path(data_dir) / FILENAME


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


_COLUMNS = "id, name, role, patients, episodes, created_at, expires_at, revoked_at, last_used_at"


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


class TokenStore:
    """The token table of one SQLite file; safe to share between threads and processes."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Hashes only, yet nobody else's business: owner read/write.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- administration --------------------------------------------------------------------

    def create(self, name: str, role: str, patients: Iterable[str] | None = None,
               episodes: Iterable[str] | None = None,
               expires_in: timedelta | None = None) -> tuple[str, TokenInfo]:
        """Create a token; return ``(plaintext, info)``. The plaintext is not kept anywhere:
        this is the only time it is seen."""
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
        now = self._clock()
        expires_at = None if expires_in is None else now + expires_in.total_seconds()
        token = generate_token()
        with self._lock:
            for _ in range(5):
                token_id = "tok_" + secrets.token_hex(4)
                try:
                    self._db.execute(
                        "INSERT INTO tokens (id, name, token_hash, role, patients, episodes,"
                        " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (token_id, name, hash_token(token), role,
                         None if patients_t is None else json.dumps(list(patients_t)),
                         None if episodes_t is None else json.dumps(list(episodes_t)),
                         now, expires_at))
                    break
                except sqlite3.IntegrityError:
                    if self._db.execute("SELECT 1 FROM tokens WHERE name = ? AND revoked_at IS NULL",
                                        (name,)).fetchone():
                        raise TokenError(f"a live token named {name!r} exists; revoke it first") from None
                    # an id collision (1 in 4 billion): draw another
            else:  # pragma: no cover
                raise TokenError("could not allocate a token id")
        info = TokenInfo(token_id, name, role, patients_t, episodes_t, _dt(now), _dt(expires_at),
                         None, None)
        return token, info

    def list(self, *, include_revoked: bool = True) -> list[TokenInfo]:
        """Every token's public description, oldest first. Never the secret nor its hash."""
        sql = f"SELECT {_COLUMNS} FROM tokens"
        if not include_revoked:
            sql += " WHERE revoked_at IS NULL"
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created_at, id").fetchall()
        return [self._info(row) for row in rows]

    def get(self, name_or_id: str) -> TokenInfo | None:
        """The token with this id, or the live token with this name."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM tokens WHERE id = ? OR (name = ? AND revoked_at IS NULL)"
                " ORDER BY id = ? DESC LIMIT 1", (name_or_id, name_or_id, name_or_id)).fetchone()
        return None if row is None else self._info(row)

    def revoke(self, name_or_id: str) -> bool:
        """Revoke the token with this id, or the live token with this name. True if a token was
        revoked now; False if none matched or it was revoked already. Effective at once, in
        every process using the file."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE tokens SET revoked_at = ? WHERE revoked_at IS NULL AND (id = ? OR name = ?)",
                (self._clock(), name_or_id, name_or_id))
        return cur.rowcount > 0

    # --- per request -----------------------------------------------------------------------

    def check(self, token: str) -> AuthResult:
        """Check ``token``: one indexed SELECT on its hash. Never raises for a bad token."""
        if not isinstance(token, str) or decode_token(token) is None:
            return AuthResult(None, "malformed")
        digest = hash_token(token)
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS}, token_hash FROM tokens WHERE token_hash = ?", (digest,)).fetchone()
        if row is None or not hmac.compare_digest(row[-1], digest):
            return AuthResult(None, "unknown")
        info = self._info(row[:-1])
        now = self._clock()
        if info.revoked_at is not None:
            return AuthResult(None, "revoked", info.id)
        if info.expires_at is not None and info.expires_at.timestamp() <= now:
            return AuthResult(None, "expired", info.id)
        self._touch(info, now)
        principal = Principal(
            id=f"token:{info.name}", role=info.role,
            patients=None if info.patients is None else frozenset(info.patients),
            episodes=None if info.episodes is None else frozenset(info.episodes),
            via="token", claims={"token_id": info.id, "token_name": info.name})
        return AuthResult(principal, "ok", info.id)

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a live token; None for a malformed, unknown, revoked or expired one
        (``check`` says which)."""
        return self.check(token).principal

    # --- helpers ---------------------------------------------------------------------------

    def _touch(self, info: TokenInfo, now: float) -> None:
        last = None if info.last_used_at is None else info.last_used_at.timestamp()
        if last is not None and now - last < LAST_USED_GRANULARITY:
            return
        with self._lock:
            try:
                # Do not wait long for another writer: this runs on the request path.
                self._db.execute("PRAGMA busy_timeout=100")
                self._db.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?", (now, info.id))
            except sqlite3.Error:
                pass  # bookkeeping only (read-only file, busy database): never fail a request on it
            finally:
                self._db.execute("PRAGMA busy_timeout=10000")

    @staticmethod
    def _info(row: tuple) -> TokenInfo:
        tid, name, role, patients, episodes, created, expires, revoked, used = row
        load = lambda s: None if s is None else tuple(json.loads(s))  # noqa: E731
        return TokenInfo(tid, name, role, load(patients), load(episodes), _dt(created),
                         _dt(expires), _dt(revoked), _dt(used))
