"""Authentication by API token (``gateway.tokens``): ``Authorization: Bearer mdc_…`` or
``Authorization: Basic base64(name:mdc_…)``.

The Kubo CLI sends ``--api-auth bearer:<token>`` as ``Bearer <token>`` and
``--api-auth basic:<user>:<password>`` as Basic; with Basic the password is the token and the
user name is ignored (it is informational, and never trusted). Only values of the token format
(``mdc_`` prefix) are judged here: anything else is left to other plugins (JWT), and a bad
``mdc_`` token is refused outright with 401, its reason (malformed, unknown, revoked, expired)
going to the audit log. Tokens are never logged.
"""

from __future__ import annotations

import base64
import binascii
import logging

from gateway.appkeys import CONFIG
from gateway.errors import GatewayError
from gateway.hookspecs import hookimpl
from gateway.tokens import TokenStore, looks_like_token, token_path

log = logging.getLogger(__name__)

# One store per data dir (normally exactly one), opened on first use.
_STORES: dict[str, TokenStore] = {}

UNAUTHORIZED = "invalid or revoked token"


def store_for(data_dir: str) -> TokenStore:
    store = _STORES.get(data_dir)
    if store is None:
        store = _STORES[data_dir] = TokenStore(token_path(data_dir))
    return store


def authorization(request) -> str | None:
    """The request's single Authorization header, or None; 401 if it was sent twice."""
    headers = request.headers
    getall = getattr(headers, "getall", None)
    values = getall("Authorization", []) if getall is not None else (
        [headers["Authorization"]] if "Authorization" in headers else [])
    if not values:
        return None
    if len(values) > 1:
        raise GatewayError(401, "more than one Authorization header", reason="several Authorization headers",
                           headers={"WWW-Authenticate": 'Bearer realm="medicon"'})
    return values[0]


def credential(header: str) -> str | None:
    """The token candidate in an Authorization header value (Bearer, or Basic's password),
    or None when the scheme is neither or the value is not decodable."""
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    scheme = scheme.lower()
    if scheme == "bearer":
        return value or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return None
        _user, sep, password = decoded.partition(":")
        return password if sep and password else None
    return None


@hookimpl
def medicon_authenticate(request):
    header = authorization(request)
    if header is None:
        return None
    token = credential(header)
    if token is None or not looks_like_token(token):
        return None  # not ours: another plugin (JWT) may know it
    result = store_for(request.app[CONFIG].records.data_dir).check(token)
    if result.principal is None:
        log.info("token refused: %s%s", result.reason,
                 f" (token id {result.token_id})" if result.token_id else "")
        # The client learns no more than "invalid or revoked"; the audit log gets the reason.
        raise GatewayError(401, UNAUTHORIZED, headers={"WWW-Authenticate": 'Bearer realm="medicon"'},
                           reason=result.reason)
    return result.principal
