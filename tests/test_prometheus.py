"""A real Prometheus (Debian's) scrapes the gateway process the way ``deploy/README.md`` says:
bearer token of the role ``monitor`` from a file; a clinician's token is refused. The Grafana
dashboard's queries are valid PromQL (``promtool``) and each one runs against that Prometheus."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import ROOT, bearer, make_token, start_gateway
from gateway.kubo.node import free_port
from records_helpers import opened, uid

DASHBOARD = ROOT / "deploy" / "grafana" / "medicon-gateway.json"
HINT = "Run `make setup`, or as root: apt-get update && apt-get install -y prometheus"
OPENED_ROUTE = "/medicon/v1/patients/{patient}/episodes"


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"PROMETHEUS IS REQUIRED: `{name}` is not installed; these tests run a real "
                    f"Prometheus. {HINT}", pytrace=False)
    return found


def dashboard_queries() -> list[str]:
    """Every query of the dashboard, with Grafana's variables as Grafana would fill them."""
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in doc["panels"] for t in panel["targets"]]
    return [e.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", ".*") for e in exprs]


def promtool_check(tmp_path: Path, exprs: list[str]) -> subprocess.CompletedProcess:
    rules = "groups:\n  - name: dashboard\n    rules:\n" + "".join(
        f"      - record: dashboard:query_{i}\n        expr: {json.dumps(e)}\n" for i, e in enumerate(exprs))
    path = tmp_path / "rules.yml"
    path.write_text(rules)
    return subprocess.run([binary("promtool"), "check", "rules", str(path)], capture_output=True, text=True,
                          timeout=60)


def test_dashboard_queries_are_valid_promql(tmp_path):
    exprs = dashboard_queries()
    done = promtool_check(tmp_path, exprs)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout
    broken = promtool_check(tmp_path, ["sum by (surface (rate(medicon_http_requests_total[1m]))"])
    assert broken.returncode != 0  # the check can fail


class Prometheus:
    def __init__(self, tmp_path: Path, target: str, tokens: dict[str, str]) -> None:
        jobs = []
        for job, token in tokens.items():
            token_file = tmp_path / f"{job}.token"
            token_file.write_text(token)
            token_file.chmod(0o600)
            jobs.append(f"""  - job_name: {job}
    metrics_path: /metrics
    authorization:
      type: Bearer
      credentials_file: {token_file}
    static_configs:
      - targets: ["{target}"]
""")
        config = tmp_path / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n" + "".join(jobs))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process = subprocess.Popen(
            [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
        self.wait_for(lambda: requests.get(self.url + "/-/ready", timeout=2).status_code == 200, "ready")

    def wait_for(self, condition, what: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "prometheus exited"
            try:
                if condition():
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus: not {what} within {seconds}s")

    def query(self, promql: str) -> list[dict]:
        answer = requests.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10).json()
        assert answer["status"] == "success", (promql, answer)
        return answer["data"]["result"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def test_prometheus_scrapes_with_a_monitor_token(kubo, tmp_path):
    gw = start_gateway(kubo)
    prometheus = None
    try:
        monitor = make_token(gw.data_dir, name="prometheus", role="monitor")
        clinician = make_token(gw.data_dir, name="not-a-scraper", role="clinician")
        opened_count = 5
        for _ in range(opened_count):
            patient = uid("p")
            r = requests.post(f"{gw.url}/medicon/v1/patients/{patient}/episodes", headers=gw.headers,
                              json=opened(patient, uid("e")), timeout=30)
            assert r.status_code == 201
        prometheus = Prometheus(tmp_path, gw.url.removeprefix("http://"),
                                {"medicon": monitor, "medicon-denied": clinician})

        def up() -> dict[str, str]:
            return {r["metric"]["job"]: r["value"][1] for r in prometheus.query("up")}
        prometheus.wait_for(lambda: up() == {"medicon": "1", "medicon-denied": "0"}, "scraping both jobs")
        targets = requests.get(prometheus.url + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        denied = next(t for t in targets if t["labels"]["job"] == "medicon-denied")
        assert "403" in denied["lastError"]

        created = f'sum(medicon_http_requests_total{{job="medicon", route="{OPENED_ROUTE}", status="201"}})'
        prometheus.wait_for(lambda: [r["value"][1] for r in prometheus.query(created)] == [str(opened_count)],
                            "counting the episodes opened")
        appended = 'medicon_record_appends_total{job="medicon", outcome="created"}'
        assert [r["value"][1] for r in prometheus.query(appended)] == [str(opened_count)]

        # every dashboard query runs; the request-rate panel has data once two scrapes are in
        prometheus.wait_for(lambda: prometheus.query(dashboard_queries()[0]), "rating requests")
        for expr in dashboard_queries():
            prometheus.query(expr)
        scraped = requests.get(gw.url + "/metrics", headers=bearer(monitor), timeout=10).text
        assert not re.search(r"p-[0-9a-f]{12}", scraped)  # no patient id ever becomes a label
    finally:
        if prometheus is not None:
            prometheus.stop()
        assert gw.stop() == 0
