"""What it costs to know that a record block is stored and pinned before acknowledging it.

Kubo's ``dag/put`` answers 200 with the CID before it commits and pins the block; a failure
(a full disk) arrives only in the ``X-Stream-Error`` trailer, which aiohttp never exposes. This
measures, on one fresh Kubo (offline, temporary repo), appends of ~1.1 kB record-like nodes
chained by ``prev`` (as an episode is), for each way of storing one:

- ``dag/put`` (``pin=true``): what the gateway did, unconfirmed (the baseline, not correct);
- ``dag/put`` + ``block/stat?offline=true`` + ``pin/ls?arg=<cid>&type=recursive``: confirmed
  by two more calls;
- ``block/put`` (``cid-codec=dag-cbor``, ``pin=true``) of the node encoded here
  (``gateway.kubo.ipld.encode``): Kubo writes and pins before its only answer, so the status
  is the write's;
- ``block/put`` then ``pin/add``: ``pin/add`` fetches the whole graph under the node (the
  episode's chain), so its cost grows with the chain.

Each strategy runs with 1 writer and with 8 concurrent writers (a chain each), interleaved
over ``--repeats`` rounds; the median per-append latency and appends/s are printed and written
to ``bench/results/confirm.json``. Kubo fsyncs its blocks, as the gateway runs it (``--no-sync``:
Kubo's default).

    .venv/bin/python -m bench.confirm [--appends 300] [--repeats 3] [--no-sync]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.kubo import ipld  # noqa: E402
from gateway.kubo.client import one_file_form  # noqa: E402
from gateway.kubo.node import KuboNode  # noqa: E402

RESULTS = Path(__file__).resolve().with_name("results")


def record_node(prev: str | None, seq: int) -> dict:
    """A node shaped like the gateway's sealed record nodes (about 1.1 kB as dag-cbor)."""
    return {"v": 1, "schema": "https://medicon.example/schemas/encounter/v1",
            "episode": secrets.token_hex(16), "seq": seq, "prev": {"/": prev} if prev else None,
            "key": secrets.token_hex(8), "dek": secrets.token_hex(8),
            "sealed": secrets.token_urlsafe(900), "sig": secrets.token_urlsafe(64)}


class Kubo:
    def __init__(self, session: aiohttp.ClientSession, api: str) -> None:
        self.session, self.api = session, api.rstrip("/") + "/api/v0/"

    async def call(self, command: str, params: dict, data: bytes | None = None) -> dict:
        headers = None
        if data is not None:
            data, headers = one_file_form(data)
        async with self.session.post(self.api + command, params=params, data=data, headers=headers) as r:
            body = await r.read()
            if r.status != 200:
                raise RuntimeError(f"{command}: {r.status} {body[:200]!r}")
            return json.loads(body.splitlines()[-1])


async def dag_put(kubo: Kubo, node: dict) -> str:
    out = await kubo.call("dag/put", {"store-codec": "dag-cbor", "input-codec": "dag-json", "pin": "true"},
                          json.dumps(node).encode())
    return out["Cid"]["/"]


async def dag_put_confirmed(kubo: Kubo, node: dict) -> str:
    cid = await dag_put(kubo, node)
    await kubo.call("block/stat", {"arg": cid, "offline": "true"})
    await kubo.call("pin/ls", {"arg": cid, "type": "recursive"})
    return cid


async def block_put(kubo: Kubo, node: dict) -> str:
    out = await kubo.call("block/put", {"cid-codec": "dag-cbor", "mhtype": "sha2-256", "pin": "true"},
                          ipld.encode(node))
    return out["Key"]


async def block_put_pin_add(kubo: Kubo, node: dict) -> str:
    out = await kubo.call("block/put", {"cid-codec": "dag-cbor", "mhtype": "sha2-256"}, ipld.encode(node))
    await kubo.call("pin/add", {"arg": out["Key"], "recursive": "true"})
    return out["Key"]


STRATEGIES = {
    "dag/put (unconfirmed)": dag_put,
    "dag/put + block/stat + pin/ls": dag_put_confirmed,
    "block/put pin=true": block_put,
    "block/put + pin/add": block_put_pin_add,
}


async def run(kubo: Kubo, put, appends: int, writers: int) -> dict:
    latencies: list[float] = []

    async def writer(count: int) -> None:
        prev = None
        for seq in range(count):
            node = record_node(prev, seq)
            t0 = time.perf_counter()
            prev = await put(kubo, node)
            latencies.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    await asyncio.gather(*(writer(appends // writers) for _ in range(writers)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"appends_per_s": len(latencies) / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))]}


async def measure(api: str, appends: int, repeats: int) -> dict:
    results: dict = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        kubo = Kubo(session, api)
        for name in STRATEGIES:  # warm-up
            await run(kubo, STRATEGIES[name], 16, 1)
        for round_ in range(repeats):
            order = list(STRATEGIES) if round_ % 2 == 0 else list(reversed(STRATEGIES))
            for writers in (1, 8):
                for name in order:
                    got = await run(kubo, STRATEGIES[name], appends, writers)
                    results.setdefault(f"{writers}", {}).setdefault(name, []).append(got)
                    print(f"round {round_ + 1} writers {writers} {name:32} {got['appends_per_s']:7.0f}/s "
                          f"p50 {got['p50_ms']:6.2f} ms p99 {got['p99_ms']:6.2f} ms", file=sys.stderr, flush=True)
    return {w: {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in by.items()}
            for w, by in results.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.confirm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--appends", type=int, default=300, help="appends per strategy and round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-sync", action="store_true", help="Kubo's default: blocks not fsynced")
    p.add_argument("--out", type=Path, default=RESULTS / "confirm.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="medicon-confirm-") as tmp:
        with KuboNode(Path(tmp) / "repo", sync=not args.no_sync) as node:
            summary = measure_sync(node.api_url, args.appends, args.repeats)
    out = {"appends": args.appends, "repeats": args.repeats, "blocks_fsynced": not args.no_sync,
           "loadavg": os.getloadavg(), "median": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print("| writers | strategy | appends/s | p50 ms | p99 ms |\n| ---: | --- | ---: | ---: | ---: |")
    for writers, by in summary.items():
        for name, m in by.items():
            print(f"| {writers} | {name} | {m['appends_per_s']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} |")
    return 0


def measure_sync(api: str, appends: int, repeats: int) -> dict:
    return asyncio.run(measure(api, appends, repeats))


if __name__ == "__main__":
    sys.exit(main())
