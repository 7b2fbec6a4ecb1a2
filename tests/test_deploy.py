"""Checks of the deployment files in deploy/: Kubo's RPC API must never be reachable except
through medicon-gateway.

The tests parse the files (Compose and Kubernetes YAML, TOML, systemd units, the Dockerfile)
and need neither Kubo nor the network. The one exception runs kubo-harden.sh against the
real Kubo binary in .tools/bin/ipfs, which `make setup` installs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

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
    text = (DEPLOY / "Dockerfile").read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        keyword, _, args = current.strip().partition(" ")
        logical.append((keyword.upper(), args.strip()))
        current = ""
    return logical


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
    """A systemd unit as {section: {key: [values in order]}}; keys may repeat."""
    sections: dict[str, dict[str, list[str]]] = {}
    current, pending = None, ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


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
    defaults = dict(re.findall(r'^(\w+)="\$\{KUBO_\w+_PORT:-(\d+)\}"', text, re.M))
    for key, port in (("Addresses.API", 5001), ("Addresses.Gateway", 8080)):
        as_json, value = calls[key]
        assert not as_json
        value = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), value)
        assert value == f"/ip4/127.0.0.1/tcp/{port}", f"{key} = {value}"
    assert calls["Gateway.NoFetch"][0] is True
    assert calls["API.HTTPHeaders"] == (True, "{}")
    assert calls["Swarm.DisableNatPortMap"] == (True, "true")
    assert calls["Discovery.MDNS.Enabled"] == (True, "false")
    assert "API.Authorizations" not in calls
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
    peer_id = cfg["Identity"]["PeerID"]

    # 2. What the Docker image's first-run init leaves behind (API on 0.0.0.0) plus CORS and
    # an RPC secret: re-running puts the listeners back on loopback, keeps the identity
    # (no re-init) and leaves API.Authorizations alone.
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
    assert cfg["API"]["Authorizations"] == auth
    assert cfg["Gateway"]["NoFetch"] is False

    # 3. Bad input stops the start instead of producing a half-hardened repo.
    assert run(KUBO_GATEWAY_NOFETCH="maybe").returncode != 0
    assert run(KUBO_API_PORT="5001; rm -rf /").returncode != 0
    assert subprocess.run(["sh", script], env={"PATH": os.environ.get("PATH", "")},
                          capture_output=True).returncode != 0  # no IPFS_PATH
