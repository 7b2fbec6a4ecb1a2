"""``server.workers``: several gateway processes serving one port, so requests use more than one
core (one Python process runs its request handling on one).

The supervisor (``medicon-gateway serve`` with ``server.workers`` > 1) reserves the port with a
socket bound ``SO_REUSEPORT`` but never listening, starts the workers — the same command with
``--worker N``, each listening on that port with ``SO_REUSEPORT``, so the kernel spreads new
connections over them — and announces the URL once every worker announced its own. A worker
that dies is started again (a crash is logged with its exit status); one that cannot start
three times in a row stops the whole gateway, as a single process that cannot start does.
SIGTERM/SIGINT is passed on: each worker drains its requests (``server.shutdown_timeout``) and
the supervisor exits when they have, with a non-zero status if one did not exit cleanly.

Each worker's metrics go to a directory the supervisor makes for them (``gateway.metrics``:
prometheus_client's multiprocess mode), so ``/metrics`` shows the whole gateway whichever
worker answers; a dead worker's in-flight gauge is dropped, its counts stay. The directory goes
when the supervisor stops; one left by a supervisor killed outright is removed by the next.

Only a storage backend several processes share can have workers: PostgreSQL (``storage.url``),
where several gateways already share heads, tokens, audit and keys; the embedded SQLite stores
belong to one process (the configuration refuses it).
"""

from __future__ import annotations

import ctypes
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from .config import Config
from .metrics import MULTIPROCESS_ENV

log = logging.getLogger("medicon_gateway")

STARTS_BEFORE_GIVING_UP = 3  # a worker that exits while starting, this many times in a row: stop
START_TIMEOUT = 120.0        # seconds a worker has to announce its URL
PR_SET_PDEATHSIG = 1


def reserve_port(host: str, port: int) -> socket.socket:
    """The port the workers share, held for as long as the gateway runs (a worker restarted
    finds it still free). Bound with SO_REUSEPORT and never listening: it takes no connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def die_with_parent() -> None:
    """``preexec_fn`` of a child that must not outlive the process that started it, even one
    killed outright (SIGKILL): the kernel sends it SIGTERM then (Linux: PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@dataclass
class Worker:
    number: int
    process: subprocess.Popen | None = None
    started: float = 0.0
    failed_starts: int = 0
    ready: bool = False
    buffered: bytes = b""


class Supervisor:
    def __init__(self, config: Config, argv: list[str], port: int) -> None:
        self.config = config
        self.argv = argv  # the command line of this process, less the program
        self.port = port
        self.workers = [Worker(n) for n in range(1, config.server.workers + 1)]
        self.stopping = False
        self.selector = selectors.DefaultSelector()
        remove_stale_metrics_dirs()
        self.metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")

    def command(self, worker: Worker) -> list[str]:
        return [sys.executable, "-m", "gateway", *self.argv, "--port", str(self.port), "--worker", str(worker.number)]

    def start(self, worker: Worker) -> None:
        worker.process = subprocess.Popen(self.command(worker), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                          env={**os.environ, MULTIPROCESS_ENV: self.metrics_dir},
                                          preexec_fn=die_with_parent)
        worker.started, worker.ready, worker.buffered = time.monotonic(), False, b""
        os.set_blocking(worker.process.stdout.fileno(), False)
        self.selector.register(worker.process.stdout, selectors.EVENT_READ, worker)

    def read_announcement(self, worker: Worker) -> None:
        """A worker's stdout: its first line is its URL (it is ready); anything after is passed on."""
        assert worker.process is not None
        try:
            chunk = os.read(worker.process.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.selector.unregister(worker.process.stdout)
            return
        if worker.ready:
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            return
        worker.buffered += chunk
        if b"\n" in worker.buffered:
            line, _, rest = worker.buffered.partition(b"\n")
            if not line.startswith(b"MEDICON_GATEWAY_URL="):
                log.error("worker %d printed %r instead of its URL", worker.number, line[:200])
            worker.ready, worker.failed_starts = True, 0
            if rest:
                sys.stdout.buffer.write(rest)
                sys.stdout.flush()

    def reap(self, worker: Worker) -> None:
        """A worker that exited: started again, unless the gateway is stopping or the worker
        keeps failing to start."""
        assert worker.process is not None
        code = worker.process.returncode
        try:
            self.selector.unregister(worker.process.stdout)
        except (KeyError, ValueError):
            pass
        worker.process.stdout.close()
        mark_process_dead(worker.process.pid, self.metrics_dir)  # its requests in flight are over
        if self.stopping:
            return
        if not worker.ready:
            worker.failed_starts += 1
            if worker.failed_starts >= STARTS_BEFORE_GIVING_UP:
                raise WorkerFailed(f"worker {worker.number} exited with status {code} while starting, "
                                   f"{worker.failed_starts} times in a row")
        log.warning("worker %d exited with status %s; starting it again", worker.number, code)
        self.start(worker)

    def poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            self.read_announcement(key.data)
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is not None:
                self.reap(worker)
            elif worker.process is not None and not worker.ready and time.monotonic() - worker.started > START_TIMEOUT:
                worker.process.kill()

    def stop(self) -> int:
        """SIGTERM to every worker, then wait for them to drain; 0 if every one exited cleanly."""
        self.stopping = True
        running = [w.process for w in self.workers if w.process is not None and w.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_timeout + 10
        status = 0
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in time; killed", worker.number)
                process.kill()
                process.wait()
            # (one still starting has nothing to drain: SIGTERM's default ends it)
            clean = (0,) if worker.ready else (0, -signal.SIGTERM)
            if process in running and process.returncode not in clean:
                log.error("worker %d exited with status %s when stopped", worker.number, process.returncode)
                status = 1
        shutil.rmtree(self.metrics_dir, ignore_errors=True)  # every worker is gone: so are their metrics
        return status


class WorkerFailed(RuntimeError):
    pass


# The workers' metrics directory: "<prefix><supervisor's pid>-<random>" in the temp dir.
METRICS_DIR_PREFIX = "medicon-metrics-"


def remove_stale_metrics_dirs(parent: str | None = None) -> list[Path]:
    """Remove the metrics directories of supervisors that are gone without stopping (killed
    outright: SIGKILL skips ``Supervisor.stop``), so they do not pile up in the temp dir. A
    directory whose supervisor's pid is alive — or belongs to another user — is kept."""
    removed = []
    for path in Path(parent or tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        pid = path.name[len(METRICS_DIR_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or not path.is_dir() or path.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue  # gone meanwhile (another supervisor starting removed it)
        try:
            os.kill(int(pid), 0)
            continue  # its supervisor runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # a process of another user has that pid now
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def supervise(config: Config, argv: list[str], announce) -> int:
    """Run ``server.workers`` workers on one port until SIGTERM/SIGINT."""
    reserved = reserve_port(config.server.host, config.server.port)
    port = reserved.getsockname()[1]
    supervisor = Supervisor(config, argv, port)
    stop_requested = []

    def request_stop(signum, frame) -> None:
        stop_requested.append(signum)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for worker in supervisor.workers:
            supervisor.start(worker)
        announced = False
        while not stop_requested:
            supervisor.poll(0.2)
            if not announced and all(w.ready for w in supervisor.workers):
                announce(config.server.host, port)
                log.info("medicon-gateway: %d workers listening on port %d", len(supervisor.workers), port)
                announced = True
    except WorkerFailed as exc:
        log.error("%s: stopping the gateway", exc)
        supervisor.stop()
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    status = supervisor.stop()
    reserved.close()
    log.info("stopped")
    return status
