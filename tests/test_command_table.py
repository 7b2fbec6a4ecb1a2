"""The command table decides what reaches Kubo; these tests pin that surface down."""

from __future__ import annotations

import subprocess

import pytest

from gateway.http.commands import COMMANDS, Action, resolve
from gateway.kubo.node import find_binary
from gateway.http.proxy import upstream_query
from conftest import app_client, gateway_config


@pytest.fixture(scope="module")
def kubo_commands() -> set[str]:
    """Every command this Kubo release has, as ``ipfs commands`` lists it."""
    out = subprocess.run([str(find_binary()), "commands"], capture_output=True, text=True, check=True)
    return {line.removeprefix("ipfs ").strip().replace(" ", "/") for line in out.stdout.splitlines()
            if line.startswith("ipfs ")}


def test_every_forwarded_command_exists_in_kubo(kubo_commands):
    forwarded = {name for name, rule in COMMANDS.items() if rule.action is not Action.REFUSE}
    assert forwarded - kubo_commands == set()


def test_every_kubo_command_is_classified_under_its_own_name(kubo_commands):
    """No Kubo command may fall through to its parent as a path argument (``version/deps``
    forwarded as ``version``); each is forwarded by name or refused."""
    for name in sorted(kubo_commands):
        got = resolve(name)
        if got.entry.action is not Action.REFUSE:
            assert (got.command, got.path_arg) == (name, None), name


@pytest.mark.parametrize("raw, command, action, arg", [
    ("cat", "cat", Action.INTERCEPT, None),
    ("cat/QmX", "cat", Action.INTERCEPT, "QmX"),
    ("ls/QmX", "ls", Action.FORWARD, "QmX"),
    ("dag/get/bafyX", "dag/get", Action.FORWARD, "bafyX"),
    ("config/show", "config", Action.REFUSE, None),
    ("key/gen/name", "key", Action.REFUSE, None),
    ("pin/remote/service/add", "pin/remote", Action.REFUSE, None),
    ("refs/local", "refs/local", Action.REFUSE, None),
    ("name/publish", "name/publish", Action.REFUSE, None),
    ("./cat/../config/show", "config", Action.REFUSE, None),
    ("cat/x/y", "cat/x/y", Action.REFUSE, None),
    ("nonsense", "nonsense", Action.REFUSE, None),
    ("", "", Action.REFUSE, None),
])
def test_resolve(raw, command, action, arg):
    got = resolve(raw)
    assert (got.command, got.entry.action, got.path_arg) == (command, action, arg)


def test_query_passes_unchanged_but_credentials():
    q = "arg=a&arg=b&cid-version=1&wrap-with-directory=True&api-auth=bearer%3Asecret&pin=false"
    assert upstream_query(q, None) == "arg=a&arg=b&cid-version=1&wrap-with-directory=True&pin=false"
    assert upstream_query("arg=b&p=true", "a b/c") == "arg=a%20b%2Fc&arg=b&p=true"


REFUSED = sorted(name for name, rule in COMMANDS.items() if rule.action is Action.REFUSE)


async def test_every_refused_command_answers_403_in_kubo_shape(client, kubo_commands):
    probes = set(REFUSED) | {c for c in kubo_commands if resolve(c).entry.action is Action.REFUSE}
    probes |= {"definitely/not/a/command", "config/show", "key/gen", "repo/gc", "diag/sys"}
    for name in sorted(probes):
        r = await client.post(f"/api/v0/{name}?arg=x")
        assert r.status == 403, name
        body = await r.json()
        assert set(body) == {"Message", "Code", "Type"}, name
        assert body["Type"] == "error" and body["Code"] == 4, name
        assert "refused by the gateway" in body["Message"], name


async def test_refusal_never_reaches_kubo(client, kubo):
    before = kubo.ipfs("config", "Addresses.API").stdout
    r = await client.post("/api/v0/config?arg=Addresses.API&arg=/ip4/0.0.0.0/tcp/5001")
    assert r.status == 403
    assert kubo.ipfs("config", "Addresses.API").stdout == before


async def test_rpc_takes_post_only(client):
    r = await client.get("/api/v0/version")
    assert r.status == 405
    assert r.headers["Allow"] == "POST"
    assert (await r.json())["Type"] == "error"


@pytest.mark.parametrize("path", ["/debug/pprof/", "/debug/vars", "/debug/metrics/prometheus", "/logs",
                                  "/webui", "/api/v1/anything", "/"])
async def test_kubo_debug_endpoints_are_not_reachable(client, path):
    r = await client.get(path)
    assert r.status == 404
    assert (await r.json())["Type"] == "error"


async def test_csrf_foreign_origin_refused(client):
    r = await client.post("/api/v0/version", headers={"Origin": "https://evil.example"})
    assert r.status == 403 and "origin" in (await r.json())["Message"]
    r = await client.post("/api/v0/version", headers={"Referer": "https://evil.example/page"})
    assert r.status == 403
    r = await client.post("/api/v0/version", headers={"User-Agent": "Mozilla/5.0 (X11)"})
    assert r.status == 403


async def test_csrf_allowed_origin_reaches_kubo(aiohttp_client, kubo):
    """Kubo would refuse this Origin (not its own port); the gateway checks it and strips it."""
    from gateway.http.app import create_app
    cfg = gateway_config(kubo, **{"server.allowed_origins": ["https://ehr.example"]})
    c = await app_client(aiohttp_client, cfg)
    r = await c.post("/api/v0/version", headers={"Origin": "https://ehr.example",
                                                 "User-Agent": "Mozilla/5.0"})
    assert r.status == 200 and "Version" in await r.json()


def test_table_documents_every_rule():
    for name, rule in COMMANDS.items():
        assert rule.why, name
