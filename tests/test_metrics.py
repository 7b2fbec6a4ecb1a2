"""``/metrics``: scraped from the real app in front of the session's Kubo and parsed with the
Prometheus text parser; counted by surface, command or route template, never by path; guarded
by ``metrics:read``; each app with its own registry; and the Grafana dashboard in ``deploy/``
asks only for metrics the gateway exposes."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, app_client, bearer, gateway_config, make_token
from gateway.errors import Unavailable
from gateway.kubo.client import KuboAnswer, KuboClient
from gateway.metrics import Metrics
from gateway.storage.sqlite import SQLiteDatabase
from records_helpers import encounter, opened, uid

DASHBOARD = ROOT / "deploy" / "grafana" / "medicon-gateway.json"


def samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(found: list, name: str, **labels) -> float:
    """The one sample ``name`` with exactly these labels (0 if there is none yet)."""
    matching = [s.value for s in found if s.name == name and s.labels == labels]
    assert len(matching) <= 1, (name, labels, matching)
    return matching[0] if matching else 0.0


def total(found: list, name: str, **labels) -> float:
    """The sum of every sample ``name`` whose labels include these."""
    return sum(s.value for s in found if s.name == name and labels.items() <= s.labels.items())


async def scrape(client) -> tuple[str, list]:
    r = await client.get("/metrics")
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await r.text()
    return text, samples(text)


async def test_requests_appends_conflicts_kubo_and_batches_are_counted(aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo))
    patient, episode = uid("p"), uid("e")
    r = await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
    assert r.status == 201
    r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode),
                     headers={"Idempotency-Key": "k1"})
    assert r.status == 201
    cid = (await r.json())["cid"]
    r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode),
                     headers={"Idempotency-Key": "k1"})
    assert r.status == 200  # the retry is answered with the record already written
    r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=encounter(patient, episode, seq=7))
    assert r.status == 409
    assert (await c.get(f"/medicon/v1/episodes/{episode}")).status == 200
    assert (await c.post(f"/api/v0/cat?arg={cid}")).status == 200
    assert (await c.post(f"/api/v0/no-such-command/{patient}")).status == 403
    assert (await c.get(f"/nowhere/{patient}")).status == 404

    text, found = await scrape(c)
    for identifier in (patient, episode, cid, c.token):
        assert identifier not in text
    post_episodes = dict(surface="medicon", route="/medicon/v1/patients/{patient}/episodes", method="POST")
    assert value(found, "medicon_http_requests_total", **post_episodes, status="201") == 1
    records = dict(surface="medicon", route="/medicon/v1/episodes/{episode}/records", method="POST")
    assert value(found, "medicon_http_requests_total", **records, status="201") == 1
    assert value(found, "medicon_http_requests_total", **records, status="200") == 1
    assert value(found, "medicon_http_requests_total", **records, status="409") == 1
    assert value(found, "medicon_http_requests_total", surface="medicon", route="/medicon/v1/episodes/{episode}",
                 method="GET", status="200") == 1
    assert total(found, "medicon_http_requests_total", surface="api", route="cat") == 1
    assert total(found, "medicon_http_requests_total", surface="api", route="unknown") == 1
    assert total(found, "medicon_http_requests_total", surface="other", route="unmatched", status="404") == 1
    assert value(found, "medicon_http_request_duration_seconds_count", surface="medicon",
                 route="/medicon/v1/episodes/{episode}/records") == 3
    assert value(found, "medicon_http_requests_in_flight") == 1  # the scrape itself

    assert value(found, "medicon_record_appends_total", outcome="created") == 2
    assert value(found, "medicon_record_appends_total", outcome="replayed") == 1
    assert value(found, "medicon_record_conflicts_total") == 1

    assert value(found, "medicon_kubo_call_duration_seconds_count", command="block/put") == 2  # each record node, written once
    assert value(found, "medicon_kubo_call_duration_seconds_count", command="block/get") >= 1
    if os.environ.get("MEDICON_TEST_STORAGE") != "postgres":  # there, head moves are single statements
        batches = value(found, "medicon_storage_commit_batch_size_count", store="head")
        assert batches >= 1 and value(found, "medicon_storage_commit_batch_size_sum", store="head") == 2
    assert value(found, "medicon_storage_commit_batch_size_count", store="audit") >= 1
    assert value(found, "process_resident_memory_bytes") > 0


async def test_relayed_calls_are_timed_by_command(aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo))
    form = aiohttp.FormData()
    form.add_field("file", b"raw bytes for the relay", filename="x")
    r = await c.post("/api/v0/add", data=form)
    assert r.status == 200, await r.text()
    assert (await c.post("/api/v0/version")).status == 200
    _, found = await scrape(c)
    assert value(found, "medicon_kubo_call_duration_seconds_count", command="version") == 1
    assert value(found, "medicon_kubo_call_duration_seconds_count", command="add") == 1
    assert total(found, "medicon_kubo_call_errors_total") == 0


async def test_metrics_need_metrics_read(aiohttp_client, kubo):
    cfg = gateway_config(kubo)
    c = await app_client(aiohttp_client, cfg, role="monitor")
    assert (await c.get("/metrics")).status == 200
    r = await c.get("/medicon/v1/whoami")  # a monitor reads metrics, nothing else
    assert r.status == 403
    r = await c.get("/metrics", headers={"Authorization": ""})
    assert r.status == 401
    assert (await r.json())["error"]["status"] == 401  # the gateway's own error shape
    for role, scope in (("clinician", {}), ("auditor", {}), ("patient", {"patients": ["p-1"]})):
        r = await c.get("/metrics", headers=bearer(make_token(cfg, role=role, **scope)))
        assert r.status == 403, role
    scoped_admin = make_token(cfg, role="admin", patients=["p-1"])
    assert (await c.get("/metrics", headers=bearer(scoped_admin))).status == 403


async def test_each_app_counts_its_own_requests(aiohttp_client, kubo):
    a = await app_client(aiohttp_client, gateway_config(kubo))
    b = await app_client(aiohttp_client, gateway_config(kubo))
    for _ in range(3):
        assert (await a.get("/medicon/v1/whoami")).status == 200
    whoami = dict(surface="medicon", route="/medicon/v1/whoami", method="GET", status="200")
    assert value((await scrape(a))[1], "medicon_http_requests_total", **whoami) == 3
    assert value((await scrape(b))[1], "medicon_http_requests_total", **whoami) == 0


async def test_openmetrics_when_asked(aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo))
    r = await c.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await r.text()).rstrip().endswith("# EOF")


async def test_kubo_refusals_and_unreachable_kubo_are_counted(kubo, unused_tcp_port):
    from gateway.config import KuboConfig
    metrics = Metrics()
    client = KuboClient.open(KuboConfig(api_url=kubo.api_url), observer=metrics)
    try:
        assert not await client.has_block("bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy")
        with pytest.raises(KuboAnswer):
            await client.call("dag/get", [("arg", "not-a-cid")])
    finally:
        await client.close()
    down = KuboClient.open(KuboConfig(api_url=f"http://127.0.0.1:{unused_tcp_port}"), observer=metrics)
    try:
        with pytest.raises(Unavailable):
            await down.version()
    finally:
        await down.close()
    found = samples(_exposed(metrics))
    assert value(found, "medicon_kubo_call_errors_total", command="block/stat", kind="refused") == 1
    assert value(found, "medicon_kubo_call_errors_total", command="dag/get", kind="refused") == 1
    assert value(found, "medicon_kubo_call_errors_total", command="version", kind="unreachable") == 1
    assert value(found, "medicon_kubo_call_duration_seconds_count", command="version") == 1


async def test_relay_to_a_stopped_kubo_is_counted(aiohttp_client, own_kubo):
    c = await app_client(aiohttp_client, gateway_config(own_kubo))
    own_kubo.stop()
    assert (await c.post("/api/v0/version")).status == 502
    _, found = await scrape(c)
    assert value(found, "medicon_kubo_call_errors_total", command="version", kind="unreachable") == 1


async def test_storage_errors_are_counted(tmp_path):
    metrics = Metrics()
    db = await SQLiteDatabase.open(tmp_path / "x.sqlite3", "CREATE TABLE t (x INTEGER);", name="test",
                                   metrics=metrics)
    try:
        await db.write(lambda conn: conn.execute("INSERT INTO t VALUES (1)"))
        with pytest.raises(Unavailable):
            await db.write(lambda conn: conn.execute("INSERT INTO no_such_table VALUES (1)"))
        with pytest.raises(Unavailable):
            await db.read(lambda conn: conn.execute("SELECT * FROM no_such_table").fetchall())
    finally:
        await db.close()
    found = samples(_exposed(metrics))
    assert value(found, "medicon_storage_errors_total", store="test", operation="write", kind="failed") == 1
    assert value(found, "medicon_storage_errors_total", store="test", operation="read", kind="failed") == 1
    assert value(found, "medicon_storage_commit_batch_size_count", store="test") == 2
    assert sqlite3.connect(tmp_path / "x.sqlite3").execute("SELECT count(*) FROM t").fetchone() == (1,)


def _exposed(metrics: Metrics) -> str:
    from prometheus_client import generate_latest
    return generate_latest(metrics.registry).decode()


# --- the Grafana dashboard --------------------------------------------------------------------

def _dashboard_metrics() -> set[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in doc["panels"] for t in panel.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    names = set()
    for expr in exprs:
        names |= set(re.findall(r"\b((?:medicon|process)_[a-z_]+)\b", expr))
    return names


def _served_names(text: str) -> set[str]:
    """Every series name a scrape declares (a labelled counter has no sample before it is first
    counted, but its family is declared all the same)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
    return names


async def test_dashboard_asks_only_for_served_metrics(aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo))
    wanted = _dashboard_metrics()
    assert {"medicon_http_requests_total", "medicon_record_conflicts_total",
            "medicon_kubo_call_errors_total", "medicon_storage_commit_batch_size_bucket"} <= wanted
    assert wanted - _served_names((await scrape(c))[0]) == set()


def test_dashboard_is_importable_json():
    doc = json.loads(Path(DASHBOARD).read_text())
    assert doc["title"] and doc["uid"]
    assert any(v["type"] == "datasource" for v in doc["templating"]["list"])
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
