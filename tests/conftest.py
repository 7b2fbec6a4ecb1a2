"""Shared fixtures: one real Kubo daemon for the session, and the gateway in front of it.

There is no fake IPFS server anywhere in this suite. Without Kubo the run stops at once,
saying how to install it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.kubo import INSTALL_HINT, KuboError, KuboNode, find_binary

ROOT = Path(__file__).resolve().parents[1]


def pytest_sessionstart(session: pytest.Session) -> None:
    try:
        binary = find_binary()
    except KuboError as exc:
        pytest.exit(f"\n\nKUBO IS REQUIRED: the tests run against a real Kubo node.\n{exc}\n", returncode=3)
    version = subprocess.run([str(binary), "version", "--number"], capture_output=True, text=True)
    if version.returncode != 0:
        pytest.exit(f"\n\nKubo at {binary} does not run: {version.stderr}\n{INSTALL_HINT}\n", returncode=3)


@pytest.fixture(scope="session")
def kubo(tmp_path_factory: pytest.TempPathFactory):
    """The session's Kubo: offline, temporary repo, free loopback ports."""
    node = KuboNode(tmp_path_factory.mktemp("kubo") / "repo")
    node.start()
    yield node
    node.stop()


@pytest.fixture
def own_kubo(tmp_path: Path):
    """A Kubo of the test's own, for tests that stop, pause or break it."""
    node = KuboNode(tmp_path / "repo")
    node.start()
    yield node
    node.stop()


def gateway_config(node: KuboNode, **overrides):
    """A config for ``node`` with a head store of its own (fresh chains for every app)."""
    return load_config(env={}, overrides={
        "kubo.api_url": node.api_url, "kubo.gateway_url": node.gateway_url,
        "records.data_dir": tempfile.mkdtemp(prefix="medicon-test-"), **overrides,
    })


@dataclass
class GatewayProcess:
    """The gateway as a real process on a real port, as clients meet it."""

    process: subprocess.Popen
    url: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def multiaddr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.port}"

    def rss_peak_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc status")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_gateway(node: KuboNode, *args: str, env: dict | None = None) -> GatewayProcess:
    full_env = {**os.environ, "MEDICON_KUBO_API_URL": node.api_url,
                "MEDICON_KUBO_GATEWAY_URL": node.gateway_url,
                "MEDICON_RECORDS_DATA_DIR": tempfile.mkdtemp(prefix="medicon-test-"), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--log-level", "WARNING", "serve", "--port", "0", *args],
        env=full_env, stdout=subprocess.PIPE, stderr=None, text=True, cwd=ROOT,
    )
    line = proc.stdout.readline()
    if not line.startswith("MEDICON_GATEWAY_URL="):
        proc.kill()
        raise AssertionError(f"gateway did not announce its URL, printed {line!r}")
    return GatewayProcess(proc, line.strip().split("=", 1)[1])


@pytest.fixture(scope="session")
def gateway(kubo: KuboNode):
    """The gateway process in front of the session's Kubo."""
    gw = start_gateway(kubo)
    yield gw
    assert gw.stop() == 0, "gateway did not exit cleanly on SIGTERM"


@pytest.fixture
async def client(aiohttp_client, kubo):
    """The gateway app in-process (pytest-aiohttp), in front of the session's real Kubo."""
    from gateway.app import create_app
    return await aiohttp_client(create_app(gateway_config(kubo)))


def ipfs_cli(api: str, *args: str, input: bytes | None = None, cwd: Path | None = None,
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The Kubo CLI as a user runs it, pointed at ``api`` (a multiaddr), with no local repo."""
    env = {**os.environ, "IPFS_PATH": "/nonexistent-medicon-test-repo"}
    return subprocess.run([str(find_binary()), "--api", api, *extra, *args], input=input,
                          capture_output=True, env=env, cwd=cwd, timeout=120)
