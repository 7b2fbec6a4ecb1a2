"""Real parts for the tests besides Kubo: a throwaway PostgreSQL server and Debian's Chromium.

Nothing here is faked and nothing is skipped: a missing part raises ``PartMissing``, whose
message says how to install it, and the fixtures in conftest turn that into a failed run.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from gateway.kubo.node import free_port

POSTGRES_HINT = ("Run `make setup`, or as root: apt-get update && apt-get install -y postgresql")
CHROMIUM_PATH = Path("/usr/bin/chromium")
CHROMIUM_HINT = ("Run `make setup`, or as root: apt-get update && apt-get install -y chromium "
                 "chromium-driver")


class PartMissing(RuntimeError):
    """A real part the tests need is not installed; the message says how to install it."""


def postgres_bindir() -> Path:
    """The directory of initdb and pg_ctl: ``pg_config --bindir``, else Debian's newest
    /usr/lib/postgresql/<version>/bin (pg_config may come from libpq-dev without a server)."""
    candidates = []
    if shutil.which("pg_config"):
        done = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if done.returncode == 0:
            candidates.append(Path(done.stdout.strip()))
    versioned = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted((Path(p) for p in versioned), key=lambda p: int(p.parent.name)
                         if p.parent.name.isdigit() else 0, reverse=True)
    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise PartMissing("PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found; the "
                      f"storage tests run a real PostgreSQL server. {POSTGRES_HINT}")


def chromium_executable() -> Path:
    """Debian's Chromium, which Playwright drives (``playwright install`` is never needed)."""
    if not os.access(CHROMIUM_PATH, os.X_OK):
        raise PartMissing(f"Chromium is not installed at {CHROMIUM_PATH}; the browser tests "
                          f"drive a real Chromium. {CHROMIUM_HINT}")
    return CHROMIUM_PATH


class PostgresServer:
    """A PostgreSQL cluster of its own: a temp dir, a free loopback port, a unix socket in that
    dir, a random password. PostgreSQL refuses to run as root, so as root the cluster belongs
    to (and the server runs as) the ``postgres`` user the Debian package creates."""

    SUPERUSER = "medicon"

    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.password = secrets.token_urlsafe(24)
        self.port = 0
        self.dir: Path | None = None
        self._run_as: list[str] = []
        self._owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._owner = pwd.getpwnam("postgres")
            except KeyError:
                raise PartMissing("running as root, but there is no `postgres` user to run the "
                                  f"server as (the Debian package creates it). {POSTGRES_HINT}")
            self._run_as = ["runuser", "-u", "postgres", "--"]

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def dsn(self) -> str:
        """The maintenance database ``postgres``, as the superuser."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return (f"postgresql://{self.SUPERUSER}:{self.password}@127.0.0.1:{self.port}/"
                f"{database}")

    def _tool(self, name: str, *args: str, as_owner: bool = True) -> subprocess.CompletedProcess:
        command = [*(self._run_as if as_owner else []), str(self.bindir / name), *args]
        env = {**os.environ, "PGPASSWORD": self.password, "LC_ALL": "C.UTF-8"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120,
                              cwd=self.dir)
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed ({done.returncode}): {done.stderr.strip()}"
                               f"{self._log_tail()}")
        return done

    def _log_tail(self) -> str:
        log = self.dir / "log" if self.dir else None
        if log is None or not log.exists():
            return ""
        return "\nserver log:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])

    def start(self, attempts: int = 3) -> "PostgresServer":
        """initdb and start; a port taken between choosing and binding it gets another try."""
        self.dir = Path(tempfile.mkdtemp(prefix="medicon-pg-"))
        try:
            if self._owner is not None:
                os.chown(self.dir, self._owner.pw_uid, self._owner.pw_gid)
            password_file = self.dir / "password"
            password_file.write_text(self.password + "\n")
            if self._owner is not None:
                os.chown(password_file, self._owner.pw_uid, self._owner.pw_gid)
            self._tool("initdb", "-D", str(self.data_dir), "-U", self.SUPERUSER,
                       f"--pwfile={password_file}", "--auth-host=scram-sha-256",
                       "--auth-local=scram-sha-256", "-E", "UTF8", "--no-instructions")
            password_file.unlink()
            for attempt in range(attempts):
                self.port = free_port()
                try:
                    self._tool("pg_ctl", "-D", str(self.data_dir), "-l", str(self.dir / "log"),
                               "-o", f"-p {self.port} -k {self.dir} "
                                     "-c listen_addresses=127.0.0.1", "-w", "-t", "60", "start")
                    return self
                except RuntimeError:
                    if attempt == attempts - 1 or "already in use" not in self._log_tail():
                        raise
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Fast shutdown (open sessions are ended) and the whole cluster removed."""
        if self.dir is None:
            return
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._tool("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its DSN."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r} is not a plain lower-case identifier")
        self._tool("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.SUPERUSER,
                   name, as_owner=False)
        return self.dsn_for(name)

    def server_pid(self) -> int:
        """The postmaster's process id (first line of postmaster.pid)."""
        return int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
