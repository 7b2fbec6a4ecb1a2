"""What a new patient costs as the number of patients grows: 10^3, 10^5, 10^6 (not in `make test`).

For each backend (embedded SQLite, PostgreSQL) and each size N, the key store is filled up to
N - SAMPLE patients through the bulk path a keyring-file migration uses (real wrapped keys,
``KeyStore.import_keys``), then SAMPLE new patients are enrolled one after another through the
gateway's own path (``KeyringProvider.data_key_for_patient``: pseudonym, new key, wrap, one
insert) and timed; then SAMPLE lookups of known patients' keys (``data_key``: the per-use
check that makes a shredding seen everywhere) and, with ``--rotate``, a full ``keys rotate``.

    .venv/bin/python -m bench.keys_scale                        # 10^3, 10^5, 10^6 on both
    .venv/bin/python -m bench.keys_scale --sizes 1000,100000 --backends sqlite
    .venv/bin/python -m bench.keys_scale --postgres-url postgresql://…   # an existing server

Without ``--postgres-url`` a throwaway PostgreSQL server is started as the tests start one
(Debian's ``postgresql``: ``make setup``). Results: ``bench/results/keys_scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gateway.security import crypto
from gateway.security.keyring import PATIENT, LocalKeyring
from gateway.core.key_provider import KeyringProvider
from gateway.storage.model import PatientKey

RESULTS = Path(__file__).resolve().parent / "results"
FILL_BATCH = 10_000


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(samples: list[float]) -> dict[str, float]:
    return {"mean_ms": statistics.fmean(samples) * 1e3, "p50_ms": _percentile(samples, 0.5) * 1e3,
            "p99_ms": _percentile(samples, 0.99) * 1e3}


async def _fill(provider: KeyringProvider, have: int, want: int) -> float:
    """Bulk-add patients ``have`` .. ``want`` - 1 (wrapped as the gateway wraps them)."""
    ring = provider.ring
    start, kek = time.perf_counter(), ring.active_kek_id
    for first in range(have, want, FILL_BATCH):
        keys = []
        for i in range(first, min(want, first + FILL_BATCH)):
            ps, dek_id = provider.pseudonym(PATIENT, f"bulk-{i}"), f"dek-{secrets.token_hex(12)}"
            keys.append(PatientKey(ps, dek_id, kek, ring.wrap(dek_id, ps, crypto.new_key(), kek)))
        await provider.store.import_keys(keys)
    return time.perf_counter() - start


async def run_backend(name: str, open_storage, settle, sizes: list[int], sample: int, rotate: bool,
                      wal_bytes=None) -> list[dict]:
    """``settle(tmp)`` after each bulk fill: a checkpoint (and for PostgreSQL a VACUUM ANALYZE,
    as autovacuum would), so a size is measured in steady state rather than in the wake of a
    million rows loaded in a minute, which a hospital's enrolments never are. ``wal_bytes()``
    (PostgreSQL): the WAL position, to report the WAL each new patient writes."""
    out = []
    with tempfile.TemporaryDirectory(prefix="medicon-keys-scale-") as tmp:
        ring = LocalKeyring.init(Path(tmp) / "keyring.json", gateway_id="bench")
        storage = await open_storage(Path(tmp))
        try:
            provider = KeyringProvider(ring.path)
            await provider.attach(storage.keys)
            have = 0
            for size in sizes:
                fill_s = await _fill(provider, have, size - sample)
                await settle(Path(tmp))
                enrol, wal_before = [], wal_bytes and await wal_bytes()
                for i in range(sample):
                    t = time.perf_counter()
                    await provider.data_key_for_patient(f"new-{size}-{i}")
                    enrol.append(time.perf_counter() - t)
                wal_per_patient = wal_bytes and (await wal_bytes() - wal_before) / sample
                have = size
                t = time.perf_counter()
                await asyncio.gather(*(provider.data_key_for_patient(f"burst-{size}-{i}") for i in range(sample)))
                burst_s = time.perf_counter() - t
                known = [f"new-{size}-{i}" for i in range(sample)]
                dek_ids = [(await provider.data_key_for_patient(p, create=False))[0] for p in known]
                lookup = []
                for dek_id in dek_ids:
                    t = time.perf_counter()
                    await provider.data_key(dek_id)
                    lookup.append(time.perf_counter() - t)
                row = {"backend": name, "patients": await storage.keys.count(), "fill_s": round(fill_s, 1),
                       "enrol": _summary(enrol), "enrol_concurrent_per_s": sample / burst_s,
                       "lookup": _summary(lookup)}
                if wal_per_patient:
                    row["wal_bytes_per_new_patient"] = round(wal_per_patient)
                have += sample  # the burst's patients
                if rotate:
                    t = time.perf_counter()
                    await provider.rotate(batch=1000)
                    row["rotate_s"] = time.perf_counter() - t
                out.append(row)
                print(_line(row), flush=True)
        finally:
            await storage.close()
    return out


def _line(row: dict) -> str:
    e, lk = row["enrol"], row["lookup"]
    rotate = f", rotate {row['rotate_s']:.1f} s" if "rotate_s" in row else ""
    if "wal_bytes_per_new_patient" in row:
        rotate += f", WAL {row['wal_bytes_per_new_patient']} B per new patient"
    return (f"{row['backend']:8s} {row['patients']:>9,d} patients: new patient {e['mean_ms']:.2f} ms mean "
            f"(p50 {e['p50_ms']:.2f}, p99 {e['p99_ms']:.2f}), {row['enrol_concurrent_per_s']:.0f}/s concurrent; "
            f"key lookup {lk['mean_ms']:.3f} ms mean (p99 {lk['p99_ms']:.3f}); filled in {row['fill_s']} s{rotate}")


def _markdown(rows: list[dict], machine: dict) -> str:
    lines = ["# Key store scale: the cost of a new patient", "",
             f"{machine['python']} on {machine['machine']}, {machine['date']}.", "",
             "| backend | patients | new patient mean | p50 | p99 | concurrent new/s | key lookup mean | p99 |"
             " WAL per new patient |" + (" rotate |" if any("rotate_s" in r for r in rows) else ""),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
             + (" ---: |" if any("rotate_s" in r for r in rows) else "")]
    for r in rows:
        e, lk = r["enrol"], r["lookup"]
        lines.append(f"| {r['backend']} | {r['patients']:,} | {e['mean_ms']:.2f} ms | {e['p50_ms']:.2f} ms | "
                     f"{e['p99_ms']:.2f} ms | {r['enrol_concurrent_per_s']:.0f} | {lk['mean_ms']:.3f} ms | "
                     f"{lk['p99_ms']:.3f} ms | {r.get('wal_bytes_per_new_patient', '-')} |"
                     + (f" {r['rotate_s']:.1f} s |" if "rotate_s" in r else ""))
    return "\n".join(lines) + "\n"


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.keys_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000,1000000")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--sample", type=int, default=1000, help="patients enrolled and timed at each size")
    parser.add_argument("--rotate", action="store_true", help="also time a full `keys rotate` at each size")
    parser.add_argument("--postgres-url", help="an existing server's maintenance database (default: start one)")
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if sizes[0] < 2 * args.sample:
        parser.error(f"the smallest size must be at least twice --sample ({args.sample})")
    rows, server = [], None
    for backend in args.backends.split(","):
        if backend == "sqlite":
            from gateway.storage.sqlite import KEYS_FILE, open_sqlite_storage

            async def checkpoint(tmp: Path) -> None:
                import sqlite3
                db = sqlite3.connect(tmp / KEYS_FILE)
                try:
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                finally:
                    db.close()
            rows += await run_backend("sqlite", open_sqlite_storage, checkpoint, sizes, args.sample, args.rotate)
        elif backend == "postgres":
            from gateway.storage.postgres import open_postgres_storage
            base = args.postgres_url
            if base is None:
                sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
                from realparts import PostgresServer
                server = PostgresServer().start()
                base = server.dsn
            import asyncpg
            name = f"keys_scale_{secrets.token_hex(4)}"
            conn = await asyncpg.connect(base)
            await conn.execute(f"CREATE DATABASE {name}")
            await conn.close()
            url = base.rsplit("/", 1)[0] + "/" + name
            async def vacuum(_tmp: Path) -> None:
                conn = await asyncpg.connect(url)
                try:
                    await conn.execute("VACUUM ANALYZE patient_keys")
                    await conn.execute("CHECKPOINT")
                finally:
                    await conn.close()
            async def wal_position() -> int:
                conn = await asyncpg.connect(url)
                try:
                    return int(await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
                finally:
                    await conn.close()
            try:
                rows += await run_backend("postgres", lambda _tmp: open_postgres_storage(url), vacuum, sizes,
                                          args.sample, args.rotate, wal_bytes=wal_position)
            finally:
                if server is not None:
                    server.stop()
        else:
            parser.error(f"unknown backend {backend!r}")
    machine = {"python": f"Python {platform.python_version()}", "machine": platform.platform(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.mkdir(exist_ok=True)
    ran = {r["backend"] for r in rows}
    if (RESULTS / "keys_scale.json").exists():  # keep the other backends' rows of an earlier run
        earlier = json.loads((RESULTS / "keys_scale.json").read_text())["rows"]
        rows = [r for r in earlier if r["backend"] not in ran] + rows
    (RESULTS / "keys_scale.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    (RESULTS / "keys_scale.md").write_text(_markdown(rows, machine))
    print(_markdown(rows, machine))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
