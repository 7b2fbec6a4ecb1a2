"""`medicon-gateway dev`: a managed Kubo and the gateway, announced, stopped on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

from gateway.kubo.node import KuboNode


def test_dev_starts_kubo_and_gateway_and_stops_both(tmp_path):
    data_dir = tmp_path / "dev"
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "dev", "--port", "0", "--data-dir", str(data_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("MEDICON_GATEWAY_URL=http://127.0.0.1:"), line
        url = line.split("=", 1)[1]
        token_line = proc.stdout.readline().strip()
        assert token_line.startswith("MEDICON_TOKEN=mdc_"), token_line
        token = token_line.split("=", 1)[1]
        req = urllib.request.Request(url + "/api/v0/version", method="POST")
        try:  # no token, no service
            urllib.request.urlopen(req, timeout=10)
            raise AssertionError("answered without credentials")
        except urllib.error.HTTPError as err:
            assert err.code == 401
        req = urllib.request.Request(url + "/api/v0/version", method="POST",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.load(r)["Version"]
        with urllib.request.urlopen(url + "/readyz", timeout=10) as r:
            assert json.load(r)["status"] == "ready"
        kubo_api = json.loads((data_dir / "kubo" / "config").read_text())["Addresses"]["API"]
        assert kubo_api.startswith("/ip4/127.0.0.1/tcp/")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert "kubo stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    node = KuboNode(data_dir / "kubo", api_port=int(kubo_api.rsplit("/", 1)[1]))
    assert node.version() is None, "Kubo still answers after dev stopped"
    # the repo survives: a second run starts on it again
    assert (data_dir / "kubo" / "config").exists() and os.listdir(data_dir / "kubo")
