"""Reading credentials off a request, for authentication plugins (``token_auth``, ``jwt_auth``,
an institution's own): one ``Authorization`` header, its scheme and its secret."""

from __future__ import annotations

import base64
import binascii

from aiohttp import web

from ..errors import Unauthenticated


def authorization(request: web.BaseRequest) -> str | None:
    """The request's single Authorization header, or None; refused if it was sent twice (which
    one a proxy or a plugin would read is anybody's guess)."""
    values = request.headers.getall("Authorization", [])
    if not values:
        return None
    if len(values) > 1:
        raise Unauthenticated("more than one Authorization header", reason="several Authorization headers")
    return values[0]


def bearer(request: web.BaseRequest) -> str | None:
    """The value of a ``Bearer`` credential, or None for any other (or no) scheme."""
    header = authorization(request)
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def secret(header: str) -> str | None:
    """The secret in an Authorization header value (Bearer's value, or Basic's password: the
    user name is informational and never trusted), or None when the scheme is neither or the
    value is not decodable."""
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
