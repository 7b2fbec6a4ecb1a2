"""The ``sites`` scenario of ``make bench``: record appends on SQLite and on PostgreSQL, through
one and two gateway processes, with ``records.replicas`` 1 and 2, side by side in one run.

Starts its own parts (the run's offline Kubo is not used): two Kubo nodes in a private swarm
(A and B), a throwaway PostgreSQL server (``gateway.devcluster.LocalPostgres``, as the
``postgres`` user when run as root), and five gateway processes:

- ``sqlite``: the embedded stores, on node A;
- ``pg-a1``, ``pg-b1``: one PostgreSQL database, on nodes A and B, ``records.replicas = 1``;
- ``pg-a1w2``: the same database on node A, ``server.workers = 2`` (two processes on one port);
- ``pg-a2``, ``pg-b2``: the same database, on nodes A and B, ``records.replicas = 2``: each asks
  the other's ``/pinning/v1`` to pin every record before it is acknowledged.

Targets (interleaved round after round by the load generator, each client over 4 episodes of
its own): SQLite · 1 gateway; PostgreSQL · 1 gateway · replicas 1; the same gateway with 2
workers; PostgreSQL · 2 gateways (clients split between A and B) · replicas 1; the same two
with replicas 2.

    .venv/bin/python -m bench --only sites
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.procs import PYTHON, ROOT, BenchError, Procs
from gateway.kubo.node import free_port, private_swarm, start_swarm

TARGETS = ("SQLite · 1 gateway · replicas 1", "PostgreSQL · 1 gateway · replicas 1",
           "PostgreSQL · 1 gateway, 2 workers · replicas 1",
           "PostgreSQL · 2 gateways · replicas 1", "PostgreSQL · 1 gateway · replicas 2",
           "PostgreSQL · 2 gateways · replicas 2")
CONCURRENCY = {1: 100, 8: 40, 32: 12}  # clients: records per client and round


def _median(values: list[float]) -> float | None:
    import statistics
    return statistics.median(values) if values else None


def _replicator_token(procs: Procs) -> str:
    res = subprocess.run([PYTHON, "-m", "gateway", "--log-level", "WARNING", "token", "create",
                          f"bench-replicator-{free_port()}", "--role", "replicator"], cwd=ROOT,
                         env=procs.gateway_env(), capture_output=True, text=True, timeout=60)
    for line in res.stdout.splitlines():
        if line.startswith("MEDICON_TOKEN="):
            return line.split("=", 1)[1].strip()
    raise BenchError(f"could not create a replicator token: {res.stderr.strip()[-300:]}")


def sites(ctx: Any) -> None:
    from gateway.devcluster import DevError
    from gateway.kubo.node import KuboError
    try:
        _sites(ctx)
    except (DevError, KuboError) as exc:
        raise BenchError(str(exc)) from None


def _sites(ctx: Any) -> None:
    from gateway.devcluster import LocalPostgres
    from gateway.security.keyring import LocalKeyring

    plan = ctx.plan
    tmp = ctx.procs.tmp / "sites"
    pg_dir = Path(tempfile.mkdtemp(prefix="medicon-bench-pg-"))  # the postgres user must reach it
    pg_dir.chmod(0o755)
    postgres = LocalPostgres(pg_dir / "cluster")
    nodes, gateways = [], []
    try:
        url = postgres.start()
        nodes = start_swarm(private_swarm([tmp / "kubo-a", tmp / "kubo-b"]))
        a_dir, b_dir = tmp / "site-a", tmp / "site-b"
        LocalKeyring.init(a_dir / "keyring.json", gateway_id="site-a")
        LocalKeyring.load(a_dir / "keyring.json").export(tmp / "bundle.json")
        LocalKeyring.join(b_dir / "keyring.json", tmp / "bundle.json", gateway_id="site-b")
        (tmp / "bundle.json").unlink()
        ports = {name: free_port() for name in ("pg-a2", "pg-b2")}

        def gateway(name: str, node_index: int, data_dir: Path | None, env: dict[str, str],
                    port: int = 0) -> Procs:
            procs = Procs(tmp / name, owns_kubo=False, port=port)
            procs.kubo = nodes[node_index]
            procs.extra_env = {**({"MEDICON_STORAGE_URL": url, "MEDICON_RECORDS_DATA_DIR": str(data_dir)}
                                  if data_dir else {}), **env}
            if data_dir is None:
                procs.ensure_keyring()
            procs.create_token()
            gateways.append(procs)
            return procs
        sqlite = gateway("sqlite", 0, None, {})
        pg_a1 = gateway("pg-a1", 0, a_dir, {})
        pg_b1 = gateway("pg-b1", 1, b_dir, {})
        pg_a1w2 = gateway("pg-a1w2", 0, a_dir, {"MEDICON_SERVER_WORKERS": "2"})
        replicator = _replicator_token(pg_a1)
        key_file = tmp / "replicator-key"
        key_file.touch(mode=0o600)
        key_file.write_text(replicator)

        def replicated(peer: str, peer_port: int) -> dict[str, str]:
            return {"MEDICON_RECORDS_REPLICAS": "2", "MEDICON_RECORDS_REPLICA_SERVICES": json.dumps(
                [{"name": peer, "endpoint": f"http://127.0.0.1:{peer_port}/pinning/v1", "key_file": str(key_file)}])}
        pg_a2 = gateway("pg-a2", 0, a_dir, replicated("site-b", ports["pg-b2"]), ports["pg-a2"])
        pg_b2 = gateway("pg-b2", 1, b_dir, replicated("site-a", ports["pg-a2"]), ports["pg-b2"])
        for procs in gateways:
            procs.start_gateway()
        headers = pg_a1.auth.headers  # one token store for every PostgreSQL gateway
        targets = [
            {"name": TARGETS[0], "kind": "append", "urls": [sqlite.gateway.url], "headers": sqlite.auth.headers},
            {"name": TARGETS[1], "kind": "append", "urls": [pg_a1.gateway.url], "headers": headers},
            {"name": TARGETS[2], "kind": "append", "urls": [pg_a1w2.gateway.url], "headers": headers},
            {"name": TARGETS[3], "kind": "append", "urls": [pg_a1.gateway.url, pg_b1.gateway.url], "headers": headers},
            {"name": TARGETS[4], "kind": "append", "urls": [pg_a2.gateway.url], "headers": headers},
            {"name": TARGETS[5], "kind": "append", "urls": [pg_a2.gateway.url, pg_b2.gateway.url], "headers": headers},
        ]
        block = ctx.results.setdefault("sites", {})
        for c, per_client in CONCURRENCY.items():
            per_client = per_client if not plan.quick else max(5, per_client // 10)
            res = ctx.loadgen({"kind": "append", "concurrency": c, "records_per_client": per_client,
                               "episodes_per_client": 4, "targets": targets, "repeats": plan.append_repeats,
                               "budget_s": 300, "run_timeout_s": 120}, 300)
            runs = res["runs"]
            base = runs[TARGETS[0]]
            n = min(len(v) for v in runs.values())
            got = {"concurrency": c, "runs": runs,
                   "records_per_s": {t: _median([x["records_per_s"] for x in v]) for t, v in runs.items()},
                   "p50_ms": {t: _median([x["p50_ms"] for x in v]) for t, v in runs.items()},
                   "p99_ms": {t: _median([x["p99_ms"] for x in v]) for t, v in runs.items()},
                   "to_sqlite": {t: _median([v[i]["records_per_s"] / base[i]["records_per_s"] for i in range(n)])
                                 for t, v in runs.items()}}
            block[str(c)] = got
            for t in TARGETS:
                ctx.say(f"sites c={c}: {t}: {got['records_per_s'][t]:.0f}/s p50 {got['p50_ms'][t]:.1f} ms "
                        f"p99 {got['p99_ms'][t]:.1f} ms ({got['to_sqlite'][t]:.2f}x SQLite)")
    finally:
        for procs in gateways:
            procs.close()
        for node in nodes:
            node.stop()
        try:
            postgres.stop()
        except Exception as exc:  # noqa: BLE001 - keep cleaning up
            ctx.say(f"sites: stopping PostgreSQL failed: {exc}")
        shutil.rmtree(pg_dir, ignore_errors=True)


def sites_lines(block: dict[str, Any] | None) -> list[str]:
    """The table of the ``sites`` scenario for ``latest.md``."""
    if not block:
        return []
    lines = ["", "### Storage backends, gateway processes and replicas (appends through the REST API)", "",
             "| configuration | clients | records/s | p50 ms | p99 ms | ÷ SQLite |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for c_s, got in sorted(block.items(), key=lambda kv: int(kv[0])):
        for t in TARGETS:
            if t in got["records_per_s"]:
                lines.append(f"| {t} | {c_s} | {got['records_per_s'][t]:.0f} | {got['p50_ms'][t]:.1f} | "
                             f"{got['p99_ms'][t]:.1f} | {got['to_sqlite'][t]:.2f}× |")
    lines += ["", "Two Kubo nodes in a private swarm on loopback, one PostgreSQL server; with 2 gateways "
              "the clients are split between sites A and B; with replicas 2 an append returns only once the "
              "other site's node reports the record pinned (its Pinning Service API)."]
    return lines
