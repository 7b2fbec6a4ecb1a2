"""API tokens: the SQLite store, the ``token_auth`` plugin and the ``medicon-gateway token`` CLI.

No Kubo is involved: the plugin is given aiohttp's own test request and a real record service
(which never calls Kubo here).
"""

from __future__ import annotations

import base64
import os
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from conftest import BlockingTokens as TokenStore, token_path
from gateway.config import load_config
from gateway.core.plugins import PluginHost, make_manager
from gateway.core.service import RecordService
from gateway.errors import Unauthenticated
from gateway.security.keyring import LocalKeyring
from gateway.security.principal import Principal
from gateway.security.tokens import TokenError, decode_token, parse_duration
from plugins import token_auth

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path):
    with TokenStore(token_path(tmp_path)) as s:
        yield s


# --- the store ------------------------------------------------------------------------------

def test_create_then_authenticate_gives_scoped_principal(store):
    token, info = store.create("ward-7", "clinician", patients=["p1", "p2"], episodes=["e1"])
    assert info.name == "ward-7" and info.id.startswith("tok_") and info.role == "clinician"
    principal = store.authenticate(token)
    assert principal == Principal(id="token:ward-7", role="clinician", patients=frozenset({"p1", "p2"}),
                                  episodes=frozenset({"e1"}), via="token")
    assert principal.claims["token_id"] == info.id

    token2, _ = store.create("backup", "replicator")
    everything = store.authenticate(token2)
    assert everything.role == "replicator" and everything.patients is None and everything.episodes is None


def test_token_has_256_random_bits(store):
    token, _ = store.create("a", "admin")
    assert token.startswith("mdc_")
    raw = base64.urlsafe_b64decode(token[4:] + "=" * (-len(token[4:]) % 4))
    assert len(raw) == 32
    assert decode_token(token) == raw
    others = {store.create(f"t{i}", "admin")[0] for i in range(20)}
    assert len(others) == 20 and token not in others


def test_database_holds_no_plaintext(tmp_path):
    path = token_path(tmp_path)
    with TokenStore(path) as s:
        token, _ = s.create("secret-holder", "admin")
        assert s.authenticate(token) is not None
    body = token[4:]
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("tokens.sqlite3"))
    assert token.encode() not in data
    assert body.encode() not in data
    assert base64.urlsafe_b64decode(body + "=") not in data  # not the raw bytes either
    hashes = [r[0] for r in sqlite3.connect(path).execute("SELECT token_hash FROM tokens")]
    assert len(hashes) == 1 and len(hashes[0]) == 64 and body not in hashes[0]


def test_list_never_exposes_secrets(store):
    token, info = store.create("lab-robot", "lab", expires_in=timedelta(days=30))
    listed = store.list()
    assert [i.id for i in listed] == [info.id]
    text = repr(listed) + repr([i.to_dict() for i in listed])
    assert token not in text and token[4:] not in text
    assert "hash" not in text
    assert listed[0].expires_at is not None and listed[0].status() == "active"


def test_revoke_takes_effect_at_once_in_every_store_on_the_file(tmp_path):
    path = token_path(tmp_path)
    a, b = TokenStore(path), TokenStore(path)
    try:
        token, info = a.create("ci", "lab")
        assert b.authenticate(token) is not None  # another "process" sees it
        assert b.revoke("ci") is True
        assert a.authenticate(token) is None
        assert a.check(token).reason == "revoked"
        assert TokenStore(path).authenticate(token) is None
        assert a.revoke("ci") is False and a.revoke(info.id) is False  # already revoked
        # the name can be given to a replacement; revoke by id works too
        token2, info2 = a.create("ci", "lab")
        assert b.authenticate(token2).id == "token:ci"
        assert b.revoke(info2.id) is True and a.authenticate(token2) is None
        assert a.revoke("nope") is False
    finally:
        a.close()
        b.close()


def test_live_names_are_unique(store):
    store.create("svc", "admin")
    with pytest.raises(TokenError, match="exists"):
        store.create("svc", "lab")


def test_expiry_is_honoured(tmp_path):
    clock = Clock()
    with TokenStore(token_path(tmp_path), clock=clock) as s:
        token, info = s.create("short", "auditor", expires_in=timedelta(seconds=30))
        assert s.authenticate(token) is not None
        clock.now += 29
        assert s.authenticate(token) is not None
        clock.now += 1
        assert s.authenticate(token) is None
        assert s.check(token).reason == "expired"


def test_unknown_and_malformed_tokens(store):
    store.create("x", "admin")
    forged = "mdc_" + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    assert store.authenticate(forged) is None and store.check(forged).reason == "unknown"
    for bad in ("mdc_", "mdc_short", "mdc_" + "A" * 44, "nope", ""):
        assert store.check(bad).reason == "malformed"


def test_patient_token_needs_exactly_one_patient(store):
    for patients in (None, ["p1", "p2"]):
        with pytest.raises(TokenError, match="exactly one patient"):
            store.create("me", "patient", patients=patients)
    token, _ = store.create("me", "patient", patients=["p1"])
    assert store.authenticate(token).patients == frozenset({"p1"})


@pytest.mark.parametrize("kwargs, match", [
    ({"role": "root"}, "unknown role"),
    ({"role": "admin", "patients": []}, "empty"),
    ({"role": "admin", "episodes": [""]}, "non-empty"),
    ({"role": "admin", "expires_in": timedelta(0)}, "positive"),
])
def test_create_refuses_bad_input(store, kwargs, match):
    with pytest.raises(TokenError, match=match):
        store.create("n", **kwargs)
    for name in ("", "has space", "tok_0123abcd", "x" * 200):
        with pytest.raises(TokenError, match="invalid token name"):
            store.create(name, "admin")


def test_parse_duration():
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("3600s") == parse_duration("3600") == timedelta(hours=1)
    for bad in ("", "0s", "1y", "-5m", "h"):
        with pytest.raises(TokenError):
            parse_duration(bad)


# --- the plugin -----------------------------------------------------------------------------

@pytest.fixture
async def service(tmp_path):
    LocalKeyring.init(tmp_path / "keyring.json")
    async with RecordService.open(load_config(env={}, overrides={"records.data_dir": str(tmp_path)})) as s:
        yield s


def request(authorization=None, *more):
    headers = [] if authorization is None else [("Authorization", authorization)]
    headers += [("Authorization", h) for h in more]
    return make_mocked_request("POST", "/api/v0/version", headers=CIMultiDict(headers))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def authenticate(service, *headers):
    """The plugin's answer: None (not its credential), or the principal it awaits."""
    answer = token_auth.medicon_authenticate(request(*headers), service)
    return None if answer is None else await answer


async def test_plugin_accepts_bearer_and_basic(service):
    token, _ = await service.storage.tokens.create("kubo-cli", "clinician", patients=["p9"])
    for header in (f"Bearer {token}", f"bearer   {token} ", basic("kubo-cli", token), basic("", token),
                   basic("someone-else", token)):
        principal = await authenticate(service, header)
        assert principal.id == "token:kubo-cli" and principal.via == "token"
        assert principal.role == "clinician" and principal.patients == frozenset({"p9"})


async def test_plugin_refuses_bad_mdc_tokens_with_401(service):
    token, _ = await service.storage.tokens.create("gone", "admin")
    await service.storage.tokens.revoke("gone")
    forged = "mdc_" + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    for header in (f"Bearer {token}", basic("gone", token), f"Bearer {forged}", "Bearer mdc_garbage"):
        with pytest.raises(Unauthenticated) as err:
            await authenticate(service, header)
        assert err.value.message == "invalid or revoked token"
        assert token not in str(err.value) and forged not in str(err.value)


async def test_plugin_leaves_other_credentials_to_other_plugins(service):
    for header in (None, "Bearer eyJhbGciOiJSUzI1NiJ9.e30.sig", basic("u", "password"), "Basic !!!",
                   "Digest username=x", "Bearer", ""):
        assert await authenticate(service, header) is None


async def test_plugin_refuses_two_authorization_headers(service):
    token, _ = await service.storage.tokens.create("x", "admin")
    with pytest.raises(Unauthenticated):
        await authenticate(service, f"Bearer {token}", "Bearer other")


async def test_plugin_is_registered_through_the_entry_point(service):
    pm = make_manager()
    assert pm.has_plugin("token_auth") and pm.has_plugin("jwt_auth")
    token, _ = await service.storage.tokens.create("via-pm", "auditor")
    host = PluginHost(pm)
    await host.call("medicon_startup", service=service)  # jwt_auth's state, as the gateway opens it
    principal = await host.call("medicon_authenticate", request=request(f"Bearer {token}"), service=service)
    assert principal.id == "token:via-pm"


# --- the CLI --------------------------------------------------------------------------------

def cli(*args, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MEDICON_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "gateway", "token", *args], capture_output=True,
                          text=True, cwd=ROOT, env=full_env, timeout=60)


def test_cli_create_list_revoke(tmp_path):
    data = str(tmp_path / "data")
    out = cli("create", "ops", "--role", "clinician", "--patient", "p1", "--patient", "p2",
              "--expires-in", "12h", "--data-dir", data)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("MEDICON_TOKEN=mdc_")
    token = lines[0].split("=", 1)[1]
    assert token not in out.stderr and "ops" in out.stderr
    with TokenStore(token_path(data)) as s:
        assert s.authenticate(token).patients == frozenset({"p1", "p2"})

    listed = cli("list", "--data-dir", data)
    assert listed.returncode == 0, listed.stderr
    assert "ops" in listed.stdout and "clinician" in listed.stdout and "patients=p1,p2" in listed.stdout
    assert token not in listed.stdout + listed.stderr and token[4:] not in listed.stdout
    as_json = cli("list", "--json", "--data-dir", data)
    assert '"name": "ops"' in as_json.stdout and token[4:] not in as_json.stdout

    # the data dir can also come from the config's environment, and --data-dir before the action
    env_listed = cli("list", env={"MEDICON_RECORDS_DATA_DIR": data})
    assert "ops" in env_listed.stdout
    assert "ops" in cli("--data-dir", data, "list").stdout

    revoked = cli("revoke", "ops", "--data-dir", data)
    assert revoked.returncode == 0, revoked.stderr
    with TokenStore(token_path(data)) as s:
        assert s.authenticate(token) is None
    assert cli("revoke", "ops", "--data-dir", data).returncode == 1
    assert "no live token" in cli("revoke", "ops", "--data-dir", data).stderr


def test_cli_refuses_patient_token_without_one_patient(tmp_path):
    out = cli("create", "me", "--role", "patient", "--data-dir", str(tmp_path))
    assert out.returncode == 2 and out.stdout == ""
    assert "exactly one patient" in out.stderr
