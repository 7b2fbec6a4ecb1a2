"""``medicon-gateway dev --sites N``: several sites on one machine, for development.

Starts, all on loopback and all under the dev data dir: a PostgreSQL server of its own
(``postgres/``; as the ``postgres`` user when run as root, as PostgreSQL refuses root), N Kubo
nodes in a private swarm (one swarm key, no bootstrap, each peering with the others), and N
gateway processes on that one database, each in front of its own node, each replicating every
record to the others' Pinning Service API (``records.replicas``: 2 by default). The sites
share the key-encryption key (``keys export`` / ``keys join``), each signs with its own key.
Prints each site's URL and an admin token (``MEDICON_SITE<n>_URL=``, ``MEDICON_SITE<n>_TOKEN=``;
site 1 also as ``MEDICON_GATEWAY_URL=``/``MEDICON_TOKEN=``), runs until Ctrl-C, then stops
every process and revokes the tokens it made. A second run on the same data dir finds the
same database, repos and keys.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .config import ConfigError, load_config
from .kubo.node import KuboError, KuboNode, find_binary, free_port, private_swarm, start_swarm
from .security.keyring import LocalKeyring
from .storage import open_storage

POSTGRES_HINT = "apt-get install -y postgresql (Debian), or `make setup`"
DATABASE = "medicon"


class DevError(RuntimeError):
    """A part of the multi-site dev setup is missing or did not start."""


def postgres_bindir() -> Path:
    """initdb and pg_ctl: ``pg_config --bindir``, else Debian's newest /usr/lib/postgresql/*/bin."""
    candidates = []
    if shutil.which("pg_config"):
        done = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if done.returncode == 0:
            candidates.append(Path(done.stdout.strip()))
    candidates += sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
                         key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise DevError(f"PostgreSQL (initdb, pg_ctl) is not installed: {POSTGRES_HINT}")


class LocalPostgres:
    """A PostgreSQL cluster kept in ``directory``: created once (a random password, kept 0600
    beside it), started on a free loopback port, no unix socket, stopped with ``stop``."""

    USER = "medicon"

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.bindir = postgres_bindir()
        self.port = 0
        self._owner = None
        if os.geteuid() == 0:
            try:
                self._owner = pwd.getpwnam("postgres")
            except KeyError:
                raise DevError(f"running as root, but there is no `postgres` user to run PostgreSQL as: {POSTGRES_HINT}")

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def password(self) -> str:
        return (self.dir / "password").read_text().strip()

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://{self.USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str) -> None:
        command = [*(["runuser", "-u", "postgres", "--"] if self._owner else []), str(self.bindir / tool), *args]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.dir, timeout=120,
                              env={**os.environ, "LC_ALL": "C.UTF-8"})
        if done.returncode != 0:
            log = self.dir / "log"
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:]) if log.exists() else ""
            raise DevError(f"{tool} failed: {done.stderr.strip()}\n{tail}".strip())

    def _own(self, path: Path) -> None:
        if self._owner is not None:
            os.chown(path, self._owner.pw_uid, self._owner.pw_gid)

    def start(self) -> str:
        """Start the server (creating the cluster and its database on the first run); the URL
        of the database."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._own(self.dir)
        if self._owner is not None and subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(self.dir)],
                                                      capture_output=True).returncode != 0:
            raise DevError(f"PostgreSQL runs as the postgres user, which cannot reach {self.dir}: a parent "
                           "directory is private (mode 0700); use a --data-dir under a directory it can enter")
        if not (self.data / "PG_VERSION").exists():
            password = self.dir / "password"
            password.write_text(secrets.token_urlsafe(24) + "\n")
            password.chmod(0o600)
            self._own(password)
            self._run("initdb", "-D", str(self.data), "-U", self.USER, f"--pwfile={password}",
                      "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--no-instructions")
        self.port = free_port()
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "60",
                  "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''", "start")
        asyncio.run(self._create_database())
        return self.url()

    async def _create_database(self) -> None:
        import asyncpg
        conn = await asyncpg.connect(self.url("postgres"))
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
                await conn.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            await conn.close()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


def replica_services(names: list[str], urls: list[str], key_file: Path) -> list[dict[str, str]]:
    """``records.replica_services`` naming the other sites' Pinning Service API."""
    return [{"name": name, "endpoint": f"{url}/pinning/v1", "key_file": str(key_file)} for name, url in zip(names, urls)]


def _keyrings(dirs: list[Path], names: list[str], scratch: Path) -> None:
    """Site 1's keyring (made once); each other site's joined from site 1's bundle."""
    first = dirs[0] / "keyring.json"
    if not first.exists():
        first.parent.mkdir(parents=True, exist_ok=True)
        LocalKeyring.init(first, gateway_id=names[0])
    for d, name in zip(dirs[1:], names[1:]):
        ring = d / "keyring.json"
        if ring.exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        bundle = scratch / f"bundle-{secrets.token_hex(4)}.json"
        LocalKeyring.load(first).export(bundle)
        try:
            LocalKeyring.join(ring, bundle, gateway_id=name)
        finally:
            bundle.unlink(missing_ok=True)


async def _tokens(url: str, data_dir: Path, names: list[str]) -> list[tuple[str, str, str, str]]:
    """(admin token, its id, replicator token, its id) for each site, named after this run."""
    config = load_config(env={}, overrides={"storage.url": url, "records.data_dir": str(data_dir)})
    storage = await open_storage(config)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)
    try:
        out = []
        for name in names:
            admin, admin_info = await storage.tokens.create(f"dev-{name}-{stamp}", "admin")
            rep, rep_info = await storage.tokens.create(f"dev-replicator-{name}-{stamp}", "replicator")
            out.append((admin, admin_info.id, rep, rep_info.id))
        return out
    finally:
        await storage.close()


async def _revoke(url: str, data_dir: Path, ids: list[str]) -> None:
    config = load_config(env={}, overrides={"storage.url": url, "records.data_dir": str(data_dir)})
    storage = await open_storage(config)
    try:
        for token_id in ids:
            await storage.tokens.revoke(token_id)
    finally:
        await storage.close()


def run_sites(count: int, data_dir: Path, *, config_path: str | None, host: str | None, port: int | None,
              replicas: int | None, log_level: str, log_format: str) -> int:
    """The ``dev --sites N`` command (see the module's docstring)."""
    if count < 2:
        raise ConfigError("--sites must be 2 or more (one site: plain `dev`)")
    replicas = min(2, count) if replicas is None else replicas
    if not 1 <= replicas <= count:
        raise ConfigError(f"--replicas must be between 1 and the number of sites ({count})")
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    names = [f"site-{i}" for i in range(1, count + 1)]
    key_file = data_dir / "swarm.key.hex"
    if not key_file.exists():
        from .kubo.node import new_swarm_key
        key_file.touch(mode=0o600)
        key_file.write_text(new_swarm_key() + "\n")
    binary = find_binary(load_config(config_path).kubo.bin)
    postgres = LocalPostgres(data_dir / "postgres")
    nodes: list[KuboNode] = []
    gateways: list[subprocess.Popen] = []
    url, token_ids = "", []
    stop = {"signal": None}

    def on_signal(signum, frame) -> None:
        stop["signal"] = signum
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = postgres.start()
        print(f"postgresql on 127.0.0.1:{postgres.port}, cluster {postgres.data}", file=sys.stderr, flush=True)
        nodes = start_swarm(private_swarm([data_dir / name / "kubo" for name in names],
                                          key_file.read_text().strip(), binary=binary))
        for name, node in zip(names, nodes):
            print(f"kubo {node.version()} for {name}: repo {node.repo}, swarm {node.swarm_multiaddr} "
                  "(private: the dev swarm key)", file=sys.stderr, flush=True)
        dirs = [data_dir / name / "records" for name in names]
        _keyrings(dirs, names, data_dir)
        tokens = asyncio.run(_tokens(url, dirs[0], names))
        token_ids = [t for four in tokens for t in (four[1], four[3])]
        shown = "127.0.0.1" if host in (None, "0.0.0.0", "127.0.0.1", "localhost") else host
        ports = [(port + i if port else free_port()) for i in range(count)]
        urls = [f"http://{shown}:{p}" for p in ports]
        for i, (name, node, d) in enumerate(zip(names, nodes, dirs)):
            key = data_dir / name / "replicator-key"
            key.touch(mode=0o600)
            key.write_text(tokens[i][2])
            others = [j for j in range(count) if j != i]
            env = {k: v for k, v in os.environ.items() if not k.startswith("MEDICON_")}
            env.update({
                "MEDICON_KUBO_API_URL": node.api_url, "MEDICON_KUBO_GATEWAY_URL": node.gateway_url,
                "MEDICON_KUBO_API_AUTH": node.api_secret, "MEDICON_RECORDS_DATA_DIR": str(d),
                "MEDICON_STORAGE_URL": url, "MEDICON_RECORDS_REPLICAS": str(replicas),
                "MEDICON_RECORDS_REPLICA_SERVICES": json.dumps(replica_services(
                    [names[j] for j in others], [urls[j] for j in others], key)),
                "PYTHONUNBUFFERED": "1"})
            if host is not None:
                env["MEDICON_SERVER_HOST"] = host
            command = [sys.executable, "-m", "gateway", "--log-level", log_level, "--log-format", log_format,
                       "serve", "--port", str(ports[i])] + (["--config", config_path] if config_path else [])
            gateways.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                             text=True, start_new_session=True))
        for i, proc in enumerate(gateways):
            line = proc.stdout.readline()
            if not line.startswith("MEDICON_GATEWAY_URL="):
                raise DevError(f"the gateway of {names[i]} did not start (exit {proc.poll()})")
        print(f"MEDICON_GATEWAY_URL={urls[0]}", flush=True)
        print(f"MEDICON_TOKEN={tokens[0][0]}", flush=True)
        for i in range(count):
            print(f"MEDICON_SITE{i + 1}_URL={urls[i]}", flush=True)
            print(f"MEDICON_SITE{i + 1}_TOKEN={tokens[i][0]}", flush=True)
        print(f"{count} sites on one PostgreSQL, records pinned on {replicas} of {count} Kubo nodes before "
              "they are acknowledged; admin tokens revoked when dev stops (Ctrl-C)", file=sys.stderr, flush=True)
        while stop["signal"] is None:
            ended = [names[i] for i, p in enumerate(gateways) if p.poll() is not None]
            if ended:
                print(f"the gateway of {', '.join(ended)} exited: stopping", file=sys.stderr, flush=True)
                break
            time.sleep(0.2)
        return 0
    except (DevError, KuboError) as exc:
        print(f"medicon-gateway: error: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for proc in gateways:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in gateways:
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
        if token_ids:
            try:
                asyncio.run(_revoke(url, data_dir / names[0] / "records", token_ids))
            except Exception as exc:  # noqa: BLE001 - the rest must still stop
                print(f"could not revoke the dev tokens: {exc}", file=sys.stderr)
        for node in nodes:
            node.stop()
        try:
            postgres.stop()
        except DevError as exc:
            print(f"postgresql: {exc}", file=sys.stderr)
        print("sites stopped", file=sys.stderr, flush=True)
        for s, handler in previous.items():
            signal.signal(s, handler)
