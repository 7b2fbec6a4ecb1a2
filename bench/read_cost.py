"""What one small read costs through the gateway: latency of one request after another, on one
client, for ``GET /ipfs/<cid>`` and ``cat`` of a 1 kB and a 1 MiB block, directly on Kubo,
through a bare aiohttp relay (``bench/relay.py``: no auth, no audit, no checks — the floor any
Python proxy in front of Kubo starts from) and through the gateway, interleaved; and the CPU
time per read of the relay and of the gateway (all threads, from ``/proc/<pid>/stat``). With ``--py-spy SECONDS``, also records the gateway with
``py-spy record --gil`` while it serves 1 kB ``GET /ipfs`` reads and prints the top inclusive
lines (py-spy comes with the ``bench`` extra, which ``bench/setup.sh`` installs).

    .venv/bin/python -m bench.read_cost [--requests 300] [--rounds 3] [--py-spy 15]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.procs import ROOT, Procs


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def latency_ms(session: aiohttp.ClientSession, method: str, url: str, requests: int, **kw) -> float:
    """Median milliseconds of ``requests`` requests made one after another, body read whole."""
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        async with session.request(method, url, **kw) as resp:
            if resp.status != 200:
                raise SystemExit(f"{method} {url}: {resp.status} {(await resp.text())[:300]}")
            await resp.read()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


async def add(session: aiohttp.ClientSession, api: str, headers: dict, data: bytes) -> str:
    form = aiohttp.FormData()
    form.add_field("file", data, filename="blob")
    async with session.post(api + "/api/v0/add", data=form, headers=headers) as resp:
        return (await resp.json())["Hash"]


async def measure(procs: Procs, requests: int, rounds: int) -> dict:
    """Median latency per (read, size, target) and CPU per read of the relay and the gateway,
    the targets taking turns within each round."""
    kubo, gw = procs.kubo, procs.gateway
    out: dict[str, list[float]] = collections.defaultdict(list)
    async with aiohttp.ClientSession(headers=kubo.rpc_headers) as direct, \
            aiohttp.ClientSession(headers=procs.auth.headers) as through:
        # (name, session, RPC base, HTTP gateway base, pid whose CPU is counted)
        targets = [("direct", direct, kubo.api_url, kubo.gateway_url, None),
                   ("aiohttp relay", direct, procs.relay_url, procs.relay_url, procs.relay.pid),
                   ("gateway", through, gw.url, gw.url, gw.pid)]
        cids = {"1 kB": await add(direct, kubo.api_url, kubo.rpc_headers, os.urandom(1000)),
                "1 MiB": await add(direct, kubo.api_url, kubo.rpc_headers, os.urandom(1 << 20))}
        for _ in range(rounds):
            for size, cid in cids.items():
                for read in ("GET /ipfs", "cat"):
                    for name, session, api, http, pid in targets:
                        before = cpu_seconds(pid) if pid else 0.0
                        if read == "cat":
                            ms = await latency_ms(session, "POST", f"{api}/api/v0/cat", requests, params={"arg": cid})
                        else:
                            ms = await latency_ms(session, "GET", f"{http}/ipfs/{cid}", requests)
                        out[f"{read} {size} {name}"].append(ms)
                        if pid:
                            out[f"{read} {size} {name} CPU"].append((cpu_seconds(pid) - before) / requests * 1e3)
    return {"cids": cids, "samples": dict(out)}


async def hammer(procs: Procs, cid: str, seconds: float) -> None:
    async with aiohttp.ClientSession(headers=procs.auth.headers) as session:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            async with session.get(f"{procs.gateway.url}/ipfs/{cid}") as resp:
                await resp.read()


def table(samples: dict[str, list[float]]) -> list[str]:
    """One markdown row per read: median latencies, their ratios to direct (speed: direct ÷
    target), and the CPU per read of the relay and of the gateway."""
    def m(key: str) -> float:
        return statistics.median(samples[key])
    lines = ["| read | direct ms | aiohttp relay ms | gateway ms | relay speed | gateway speed "
             "| relay CPU ms | gateway CPU ms | gateway's own CPU ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    reads = dict.fromkeys(k.rsplit(" ", 1)[0] for k in samples if k.endswith(" direct"))
    for read in reads:
        d, r, g = m(f"{read} direct"), m(f"{read} aiohttp relay"), m(f"{read} gateway")
        rc, gc = m(f"{read} aiohttp relay CPU"), m(f"{read} gateway CPU")
        lines.append(f"| {read} | {d:.2f} | {r:.2f} | {g:.2f} | {d / r:.2f}× | {d / g:.2f}× "
                     f"| {rc:.2f} | {gc:.2f} | {gc - rc:.2f} |")
    return lines


def top_lines(raw: Path, count: int = 15) -> list[str]:
    """Inclusive share of each function in py-spy's raw (collapsed stack) output."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        seen = set()
        for frame in stack.split(";"):
            name, _, where = frame.partition(" (")
            key = f"{name} ({where.split(':')[0].replace(str(ROOT) + '/', '').split('site-packages/')[-1]})"
            if key not in seen:
                seen.add(key)
                inclusive[key] += int(n)
    skip = ("<module>", "_run_module_as_main", "_run_code", "main (", "cmd_serve", "run_loop", "Runner.run",
            "run_until_complete", "run_forever", "_run_once", "Handle._run")
    rows = [(k, v) for k, v in inclusive.most_common() if not k.startswith(skip) and not any(s in k for s in skip)]
    return [f"{100 * v / total:5.1f}% {k}" for k, v in rows[:count]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300, help="requests per sample (default 300)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--py-spy", type=float, default=0, metavar="SECONDS",
                   help="also record the gateway with py-spy for this long")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="medicon-read-cost-") as tmp:
        procs = Procs(Path(tmp))
        try:
            procs.start_kubo()
            procs.ensure_keyring()
            procs.create_token()
            procs.start_gateway()
            procs.start_relay()
            result = asyncio.run(measure(procs, args.requests, args.rounds))
            print("\n".join(table(result["samples"])))
            if args.py_spy:
                spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
                raw = Path(tmp) / "py-spy.txt"
                recorder = subprocess.Popen([spy, "record", "--gil", "-r", "200", "-f", "raw", "-o", str(raw),
                                             "-d", str(int(args.py_spy)), "-p", str(procs.gateway.pid)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                asyncio.run(hammer(procs, result["cids"]["1 kB"], args.py_spy + 2))
                if recorder.wait() != 0 or not raw.exists():
                    raise SystemExit(f"py-spy failed (exit {recorder.returncode}); is it installed and allowed to ptrace?")
                print("\npy-spy --gil, 1 kB GET /ipfs, top inclusive lines:")
                print("\n".join(top_lines(raw)))
        finally:
            procs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
