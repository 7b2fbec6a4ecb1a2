"""Shared fixtures: one real Kubo daemon for the session, and the gateway in front of it.

There is no fake IPFS server anywhere in this suite. Without Kubo the run stops at once,
saying how to install it.

``MEDICON_TEST_STORAGE=postgres`` (``make test-postgres``) runs the same tests with every
gateway they start on PostgreSQL: each data dir made by ``new_data_dir`` gets a fresh database
of the session's PostgreSQL server, which ``gateway_config``, ``start_gateway``, ``make_token``
and ``BlockingTokens`` use. The default is the embedded SQLite stores.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from gateway.kubo.node import INSTALL_HINT, KuboError, KuboNode, find_binary
from realparts import PartMissing, PostgresServer

ROOT = Path(__file__).resolve().parents[1]
STORAGE = os.environ.get("MEDICON_TEST_STORAGE", "sqlite")
if STORAGE not in ("sqlite", "postgres"):
    raise ConfigError(f"MEDICON_TEST_STORAGE must be sqlite or postgres, not {STORAGE!r}")
# data dir -> the URL of its database, when the gateways of this run use PostgreSQL
STORAGE_URLS: dict[str, str] = {}
_POSTGRES: list[PostgresServer] = []


def session_postgres() -> PostgresServer:
    """The session's PostgreSQL server, started on first use and stopped at the session's end."""
    if not _POSTGRES:
        try:
            _POSTGRES.append(PostgresServer().start())
        except PartMissing as exc:
            pytest.exit(f"\n\nPOSTGRESQL IS REQUIRED: {exc}\n", returncode=3)
    return _POSTGRES[0]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    while _POSTGRES:
        _POSTGRES.pop().stop()


def run_blocking(coro):
    """Run ``coro`` to its end on a loop of its own, also from a test's running event loop."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, asyncio.run(coro)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result.append((False, exc))
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def storage_env(data_dir) -> dict[str, str]:
    """The environment that points a gateway process or the CLI at ``data_dir``'s stores."""
    url = STORAGE_URLS.get(str(data_dir))
    return {"MEDICON_STORAGE_URL": url} if url else {}


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


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL server (real, throwaway); a missing PostgreSQL fails the run."""
    return session_postgres()


@pytest.fixture
def postgres_db(postgres) -> str:
    """A fresh, empty database of the session's PostgreSQL for this test; its DSN."""
    return postgres.create_database(f"test_{uuid.uuid4().hex}")


@pytest.fixture
def own_kubo(tmp_path: Path):
    """A Kubo of the test's own, for tests that stop, pause or break it."""
    node = KuboNode(tmp_path / "repo")
    node.start()
    yield node
    node.stop()


def token_path(data_dir) -> Path:
    from gateway.storage.sqlite import TOKENS_FILE
    return Path(data_dir) / TOKENS_FILE


class BlockingTokens:
    """The gateway's real token store (the one the gateway of that data dir opens: its SQLite
    file, or its PostgreSQL database), driven from synchronous test code: its coroutines run on
    an event loop in a thread of its own."""

    def __init__(self, path, clock=time.time) -> None:
        self.path = Path(path)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        url = STORAGE_URLS.get(str(self.path.parent))
        if url:
            from gateway.storage.postgres import PostgresDatabase, PostgresTokenStore
            self._db = self._run(PostgresDatabase.open(url, min_size=1, max_size=2))
            self._store = PostgresTokenStore(self._db, clock=clock)
        else:
            from gateway.storage.sqlite import TOKENS_SCHEMA, SQLiteDatabase, SQLiteTokenStore
            self._db = self._run(SQLiteDatabase.open(self.path, TOKENS_SCHEMA, name="token"))
            self._store = SQLiteTokenStore(self._db, clock=clock)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name):
        method = getattr(self._store, name)
        return lambda *args, **kwargs: self._run(method(*args, **kwargs))

    def authenticate(self, token: str):
        return self.check(token).principal

    def close(self) -> None:
        self._run(self._db.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> "BlockingTokens":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def postgres_rows(url: str, query: str, *args) -> list[tuple]:
    """``query`` run on the PostgreSQL database at ``url`` over a connection of its own."""
    import asyncpg
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch(query, *args)]
    finally:
        await conn.close()


def sqlite_rows(path, query: str, *args) -> list[tuple]:
    """``query`` (``$1`` placeholders, as for PostgreSQL) run and committed on the SQLite file
    at ``path`` over a connection of its own."""
    import re
    import sqlite3
    db = sqlite3.connect(path)
    try:
        rows = db.execute(re.sub(r"\$\d+", "?", query), args).fetchall()
        db.commit()
        return rows
    finally:
        db.close()


def store_sql(data_dir, store: str, query: str, *args) -> list[tuple]:
    """Run ``query`` (``$1`` placeholders) on one store (``heads``, ``audit``, ``tokens``,
    ``keys``, ``fhir``) of ``data_dir``'s gateway, as someone with access to the database would:
    to read it raw, or to tamper with it. PostgreSQL holds every store in one database."""
    url = STORAGE_URLS.get(str(data_dir))
    if url:
        return run_blocking(postgres_rows(url, query, *args))
    return sqlite_rows(Path(data_dir) / f"{store}.sqlite3", query, *args)


def audit_sql(data_dir, query: str, *args) -> list[tuple]:
    return store_sql(data_dir, "audit", query, *args)


def audit_store_bytes(data_dir) -> bytes:
    """Everything the audit store of ``data_dir``'s gateway keeps: the SQLite file and its WAL
    as they stand on disk, or every row of the PostgreSQL table."""
    url = STORAGE_URLS.get(str(data_dir))
    if url:
        return "\n".join("\t".join(map(str, r)) for r in run_blocking(postgres_rows(url, "SELECT * FROM audit"))).encode()
    base = os.path.join(data_dir, "audit.sqlite3")
    return b"".join(open(p, "rb").read() for p in (base, base + "-wal") if os.path.exists(p))


def make_token(config_or_dir, name: str | None = None, role: str = "admin", patients=None,
               episodes=None) -> str:
    """A real API token in the gateway's token store (what `medicon-gateway token create` does)."""
    data_dir = getattr(getattr(config_or_dir, "records", None), "data_dir", config_or_dir)
    with BlockingTokens(token_path(data_dir)) as store:
        token, _ = store.create(name or f"{role}-{uuid.uuid4().hex[:8]}", role, patients=patients,
                                episodes=episodes)
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def app_client(aiohttp_client, config, role: str = "admin", **scope):
    """The app in-process, with a client holding a token of ``role`` (and scope)."""
    from gateway.http.app import create_app
    token = make_token(config, role=role, **scope)
    client = await aiohttp_client(create_app(config), headers=bearer(token))
    client.token = token
    return client


def new_data_dir() -> str:
    """A fresh gateway data dir with its keyring (what `medicon-gateway keys init` makes), and
    with PostgreSQL a fresh database for it (migrated, as `medicon-gateway migrate` does)."""
    from gateway.security.keyring import LocalKeyring
    data_dir = tempfile.mkdtemp(prefix="medicon-test-")
    LocalKeyring.init(Path(data_dir) / "keyring.json")
    if STORAGE == "postgres":
        url = session_postgres().create_database(f"gw_{uuid.uuid4().hex}")
        from gateway.storage.postgres import migrate_database
        run_blocking(migrate_database(url))
        STORAGE_URLS[data_dir] = url
    return data_dir


def gateway_config(node: KuboNode, **overrides):
    """A config for ``node`` with a data dir of its own (fresh chains, tokens and keys)."""
    data_dir = new_data_dir()
    url = STORAGE_URLS.get(data_dir)
    return load_config(env={}, overrides={
        "kubo.api_url": node.api_url, "kubo.gateway_url": node.gateway_url, "kubo.api_auth": node.api_secret,
        "records.data_dir": data_dir, **({"storage.url": url} if url else {}), **overrides,
    })


@dataclass
class GatewayProcess:
    """The gateway as a real process on a real port, as clients meet it."""

    process: subprocess.Popen
    url: str
    data_dir: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)

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


def start_gateway(node: KuboNode, *args: str, env: dict | None = None,
                  data_dir: str | None = None, log: Path | None = None,
                  log_level: str = "WARNING") -> GatewayProcess:
    """The gateway as a process; its log (stderr) goes to ``log`` when given, else to ours."""
    data_dir = data_dir or new_data_dir()
    token = make_token(data_dir)
    full_env = {**os.environ, "MEDICON_KUBO_API_URL": node.api_url,
                "MEDICON_KUBO_GATEWAY_URL": node.gateway_url, "MEDICON_KUBO_API_AUTH": node.api_secret,
                "MEDICON_RECORDS_DATA_DIR": data_dir, "PYTHONUNBUFFERED": "1", **storage_env(data_dir),
                **(env or {})}
    stderr = open(log, "ab") if log is not None else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--log-level", log_level, "serve", "--port", "0", *args],
        env=full_env, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT,
    )
    if stderr is not None:
        stderr.close()
    line = proc.stdout.readline()
    if not line.startswith("MEDICON_GATEWAY_URL="):
        proc.kill()
        raise AssertionError(f"gateway did not announce its URL, printed {line!r}")
    return GatewayProcess(proc, line.strip().split("=", 1)[1], data_dir, token)


@pytest.fixture(scope="session")
def gateway(kubo: KuboNode):
    """The gateway process in front of the session's Kubo."""
    gw = start_gateway(kubo)
    yield gw
    assert gw.stop() == 0, "gateway did not exit cleanly on SIGTERM"


@pytest.fixture
async def client(aiohttp_client, kubo):
    """The gateway app in-process (pytest-aiohttp), in front of the session's real Kubo, with an
    admin token."""
    return await app_client(aiohttp_client, gateway_config(kubo))


def ipfs_cli(target, *args: str, input: bytes | None = None, cwd: Path | None = None,
             extra: tuple[str, ...] = (), token: str | None = None) -> subprocess.CompletedProcess:
    """The Kubo CLI as a user runs it, with no local repo, pointed at ``target``: the gateway
    (with its admin token unless another is given), a Kubo node, or a multiaddr."""
    if isinstance(target, GatewayProcess):
        api, token = target.multiaddr, token or target.token
    elif isinstance(target, KuboNode):
        api, token = target.api_multiaddr, token or target.api_secret
    else:
        api = target
    auth = ("--api-auth", f"bearer:{token}") if token else ()
    env = {**os.environ, "IPFS_PATH": "/nonexistent-medicon-test-repo"}
    return subprocess.run([str(find_binary()), "--api", api, *auth, *extra, *args], input=input,
                          capture_output=True, env=env, cwd=cwd, timeout=120)


# --- the chaos summary (`make chaos`) -----------------------------------------------------------

# storage_full: 507s answered while a disk was full (expected then, and counted apart from 5xx).
# kubo_restarts: Kubo restarted after a full disk because Kubo itself still refused writes.
CHAOS = {"acknowledged": 0, "found_after_recovery": 0, "storage_full": 0, "kubo_restarts": 0, "forks": 0,
         "server_errors": 0}


async def trickle_body(host: str, port: int, head: str, first: bytes, total: int) -> bytes:
    """Send a request ``head`` (without its blank line; ``Content-Length: total`` is added) and
    ``first`` at once, then one byte a second, until the gateway answers; returns its answer."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head.encode() + f"Content-Length: {total}\r\n\r\n".encode() + first)
    await writer.drain()
    answer = b""
    try:
        for _ in range(12):
            try:
                answer += await asyncio.wait_for(reader.read(65536), 1.0)
            except asyncio.TimeoutError:
                writer.write(b" ")
                await writer.drain()
                continue
            if answer:
                break
    except (ConnectionResetError, BrokenPipeError):
        pass
    writer.close()
    return answer


def chaos_scale(default: int) -> int:
    """Long variants: `make chaos` sets MEDICON_CHAOS to multiply rounds, writers and examples."""
    return default * int(os.environ.get("MEDICON_CHAOS", "1"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The line `make chaos` ends with, and checks reads "lost 0, forks 0, 5xx 0". Forks and 5xx
    are counted by the race, crash and fuzz tests (each of which also fails on the first one);
    the 507s of the full-disk tests are counted on their own (expected while a disk is full)."""
    if CHAOS["acknowledged"] or os.environ.get("MEDICON_CHAOS"):
        lost = CHAOS["acknowledged"] - CHAOS["found_after_recovery"]
        terminalreporter.write_line(
            f"chaos: acknowledged {CHAOS['acknowledged']}, found after recovery "
            f"{CHAOS['found_after_recovery']}, 507 on a full disk {CHAOS['storage_full']}, "
            f"Kubo restarted after a full disk {CHAOS['kubo_restarts']}, lost {lost}, "
            f"forks {CHAOS['forks']}, 5xx {CHAOS['server_errors']}")
