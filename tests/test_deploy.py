"""Checks of the deployment files in deploy/: Kubo's RPC API must never be reachable except
through medicon-gateway.

The tests parse the files (Compose and Kubernetes YAML, TOML, systemd units, the Dockerfile)
and need neither Kubo nor the network. The exceptions run scripts for real: kubo-harden.sh
against the Kubo binary in .tools/bin/ipfs, which `make setup` installs, and
medicon-entrypoint.sh with this virtualenv's medicon-gateway on PATH (keyring creation, and
the gateway it then starts).

Second concern: the gateway must be able to start from these files, i.e. every flavour has a
persistent, writable records.data_dir and creates the keyring there exactly once, and no
keyring or token is ever part of a deploy file.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from SystemdUnitParser import SystemdUnitParser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
IPFS_BIN = Path(__file__).parents[1] / ".tools/bin/ipfs"

KUBO_PORTS = {5001, 8080}  # Kubo RPC API and HTTP gateway: never published, never declared
GATEWAY_PORT = 5080
SWARM_PORT = 4001  # libp2p, may be published
KUBO_IMAGE = "ipfs/kubo:v0.42.0"
CONFIG_PATH = "/etc/medicon/gateway.toml"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
LOOPBACK_API = re.compile(r"^/ip4/127\.0\.0\.1/tcp/\d+$")
DATA_DIR = "/var/lib/medicon-gateway"  # records.data_dir in every flavour
ENTRYPOINT = DEPLOY / "medicon-entrypoint.sh"
VENV_BIN = Path(sys.executable).parent  # the medicon-gateway of the virtualenv running the tests

if str(ROOT) not in sys.path:  # import the gateway package from this checkout
    sys.path.insert(0, str(ROOT))


def load_config(path: Path, env: dict[str, str] | None = None):
    from gateway.config import load_config as _load

    return _load(path, env={} if env is None else env)


def parse_duration(value: Any) -> float:
    """Seconds in a Compose ("1m30s") or systemd ("40s", "1min 30s", "40") duration."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|min|sec|hr|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"unparsable duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def url_host(url: str) -> str | None:
    return urlsplit(url).hostname


# --------------------------------------------------------------------------- Compose


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _interpolate(text: str) -> str:
    """Replace ${VAR}, ${VAR:-default} and ${VAR-default} with the default (or nothing)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?]([^}]*))?\}", lambda m: m.group(1) or "", text)


def _port_range(text: str) -> set[int]:
    low, _, high = text.partition("-")
    return set(range(int(low), int(high or low) + 1))


def compose_port(entry: Any) -> tuple[set[int], set[int] | None]:
    """(container ports, host ports or None for a random host port) of one `ports:` entry."""
    if isinstance(entry, int):
        return {entry}, None
    if isinstance(entry, dict):
        published = entry.get("published")
        host = _port_range(_interpolate(str(published))) if published not in (None, "") else None
        return _port_range(_interpolate(str(entry["target"]))), host
    spec = _interpolate(str(entry)).split("/")[0]
    if spec.startswith("["):  # "[::1]:5080:5080"
        spec = spec[spec.index("]") + 2:]
    parts = spec.rsplit(":", 2)
    target = _port_range(parts[-1])
    host_part = parts[-2] if len(parts) >= 2 else ""
    return target, (_port_range(host_part) if host_part else None)


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _interpolate(str(v)) for k, v in env.items()}


def test_compose_publishes_no_kubo_port_anywhere():
    services = compose()["services"]
    assert services, "no services in docker-compose.yml"
    for name, service in services.items():
        for entry in service.get("ports") or []:
            targets, hosts = compose_port(entry)
            assert not targets & KUBO_PORTS, f"{name}: publishes container port {entry!r}"
            assert not (hosts or set()) & KUBO_PORTS, f"{name}: publishes host port {entry!r}"
        for entry in service.get("expose") or []:
            assert not _port_range(str(entry).split("/")[0]) & KUBO_PORTS, f"{name}: expose {entry!r}"
        # Host networking would put Kubo's loopback listeners on the host's loopback.
        assert service.get("network_mode") != "host", f"{name}: network_mode host"


def test_compose_gateway_is_a_sidecar_in_kubo_network_namespace():
    services = compose()["services"]
    gateway = services["gateway"]
    assert gateway.get("network_mode") == "service:kubo"
    assert "ports" not in gateway, "a service with network_mode service:kubo cannot publish ports"
    assert "networks" not in gateway
    assert services["kubo"]["image"] == KUBO_IMAGE


def test_compose_only_gateway_port_is_published():
    services = compose()["services"]
    published: dict[int, str] = {}
    for name, service in services.items():
        for entry in service.get("ports") or []:
            targets, hosts = compose_port(entry)
            assert targets <= {GATEWAY_PORT, SWARM_PORT}, f"{name}: unexpected published port {entry!r}"
            for port in targets:
                published[port] = name
            if GATEWAY_PORT in targets:
                assert hosts, f"{name}: gateway port {entry!r} needs a fixed host port"
    # network_mode "service:kubo": the gateway's port has to be published on the kubo service.
    assert published.get(GATEWAY_PORT) == "kubo", published


def test_compose_kubo_runs_harden_script_before_daemon():
    kubo = compose()["services"]["kubo"]
    mounts = [str(v).split(":") for v in kubo.get("volumes") or []]
    hooks = [m for m in mounts if len(m) >= 2 and m[1].startswith("/container-init.d/")]
    assert hooks, "kubo-harden.sh is not mounted in /container-init.d/"
    source, target = hooks[0][0], hooks[0][1]
    assert target.endswith(".sh"), "the image only runs /container-init.d/*.sh"
    assert (DEPLOY / source).resolve() == (DEPLOY / "kubo-harden.sh").resolve()
    assert any(len(m) >= 2 and m[1] == "/data/ipfs" for m in mounts), "no volume for the Kubo repo"
    # Not executable, the image would source it into its own shell instead of running it.
    assert os.access(DEPLOY / "kubo-harden.sh", os.X_OK), "chmod +x deploy/kubo-harden.sh"


def test_compose_gateway_config_env_and_healthcheck():
    services = compose()["services"]
    gateway = services["gateway"]
    env = compose_env(gateway)
    assert env.get("MEDICON_SERVER_HOST") == "0.0.0.0"
    # Every MEDICON_* variable must be a real config key, and the result must still point at
    # Kubo over loopback.
    config = load_config(DEPLOY / "gateway.toml", env=env)
    assert url_host(config.kubo.api_url) in LOOPBACK_HOSTS
    assert url_host(config.kubo.gateway_url) in LOOPBACK_HOSTS
    assert any(config.server.port in compose_port(p)[0] for p in services["kubo"]["ports"])
    assert any(v.split(":")[1] == CONFIG_PATH for v in map(str, gateway.get("volumes") or []))
    assert "/readyz" in " ".join(map(str, gateway["healthcheck"]["test"]))
    assert parse_duration(gateway["stop_grace_period"]) > config.server.shutdown_timeout
    build = gateway["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert (DEPLOY / build["context"] / "pyproject.toml").resolve().parent == ROOT


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, comments left out (``dockerfile-parse``)."""
    parsed = DockerfileParser(path=str(DEPLOY / "Dockerfile"))
    return [(item["instruction"], " ".join(item["value"].split())) for item in parsed.structure
            if item["instruction"] != "COMMENT"]


def test_dockerfile_runs_gateway_as_non_root():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [args for kw, args in instructions if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(kw == "RUN" and re.search(r"pip install (\S+ )*\.(\s|$)", args) for kw, args in instructions)
    cmds = [json.loads(args) for kw, args in instructions if kw == "CMD"]
    assert cmds[-1] == ["medicon-gateway", "serve", "--config", CONFIG_PATH]
    exposed = {p.split("/")[0] for kw, args in instructions if kw == "EXPOSE" for p in args.split()}
    assert exposed == {str(GATEWAY_PORT)}


# --------------------------------------------------------------------------- Kubernetes


def k8s_docs() -> list[dict[str, Any]]:
    path = DEPLOY / "kubernetes" / "medicon-gateway.yaml"
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_one(kind: str) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    return k8s_one("Deployment")["spec"]["template"]["spec"]


def pod_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def container(name: str) -> dict[str, Any]:
    found = [c for c in pod_spec()["containers"] if c["name"] == name]
    assert len(found) == 1, f"no container {name!r}"
    return found[0]


def resolve_port(c: dict[str, Any], port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in c.get("ports") or [] if p.get("name") == port), None)


def test_k8s_no_container_declares_kubo_ports():
    workloads = [d for d in k8s_docs() if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Pod")]
    assert workloads
    for doc in workloads:
        spec = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
        assert not spec.get("hostNetwork"), "hostNetwork would expose Kubo's loopback on the node"
        for c in pod_containers(spec):
            for p in c.get("ports") or []:
                assert p["containerPort"] not in KUBO_PORTS, f"{c['name']} declares {p}"
                assert p.get("hostPort") in (None, SWARM_PORT), f"{c['name']} uses a hostPort: {p}"


def test_k8s_service_targets_only_the_gateway():
    service = k8s_one("Service")
    labels = k8s_one("Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector and selector.items() <= labels.items(), "Service does not select the Pod"
    ports = service["spec"]["ports"]
    assert ports
    gateway = container("gateway")
    for p in ports:
        target = p.get("targetPort", p["port"])
        assert resolve_port(gateway, target) == GATEWAY_PORT, f"Service port {p} is not the gateway"
        assert p["port"] not in KUBO_PORTS


def test_k8s_gateway_probes_and_security():
    gateway = container("gateway")
    assert {p["containerPort"] for p in gateway["ports"]} == {GATEWAY_PORT}
    ready, live = gateway["readinessProbe"]["httpGet"], gateway["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz" and resolve_port(gateway, ready["port"]) == GATEWAY_PORT
    assert live["path"] == "/healthz" and resolve_port(gateway, live["port"]) == GATEWAY_PORT
    sc, pod_sc = gateway["securityContext"], pod_spec().get("securityContext") or {}
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
    assert sc.get("runAsUser", pod_sc.get("runAsUser")) not in (0, None)
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert "ALL" in sc["capabilities"]["drop"]
    assert pod_spec().get("enableServiceLinks") is False, "Service env vars would leak into MEDICON_*"


def test_k8s_kubo_is_hardened_by_init_container():
    spec = pod_spec()
    kubo = container("kubo")
    assert kubo["image"] == KUBO_IMAGE
    data_mount = next(m for m in kubo["volumeMounts"] if m["mountPath"] == "/data/ipfs")
    harden = [c for c in spec.get("initContainers") or [] if "kubo-harden.sh" in " ".join(c.get("command", []) + c.get("args", []))]
    assert harden, "no initContainer runs kubo-harden.sh"
    init = harden[0]
    assert init["image"] == KUBO_IMAGE
    env = {e["name"]: e.get("value") for e in init.get("env") or []}
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert init_mounts.get(data_mount["name"]) == env["IPFS_PATH"], "init hardens another repo than Kubo uses"
    # The script in the ConfigMap is the one tested here, not a drifting copy.
    configmap = k8s_one("ConfigMap")
    assert configmap["data"]["kubo-harden.sh"] == (DEPLOY / "kubo-harden.sh").read_text()


def test_k8s_configmap_gateway_config(tmp_path):
    toml = tmp_path / "gateway.toml"
    toml.write_text(k8s_one("ConfigMap")["data"]["gateway.toml"])
    config = load_config(toml)
    assert config.server.host == "0.0.0.0"
    assert config.server.port == GATEWAY_PORT
    assert url_host(config.kubo.api_url) in LOOPBACK_HOSTS
    assert url_host(config.kubo.gateway_url) in LOOPBACK_HOSTS
    assert pod_spec()["terminationGracePeriodSeconds"] > config.server.shutdown_timeout
    mount = next(m for m in container("gateway")["volumeMounts"] if m["mountPath"] == str(Path(CONFIG_PATH).parent))
    assert mount.get("readOnly") is True


def test_k8s_network_policy_allows_only_gateway_port():
    policy = k8s_one("NetworkPolicy")
    labels = k8s_one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert "Ingress" in policy["spec"]["policyTypes"]
    rules = policy["spec"]["ingress"]
    assert rules
    allowed = set()
    for rule in rules:
        assert rule.get("ports"), "an ingress rule without ports allows every port"
        allowed |= {p["port"] for p in rule["ports"]}
    assert GATEWAY_PORT in allowed and allowed <= {GATEWAY_PORT, SWARM_PORT}


# --------------------------------------------------------------------------- systemd


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values in order]}}; keys may repeat (``SystemdUnitParser``)."""
    parser = SystemdUnitParser()
    parser.read(path)
    return {section: {key: list(value) if isinstance(value, tuple) else [value]
                      for key, value in parser[section].items()} for section in parser.sections()}


def last(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str | None:
    values = unit.get(section, {}).get(key)
    return values[-1] if values else None


def is_yes(value: str | None) -> bool:
    return (value or "").lower() in ("yes", "true", "1", "on")


def unit_env(unit: dict[str, dict[str, list[str]]]) -> dict[str, str]:
    pairs = [p for v in unit["Service"].get("Environment", []) for p in shlex.split(v)]
    return dict(p.split("=", 1) for p in pairs)


def test_systemd_kubo_unit_hardens_before_start():
    unit = parse_unit(DEPLOY / "systemd" / "kubo.service")
    service = unit["Service"]
    assert any("kubo-harden.sh" in v for v in service.get("ExecStartPre", []))
    assert last(unit, "Service", "ExecStart") == "/usr/local/bin/ipfs daemon --migrate=false"
    assert last(unit, "Service", "User") not in (None, "root", "0"), "Kubo must run as its own user"
    env = unit_env(unit)
    assert env.get("IPFS_PATH"), "the harden script requires IPFS_PATH"
    assert env.get("IPFS_BIN", "ipfs") in ("ipfs", "/usr/local/bin/ipfs")
    assert is_yes(last(unit, "Service", "NoNewPrivileges"))


def test_systemd_gateway_unit_requires_kubo_and_is_sandboxed():
    unit = parse_unit(DEPLOY / "systemd" / "medicon-gateway.service")
    requires = " ".join(unit["Unit"].get("Requires", [])).split()
    after = " ".join(unit["Unit"].get("After", [])).split()
    assert "kubo.service" in requires and "kubo.service" in after
    assert is_yes(last(unit, "Service", "NoNewPrivileges"))
    assert last(unit, "Service", "ProtectSystem") == "strict"
    assert is_yes(last(unit, "Service", "PrivateTmp"))
    assert last(unit, "Service", "ProtectHome") in ("yes", "true", "read-only", "tmpfs")
    families = set(" ".join(unit["Service"].get("RestrictAddressFamilies", [])).split())
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert is_yes(last(unit, "Service", "DynamicUser")) or last(unit, "Service", "User") not in (None, "root", "0")
    exec_start = shlex.split(last(unit, "Service", "ExecStart") or "")
    assert exec_start[0].endswith("/medicon-gateway") and exec_start[1:] == ["serve", "--config", CONFIG_PATH]
    assert last(unit, "Service", "KillSignal") == "SIGTERM"
    shutdown = load_config(DEPLOY / "gateway.toml").server.shutdown_timeout
    stop = parse_duration(last(unit, "Service", "TimeoutStopSec"))
    assert shutdown < stop <= shutdown + 30, f"TimeoutStopSec {stop}s vs shutdown_timeout {shutdown}s"


# --------------------------------------------------------------------------- gateway.toml


def test_example_gateway_config_loads_and_targets_loopback():
    config = load_config(DEPLOY / "gateway.toml")
    assert url_host(config.kubo.api_url) in LOOPBACK_HOSTS
    assert url_host(config.kubo.gateway_url) in LOOPBACK_HOSTS
    assert config.server.port == GATEWAY_PORT


# --------------------------------------------------------------------------- kubo-harden.sh


def harden_config_calls() -> dict[str, tuple[bool, str]]:
    """{key: (json?, value)} of every `ipfs config KEY VALUE` call in kubo-harden.sh."""
    calls = {}
    for line in (DEPLOY / "kubo-harden.sh").read_text().splitlines():
        tokens = shlex.split(line, comments=True)
        if len(tokens) >= 4 and tokens[0] == "$IPFS_BIN" and tokens[1] == "config":
            as_json = tokens[2] == "--json"
            rest = tokens[3:] if as_json else tokens[2:]
            if len(rest) == 2:
                calls[rest[0]] = (as_json, rest[1])
    return calls


def test_harden_script_syntax():
    result = subprocess.run(["sh", "-n", str(DEPLOY / "kubo-harden.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (DEPLOY / "kubo-harden.sh").read_text().startswith("#!/bin/sh\n")


def test_harden_script_binds_kubo_to_loopback():
    calls = harden_config_calls()
    text = (DEPLOY / "kubo-harden.sh").read_text()
    defaults = dict(re.findall(r'^(\w+)="\$\{KUBO_\w+_(?:PORT|HOST):-([\d.]+)\}"', text, re.M))
    for key, port in (("Addresses.API", 5001), ("Addresses.Gateway", 8080)):
        as_json, value = calls[key]
        assert not as_json
        value = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), value)
        assert value == f"/ip4/127.0.0.1/tcp/{port}", f"{key} = {value}"
    assert calls["Gateway.NoFetch"][0] is True
    assert calls["API.HTTPHeaders"] == (True, "{}")
    assert calls["Swarm.DisableNatPortMap"] == (True, "true")
    assert calls["Discovery.MDNS.Enabled"] == (True, "false")
    as_json, value = calls["API.Authorizations"]  # only the gateway's secret opens the RPC API
    assert as_json and '"medicon-gateway"' in value and '"AllowedPaths": ["/api/v0"]' in value
    assert "0.0.0.0" not in " ".join(v for _, v in calls.values())


def test_harden_script_on_real_kubo(tmp_path):
    if not IPFS_BIN.is_file():
        pytest.fail(f"Kubo binary not found at {IPFS_BIN}: run `make setup`")
    repo = tmp_path / "repo"
    script = str(DEPLOY / "kubo-harden.sh")

    def run(**extra: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
               "IPFS_PATH": str(repo), "IPFS_BIN": str(IPFS_BIN), **extra}
        return subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=120)

    def config() -> dict[str, Any]:
        return json.loads((repo / "config").read_text())

    # 1. Empty path: the repo is created and hardened.
    result = run()
    assert result.returncode == 0, result.stderr
    cfg = config()
    assert cfg["Addresses"]["API"] == "/ip4/127.0.0.1/tcp/5001"
    assert cfg["Addresses"]["Gateway"] == "/ip4/127.0.0.1/tcp/8080"
    assert cfg["Gateway"]["NoFetch"] is True
    assert cfg["API"]["HTTPHeaders"] == {}
    assert cfg["Swarm"]["DisableNatPortMap"] is True
    assert cfg["Discovery"]["MDNS"]["Enabled"] is False
    assert not cfg["Gateway"].get("PublicGateways")
    blocks = [m for m in cfg["Datastore"]["Spec"]["mounts"] if m["mountpoint"] == "/blocks"]
    assert blocks and blocks[0]["type"] == "flatfs" and blocks[0]["sync"] is True  # Kubo's init says false
    opened = subprocess.run([str(IPFS_BIN), "repo", "stat"], env={**os.environ, "IPFS_PATH": str(repo)},
                            capture_output=True, text=True, timeout=60)
    assert opened.returncode == 0, opened.stderr  # the synced spec still matches the repo on disk
    peer_id = cfg["Identity"]["PeerID"]

    secret = (repo / "medicon-api-secret").read_text().strip()
    assert len(secret) >= 32 and (repo / "medicon-api-secret").stat().st_mode & 0o077 == 0
    gateway_only = {"medicon-gateway": {"AuthSecret": f"bearer:{secret}", "AllowedPaths": ["/api/v0"]}}
    assert cfg["API"]["Authorizations"] == gateway_only
    assert secret not in result.stdout + result.stderr

    # 2. What the Docker image's first-run init leaves behind (API on 0.0.0.0) plus CORS and
    # another caller's RPC secret: re-running puts the listeners back on loopback, keeps the
    # identity (no re-init) and the gateway's secret, and lets no other caller in.
    cfg["Addresses"]["API"] = ["/ip4/0.0.0.0/tcp/5001", "/ip6/::/tcp/5001"]
    cfg["Addresses"]["Gateway"] = "/ip4/0.0.0.0/tcp/8080"
    cfg["API"]["HTTPHeaders"] = {"Access-Control-Allow-Origin": ["*"]}
    auth = {"ops": {"AuthSecret": "bearer:s3cret", "AllowedPaths": ["/api/v0/id"]}}
    cfg["API"]["Authorizations"] = auth
    (repo / "config").write_text(json.dumps(cfg))
    result = run(KUBO_GATEWAY_NOFETCH="false", KUBO_API_PORT="15001")
    assert result.returncode == 0, result.stderr
    cfg = config()
    assert cfg["Identity"]["PeerID"] == peer_id
    assert cfg["Addresses"]["API"] == "/ip4/127.0.0.1/tcp/15001"
    assert cfg["Addresses"]["Gateway"] == "/ip4/127.0.0.1/tcp/8080"
    assert cfg["API"]["HTTPHeaders"] == {}
    assert cfg["API"]["Authorizations"] == gateway_only
    assert cfg["Gateway"]["NoFetch"] is False
    # a secret mounted from elsewhere (a Docker or Kubernetes secret) is used as it is
    mounted = tmp_path / "mounted-secret"
    mounted.write_text("m" * 40 + "\n")
    assert run(KUBO_API_SECRET_FILE=str(mounted)).returncode == 0
    assert config()["API"]["Authorizations"]["medicon-gateway"]["AuthSecret"] == "bearer:" + "m" * 40

    # 3. A block store set back to Kubo's default (no fsync) is synced again on the next start.
    cfg = config()
    for mount in cfg["Datastore"]["Spec"]["mounts"]:
        if mount["type"] == "flatfs":
            mount["sync"] = False
    (repo / "config").write_text(json.dumps(cfg, indent=2))
    result = run()
    assert result.returncode == 0, result.stderr
    assert "BlocksSync=true" in result.stdout
    assert [m["sync"] for m in config()["Datastore"]["Spec"]["mounts"] if m["type"] == "flatfs"] == [True]

    # 4. Bad input stops the start instead of producing a half-hardened repo.
    assert run(KUBO_GATEWAY_NOFETCH="maybe").returncode != 0
    assert run(KUBO_API_PORT="5001; rm -rf /").returncode != 0
    assert subprocess.run(["sh", script], env={"PATH": os.environ.get("PATH", "")},
                          capture_output=True).returncode != 0  # no IPFS_PATH


# --------------------------------------------------------------------------- data dir, keyring, tokens
#
# The gateway refuses to start without a keyring, and `keys init` refuses to overwrite one. Each
# flavour must therefore give the gateway a persistent, writable records.data_dir and run
# medicon-entrypoint.sh (keys init only when the keyring is missing) before `serve`.


def is_under(path: str | Path, parent: str | Path) -> bool:
    return Path(path) == Path(parent) or Path(parent) in Path(path).parents


def entrypoint_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment (no MEDICON_* from outside) with the venv's medicon-gateway on PATH."""
    if not (VENV_BIN / "medicon-gateway").is_file():
        pytest.fail(f"no medicon-gateway next to {sys.executable}: run `make setup`")
    return {"PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(tmp_path),
            "LANG": "C.UTF-8", **extra}


def run_entrypoint(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=entrypoint_env(tmp_path, **extra),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)


def snapshot(path: Path) -> tuple[bytes, int, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_ino, st.st_mtime_ns, stat.S_IMODE(st.st_mode)


def test_entrypoint_script_syntax():
    result = subprocess.run(["sh", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    # Installed with `install -m 0755` in the image and by the systemd instructions; executable
    # in the tree too, so `deploy/medicon-entrypoint.sh` can be run as is.
    assert os.access(ENTRYPOINT, os.X_OK), "chmod +x deploy/medicon-entrypoint.sh"


def test_entrypoint_creates_keyring_once_and_never_overwrites(tmp_path):
    from gateway.security.keyring import LocalKeyring

    data = tmp_path / "data"
    env = {"MEDICON_CONFIG": str(DEPLOY / "gateway.toml"), "MEDICON_RECORDS_DATA_DIR": str(data)}
    ring = data / "keyring.json"

    # 1. Empty data dir (not even created): the keyring appears, 0600, and is a real keyring.
    first = run_entrypoint(tmp_path, "--init-only", **env)
    assert first.returncode == 0, first.stderr
    assert ring.is_file(), first.stderr
    assert stat.S_IMODE(ring.stat().st_mode) == 0o600
    LocalKeyring.load(ring)  # loads: valid format, and private enough for the gateway
    before = snapshot(ring)
    assert sorted(p.name for p in data.iterdir()) == ["keyring.json"], "only the keyring, no temp files"

    # 2. Second start: the same file, byte for byte (same inode, not even rewritten).
    second = run_entrypoint(tmp_path, "--init-only", **env)
    assert second.returncode == 0, second.stderr
    assert snapshot(ring) == before

    # 3. A keyring restored from a backup (any content) is never replaced either.
    restored = b'{"restored": "from backup"}\n'
    ring.write_bytes(restored)
    ring.chmod(0o600)
    assert run_entrypoint(tmp_path, "--init-only", **env).returncode == 0
    assert ring.read_bytes() == restored

    # 4. A dangling symlink at the keyring path counts as "present": keys init is not called
    # (it would refuse), and the link is not replaced by a fresh keyring.
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "keyring.json").symlink_to(tmp_path / "elsewhere.json")
    result = run_entrypoint(tmp_path, "--init-only", **{**env, "MEDICON_RECORDS_DATA_DIR": str(linked)})
    assert result.returncode == 0, result.stderr
    assert (linked / "keyring.json").is_symlink() and not (tmp_path / "elsewhere.json").exists()


def test_entrypoint_follows_the_gateways_config(tmp_path):
    """The keyring path comes from the gateway's own config loader: security.keyring in the
    config file wins over <data_dir>/keyring.json, exactly as for `serve`."""
    config = tmp_path / "gateway.toml"
    config.write_text(f'[records]\ndata_dir = "{tmp_path / "data"}"\n\n'
                      f'[security]\nkeyring = "{tmp_path / "keys" / "ring.json"}"\n')
    result = run_entrypoint(tmp_path, "--init-only", MEDICON_CONFIG=str(config))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((tmp_path / "keys" / "ring.json").stat().st_mode) == 0o600
    assert not (tmp_path / "data" / "keyring.json").exists()
    before = snapshot(tmp_path / "keys" / "ring.json")
    assert run_entrypoint(tmp_path, "--init-only", MEDICON_CONFIG=str(config)).returncode == 0
    assert snapshot(tmp_path / "keys" / "ring.json") == before


def test_entrypoint_fails_loudly(tmp_path):
    # A config error stops the start, with the gateway's message, and creates nothing.
    bad = run_entrypoint(tmp_path, "--init-only", MEDICON_RECORDS_DATA_DIR=str(tmp_path / "d"),
                         MEDICON_SERVER_PORT="not-a-port")
    assert bad.returncode != 0 and "server.port" in bad.stderr
    assert not (tmp_path / "d").exists()
    # A data dir that cannot be created (its parent is a file): a clear error, non-zero.
    (tmp_path / "file").write_text("")
    blocked = run_entrypoint(tmp_path, "--init-only", MEDICON_RECORDS_DATA_DIR=str(tmp_path / "file" / "d"))
    assert blocked.returncode != 0 and "not a writable directory" in blocked.stderr
    # No medicon-gateway: not found, nothing exec'd.
    missing = run_entrypoint(tmp_path, MEDICON_GATEWAY_BIN=str(tmp_path / "nope"),
                             MEDICON_RECORDS_DATA_DIR=str(tmp_path / "d"))
    assert missing.returncode == 127 and not (tmp_path / "d").exists()


def test_entrypoint_runs_other_commands_without_a_keyring(tmp_path):
    data = tmp_path / "data"
    # The documented first-token command (`docker compose run/exec ... token create`) goes
    # through the entrypoint untouched: a token store, but no keyring behind its back (a
    # backup could still be restored into this data dir).
    result = run_entrypoint(tmp_path, "medicon-gateway", "token", "create", "admin", "--role", "admin",
                            MEDICON_RECORDS_DATA_DIR=str(data))
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"MEDICON_TOKEN=mdc_\S+\n", result.stdout), result.stdout
    assert (data / "tokens.sqlite3").is_file() and not (data / "keyring.json").exists()
    # An arbitrary command is exec'd with its arguments.
    echo = run_entrypoint(tmp_path, "sh", "-c", 'echo "$0 $1"', "a b", "c", MEDICON_RECORDS_DATA_DIR=str(data))
    assert echo.returncode == 0 and echo.stdout == "a b c\n"
    assert not (data / "keyring.json").exists()
    # `medicon-gateway ... serve ...` (the image's CMD) gets the keyring first.
    serve = run_entrypoint(tmp_path, "medicon-gateway", "serve", "--help", MEDICON_RECORDS_DATA_DIR=str(data))
    assert serve.returncode == 0 and "usage: medicon-gateway serve" in serve.stdout, serve.stderr
    assert stat.S_IMODE((data / "keyring.json").stat().st_mode) == 0o600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_entrypoint_starts_the_gateway_on_an_empty_data_dir(tmp_path):
    """What the image does with no arguments: keyring, then `exec medicon-gateway serve` with the
    deploy config. The gateway must come up (without Kubo it is live but not ready), accept the
    token an operator creates as documented, and stop gracefully on SIGTERM."""
    data = tmp_path / "data"
    dead_kubo = f"http://127.0.0.1:{free_port()}"
    env = entrypoint_env(tmp_path, MEDICON_CONFIG=str(DEPLOY / "gateway.toml"),
                         MEDICON_RECORDS_DATA_DIR=str(data), MEDICON_SERVER_PORT="0",
                         MEDICON_KUBO_API_URL=dead_kubo, MEDICON_KUBO_GATEWAY_URL=dead_kubo)
    proc = subprocess.Popen(["sh", str(ENTRYPOINT)], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        try:
            first = lines.get(timeout=30)
        except queue.Empty:
            proc.kill()
            pytest.fail(f"the gateway did not start: {proc.communicate()[1]}")
        assert first.startswith("MEDICON_GATEWAY_URL="), first
        url = first.strip().split("=", 1)[1]
        # exec: the shell is gone, the gateway has its pid (so it gets SIGTERM directly).
        assert Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[1].endswith(b"medicon-gateway")
        assert stat.S_IMODE((data / "keyring.json").stat().st_mode) == 0o600
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
            assert response.status == 200

        created = subprocess.run([str(VENV_BIN / "medicon-gateway"), "token", "create", "admin", "--role", "admin"],
                                 env={k: v for k, v in env.items() if k != "MEDICON_SERVER_PORT"},
                                 capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stderr
        token = created.stdout.strip().split("=", 1)[1]

        def status(headers: dict[str, str]) -> int:
            request = urllib.request.Request(f"{url}/api/v0/version", method="POST", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert status({}) == 401
        # Authenticated; Kubo is down, so the gateway answers 502/503/504 instead of 401/403.
        assert status({"Authorization": f"Bearer {token}"}) >= 500
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, proc.stderr.read()


# Compose


def test_compose_gateway_data_dir_is_a_named_volume():
    doc = compose()
    gateway = doc["services"]["gateway"]
    env = compose_env(gateway)
    config = load_config(DEPLOY / "gateway.toml", env=env)
    data_dir = config.records.data_dir
    assert env.get("MEDICON_RECORDS_DATA_DIR") == data_dir == DATA_DIR
    assert env.get("MEDICON_CONFIG", CONFIG_PATH) == CONFIG_PATH, "keys init and serve must read one config"
    mounts = {}
    for entry in gateway.get("volumes") or []:
        if isinstance(entry, dict):
            mounts[entry["target"]] = (entry.get("source"), bool(entry.get("read_only")))
        else:
            parts = str(entry).split(":")
            mounts[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    assert data_dir in mounts, f"no volume at the data dir {data_dir}"
    source, read_only = mounts[data_dir]
    assert not read_only
    assert source in (doc.get("volumes") or {}), f"{source!r} is not a declared named volume"
    assert source != "kubo-data", "the gateway's data must not share Kubo's volume"
    assert is_under(config.security.keyring or Path(data_dir) / "keyring.json", data_dir)
    # The image's entrypoint does the keyring init; overriding it would skip that.
    assert "entrypoint" not in gateway
    assert "serve" in (gateway.get("command") or ["serve"])
    # The root filesystem may stay read-only: the volume is the only write target.
    assert gateway.get("read_only") is True


# Dockerfile


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """The image's environment (``dockerfile-parse`` resolves every ``ENV``)."""
    return DockerfileParser(path=str(DEPLOY / "Dockerfile")).envs


def test_dockerfile_entrypoint_and_data_dir():
    instructions = dockerfile_instructions()
    runs = " && ".join(args for kw, args in instructions if kw == "RUN")
    entrypoints = [json.loads(args) for kw, args in instructions if kw == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT: nothing creates the keyring"
    entry = entrypoints[-1]
    assert len(entry) == 1, "exec form with the script only, so CMD becomes its arguments"
    installed = re.search(r"install -m 0755 deploy/medicon-entrypoint\.sh (\S+)", runs)
    assert installed, "the image does not install deploy/medicon-entrypoint.sh"
    assert entry[0] in (installed.group(1), Path(installed.group(1)).name)
    # The image's own config (MEDICON_CONFIG for every subcommand) puts the data dir on the volume.
    env = dockerfile_env(instructions)
    assert env.get("MEDICON_CONFIG") == CONFIG_PATH
    assert ("COPY", f"deploy/gateway.toml {CONFIG_PATH}") in instructions
    config = load_config(DEPLOY / "gateway.toml", env={k: v for k, v in env.items() if k.startswith("MEDICON_")})
    data_dir = config.records.data_dir
    assert data_dir == DATA_DIR
    volumes = [v for kw, args in instructions if kw == "VOLUME" for v in json.loads(args)]
    assert data_dir in volumes
    # Created in the image owned by the runtime user, so a new named volume inherits it.
    user = [args for kw, args in instructions if kw == "USER"][-1].split(":")[0]
    assert re.search(rf"install -d -m 0700 -o {user} -g \S+ {re.escape(data_dir)}", runs)


def test_dockerignore_keeps_secrets_out_of_the_image():
    patterns = {line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".medicon-data", ".medicon-dev", "**/keyring.json", "**/tokens.sqlite3*"} <= patterns


# Kubernetes


def k8s_config_of(c: dict[str, Any], tmp_path: Path):
    """The config container ``c`` runs with: the ConfigMap's gateway.toml plus its MEDICON_* env."""
    toml = tmp_path / f"{c['name']}.toml"
    toml.write_text(k8s_one("ConfigMap")["data"]["gateway.toml"])
    env = {e["name"]: e["value"] for e in c.get("env") or [] if e["name"].startswith("MEDICON_")}
    assert env.get("MEDICON_CONFIG", CONFIG_PATH) == CONFIG_PATH
    return load_config(toml, env=env)


def test_k8s_gateway_data_dir_is_a_pvc_with_keyring_init(tmp_path):
    spec = pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    claims = {d["metadata"]["name"] for d in k8s_docs() if d["kind"] == "PersistentVolumeClaim"}
    gateway = container("gateway")

    def data_volume(c: dict[str, Any], data_dir: str) -> dict[str, Any]:
        mount = next((m for m in c.get("volumeMounts") or [] if m["mountPath"] == data_dir), None)
        assert mount, f"{c['name']}: nothing mounted at the data dir {data_dir}"
        assert not mount.get("readOnly") and not mount.get("subPath")
        return volumes[mount["name"]]

    config = k8s_config_of(gateway, tmp_path)
    assert config.records.data_dir == DATA_DIR
    volume = data_volume(gateway, DATA_DIR)
    claim = volume.get("persistentVolumeClaim", {}).get("claimName")
    assert claim in claims, "the gateway's data dir must be a PersistentVolumeClaim"
    assert claim != volumes["kubo-data"]["persistentVolumeClaim"]["claimName"]
    assert is_under(config.security.keyring or Path(DATA_DIR) / "keyring.json", DATA_DIR)

    inits = [c for c in spec.get("initContainers") or []
             if any("medicon-entrypoint" in part for part in c.get("command", []) + c.get("args", []))]
    assert inits, "no initContainer runs medicon-entrypoint"
    init = inits[0]
    assert (init.get("command", []) + init.get("args", []))[-1] == "--init-only"
    assert init["image"] == gateway["image"], "init and gateway must be the same build"
    init_config = k8s_config_of(init, tmp_path)
    assert (init_config.records.data_dir, init_config.security.keyring) == \
        (config.records.data_dir, config.security.keyring), "init creates another keyring than the gateway reads"
    assert data_volume(init, DATA_DIR) == volume
    sc = init["securityContext"]
    assert sc["runAsUser"] == gateway["securityContext"]["runAsUser"], "the keyring must belong to the gateway's user"
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False


def test_k8s_keyring_never_in_a_configmap():
    for doc in k8s_docs():
        if doc["kind"] in ("ConfigMap", "Secret"):
            data = {**(doc.get("data") or {}), **(doc.get("stringData") or {}), **(doc.get("binaryData") or {})}
            assert doc["kind"] != "Secret" or not data, "no Secret with inline data in the manifests"
            assert not any("keyring" in key or key.endswith((".sqlite3", ".db")) for key in data), doc["metadata"]
    # No container reads the keyring from a ConfigMap-backed mount.
    spec = pod_spec()
    configmap_volumes = {v["name"] for v in spec["volumes"] if "configMap" in v}
    for c in pod_containers(spec):
        for mount in c.get("volumeMounts") or []:
            if mount["name"] in configmap_volumes:
                assert not is_under(DATA_DIR, mount["mountPath"]) and not is_under(mount["mountPath"], DATA_DIR)


# systemd


def test_systemd_gateway_state_directory_and_keyring_init():
    unit = parse_unit(DEPLOY / "systemd" / "medicon-gateway.service")
    state = last(unit, "Service", "StateDirectory")
    assert state, "no StateDirectory=: nothing is writable under ProtectSystem=strict"
    data_dir = f"/var/lib/{state.split()[0]}"
    env = unit_env(unit)
    config = load_config(DEPLOY / "gateway.toml", env={k: v for k, v in env.items() if k.startswith("MEDICON_")})
    assert config.records.data_dir == data_dir == DATA_DIR
    assert is_under(config.security.keyring or Path(data_dir) / "keyring.json", data_dir)
    assert (last(unit, "Service", "StateDirectoryMode") or "0755") in ("0700", "700", "0750", "750")

    exec_start = shlex.split(last(unit, "Service", "ExecStart") or "")
    pre = [shlex.split(v) for v in unit["Service"].get("ExecStartPre", [])]
    inits = [cmd for cmd in pre if cmd and cmd[0].lstrip("+!@:").endswith("medicon-entrypoint.sh")]
    assert inits, "no ExecStartPre runs medicon-entrypoint.sh"
    init = inits[0]
    assert not init[0].startswith("-"), "a failed keyring init must stop the start"
    assert not init[0].startswith(("+", "!")), "the init must run as the service's user, who reads the keyring"
    assert init[1:] == ["--init-only"]
    # ExecStartPre and ExecStart read the same config, with the same medicon-gateway.
    assert env.get("MEDICON_CONFIG") == exec_start[exec_start.index("--config") + 1]
    assert env.get("MEDICON_GATEWAY_BIN") == exec_start[0]
    # The README's install steps put the script where ExecStartPre runs it.
    readme = (DEPLOY / "README.md").read_text()
    assert re.search(rf"install -D -m 0755 deploy/medicon-entrypoint\.sh {re.escape(init[0])}\b", readme)


# All files


SECRET_PATTERNS = {
    "API token": re.compile(r"mdc_[A-Za-z0-9_\-]{16,}"),
    "keyring field": re.compile(r'"(keks|pseudonym_key|signing_key|deks|shredded)"\s*:'),
    "base64 key": re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{42,}={0,2}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}


def test_no_keyring_or_token_material_in_deploy_files():
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    assert ENTRYPOINT in files and len(files) >= 8
    for path in files:
        name = path.name
        assert name != "keyring.json" and not name.endswith((".sqlite3", ".sqlite3-wal", ".sqlite3-shm")), path
        text = path.read_text()
        for what, pattern in SECRET_PATTERNS.items():
            found = pattern.search(text)
            assert not found, f"{path.relative_to(ROOT)}: looks like a {what}: {found.group(0)[:24]}..."


def test_secret_patterns_catch_real_material(tmp_path):
    """The scan above can fail: it recognises a real keyring and a real token."""
    from gateway.security.keyring import LocalKeyring
    from conftest import BlockingTokens as TokenStore

    LocalKeyring.init(tmp_path / "keyring.json")
    keyring_text = (tmp_path / "keyring.json").read_text()
    assert SECRET_PATTERNS["keyring field"].search(keyring_text)
    assert SECRET_PATTERNS["base64 key"].search(keyring_text)
    with TokenStore(tmp_path / "tokens.sqlite3") as store:
        token, _ = store.create("probe", "admin")
    assert SECRET_PATTERNS["API token"].search(f"MEDICON_TOKEN={token}")



# --------------------------------------------------------------------------- several sites
#
# deploy/multisite/: two sites on one PostgreSQL, their Kubo nodes in a private swarm, each
# gateway replicating to the other's Pinning Service API. Parsed here, and the parts that can run
# without Docker run: init-secrets.sh, kubo-harden.sh's private swarm on two real Kubo daemons,
# and the entrypoint joining a deployment from a key bundle.

MULTISITE = DEPLOY / "multisite"
SITES = ("a", "b")


def multisite_compose() -> dict[str, Any]:
    return yaml.safe_load((MULTISITE / "docker-compose.yml").read_text())


def multisite_k8s() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((MULTISITE / "kubernetes.yaml").read_text()) if d]


def _named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def test_multisite_compose_two_sites_one_database_a_private_swarm():
    doc = multisite_compose()
    services = doc["services"]
    assert set(services) == {"postgres", "kubo-a", "kubo-b", "gateway-a", "gateway-b"}
    assert not services["postgres"].get("ports"), "the database is reached on the compose network only"
    published = set()
    for name, service in services.items():
        for entry in service.get("ports") or []:
            targets, hosts = compose_port(entry)
            assert not targets & KUBO_PORTS, f"{name} publishes a Kubo port: {entry}"
            published |= hosts or set()
    assert published == {5080, 5081}
    for site in SITES:
        other = "b" if site == "a" else "a"
        kubo, gateway = services[f"kubo-{site}"], services[f"gateway-{site}"]
        assert kubo["image"] == KUBO_IMAGE
        assert gateway["network_mode"] == f"service:kubo-{site}"
        kenv = compose_env(kubo)
        assert kenv["LIBP2P_FORCE_PNET"] == "1", "the daemon must refuse to start without the swarm key"
        assert kenv["KUBO_SWARM_KEY_FILE"] == "/run/secrets/swarm_key" and "swarm_key" in kubo["secrets"]
        assert kenv["KUBO_PEERS"].startswith(f"/dns4/kubo-{other}/tcp/4001/p2p/")
        assert kenv["KUBO_IDENTITY_FILE"] == f"/run/secrets/kubo_identity_{site}"
        assert "PEER_ID_" + other.upper() in doc["services"][f"kubo-{site}"]["environment"]["KUBO_PEERS"]
        assert any("kubo-harden.sh:/container-init.d/" in v for v in kubo["volumes"])
        genv = compose_env(gateway)
        assert genv["MEDICON_STORAGE_URL_FILE"] == "/run/secrets/database_url" and "database_url" in gateway["secrets"]
        assert "MEDICON_STORAGE_URL" not in genv, "the URL holds a password: only in the secret file"
        assert genv["MEDICON_RECORDS_REPLICAS"] == "2"
        services_json = json.loads(genv["MEDICON_RECORDS_REPLICA_SERVICES"])
        assert services_json == [{"name": f"site-{other}", "endpoint": f"http://kubo-{other}:5080/pinning/v1",
                                  "key_file": f"/run/secrets/replicator_token_{site}"}]
        assert f"replicator_token_{site}" in gateway["secrets"]
        assert genv["MEDICON_KUBO_API_AUTH_FILE"] == f"/run/secrets/kubo_api_secret_{site}"
        assert {"postgres", f"kubo-{site}"} <= set(gateway["depends_on"])
        # The environment is a valid gateway configuration (the files it names are read at start).
        config = load_config(CONFIG_PATH_LOCAL, env={k: v for k, v in genv.items() if k.startswith("MEDICON_")
                                                    and k not in ("MEDICON_CONFIG", "MEDICON_GATEWAY_ID",
                                                                  "MEDICON_KEY_BUNDLE")})
        assert config.records.replicas == 2 and config.records.replica_services[0].name == f"site-{other}"
        assert config.storage.url_file == "/run/secrets/database_url"
    assert compose_env(services["gateway-b"])["MEDICON_KEY_BUNDLE"] == "/run/secrets/key_bundle"
    assert "MEDICON_KEY_BUNDLE" not in compose_env(services["gateway-a"]), "site A makes the keys"
    for name, secret in doc["secrets"].items():
        assert secret["file"].startswith("./secrets/"), f"secret {name} outside ./secrets"
    ignored = (MULTISITE / ".gitignore").read_text().split()
    assert "secrets/" in ignored and ".env" in ignored


CONFIG_PATH_LOCAL = DEPLOY / "gateway.toml"


def test_multisite_k8s_kubo_statefulsets_and_stateless_gateways(tmp_path):
    docs = multisite_k8s()
    toml = tmp_path / "gateway.toml"
    toml.write_text(_named(docs, "ConfigMap", "medicon-multisite")["data"]["gateway.toml"])
    base = load_config(toml)
    assert base.records.replicas == 2 and base.storage.url_file and base.server.host == "0.0.0.0"
    for site in SITES:
        other = "b" if site == "a" else "a"
        kubo = _named(docs, "StatefulSet", f"kubo-site-{site}")
        assert kubo["spec"]["replicas"] == 1 and kubo["spec"]["volumeClaimTemplates"], "a node's repo is a PVC"
        spec = kubo["spec"]["template"]["spec"]
        harden = spec["initContainers"][0]
        assert harden["image"] == KUBO_IMAGE and "kubo-harden.sh" in " ".join(harden["command"])
        env = {e["name"]: e.get("value") for e in harden["env"]}
        assert env["KUBO_API_HOST"] == "0.0.0.0" and env["KUBO_API_SECRET_FILE"]
        assert env["KUBO_SWARM_KEY_FILE"] and env["KUBO_IDENTITY_FILE"]
        assert env["KUBO_PEERS"] == f"/dns4/kubo-site-{other}-0.kubo-site-{other}/tcp/4001/p2p/$(PEER_ID_OTHER)"
        daemon = spec["containers"][0]
        assert {e["name"]: e.get("value") for e in daemon["env"]}["LIBP2P_FORCE_PNET"] == "1"
        for c in pod_containers(spec):
            for port in c.get("ports") or []:
                assert port["containerPort"] not in KUBO_PORTS, f"{c['name']} declares {port}"
        service = _named(docs, "Service", f"kubo-site-{site}")
        assert service["spec"]["clusterIP"] == "None"
        assert {p["port"] for p in service["spec"]["ports"]} == {SWARM_PORT}, "no Service for the RPC API"
        policy = _named(docs, "NetworkPolicy", f"kubo-site-{site}")
        for rule in policy["spec"]["ingress"]:
            ports = {p["port"] for p in rule["ports"]}
            if ports & KUBO_PORTS:
                sources = rule["from"]
                assert ports == KUBO_PORTS and len(sources) == 1
                assert sources[0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "medicon-gateway",
                                                                   "medicon.example/site": f"site-{site}"}
            else:
                assert ports == {SWARM_PORT}

        gateway = _named(docs, "Deployment", f"gateway-site-{site}")
        assert gateway["spec"]["replicas"] >= 2
        pod = gateway["spec"]["template"]["spec"]
        assert pod["enableServiceLinks"] is False
        for volume in pod["volumes"]:  # stateless: nothing persistent
            assert set(volume) - {"name"} <= {"emptyDir", "secret", "configMap"}, volume
        main = pod["containers"][0]
        genv = {e["name"]: e.get("value") for e in main["env"]}
        assert url_host(genv["MEDICON_KUBO_API_URL"]) == f"kubo-site-{site}-0.kubo-site-{site}"
        services_json = json.loads(genv["MEDICON_RECORDS_REPLICA_SERVICES"])
        assert services_json[0]["endpoint"] == f"http://gateway-site-{other}:5080/pinning/v1"
        config = load_config(toml, env={k: v for k, v in genv.items() if k != "MEDICON_CONFIG"})
        assert config.records.replica_services[0].key_file == "/run/secrets/replicator/token"
        copy = pod["initContainers"][0]
        assert copy["command"][:3] == ["install", "-m", "0600"], "the keyring is copied private"
        sc = main["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
        assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
        gservice = _named(docs, "Service", f"gateway-site-{site}")
        assert {p["port"] for p in gservice["spec"]["ports"]} == {GATEWAY_PORT}
        assert _named(docs, "PodDisruptionBudget", f"gateway-site-{site}")["spec"]["minAvailable"] >= 1
        gpolicy = _named(docs, "NetworkPolicy", f"gateway-site-{site}")
        assert {p["port"] for r in gpolicy["spec"]["ingress"] for p in r["ports"]} == {GATEWAY_PORT}
    for secret_doc in docs:
        assert secret_doc["kind"] != "Secret", "no Secret (hence no secret material) in the manifest"


def test_multisite_init_secrets_makes_each_secret_once(tmp_path):
    if not IPFS_BIN.is_file():
        pytest.fail(f"Kubo binary not found at {IPFS_BIN}: run `make setup`")
    script = MULTISITE / "init-secrets.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    out = tmp_path / "secrets"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "IPFS_BIN": str(IPFS_BIN)}
    done = subprocess.run(["sh", str(script), str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    compose_files = {Path(s["file"]).name for s in multisite_compose()["secrets"].values()}
    assert compose_files <= {p.name for p in out.iterdir()}, "every secret the compose file names"
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for path in out.iterdir():
        if path.name != "peers.env":
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    lines = (out / "swarm.key").read_text().splitlines()
    assert lines[:2] == ["/key/swarm/psk/1.0.0/", "/base16/"] and re.fullmatch(r"[0-9a-f]{64}", lines[2])
    peers = dict(line.split("=", 1) for line in (out / "peers.env").read_text().split())
    for site in SITES:
        identity = dict(line.split("=", 1) for line in (out / f"kubo-identity-{site}").read_text().split())
        assert identity["PeerID"] == peers[f"PEER_ID_{site.upper()}"] and identity["PeerID"].startswith("12D3")
        assert len(identity["PrivKey"]) > 40
    assert peers["PEER_ID_A"] != peers["PEER_ID_B"]
    password = (out / "postgres-password").read_text().strip()
    assert (out / "database-url").read_text().strip() == f"postgresql://medicon:{password}@postgres:5432/medicon"
    assert (out / "replicator-token-a").read_text() == "" and (out / "key-bundle.json").read_text() == ""
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = subprocess.run(["sh", str(script), str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert password not in done.stderr + again.stderr


def test_harden_script_makes_a_private_swarm_of_real_kubo_nodes(tmp_path):
    """Two repos hardened as the multi-site layouts do (swarm key, fixed identities, each the
    other's peer, no bootstrap), two daemons with LIBP2P_FORCE_PNET=1: they find each other by
    peering alone and a block stored on one is fetched by the other; a node with another swarm
    key cannot join."""
    from gateway.kubo.node import WANT_HAVE_REPLACE_SIZE, free_port
    if not IPFS_BIN.is_file():
        pytest.fail(f"Kubo binary not found at {IPFS_BIN}: run `make setup`")
    secrets_dir = tmp_path / "secrets"
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "IPFS_BIN": str(IPFS_BIN)}
    assert subprocess.run(["sh", str(MULTISITE / "init-secrets.sh"), str(secrets_dir), "a", "b", "c"], env=base_env,
                          capture_output=True, timeout=120).returncode == 0
    peers = dict(line.split("=", 1) for line in (secrets_dir / "peers.env").read_text().split())
    swarm_ports = {s: free_port() for s in ("a", "b", "c")}
    other_key = tmp_path / "other-swarm.key"
    other_key.write_text("/key/swarm/psk/1.0.0/\n/base16/\n" + "ab" * 32 + "\n")
    daemons, nodes = [], {}
    try:
        for site, other in (("a", "b"), ("b", "a"), ("c", "a")):
            repo = tmp_path / f"repo-{site}"
            env = {**base_env, "IPFS_PATH": str(repo), "KUBO_API_PORT": str(free_port()),
                   "KUBO_GATEWAY_PORT": str(free_port()), "KUBO_SWARM_HOST": "127.0.0.1",
                   "KUBO_SWARM_PORT": str(swarm_ports[site]),
                   "KUBO_SWARM_KEY_FILE": str(other_key if site == "c" else secrets_dir / "swarm.key"),
                   "KUBO_IDENTITY_FILE": str(secrets_dir / f"kubo-identity-{site}"),
                   "KUBO_PEERS": f"/ip4/127.0.0.1/tcp/{swarm_ports[other]}/p2p/{peers['PEER_ID_' + other.upper()]}"}
            done = subprocess.run(["sh", str(DEPLOY / "kubo-harden.sh")], env=env, capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 0, done.stderr
            assert "private swarm on 127.0.0.1" in done.stdout
            cfg = json.loads((repo / "config").read_text())
            assert cfg["Identity"]["PeerID"] == peers[f"PEER_ID_{site.upper()}"]
            assert cfg["Bootstrap"] == [] and cfg["AutoConf"]["Enabled"] is False
            assert cfg["Addresses"]["Swarm"] == [f"/ip4/127.0.0.1/tcp/{swarm_ports[site]}"]
            assert cfg["Peering"]["Peers"] == [{"ID": peers["PEER_ID_" + other.upper()],
                                                "Addrs": [f"/ip4/127.0.0.1/tcp/{swarm_ports[other]}"]}]
            assert cfg["Internal"]["Bitswap"]["WantHaveReplaceSize"] == WANT_HAVE_REPLACE_SIZE  # as the dev swarm has it
            assert stat.S_IMODE((repo / "swarm.key").stat().st_mode) == 0o600
            log = open(tmp_path / f"daemon-{site}.log", "wb")
            daemons.append(subprocess.Popen([str(IPFS_BIN), "daemon", "--migrate=false"],
                                            env={**env, "LIBP2P_FORCE_PNET": "1"}, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True))
            log.close()
            secret = (repo / "medicon-api-secret").read_text().strip()
            nodes[site] = (env["KUBO_API_PORT"], secret)

        def ipfs(site: str, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
            port, secret = nodes[site]
            return subprocess.run([str(IPFS_BIN), "--api", f"/ip4/127.0.0.1/tcp/{port}", "--api-auth",
                                   f"bearer:{secret}", *args], input=input, capture_output=True, timeout=60)
        deadline = time.monotonic() + 60
        while ipfs("a", "id").returncode or ipfs("b", "id").returncode or ipfs("c", "id").returncode:
            assert time.monotonic() < deadline, "the daemons did not start"
            time.sleep(0.2)
        deadline = time.monotonic() + 60  # peering alone: nobody dials by hand
        while peers["PEER_ID_B"] not in ipfs("a", "swarm", "peers").stdout.decode():
            assert time.monotonic() < deadline, "A and B did not connect by peering"
            time.sleep(0.5)
        cid = ipfs("a", "block", "put", "--pin=true", input=b"only in the private swarm").stdout.decode().strip()
        got = ipfs("b", "block", "get", "--timeout=30s", cid)
        assert got.returncode == 0 and got.stdout == b"only in the private swarm", got.stderr
        refused = ipfs("c", "swarm", "connect", "--timeout=10s",
                       f"/ip4/127.0.0.1/tcp/{swarm_ports['a']}/p2p/{peers['PEER_ID_A']}")
        assert refused.returncode != 0, "a node with another swarm key joined"
        assert peers["PEER_ID_C"] not in ipfs("a", "swarm", "peers").stdout.decode()
    finally:
        for proc in daemons:
            proc.terminate()
        for proc in daemons:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_entrypoint_joins_a_deployment_from_a_key_bundle(tmp_path):
    from gateway.security.keyring import LocalKeyring

    first, second = tmp_path / "site-a", tmp_path / "site-b"
    env_a = {"MEDICON_CONFIG": str(DEPLOY / "gateway.toml"), "MEDICON_RECORDS_DATA_DIR": str(first),
             "MEDICON_GATEWAY_ID": "site-a"}
    made = run_entrypoint(tmp_path, "--init-only", **env_a)
    assert made.returncode == 0, made.stderr
    assert LocalKeyring.load(first / "keyring.json").gateway_id == "site-a"
    bundle = tmp_path / "bundle.json"
    bundle.touch(mode=0o600)
    env_b = {"MEDICON_CONFIG": str(DEPLOY / "gateway.toml"), "MEDICON_RECORDS_DATA_DIR": str(second),
             "MEDICON_GATEWAY_ID": "site-b", "MEDICON_KEY_BUNDLE": str(bundle)}
    empty = run_entrypoint(tmp_path, "--init-only", **env_b)
    assert empty.returncode != 0 and "keys export" in empty.stderr
    assert not (second / "keyring.json").exists(), "no keyring of another deployment behind the operator's back"
    LocalKeyring.load(first / "keyring.json").export(tmp_path / "exported.json")
    (tmp_path / "exported.json").replace(bundle)  # as `docker compose cp` puts it over the empty file
    joined = run_entrypoint(tmp_path, "--init-only", **env_b)
    assert joined.returncode == 0, joined.stderr
    a, b = LocalKeyring.load(first / "keyring.json"), LocalKeyring.load(second / "keyring.json")
    assert b.gateway_id == "site-b" and b.key_id != a.key_id
    assert set(b.keks) == set(a.keks) and b.pseudonym_key == a.pseudonym_key
    again = run_entrypoint(tmp_path, "--init-only", **env_b)
    assert again.returncode == 0 and "left as it is" in again.stderr
