"""The real thing, as a plugin author runs it: ``medicon-gateway dev`` (a throwaway Kubo with the
gateway in front, this plugin installed and found through its entry point), and a small HTTP
server standing in for the hospital's wound-care system, receiving the webhook."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

WEBHOOK_SECRET = "example-webhook-secret"


@dataclass
class Receiver:
    """Every POST it got: (headers, raw body)."""

    url: str
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def deliveries(self) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return list(self.received)


@pytest.fixture(scope="session")
def receiver():
    got: list[tuple[dict[str, str], bytes]] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock:
                got.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Receiver(f"http://127.0.0.1:{server.server_port}/wounds", got, lock)
    server.shutdown()
    server.server_close()


@dataclass
class DevGateway:
    url: str
    token: str      # the admin token `dev` prints
    data_dir: Path  # the gateway's records.data_dir, for `token create`

    def token_for(self, name: str, role: str, *scope: str) -> str:
        """A token made the way an operator makes one: ``medicon-gateway token create``."""
        done = subprocess.run([sys.executable, "-m", "gateway", "token", "create", name, "--role", role,
                               "--data-dir", str(self.data_dir), *scope],
                              capture_output=True, text=True, timeout=60, check=True)
        return done.stdout.strip().split("=", 1)[1]


@pytest.fixture(scope="session")
def gateway(tmp_path_factory, receiver):
    data_dir = tmp_path_factory.mktemp("dev")
    env = {**os.environ, "EXAMPLE_WOUNDS_WEBHOOK_URL": receiver.url, "EXAMPLE_WOUNDS_WEBHOOK_SECRET": WEBHOOK_SECRET}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--log-level", "WARNING", "dev", "--port", "0",
                             "--data-dir", str(data_dir)], env=env, stdout=subprocess.PIPE, text=True)
    url_line, token_line = proc.stdout.readline(), proc.stdout.readline()
    if not url_line.startswith("MEDICON_GATEWAY_URL=") or not token_line.startswith("MEDICON_TOKEN="):
        proc.kill()
        pytest.fail(f"medicon-gateway dev did not start (printed {url_line!r}); is Kubo installed "
                    "(the gateway's `make setup`, or `ipfs` on PATH)?", pytrace=False)
    yield DevGateway(url_line.strip().split("=", 1)[1], token_line.strip().split("=", 1)[1], data_dir / "records")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
