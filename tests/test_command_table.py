"""The command table decides what reaches Kubo; these tests pin that surface down."""

from __future__ import annotations

import subprocess

import pytest

from gateway.http.commands import COMMANDS, Action, resolve
from gateway.kubo.node import find_binary
from gateway.errors import Invalid
from gateway.http.commands import COMMANDS as TABLE
from gateway.http.rpccall import parse_call
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


def call(command: str, query: str, path_arg: str | None = None):
    return parse_call(command, TABLE[command], path_arg, query)


def test_upstream_query_is_rebuilt_from_what_was_parsed():
    """Canonical names, normalised values, the path argument first, credentials and CLI-only
    options dropped: Kubo never sees the client's query string as sent."""
    parsed = call("add", "w=True&api-auth=bearer%3Asecret&cid-version=0x1&pin=FALSE&r=true&Q")
    assert parsed.upstream_query() == "wrap-with-directory=true&cid-version=1&pin=false"
    assert call("cat", "arg=b&p=true&o=010", "a b/c").upstream_query() == (
        "arg=a%20b%2Fc&arg=b&progress=true&offset=8")  # Go reads a leading 0 as octal
    assert call("cat", "arg=%2Fipfs%2Fx%2Flab+report.txt").args == ["/ipfs/x/lab report.txt"]


@pytest.mark.parametrize("command, query, why", [
    ("add", "to-files=%2Fname", "unknown option 'to-files'"),
    ("add", "nocopy=true", "only false is accepted"),
    ("add", "fscache=1", "only false is accepted"),
    ("add", "fast-provide-root=true", "only false is accepted"),
    ("pin/add", "arg=x&fast-provide-dag", "only false is accepted"),
    ("cat", "headers=%5Bobject+Object%5D", "unknown option 'headers'"),
    ("cat", "Offset=1", "unknown option 'Offset'"),          # names are case-sensitive, as in Kubo
    ("cat", "arg=x&offset=1.5", "int64"),
    ("cat", "arg=x&offset=9223372036854775808", "int64"),
    ("cat", "arg=x&offset=1&o=2", "given twice"),            # Kubo would pick one at random
    ("cat", "arg=x&offset=1&offset=2", "given 2 times"),
    ("cat", "arg=x&progress=yes", "boolean"),
    ("cat", "arg=x&timeout=soon", "duration"),
    ("cat", "arg=x&timeout=0s", "duration"),                 # Kubo: an empty 200
    ("cat", "arg=x&encoding=xml", "one of json"),
    ("cat", "arg=%zz", "percent-encoding"),
    ("cat", "arg=%ff", "not UTF-8"),
    ("cat", "", "needs an argument"),
    ("get", "arg=a&arg=b", "takes one argument"),
    ("version", "arg=a", "takes no arguments"),
    ("add", "arg=a", "takes no arguments"),
    ("pin/update", "arg=a", "needs 2 arguments"),
])
def test_options_and_arguments_outside_the_table_are_refused(command, query, why):
    with pytest.raises(Invalid, match=why):
        call(command, query)


# Options kubo-rpc-client sends that Kubo ignores: accepted (typed) and dropped.
CLIENT_EXTRAS = {"block/get": {"path", "localResolve"}, "dag/resolve": {"path"}, "pin/add": {"stream", "metadata"},
                 "pin/ls": {"paths"}}


def test_every_option_in_the_table_is_one_kubo_documents(kubo_commands):
    """An option in the table that this Kubo does not know would be a typo passed on silently:
    each name and alias must appear in the command's own ``--help``."""
    binary = str(find_binary())
    for name, entry in TABLE.items():
        if entry.action is Action.REFUSE:
            continue
        assert name in kubo_commands, name
        words = name.split("/")  # options of a parent command apply to its subcommands too
        text = "".join(subprocess.run([binary, *words[:n], "--help"], capture_output=True, text=True).stdout
                       for n in range(1, len(words) + 1))
        for option in entry.options.values():
            if name in CLIENT_EXTRAS and option.name in CLIENT_EXTRAS[name]:
                continue
            for spelled in (option.name, *option.aliases):
                dashes = "--" if len(spelled) > 1 else "-"
                assert f"{dashes}{spelled}" in text, f"{name}: {spelled}"


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
