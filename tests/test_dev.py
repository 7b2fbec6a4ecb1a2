"""`medicon-gateway dev`: a managed Kubo and the gateway, announced, stopped on Ctrl-C, and
started again on the same data dir with everything the first run wrote."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from gateway.kubo.node import KuboNode
from records_helpers import opened, uid


def call(url: str, path: str, token: str | None = None, body: dict | None = None, method: str = "POST"):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=20) as r:
        return r.status, json.load(r)


def status_of(url: str, path: str, token: str | None = None, method: str = "POST") -> int:
    try:
        return call(url, path, token, method=method)[0]
    except urllib.error.HTTPError as err:
        return err.code


class Dev:
    """One `medicon-gateway dev` run on ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "dev", "--port", "0", "--data-dir", str(data_dir)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line.startswith("MEDICON_GATEWAY_URL=http://127.0.0.1:"), line + self.proc.stderr.read()
        self.url = line.split("=", 1)[1]
        token_line = self.proc.stdout.readline().strip()
        assert token_line.startswith("MEDICON_TOKEN=mdc_"), token_line
        self.token = token_line.split("=", 1)[1]
        config = json.loads((data_dir / "kubo" / "config").read_text())
        self.kubo_api = config["Addresses"]["API"]
        self.peer_id = config["Identity"]["PeerID"]

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(30) == 0
        return self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def test_dev_starts_kubo_and_gateway_stops_both_and_starts_again_on_the_same_data(tmp_path):
    data_dir = tmp_path / "dev"
    patient, episode = uid("p"), uid("e")
    first = Dev(data_dir)
    try:
        assert status_of(first.url, "/api/v0/version") == 401  # no token, no service
        assert call(first.url, "/api/v0/version", first.token)[1]["Version"]
        assert call(first.url, "/readyz", method="GET")[1]["status"] == "ready"
        assert first.kubo_api.startswith("/ip4/127.0.0.1/tcp/")
        kubo = KuboNode(data_dir / "kubo", api_port=int(first.kubo_api.rsplit("/", 1)[1]))
        assert kubo.version() is None  # Kubo's RPC takes only the gateway's secret
        kubo.api_secret = (data_dir / "kubo" / "medicon-api-secret").read_text().strip()
        assert kubo.version() is not None
        status, appended = call(first.url, f"/medicon/v1/patients/{patient}/episodes", first.token,
                                opened(patient, episode))
        assert status == 201
        assert "kubo stopped" in first.stop()
    finally:
        first.kill()
    assert kubo.version() is None, "Kubo still answers after dev stopped"

    second = Dev(data_dir)  # the same repo, keys, tokens and head store
    try:
        assert second.peer_id == first.peer_id and second.token != first.token
        assert status_of(second.url, "/api/v0/version", first.token) == 401  # revoked when dev stopped
        status, record = call(second.url, f"/medicon/v1/records/{appended['cid']}", second.token, method="GET")
        assert status == 200 and record["record"]["patient"] == patient
        status, verdict = call(second.url, f"/medicon/v1/episodes/{episode}/verify", second.token, method="GET")
        assert verdict["ok"] is True and verdict["length"] == 1
        second.stop()
    finally:
        second.kill()


class DevSites:
    """One `medicon-gateway dev --sites 2` run on ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "dev", "--sites", "2", "--data-dir", str(data_dir)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = dict(line.split("=", 1) for line in (self.proc.stdout.readline().strip() for _ in range(6)) if "=" in line)
        assert set(lines) == {"MEDICON_GATEWAY_URL", "MEDICON_TOKEN", "MEDICON_SITE1_URL", "MEDICON_SITE1_TOKEN",
                              "MEDICON_SITE2_URL", "MEDICON_SITE2_TOKEN"}, self.proc.stderr.read()
        assert lines["MEDICON_GATEWAY_URL"] == lines["MEDICON_SITE1_URL"]
        self.urls = [lines["MEDICON_SITE1_URL"], lines["MEDICON_SITE2_URL"]]
        self.tokens = [lines["MEDICON_SITE1_TOKEN"], lines["MEDICON_SITE2_TOKEN"]]
        self.kubos = []
        for site in ("site-1", "site-2"):
            repo = data_dir / site / "kubo"
            config = json.loads((repo / "config").read_text())
            node = KuboNode(repo, api_port=int(config["Addresses"]["API"].rsplit("/", 1)[1]))
            node.api_secret = (repo / "medicon-api-secret").read_text().strip()
            self.kubos.append(node)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(60) == 0
        return self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def test_dev_sites_starts_postgresql_a_private_swarm_and_two_replicating_gateways():
    # Not under pytest's tmp_path, which is private to root: PostgreSQL runs as `postgres`.
    base = Path(tempfile.mkdtemp(prefix="medicon-dev-sites-"))
    base.chmod(0o755)
    data_dir = base / "dev"
    patient, episode = uid("p"), uid("e")
    first = DevSites(data_dir)
    try:
        for url, token in zip(first.urls, first.tokens):
            assert status_of(url, "/api/v0/version") == 401
            assert call(url, "/api/v0/version", token)[1]["Version"]
        status, appended = call(first.urls[0], f"/medicon/v1/patients/{patient}/episodes", first.tokens[0],
                                opened(patient, episode))
        assert status == 201
        status, verdict = call(first.urls[1], f"/medicon/v1/episodes/{episode}/verify", first.tokens[1], method="GET")
        assert verdict["ok"] is True and verdict["signers"] == {"site-1": 1}
        for node in first.kubos:  # acknowledged: pinned on both nodes
            assert appended["cid"] in node.ipfs("pin", "ls", "--type=recursive", "--quiet").stdout.decode()
        peers = first.kubos[0].ipfs("swarm", "peers").stdout.decode().split()
        assert [p.rsplit("/", 1)[1] for p in peers] == [first.kubos[1].peer_id]  # only each other
        assert (data_dir / "site-1" / "kubo" / "swarm.key").read_text() == (data_dir / "site-2" / "kubo" / "swarm.key").read_text()
        stderr = first.stop()
        assert "sites stopped" in stderr
    finally:
        first.kill()
    assert all(node.version() is None for node in first.kubos)
    assert not (data_dir / "postgres" / "data" / "postmaster.pid").exists(), "PostgreSQL still runs"

    second = DevSites(data_dir)  # the same database, repos and keys
    try:
        assert status_of(second.urls[1], "/api/v0/version", first.tokens[1]) == 401  # revoked at the stop
        status, record = call(second.urls[1], f"/medicon/v1/records/{appended['cid']}", second.tokens[1], method="GET")
        assert status == 200 and record["record"]["patient"] == patient
        second.stop()
    finally:
        second.kill()
        shutil.rmtree(base, ignore_errors=True)
