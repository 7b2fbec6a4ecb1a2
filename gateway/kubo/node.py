"""A local Kubo node the project manages: find the binary, init and harden a repo, start the
daemon, wait until it answers, stop it cleanly.

Used by ``medicon-gateway dev`` and by the test suite alike, so tests exercise the same code
an operator runs. Synchronous on purpose: it wraps a subprocess and is called at start-up
and shutdown, never on a request path.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
API_USER = "medicon-gateway"
SECRET_FILE = "medicon-api-secret"  # in the repo, 0600: the secret of Kubo's API.Authorizations
# Blocks up to this size go to a private-swarm peer in answer to its want-have (Kubo's
# Internal.Bitswap.WantHaveReplaceSize; its default, 1024, is below a sealed record's ~1.2 kB):
# replicating a record then costs one bitswap exchange, not two, each of which can wait out
# bitswap's 20 ms between messages to a peer. Attachment chunks (256 KiB) still ask first.
WANT_HAVE_REPLACE_SIZE = 64 * 1024
INSTALL_HINT = "run `make setup` (or `scripts/install-kubo.sh`) to build the pinned Kubo into .tools/bin/ipfs"


class KuboError(RuntimeError):
    """Kubo is missing, failed to start, or did not answer in time."""


def find_binary(explicit: str = "") -> Path:
    """``explicit`` (the config key ``kubo.bin``) or ``$MEDICON_KUBO_BIN``, else the project's
    ``.tools/bin/ipfs``, else ``ipfs`` on PATH."""
    explicit = explicit or os.environ.get("MEDICON_KUBO_BIN", "")
    if explicit:
        path = Path(explicit)
        if not os.access(path, os.X_OK):
            raise KuboError(f"kubo.bin (MEDICON_KUBO_BIN) {explicit} is not an executable file")
        return path
    local = PROJECT_ROOT / ".tools" / "bin" / "ipfs"
    if os.access(local, os.X_OK):
        return local
    found = shutil.which("ipfs")
    if found:
        return Path(found)
    raise KuboError(f"Kubo (the `ipfs` binary) is not installed: {INSTALL_HINT}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def harden(config: dict, *, api_port: int, gateway_port: int, offline: bool, api_secret: str = "",
           sync: bool = True, swarm_port: int = 0, peers: list[str] | None = None) -> dict:
    """Make a Kubo config safe to sit behind the gateway.

    The RPC API and the HTTP gateway listen on loopback only (the gateway is the only door),
    and with ``api_secret`` the RPC API takes only callers that present it (Kubo's
    ``API.Authorizations``), so no other process on the host can use it; the gateway never
    fetches from the network on a reader's behalf; no CORS headers; blocks are fsynced as
    they are written (``sync``; see ``sync_datastore``). ``deploy/kubo-harden.sh`` applies the
    same settings to a production repo.

    With ``swarm_port`` the node is a member of a private swarm (see ``private_swarm``): libp2p
    on that loopback port only, nothing announced, no bootstrap peers, and ``peers`` (the other
    members' ``/ip4/…/tcp/…/p2p/<id>`` addresses) kept connected by Kubo's peering; blocks of up
    to ``WANT_HAVE_REPLACE_SIZE`` are sent to them in answer to a want-have.
    """
    sync_datastore(config.setdefault("Datastore", {}).get("Spec", {}), sync)
    addresses = config.setdefault("Addresses", {})
    addresses["API"] = f"/ip4/127.0.0.1/tcp/{api_port}"
    addresses["Gateway"] = f"/ip4/127.0.0.1/tcp/{gateway_port}"
    api = config.setdefault("API", {})
    api["HTTPHeaders"] = {}
    if api_secret:
        api["Authorizations"] = {API_USER: {"AuthSecret": f"bearer:{api_secret}", "AllowedPaths": ["/api/v0"]}}
    gateway = config.setdefault("Gateway", {})
    gateway["NoFetch"] = True
    gateway["HTTPHeaders"] = {}
    config.setdefault("Discovery", {}).setdefault("MDNS", {})["Enabled"] = False
    config.setdefault("Swarm", {})["DisableNatPortMap"] = True
    if offline:
        addresses["Swarm"] = []
        addresses["Announce"] = []
        config["Bootstrap"] = []
    elif swarm_port:
        addresses["Swarm"] = [f"/ip4/127.0.0.1/tcp/{swarm_port}"]
        addresses["Announce"] = []
        config["Bootstrap"] = []
        config.setdefault("Peering", {})["Peers"] = [_peering_entry(p) for p in peers or []] or None
        internal = config["Internal"] = config.get("Internal") or {}
        internal["Bitswap"] = {**(internal.get("Bitswap") or {}), "WantHaveReplaceSize": WANT_HAVE_REPLACE_SIZE}
    return config


def _peering_entry(multiaddr: str) -> dict:
    """A ``Peering.Peers`` entry for ``/ip4/…/tcp/…/p2p/<id>``."""
    address, sep, peer_id = multiaddr.rpartition("/p2p/")
    if not sep or not peer_id or "/" in peer_id:
        raise KuboError(f"a peer's address must end in /p2p/<peer id>: {multiaddr!r}")
    return {"ID": peer_id, "Addrs": [address]}


SWARM_KEY_FILE = "swarm.key"
PNET_ENV = {"LIBP2P_FORCE_PNET": "1"}  # refuse to run without the swarm key: never join the public network


def new_swarm_key() -> str:
    """A private swarm's pre-shared key (64 hex digits): nodes holding it talk only to each other."""
    return secrets.token_hex(32)


def swarm_key_file(key: str) -> str:
    """The ``swarm.key`` file Kubo (libp2p's pnet) reads."""
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise KuboError("a swarm key is 64 lower-case hex digits")
    return f"/key/swarm/psk/1.0.0/\n/base16/\n{key}\n"


def sync_datastore(spec: dict, sync: bool = True) -> None:
    """Make every block store in a datastore spec fsync its writes (or not, with ``sync``
    false: for measuring the cost). Kubo initialises flatfs with ``"sync": false``, so after a
    power loss a head the gateway made durable could name a block that never reached the disk;
    badger's equivalent is ``syncWrites``. leveldb (pins and the rest) syncs its writes already.
    Only a flag the repo's on-disk spec does not record, so it can be changed on an existing
    repo."""
    if not isinstance(spec, dict):
        return
    kind = spec.get("type")
    if kind == "flatfs":
        spec["sync"] = sync
    elif kind == "badgerds":
        spec["syncWrites"] = sync
    for child in spec.get("mounts", []) if isinstance(spec.get("mounts"), list) else []:
        sync_datastore(child, sync)
    if isinstance(spec.get("child"), dict):
        sync_datastore(spec["child"], sync)


@dataclass
class KuboNode:
    """One Kubo daemon on a repo of its own, on free loopback ports."""

    repo: Path
    binary: Path = field(default_factory=find_binary)
    offline: bool = True
    sync: bool = True  # fsync blocks as they are written (False only to measure what that costs)
    api_port: int = 0
    gateway_port: int = 0
    process: subprocess.Popen | None = None
    api_secret: str = ""
    # A private swarm (``private_swarm``): its key (64 hex digits), this node's libp2p port on
    # loopback, and the other members' addresses. Empty key: offline or public, as ``offline`` says.
    swarm_key: str = ""
    swarm_port: int = 0
    peers: list[str] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def api_multiaddr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.api_port}"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "IPFS_PATH": str(self.repo), **(PNET_ENV if self.swarm_key else {})}

    @property
    def peer_id(self) -> str:
        """This node's libp2p identity (made by ``init``)."""
        return json.loads((self.repo / "config").read_text())["Identity"]["PeerID"]

    @property
    def swarm_multiaddr(self) -> str:
        """Where the other members of its private swarm reach it."""
        return f"/ip4/127.0.0.1/tcp/{self.swarm_port}/p2p/{self.peer_id}"

    def init(self) -> None:
        """Create the repo if it does not exist yet, then (re)apply the hardened config on
        fresh ports. The ``test`` profile keeps a development node off the public network."""
        self.repo.mkdir(parents=True, exist_ok=True)
        config_file = self.repo / "config"
        if not config_file.exists():
            result = subprocess.run(
                [str(self.binary), "init", "--empty-repo", "--profile", "test"],
                env=self.env, capture_output=True, text=True,
            )
            if result.returncode != 0:
                raise KuboError(f"`ipfs init` failed: {result.stderr.strip()}")
        self.api_port = self.api_port or free_port()
        self.gateway_port = self.gateway_port or free_port()
        self.api_secret = self._secret()
        if self.swarm_key:
            self.offline = False
            self.swarm_port = self.swarm_port or free_port()
            key_file = self.repo / SWARM_KEY_FILE
            key_file.touch(mode=0o600)
            key_file.write_text(swarm_key_file(self.swarm_key))
        config = json.loads(config_file.read_text())
        harden(config, api_port=self.api_port, gateway_port=self.gateway_port, offline=self.offline,
               api_secret=self.api_secret, sync=self.sync, swarm_port=self.swarm_port if self.swarm_key else 0,
               peers=self.peers)
        tmp = config_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2))
        tmp.replace(config_file)

    def _secret(self) -> str:
        """The repo's RPC secret, made once (0600) and kept across restarts."""
        path = self.repo / SECRET_FILE
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        return path.read_text().strip()

    @property
    def rpc_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_secret}"} if self.api_secret else {}

    def start(self, timeout: float = 60.0) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        if not (self.repo / "config").exists() or not self.api_port:
            self.init()
        args = [str(self.binary), "daemon", "--migrate=false"]
        if self.offline:
            args.append("--offline")
        log = open(self.repo / "daemon.log", "ab")
        self.process = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise KuboError(f"Kubo exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            if self.version() is not None:
                return
            time.sleep(0.05)
        raise KuboError(f"Kubo did not answer within {timeout}s:\n{self.log_tail()}")

    def version(self) -> str | None:
        """Kubo's version if its API answers, else None."""
        req = urllib.request.Request(self.api_url + "/api/v0/version", method="POST", headers=self.rpc_headers)
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                return json.load(resp)["Version"]
        except (OSError, ValueError, KeyError, urllib.error.URLError):
            return None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.repo / "daemon.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def connect(self, others: list["KuboNode"], timeout: float = 30.0) -> None:
        """Dial the other members of its private swarm now (peering alone retries on a backoff
        of seconds after a member was down) and wait until each is connected."""
        deadline = time.monotonic() + timeout
        for other in others:
            while True:
                self.ipfs("swarm", "connect", other.swarm_multiaddr, check=False)
                peers = self.ipfs("swarm", "peers", check=False).stdout.decode()
                if other.peer_id in peers:
                    break
                if time.monotonic() > deadline:
                    raise KuboError(f"{other.peer_id} is not connected to {self.peer_id} after {timeout}s")
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: the daemon dies at once, as in a crash or a power loss of its host."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (Kubo shuts down gracefully), SIGKILL if it does not within ``timeout``."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def ipfs(self, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run the Kubo CLI directly against this node (bypassing the gateway)."""
        auth = ("--api-auth", f"bearer:{self.api_secret}") if self.api_secret else ()
        result = subprocess.run([str(self.binary), "--api", self.api_multiaddr, *auth, *args],
                                env=self.env, input=input, capture_output=True)
        if check and result.returncode != 0:
            raise KuboError(f"ipfs {' '.join(args)} failed: {result.stderr.decode(errors='replace')}")
        return result

    def __enter__(self) -> "KuboNode":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def private_swarm(repos: list[Path], key: str | None = None, **kw) -> list[KuboNode]:
    """Kubo nodes in a private swarm of their own, initialised (not started): one swarm key, no
    bootstrap, libp2p on loopback only, each peering with every other. A block stored on one is
    found by the others over bitswap (``pin/add``, ``block/get``). ``kw`` goes to each
    ``KuboNode``."""
    key = key or new_swarm_key()
    nodes = [KuboNode(repo, swarm_key=key, **kw) for repo in repos]
    for node in nodes:
        node.init()  # makes its identity and its swarm port
    for node in nodes:
        node.peers = [other.swarm_multiaddr for other in nodes if other is not node]
        node.init()  # the same ports again, now with its peers
    return nodes


def start_swarm(nodes: list[KuboNode], timeout: float = 60.0) -> list[KuboNode]:
    """Start the members of a private swarm and connect each to the others."""
    for node in nodes:
        node.start(timeout)
    for node in nodes:
        node.connect([other for other in nodes if other is not node], timeout)
    return nodes
