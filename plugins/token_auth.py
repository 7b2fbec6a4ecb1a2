"""Authentication by API token (``gateway.security.tokens``): ``Authorization: Bearer mdc_…``
or ``Authorization: Basic base64(name:mdc_…)``.

The Kubo CLI sends ``--api-auth bearer:<token>`` as ``Bearer <token>`` and
``--api-auth basic:<user>:<password>`` as Basic; with Basic the password is the token and the
user name is ignored. Only values of the token format (``mdc_`` prefix) are judged here:
anything else is left to other plugins (JWT), and a bad ``mdc_`` token is refused outright with
401, its reason (malformed, unknown, revoked, expired) going to the audit log. Tokens live in
the gateway's token store (``service.storage.tokens``); they are never logged.
"""

from __future__ import annotations

import logging

from gateway.errors import Unauthenticated
from gateway.hookspecs import hookimpl
from gateway.http.credentials import authorization, secret
from gateway.security.tokens import looks_like_token

log = logging.getLogger(__name__)

UNAUTHORIZED = "invalid or revoked token"


async def _check(service, token: str):
    result = await service.storage.tokens.check(token)
    if result.principal is None:
        log.info("token refused: %s%s", result.reason,
                 f" (token id {result.token_id})" if result.token_id else "")
        # The client learns no more than "invalid or revoked"; the audit log gets the reason.
        raise Unauthenticated(UNAUTHORIZED, reason=result.reason)
    return result.principal


@hookimpl
def medicon_authenticate(request, service):
    """Decided synchronously whether the credential is ours (an ``mdc_`` token); only then
    the store is asked, so a JWT goes on to ``jwt_auth``."""
    header = authorization(request)
    if header is None:
        return None
    token = secret(header)
    if token is None or not looks_like_token(token):
        return None  # not ours: another plugin (JWT) may know it
    return _check(service, token)
