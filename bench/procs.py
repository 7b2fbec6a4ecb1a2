"""The processes a benchmark run owns: one Kubo, the gateway in front of it, nginx in front of
it too, and the load generator. All on loopback, all stopped by ``Procs.close`` — which
``bench/run.py`` calls in a ``finally``, so Ctrl-C and errors leave nothing running."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from gateway.kubo.node import KuboNode, free_port
from gateway.workers import die_with_parent

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
LOADGEN = Path(__file__).with_name("loadgen.py")


class BenchError(RuntimeError):
    """A process did not start, or a scenario failed."""


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def find_nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if not found:
        raise BenchError("nginx is not installed: run bench/setup.sh (make bench does)")
    return found


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (KiB) of a process."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


@dataclass
class Gateway:
    process: subprocess.Popen
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def memory_kib(self) -> dict[str, int]:
        return proc_status(self.pid)


@dataclass
class Auth:
    """How the benchmark authenticates to the gateway: a bearer token made with
    ``gateway token create`` where that subcommand exists, else nothing."""

    token: str | None = None
    note: str = "no authentication (the gateway has no `token create` subcommand)"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


@dataclass
class Procs:
    tmp: Path
    kubo: KuboNode | None = None
    gateway: Gateway | None = None
    nginx: subprocess.Popen | None = None
    nginx_url: str | None = None
    relay: subprocess.Popen | None = None
    relay_url: str | None = None
    loadgen: subprocess.Popen | None = None
    auth: Auth = field(default_factory=Auth)
    gateway_starts: int = 0
    # Another gateway's settings (the `sites` scenario: PostgreSQL, replication), and a fixed
    # port for it (another site's replica services name it before it starts); 0: any.
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    owns_kubo: bool = True  # False: a Kubo of the `sites` scenario's swarm, stopped there

    # --- Kubo ------------------------------------------------------------------------------

    def start_kubo(self, sync: bool = True) -> KuboNode:
        """Kubo as the gateway's managed node runs it; ``sync=False``: blocks not fsynced
        (Kubo's own default), only to measure what fsyncing them costs."""
        self.kubo = KuboNode(self.tmp / "kubo" / "repo", offline=True, sync=sync)
        self.kubo.start(timeout=60)
        return self.kubo

    # --- gateway ---------------------------------------------------------------------------

    @property
    def records_dir(self) -> Path:
        return self.tmp / "records"

    def gateway_env(self) -> dict[str, str]:
        assert self.kubo is not None
        return {**os.environ, "MEDICON_KUBO_API_URL": self.kubo.api_url,
                "MEDICON_KUBO_GATEWAY_URL": self.kubo.gateway_url, "MEDICON_KUBO_API_AUTH": self.kubo.api_secret,
                "MEDICON_RECORDS_DATA_DIR": str(self.records_dir), **self.extra_env}

    def create_token(self) -> Auth:
        """``gateway token create bench --role admin`` if the subcommand exists. Any other
        outcome (no such subcommand, an error, no token printed) means no Authorization
        header — and ``check_gateway`` then tells whether the gateway wanted one."""
        self.records_dir.mkdir(parents=True, exist_ok=True)
        attempts = []
        for name in ("bench", f"bench-{secrets.token_hex(3)}"):
            cmd = [PYTHON, "-m", "gateway", "--log-level", "WARNING", "token", "create", name,
                   "--role", "admin", "--data-dir", str(self.records_dir)]
            try:
                res = subprocess.run(cmd, cwd=ROOT, env=self.gateway_env(), capture_output=True,
                                     text=True, timeout=60, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                attempts.append(f"{name}: timed out")
                continue
            if res.returncode == 0:
                for line in res.stdout.splitlines():
                    if line.startswith("MEDICON_TOKEN="):
                        token = line.split("=", 1)[1].strip()
                        if token:
                            self.auth = Auth(token, f"bearer token from `gateway token create {name} --role admin`")
                            return self.auth
                attempts.append(f"{name}: exit 0 but no MEDICON_TOKEN= line on stdout")
                continue
            err = (res.stderr or res.stdout).strip()
            if "invalid choice" in err or "argument command" in err:
                self.auth = Auth(None, "no authentication (the gateway has no `token create` subcommand)")
                return self.auth
            attempts.append(f"{name}: exit {res.returncode}: {err.splitlines()[-1] if err else ''}")
        self.auth = Auth(None, "no authentication (`gateway token create` failed: " + "; ".join(attempts) + ")")
        return self.auth

    def ensure_keyring(self) -> str:
        """A keyring in the data dir, where this gateway wants one: ``gateway keys init`` if
        that subcommand exists, else ``gateway.security.keyring.LocalKeyring.init`` (what the tests
        do), else none (a gateway from before the keyring). Returns how it was made."""
        self.records_dir.mkdir(parents=True, exist_ok=True)
        path = self.records_dir / "keyring.json"
        if path.exists():
            return "existing"
        cmd = [PYTHON, "-m", "gateway", "--log-level", "WARNING", "keys", "init",
               "--data-dir", str(self.records_dir)]
        try:
            res = subprocess.run(cmd, cwd=ROOT, env=self.gateway_env(), capture_output=True,
                                 text=True, timeout=60, stdin=subprocess.DEVNULL)
            if res.returncode == 0 and path.exists():
                return "gateway keys init"
        except subprocess.TimeoutExpired:
            pass
        code = ("import sys; from pathlib import Path\n"
                "try:\n    from gateway.security.keyring import LocalKeyring\n"
                "except ImportError:\n    sys.exit(10)\n"
                "LocalKeyring.init(Path(sys.argv[1]))\n")
        res = subprocess.run([PYTHON, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
        if res.returncode == 10:
            return "none (this gateway has no keyring)"
        if res.returncode != 0:
            raise BenchError(f"could not create a keyring at {path}: {res.stderr.strip()[-400:]}")
        return "gateway.security.keyring.LocalKeyring.init"

    def start_gateway(self, timeout: float = 60.0) -> Gateway:
        """``python -m gateway serve --port 0``; waits for its ``MEDICON_GATEWAY_URL=`` line."""
        self.gateway_starts += 1
        out = self.tmp / f"gateway-{self.gateway_starts}.out"
        err = self.tmp / f"gateway-{self.gateway_starts}.log"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = subprocess.Popen(
                [PYTHON, "-m", "gateway", "--log-level", "WARNING", "serve", "--port", str(self.port)],
                cwd=ROOT, env=self.gateway_env(), stdout=stdout, stderr=stderr,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while True:
            text = out.read_text(errors="replace")
            first = text.splitlines()[0] if "\n" in text else ""
            if first:
                if not first.startswith("MEDICON_GATEWAY_URL="):
                    _stop(proc)
                    raise BenchError(f"gateway printed {first!r} instead of its URL\n{_tail(err)}")
                self.gateway = Gateway(proc, first.split("=", 1)[1].strip(), err)
                break
            if proc.poll() is not None:
                raise BenchError(f"gateway exited with {proc.returncode} while starting:\n{_tail(err)}")
            if time.monotonic() > deadline:
                _stop(proc)
                raise BenchError(f"gateway did not announce its URL within {timeout}s:\n{_tail(err)}")
            time.sleep(0.05)
        self.check_gateway()
        return self.gateway

    def check_gateway(self) -> None:
        """One authenticated request; a 401/403 means the token (or its absence) is refused."""
        assert self.gateway is not None
        req = urllib.request.Request(self.gateway.url + "/medicon/v1/schemas", headers=self.auth.headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                json.load(resp)
        except urllib.error.HTTPError as exc:
            raise BenchError(f"the gateway answered {exc.code} to the benchmark's first request "
                             f"({self.auth.note}): {exc.read()[:300]!r}") from None
        except (OSError, ValueError) as exc:
            raise BenchError(f"the gateway does not answer: {exc}") from None

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            _stop(self.gateway.process, timeout=35)
            self.gateway = None

    def restart_gateway(self) -> Gateway:
        self.stop_gateway()
        return self.start_gateway()

    def ensure_gateway(self) -> Gateway:
        """The gateway, started again if it died (a failed scenario must not fail the rest)."""
        if self.gateway is None or self.gateway.process.poll() is not None:
            return self.start_gateway()
        return self.gateway

    # --- nginx -----------------------------------------------------------------------------

    def nginx_conf(self, port: int) -> str:
        assert self.kubo is not None
        root = self.tmp / "nginx"
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        return f"""# generated by bench/procs.py: a plain streaming reverse proxy to Kubo
worker_processes auto;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 100000;
    keepalive_timeout 75s;

    upstream kubo_api {{ server 127.0.0.1:{self.kubo.api_port}; keepalive 64; }}
    upstream kubo_gateway {{ server 127.0.0.1:{self.kubo.gateway_port}; keepalive 64; }}

    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        proxy_buffering off;
        proxy_request_buffering off;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        # The upstream's name ("kubo_gateway") as Host would make Kubo's gateway look it up as
        # a DNSLink name (a DNS query per request): send the loopback address, as clients do.
        proxy_set_header Host $host;
        # With buffering off, nginx moves a body through one buffer of this size each way:
        # the gateway's chunk size (256 KiB), not the 4-8 KiB default.
        proxy_buffer_size 256k;
        proxy_buffers 4 256k;
        proxy_busy_buffers_size 256k;
        client_body_buffer_size 256k;
        proxy_read_timeout 300s;
        proxy_send_timeout 300s;
        location /api/v0/ {{ proxy_pass http://kubo_api; }}
        location /ipfs/ {{ proxy_pass http://kubo_gateway; }}
        location / {{ return 404; }}
    }}
}}
"""

    def start_nginx(self, timeout: float = 20.0) -> str:
        binary = find_nginx()
        port = free_port()
        conf = self.tmp / "nginx" / "nginx.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(self.nginx_conf(port))
        errlog = self.tmp / "nginx" / "error.log"
        with open(self.tmp / "nginx" / "stderr.log", "wb") as stderr:
            self.nginx = subprocess.Popen(
                [binary, "-p", str(conf.parent) + "/", "-e", str(errlog), "-c", str(conf), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                start_new_session=True, preexec_fn=die_with_parent,
            )
        self.nginx_url = self._relaying(f"http://127.0.0.1:{port}", self.nginx, "nginx", timeout,
                                        lambda: f"{_tail(self.tmp / 'nginx' / 'stderr.log')}\n{_tail(errlog)}")
        return self.nginx_url

    def _relaying(self, url: str, proc: subprocess.Popen, name: str, timeout: float, logs) -> str:
        """``url`` once the proxy ``proc`` there answers Kubo's ``version`` through it."""
        assert self.kubo is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode}:\n{logs()}")
            try:
                # Kubo's RPC takes only callers with its secret (API.Authorizations), through a proxy too
                req = urllib.request.Request(url + "/api/v0/version", method="POST", headers=self.kubo.rpc_headers)
                with urllib.request.urlopen(req, timeout=2) as resp:
                    json.load(resp)
                return url
            except (OSError, ValueError):
                time.sleep(0.05)
        raise BenchError(f"{name} did not proxy to Kubo within {timeout}s:\n{logs()}")

    def nginx_version(self) -> str:
        try:
            res = subprocess.run([find_nginx(), "-v"], capture_output=True, text=True, timeout=10)
            return (res.stderr or res.stdout).strip().split("/", 1)[-1]
        except (OSError, BenchError, subprocess.TimeoutExpired):
            return "unknown"

    # --- a bare aiohttp relay (bench/relay.py) ----------------------------------------------

    def start_relay(self, timeout: float = 30.0) -> str:
        """``python -m bench.relay`` in front of this run's Kubo; its URL once it relays."""
        assert self.kubo is not None
        port = free_port()
        log = self.tmp / "relay.log"
        with open(log, "wb") as out:
            self.relay = subprocess.Popen(
                [PYTHON, "-m", "bench.relay", "--api", self.kubo.api_url, "--gateway", self.kubo.gateway_url,
                 "--port", str(port)], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, preexec_fn=die_with_parent)
        self.relay_url = self._relaying(f"http://127.0.0.1:{port}", self.relay, "the aiohttp relay", timeout,
                                        lambda: _tail(log))
        return self.relay_url

    def stop_relay(self) -> None:
        _stop(self.relay, timeout=10)
        self.relay = self.relay_url = None

    # --- load generator --------------------------------------------------------------------

    def run_loadgen(self, spec: dict, timeout: float) -> dict:
        """Run one scenario in a separate load-generator process; its JSON answer."""
        self.loadgen = subprocess.Popen(
            [PYTHON, str(LOADGEN)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
            cwd=ROOT, start_new_session=True, preexec_fn=die_with_parent,
        )
        try:
            out, _ = self.loadgen.communicate(json.dumps(spec).encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"load generator ({spec['kind']}) did not finish within {timeout:.0f}s") from None
        finally:
            _stop(self.loadgen, timeout=5)
        rc, self.loadgen = self.loadgen.returncode, None
        if rc != 0:
            raise BenchError(f"load generator ({spec['kind']}) failed with exit {rc}")
        return json.loads(out)

    # --- all -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop everything this run started, in reverse order; never raises."""
        for step in (lambda: _stop(self.loadgen, timeout=5), self.stop_gateway,
                     lambda: _stop(self.nginx, timeout=15), self.stop_relay,
                     lambda: self.kubo.stop() if self.kubo and self.owns_kubo else None):
            try:
                step()
            except BaseException as exc:  # keep stopping the others
                print(f"bench: cleanup step failed: {exc!r}", file=sys.stderr)
        self.loadgen = self.nginx = None


TMP_PREFIX = "medicon-bench-"


def reap_stale(say=lambda msg: None) -> None:
    """Stop the Kubo of an earlier run that was killed outright (SIGKILL skips every cleanup;
    the gateway and nginx die with their parent, Kubo is started in a session of its own): an
    ``ipfs daemon`` whose repo is in a ``medicon-bench-*`` temporary dir and whose parent is
    gone. Then remove that dir."""
    prefix = os.path.join(tempfile.gettempdir(), TMP_PREFIX)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            if len(cmd) < 2 or not cmd[0].endswith(b"ipfs") or cmd[1] != b"daemon":
                continue
            env = dict(item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0") if b"=" in item)
            repo = env.get(b"IPFS_PATH", b"").decode()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if repo.startswith(prefix) and ppid == 1:
            say(f"stopping the Kubo (pid {entry.name}) of an earlier bench run that was killed")
            try:
                os.kill(int(entry.name), signal.SIGTERM)
                for _ in range(100):
                    if not Path(f"/proc/{entry.name}").exists():
                        break
                    time.sleep(0.1)
            except ProcessLookupError:
                pass
            shutil.rmtree(repo[:len(prefix)] + repo[len(prefix):].split("/", 1)[0], ignore_errors=True)

