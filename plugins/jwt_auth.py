"""Authentication by OIDC/JWT bearer token (``Authorization: Bearer <JWT>``).

Enabled only when ``MEDICON_JWT_ISSUER`` is set. Settings (environment):

``MEDICON_JWT_ISSUER``
    the exact ``iss`` accepted.
``MEDICON_JWT_AUDIENCE``
    the ``aud`` accepted (comma-separated for several); required: without it a token the same
    identity provider issued for any other application would be accepted.
``MEDICON_JWT_JWKS``
    the issuer's public keys: a JWKS JSON file (re-read when it changes) or an http(s) URL
    (fetched with ``jwt.PyJWKClient``, cached five minutes, refetched for an unknown ``kid``).
``MEDICON_JWT_LEEWAY``
    seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat`` (default 60).
``MEDICON_JWT_ALGORITHMS``
    accepted ``alg`` values (default ``RS256,ES256,EdDSA``; ``none`` is never accepted).
``MEDICON_JWT_ROLE_CLAIM`` / ``MEDICON_JWT_PATIENTS_CLAIM`` / ``MEDICON_JWT_EPISODES_CLAIM``
    the top-level claims holding the role (a string in ``gateway.security.principal.ROLES``), the patient
    scope and the episode scope (a string or a list of strings; absent = no restriction).
    Defaults ``medicon_role``, ``medicon_patients``, ``medicon_episodes``.

The signature, ``iss``, ``aud``, ``exp`` (required), ``nbf`` and ``iat`` are checked, and ``sub``
is required. The principal is ``jwt:<iss>#<sub>``. Bearer values of the API-token format
(``mdc_…``) are left to ``token_auth``; any other bearer value that is not a valid JWT is
refused with 401 naming a short reason, never echoing the token. Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import jwt
from jwt.algorithms import get_default_algorithms

from gateway.errors import Internal, Unauthenticated, Unavailable
from gateway.hookspecs import hookimpl
from gateway.http.credentials import bearer
from gateway.security.principal import ROLES, Principal

log = logging.getLogger(__name__)

ENV = "MEDICON_JWT_"
DEFAULT_ALGORITHMS = "RS256,ES256,EdDSA"
TOKEN_PREFIX = "mdc_"  # API tokens: token_auth's

# The key type each algorithm verifies with: a token cannot make an RSA key act as an HMAC
# secret (algorithm confusion), whatever its header says.
_KTY = {**{f"RS{n}": "RSA" for n in (256, 384, 512)}, **{f"PS{n}": "RSA" for n in (256, 384, 512)},
        "ES256": "EC", "ES256K": "EC", "ES384": "EC", "ES512": "EC",
        "EdDSA": "OKP", "Ed25519": "OKP", "Ed448": "OKP",
        **{f"HS{n}": "oct" for n in (256, 384, 512)}}


class Misconfigured(Exception):
    """The JWT settings cannot work; the operator must fix them (500, details in the log)."""


def _refuse(reason: str) -> Unauthenticated:
    """401 naming why (never echoing the token); the reason goes to the audit log too."""
    return Unauthenticated(f"invalid bearer token: {reason}", reason=reason)


@dataclass(frozen=True)
class Settings:
    issuer: str
    audience: tuple[str, ...]
    jwks: str
    leeway: float
    algorithms: tuple[str, ...]
    role_claim: str
    patients_claim: str
    episodes_claim: str

    @property
    def jwks_is_url(self) -> bool:
        return self.jwks.lower().startswith(("http://", "https://"))


def settings(env=None) -> Settings | None:
    """The settings from the environment, or None when the plugin is disabled."""
    env = os.environ if env is None else env
    raw = _raw(env)
    return None if not raw[0] else _parse(*raw)


def _raw(env) -> tuple:
    return tuple(env.get(ENV + k) for k in ("ISSUER", "AUDIENCE", "JWKS", "LEEWAY", "ALGORITHMS",
                                           "ROLE_CLAIM", "PATIENTS_CLAIM", "EPISODES_CLAIM"))


def _parse(issuer, audience, jwks, leeway, algorithms, role_claim, patients_claim,
           episodes_claim) -> Settings:
    auds = tuple(a.strip() for a in (audience or "").split(",") if a.strip())
    if not auds:
        raise Misconfigured(f"{ENV}AUDIENCE is not set")
    if not (jwks or "").strip():
        raise Misconfigured(f"{ENV}JWKS is not set")
    try:
        leeway_s = float(leeway) if leeway not in (None, "") else 60.0
    except ValueError:
        raise Misconfigured(f"{ENV}LEEWAY: expected seconds, got {leeway!r}") from None
    if not 0 <= leeway_s <= 3600:
        raise Misconfigured(f"{ENV}LEEWAY: expected 0 to 3600 seconds, got {leeway_s}")
    algs = tuple(a.strip() for a in (algorithms or DEFAULT_ALGORITHMS).split(",") if a.strip())
    supported = get_default_algorithms()
    bad = [a for a in algs if a.lower() == "none" or a not in supported or a not in _KTY]
    if bad or not algs:
        raise Misconfigured(f"{ENV}ALGORITHMS: unsupported {', '.join(bad) or '(empty)'}")
    return Settings(issuer, auds, jwks.strip(), leeway_s, algs, role_claim or "medicon_role",
                    patients_claim or "medicon_patients", episodes_claim or "medicon_episodes")


# --- keys ---------------------------------------------------------------------------------


class JwtAuth:
    """The plugin's state for one gateway: parsed settings and key caches (a JWKS file parsed
    again only when it changes; one ``PyJWKClient`` per URL, caching its keys five minutes).
    Settings are read from the environment on each use, so a change needs no restart."""

    def __init__(self) -> None:
        self._settings: dict[tuple, Settings] = {}
        self._file_keys: dict[str, tuple[tuple[int, int], list[jwt.PyJWK]]] = {}
        self._clients: dict[str, jwt.PyJWKClient] = {}

    def settings(self, env=None) -> Settings | None:
        raw = _raw(os.environ if env is None else env)
        if not raw[0]:
            return None
        found = self._settings.get(raw)
        if found is None:
            found = self._settings[raw] = _parse(*raw)
        return found

    def _keys_from_file(self, path: str) -> list[jwt.PyJWK]:
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size)
            cached = self._file_keys.get(path)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            keys = list(jwt.PyJWKSet.from_json(Path(path).read_text()))
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            raise Misconfigured(f"{ENV}JWKS file {path}: {exc}") from None
        self._file_keys[path] = (stamp, keys)
        return keys

    def _client(self, url: str) -> jwt.PyJWKClient:
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = jwt.PyJWKClient(url, cache_jwk_set=True, lifespan=300, timeout=10)
        return client

    def _candidates(self, s: Settings, kid: str | None) -> list[jwt.PyJWK]:
        if not s.jwks_is_url:
            keys = self._keys_from_file(s.jwks)
            if kid is not None:
                keys = [k for k in keys if k.key_id == kid]
            return keys
        client = self._client(s.jwks)
        try:
            if kid is not None:
                return [client.get_signing_key(kid)]  # refetches once for an unknown kid
            return client.get_signing_keys()
        except jwt.PyJWKClientConnectionError as exc:
            log.warning("jwt_auth: cannot fetch the JWKS %s: %s", s.jwks, exc)
            raise Unavailable("the identity provider's keys are unavailable",
                              reason="identity provider keys unavailable") from None
        except jwt.PyJWKClientError:
            return []

    def key_for(self, s: Settings, kid: str | None, alg: str):
        """The public key to verify an ``alg`` token with key id ``kid``, or 401."""
        keys = [k for k in self._candidates(s, kid) if k.public_key_use in ("sig", None)]
        if kid is None and len(keys) > 1:
            raise _refuse("no key id (kid) and several keys")
        usable = []
        for k in keys:
            declared = (getattr(k, "_jwk_data", None) or {}).get("alg")
            if k.key_type != _KTY[alg] or (declared is not None and declared != alg):
                continue
            usable.append(k)
        if not usable:
            raise _refuse("unknown signing key")
        return usable[0].key

    def verify(self, token: str, s: Settings) -> Principal:
        return verify(token, s, self)

    def authenticate(self, request):
        """The principal of a JWT bearer credential, an awaitable of it, or None when the
        credential is not a JWT (or the plugin is disabled): decided without waiting."""
        token = bearer(request)
        if token is None or token.startswith(TOKEN_PREFIX):
            return None
        try:
            s = self.settings()
        except Misconfigured as exc:
            log.error("jwt_auth is misconfigured: %s", exc)
            raise Internal("bearer authentication is misconfigured", reason="jwt_auth misconfigured") from None
        if s is None:
            return None
        if s.jwks_is_url:
            # PyJWKClient fetches with blocking urllib: keep it off the event loop.
            return asyncio.to_thread(self._verify_or_internal, token, s)
        return self._verify_or_internal(token, s)

    def _verify_or_internal(self, token: str, s: Settings) -> Principal:
        try:
            return self.verify(token, s)
        except Misconfigured as exc:
            log.error("jwt_auth is misconfigured: %s", exc)
            raise Internal("bearer authentication is misconfigured", reason="jwt_auth misconfigured") from None


# --- verification ---------------------------------------------------------------------------

_REASONS = [
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not yet valid"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidIssuedAtError, "malformed iat"),
    (jwt.DecodeError, "malformed"),
]


def _reason(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing {exc.claim}"
    for cls, reason in _REASONS:
        if isinstance(exc, cls):
            return reason
    return "rejected"


def _scope(payload: dict, claim: str) -> frozenset[str] | None:
    value = payload.get(claim)
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _refuse(f"malformed {claim} claim")
    return frozenset(value)


def verify(token: str, s: Settings, keys: JwtAuth) -> Principal:
    """The principal of a valid JWT, or ``Unauthenticated`` naming why not."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise _refuse("malformed") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in s.algorithms:
        raise _refuse("algorithm not allowed")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _refuse("malformed kid")
    key = keys.key_for(s, kid, alg)
    try:
        payload = jwt.decode(
            token, key=key, algorithms=[alg], issuer=s.issuer, audience=list(s.audience),
            leeway=s.leeway,
            options={"require": ["exp", "iss", "sub", "aud"], "verify_signature": True,
                     "verify_exp": True, "verify_nbf": True, "verify_iat": True,
                     "verify_iss": True, "verify_aud": True})
    except jwt.PyJWTError as exc:
        raise _refuse(_reason(exc)) from None
    sub = payload.get("sub")
    if not isinstance(sub, str) or not sub:
        raise _refuse("malformed sub")
    role = payload.get(s.role_claim)
    if not isinstance(role, str) or role not in ROLES:
        raise _refuse(f"missing or unknown {s.role_claim} claim")
    patients = _scope(payload, s.patients_claim)
    episodes = _scope(payload, s.episodes_claim)
    if role == "patient" and (patients is None or len(patients) != 1):
        raise _refuse(f"a patient must have exactly one {s.patients_claim}")
    return Principal(id=f"jwt:{payload['iss']}#{sub}", role=role, patients=patients,
                     episodes=episodes, via="jwt", claims=payload)


@hookimpl
def medicon_startup(service):
    service.resources["jwt_auth"] = JwtAuth()


@hookimpl
def medicon_authenticate(request, service):
    return service.resources["jwt_auth"].authenticate(request)
