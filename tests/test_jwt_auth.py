"""OIDC/JWT bearer tokens: ``plugins.jwt_auth`` against keys generated here, signed with PyJWT.

Pure Python: no Kubo is involved (the request is aiohttp's own test request, given to the
plugin's state object as the gateway's hook gives it).
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import threading
import time

import jwt
import pytest
from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.utils import base64url_encode
from multidict import CIMultiDict

from gateway.errors import Internal, Unauthenticated
from plugins import jwt_auth

ISSUER = "https://idp.hospital.example/realms/medicon"
AUDIENCE = "medicon-gateway"


@pytest.fixture(scope="module")
def keys():
    return {"rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec": ec.generate_private_key(ec.SECP256R1()),
            "other": rsa.generate_private_key(public_exponent=65537, key_size=2048)}


def jwks(keys) -> dict:
    rsa_jwk = RSAAlgorithm.to_jwk(keys["rsa"].public_key(), as_dict=True) | {"kid": "rsa-1", "use": "sig"}
    ec_jwk = ECAlgorithm.to_jwk(keys["ec"].public_key(), as_dict=True) | {"kid": "ec-1", "alg": "ES256"}
    return {"keys": [rsa_jwk, ec_jwk]}


@pytest.fixture
def enabled(tmp_path, monkeypatch, keys):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(keys)))
    for name in list(os.environ):
        if name.startswith("MEDICON_JWT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MEDICON_JWT_ISSUER", ISSUER)
    monkeypatch.setenv("MEDICON_JWT_AUDIENCE", AUDIENCE)
    monkeypatch.setenv("MEDICON_JWT_JWKS", str(path))
    return path


def claims(**over) -> dict:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "dr-who", "iat": now, "nbf": now - 5,
            "exp": now + 300, "medicon_role": "clinician", "medicon_patients": ["p1", "p2"],
            "medicon_episodes": "e1"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def sign(keys, payload, *, key="rsa", alg="RS256", kid="rsa-1") -> str:
    headers = {} if kid is None else {"kid": kid}
    return jwt.encode(payload, keys[key], algorithm=alg, headers=headers)


def request(authorization):
    headers = CIMultiDict() if authorization is None else CIMultiDict(Authorization=authorization)
    return make_mocked_request("GET", "/medicon/v1/episodes", headers=headers)


@pytest.fixture(autouse=True)
def plugin():
    """The plugin's state for one gateway (``medicon_startup`` makes one per service)."""
    global STATE
    STATE = jwt_auth.JwtAuth()
    yield STATE


async def authenticate(req):
    answer = STATE.authenticate(req)
    return await answer if hasattr(answer, "__await__") else answer


async def auth(token):
    return await authenticate(request(f"Bearer {token}"))


async def refused(token) -> str:
    with pytest.raises(Unauthenticated) as err:
        await auth(token)
    assert token not in err.value.message
    assert err.value.message.startswith("invalid bearer token: ")
    return err.value.message.removeprefix("invalid bearer token: ")


async def test_valid_token_maps_claims_to_principal(enabled, keys):
    principal = await auth(sign(keys, claims()))
    assert principal.id == f"jwt:{ISSUER}#dr-who" and principal.via == "jwt"
    assert principal.role == "clinician"
    assert principal.patients == frozenset({"p1", "p2"}) and principal.episodes == frozenset({"e1"})
    assert principal.claims["sub"] == "dr-who"

    unscoped = await auth(sign(keys, claims(medicon_patients=None, medicon_episodes=None, medicon_role="auditor")))
    assert unscoped.role == "auditor" and unscoped.patients is None and unscoped.episodes is None

    es = await auth(sign(keys, claims(), key="ec", alg="ES256", kid="ec-1"))
    assert es.role == "clinician"


async def test_claim_names_are_configurable(enabled, keys, monkeypatch):
    monkeypatch.setenv("MEDICON_JWT_ROLE_CLAIM", "https://medicon.example/role")
    monkeypatch.setenv("MEDICON_JWT_PATIENTS_CLAIM", "pid")
    principal = await auth(sign(keys, claims(**{"https://medicon.example/role": "patient", "pid": "p7"})))
    assert principal.role == "patient" and principal.patients == frozenset({"p7"})


@pytest.mark.parametrize("over, reason", [
    ({"iss": "https://evil.example"}, "wrong issuer"),
    ({"aud": "another-app"}, "wrong audience"),
    ({"aud": None}, "missing aud"),
    # times as offsets from when the test runs (not from collection: the suite takes minutes)
    ({"exp": -120}, "expired"),
    ({"nbf": +120}, "not yet valid"),
    ({"iat": +120}, "not yet valid"),
    ({"exp": None}, "missing exp"),
    ({"sub": None}, "missing sub"),
    ({"medicon_role": None}, "missing or unknown medicon_role claim"),
    ({"medicon_role": "superuser"}, "missing or unknown medicon_role claim"),
    ({"medicon_role": "patient"}, "a patient must have exactly one medicon_patients"),
    ({"medicon_patients": [1, 2]}, "malformed medicon_patients claim"),
])
async def test_bad_claims_are_refused(enabled, keys, over, reason):
    now = int(time.time())
    over = {k: now + v if k in ("exp", "nbf", "iat") and isinstance(v, int) else v for k, v in over.items()}
    assert await refused(sign(keys, claims(**over))) == reason


async def test_clock_skew_within_leeway_is_accepted(enabled, keys, monkeypatch):
    now = int(time.time())
    token = sign(keys, claims(exp=now - 30, nbf=now + 30, iat=now + 30))
    assert (await auth(token)).role == "clinician"  # default leeway 60 s
    monkeypatch.setenv("MEDICON_JWT_LEEWAY", "10")
    assert await refused(token) == "not yet valid"
    assert await refused(sign(keys, claims(exp=now - 30))) == "expired"


async def test_bad_signature_is_refused(enabled, keys):
    assert await refused(sign(keys, claims(), key="other")) == "bad signature"
    good = sign(keys, claims())
    head, body, sig = good.split(".")
    tampered = sign(keys, claims(medicon_role="admin")).split(".")[1]
    assert await refused(f"{head}.{tampered}.{sig}") == "bad signature"


async def test_alg_none_and_algorithm_confusion_are_refused(enabled, keys, monkeypatch):
    unsigned = jwt.encode(claims(), None, algorithm="none", headers={"kid": "rsa-1"})
    assert await refused(unsigned) == "algorithm not allowed"
    # HS256 keyed with the RSA public key (the classic confusion attack)
    pem = keys["rsa"].public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    header = base64url_encode(json.dumps({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}).encode())
    payload = base64url_encode(json.dumps(claims()).encode())
    mac = hmac.new(pem, header + b"." + payload, hashlib.sha256).digest()
    forged = b".".join([header, payload, base64url_encode(mac)]).decode()
    assert await refused(forged) == "algorithm not allowed"
    # even when HS256 is allowed, an RSA key never verifies an HMAC
    monkeypatch.setenv("MEDICON_JWT_ALGORITHMS", "RS256,HS256,ES256,ES384")
    assert await refused(forged) == "unknown signing key"
    # a key declared ES256 is not used for another algorithm
    p384 = {"p384": ec.generate_private_key(ec.SECP384R1())}
    assert await refused(sign(p384, claims(), key="p384", alg="ES384", kid="ec-1")) == "unknown signing key"


async def test_key_selection(enabled, keys):
    assert await refused(sign(keys, claims(), kid="unknown-kid")) == "unknown signing key"
    assert await refused(sign(keys, claims(), kid=None)) == "no key id (kid) and several keys"
    assert await refused(sign(keys, claims(), key="rsa", alg="RS256", kid="ec-1")) == "unknown signing key"
    assert await refused("not.a.jwt") == "malformed"
    assert await refused("garbage") == "malformed"


async def test_single_key_file_without_kid_and_key_rotation(enabled, keys):
    only_rsa = {"keys": [RSAAlgorithm.to_jwk(keys["rsa"].public_key(), as_dict=True)]}
    enabled.write_text(json.dumps(only_rsa))
    assert (await auth(sign(keys, claims(), kid=None))).role == "clinician"
    # the file is re-read when it changes: rotate to the other key
    rotated = {"keys": [RSAAlgorithm.to_jwk(keys["other"].public_key(), as_dict=True)]}
    enabled.write_text(json.dumps(rotated) + " " * 10)
    assert await refused(sign(keys, claims(), kid=None)) == "bad signature"
    assert (await auth(sign(keys, claims(), key="other", kid=None))).role == "clinician"


async def test_disabled_without_issuer_and_mdc_tokens_left_alone(enabled, keys, monkeypatch):
    token = sign(keys, claims())
    assert await authenticate(request("Bearer mdc_" + "A" * 43)) is None
    assert await authenticate(request(None)) is None
    assert await authenticate(request("Basic dXNlcjpwYXNz")) is None
    monkeypatch.delenv("MEDICON_JWT_ISSUER")
    assert await auth(token) is None
    assert await auth("garbage") is None


async def test_misconfiguration_is_a_500_without_details(enabled, keys, monkeypatch):
    monkeypatch.delenv("MEDICON_JWT_AUDIENCE")
    with pytest.raises(Internal) as err:
        await auth(sign(keys, claims()))
    assert "AUDIENCE" not in err.value.message
    monkeypatch.setenv("MEDICON_JWT_AUDIENCE", AUDIENCE)
    monkeypatch.setenv("MEDICON_JWT_ALGORITHMS", "RS256,none")
    with pytest.raises(Internal):
        await auth(sign(keys, claims()))


async def test_jwks_from_a_url(enabled, keys, monkeypatch):
    body = json.dumps(jwks(keys)).encode()
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("MEDICON_JWT_JWKS", f"http://127.0.0.1:{server.server_address[1]}/jwks.json")
        assert (await auth(sign(keys, claims()))).role == "clinician"
        assert (await auth(sign(keys, claims(), key="ec", alg="ES256", kid="ec-1"))).role == "clinician"
        assert await refused(sign(keys, claims(), key="other")) == "bad signature"
        assert len(hits) == 1  # cached
    finally:
        server.shutdown()
        server.server_close()
