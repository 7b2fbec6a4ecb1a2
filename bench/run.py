"""``make bench``: the gateway against direct Kubo and against nginx, in one run.

Starts one Kubo (offline, temporary repo), the gateway and nginx in front of it, and drives
them from a separate load-generator process (``bench/loadgen.py``), interleaving the targets
round after round so every ratio compares numbers taken under the same conditions. Writes
``bench/results/latest.{json,md,png}`` and prints the table. See ``bench/README.md``.

    .venv/bin/python -m bench [--big] [--repeats N] [--quick] [--only cat,add,mix,...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from prometheus_client.parser import text_string_to_metric_families

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report  # noqa: E402
from bench.procs import ROOT, TMP_PREFIX, BenchError, Procs, reap_stale  # noqa: E402
from bench.sites import sites  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
RESULTS = Path(__file__).resolve().with_name("results")
SCENARIOS = ("cat", "ipfs", "add", "appends", "history", "rss", "encrypted", "sync", "sites", "mix")


@dataclass
class Plan:
    sizes: list[int]
    repeats: int
    append_repeats: int
    concurrency: list[int]
    records_per_client: dict[int, int]
    history_length: int
    history_budget_s: float
    history_samples: int
    rss_sizes: list[int]
    bytes_per_sample: int
    big: bool
    quick: bool
    only: set[str]
    mix: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Plan":
        only = set(args.only.split(",")) if args.only else set(SCENARIOS)
        unknown = only - set(SCENARIOS)
        if unknown:
            raise SystemExit(f"bench: unknown scenario(s) {', '.join(sorted(unknown))}; known: {', '.join(SCENARIOS)}")
        plan = cls._sized(args, only)
        plan.mix = {"clients": args.mix_clients, "seed": args.mix_seed,
                    "warmup_s": 3 if args.quick else 10,
                    "duration_s": args.mix_duration or (15 if args.quick else 100)}
        return plan

    @classmethod
    def _sized(cls, args: argparse.Namespace, only: set[str]) -> "Plan":
        if args.quick:  # a smoke test of the whole pipeline, not numbers to keep
            return cls(sizes=[MiB, 8 * MiB], repeats=args.repeats or 2, append_repeats=2,
                       concurrency=[1, 8, 32], records_per_client={1: 40, 8: 10, 32: 4},
                       history_length=args.history_length or 300, history_budget_s=120, history_samples=8,
                       rss_sizes=[MiB, 8 * MiB], bytes_per_sample=8 * MiB, big=False, quick=True, only=only)
        sizes = [MiB, 64 * MiB, 256 * MiB] + ([GiB] if args.big else [])
        return cls(sizes=sizes, repeats=args.repeats or 5, append_repeats=min(args.repeats or 3, 5),
                   concurrency=[1, 8, 32], records_per_client={1: 300, 8: 60, 32: 25},
                   history_length=args.history_length or 100_000,
                   history_budget_s=args.history_budget or 1800, history_samples=30,
                   rss_sizes=[MiB, 256 * MiB] + ([GiB] if args.big else []),
                   bytes_per_sample=64 * MiB, big=args.big, quick=False, only=only)

    def iterations(self, size: int) -> int:
        """Small sizes repeat within a sample, so a sample moves enough bytes to be timed."""
        return max(1, self.bytes_per_sample // size)


@dataclass
class Ctx:
    procs: Procs
    plan: Plan
    started: float = field(default_factory=time.monotonic)
    results: dict[str, Any] = field(default_factory=dict)
    cids: dict[int, str] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.started:6.0f}s] {msg}", file=sys.stderr, flush=True)

    # --- targets ---------------------------------------------------------------------------

    def stream_targets(self) -> list[dict]:
        kubo, gw = self.procs.kubo, self.procs.ensure_gateway()
        # Kubo's RPC takes only callers with its secret (API.Authorizations), through nginx too
        return [{"name": "direct", "api": kubo.api_url, "gw": kubo.gateway_url, "headers": kubo.rpc_headers},
                {"name": "nginx", "api": self.procs.nginx_url, "gw": self.procs.nginx_url, "headers": kubo.rpc_headers},
                {"name": "gateway", "api": gw.url, "gw": gw.url, "headers": self.procs.auth.headers}]

    def raw_targets(self) -> list[dict]:
        headers = self.procs.kubo.rpc_headers
        return [{"name": "direct", "kind": "raw_add", "url": self.procs.kubo.api_url, "headers": headers},
                {"name": "nginx", "kind": "raw_add", "url": self.procs.nginx_url, "headers": headers}]

    def gateway_target(self) -> dict:
        gw = self.procs.ensure_gateway()
        return {"name": "gateway", "kind": "append", "url": gw.url, "headers": self.procs.auth.headers}

    def loadgen(self, spec: dict, budget_s: float) -> dict:
        # the time budget is checked between rounds: leave room for the last round and warm-up
        return self.procs.run_loadgen(spec, timeout=2 * budget_s + 300)


def size_label(size: int) -> str:
    return f"{size // GiB} GiB" if size >= GiB and size % GiB == 0 else f"{size // MiB} MiB"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# --- scenarios -------------------------------------------------------------------------------

def prepare(ctx: Ctx) -> None:
    sizes = sorted(set(ctx.plan.sizes) | set(ctx.plan.rss_sizes))
    ctx.say(f"adding the blobs to read ({', '.join(size_label(s) for s in sizes)}) directly on Kubo")
    target = ctx.stream_targets()[0]
    res = ctx.loadgen({"kind": "prepare", "target": target, "sizes": sizes}, budget_s=600)
    ctx.cids = {int(k): v for k, v in res["cids"].items()}
    ctx.results["blobs"] = {str(k): v for k, v in ctx.cids.items()}


def summarize_stream(res: dict) -> dict:
    samples, rounds = res["samples"], res["rounds"]
    out: dict[str, Any] = {"mbps": {t: median(v) for t, v in samples.items()}, "samples_mbps": samples,
                           "rounds": len(rounds), "iterations_per_sample": res["iterations"],
                           "retries": res.get("retries", {}), "seconds": res["seconds"]}
    if "direct" in samples:
        out["ratio_to_direct"] = {t: median([r[t] / r["direct"] for r in rounds])
                                  for t in samples if t != "direct"}
    if "nginx" in samples and "gateway" in samples:
        out["gateway_to_nginx"] = median([r["gateway"] / r["nginx"] for r in rounds])
    return out


def stream(ctx: Ctx, op: str) -> None:
    """``cat`` / ``ipfs`` / ``add`` at every size: MB/s per target, ratios to direct."""
    block = ctx.results.setdefault("stream", {}).setdefault(op, {})
    for size in ctx.plan.sizes:
        budget = (150 if op == "add" else 90) * max(1, size // (256 * MiB))
        spec = {"kind": "stream", "op": op, "size": size, "cid": ctx.cids.get(size),
                "targets": ctx.stream_targets(), "repeats": ctx.plan.repeats,
                "iterations": ctx.plan.iterations(size), "budget_s": budget}
        res = summarize_stream(ctx.loadgen(spec, budget))
        block[str(size)] = res
        m, r = res["mbps"], res["ratio_to_direct"]
        ctx.say(f"{op:4} {size_label(size):>8}: direct {m['direct']:7.0f} MB/s, nginx {m['nginx']:7.0f} "
                f"({r['nginx']:.2f}x), gateway {m['gateway']:7.0f} ({r['gateway']:.2f}x)  [{res['rounds']} rounds]")


def appends(ctx: Ctx) -> None:
    """Record appends through the REST API vs a raw ``add`` of the same JSON bytes on Kubo,
    through a gateway with ``records.pipeline = true`` (``gateway``) and a second gateway on
    the same Kubo with ``records.pipeline = false`` (``serial``: each append one Kubo
    round trip under its episode's lock, as before the pipeline), interleaved round after
    round; then 8 clients appending to one episode. ``kubo put`` stores each record as a
    dag-cbor block with ``block/put?pin=true`` directly on Kubo: what an append asks of Kubo,
    so the ceiling of any gateway that stores and pins one block per record."""
    block = ctx.results.setdefault("appends", {})
    gateways = {name: Procs(ctx.procs.tmp / name, kubo=ctx.procs.kubo, owns_kubo=False,
                            extra_env={"MEDICON_RECORDS_PIPELINE": on})
                for name, on in (("gateway", "true"), ("serial", "false"))}
    try:
        # what an append asks of Kubo (a dag-cbor block stored and pinned), with no gateway in
        # front: the most appends this Kubo allows at that concurrency
        kubo = ctx.procs.kubo
        targets = [*ctx.raw_targets(), {"name": "kubo put", "kind": "raw_put", "url": kubo.api_url,
                                        "headers": kubo.rpc_headers}]
        for name, procs in gateways.items():
            procs.ensure_keyring()
            procs.create_token()
            targets.append({"name": name, "kind": "append", "url": procs.start_gateway().url,
                            "headers": procs.auth.headers})
        pipelined = next(t for t in targets if t["name"] == "gateway")
        for c in ctx.plan.concurrency:
            block[str(c)] = _appends_run(ctx, c, targets, {"episodes_per_client": 4}, paths_of=pipelined)
        ctx.results["appends_one_episode"] = {"8": _appends_run(ctx, 8, targets, {"episodes": 1}, "one episode",
                                                                paths_of=pipelined)}
    finally:
        for procs in gateways.values():
            procs.stop_gateway()


def _append_paths(target: dict) -> dict[str, float]:
    """How a gateway's appends have gone so far, serial or pipelined (its
    ``medicon_record_append_paths`` counter)."""
    request = urllib.request.Request(target["url"] + "/metrics", headers=target["headers"])
    with urllib.request.urlopen(request, timeout=10) as resp:
        text = resp.read().decode()
    return {sample.labels["path"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "medicon_record_append_paths_total"}


def _appends_run(ctx: Ctx, c: int, targets: list[dict], episodes: dict, label: str = "", *,
                 paths_of: dict | None = None) -> dict:
    """One appends measurement; ``paths_of``: the pipelined gateway, whose appends in it are
    counted by the way they went (an append alone on its episode goes the serial way)."""
    paths_before = _append_paths(paths_of) if paths_of else {}
    budget = 150
    spec = {"kind": "append", "concurrency": c, "records_per_client": ctx.plan.records_per_client[c],
            **episodes, "targets": targets, "repeats": ctx.plan.append_repeats, "budget_s": budget,
            "run_timeout_s": 60}
    res = ctx.loadgen(spec, budget)
    runs = res["runs"]
    n = min(len(v) for v in runs.values())
    summary = {
        "concurrency": c, "episodes": res["episodes"], "rounds": n, "runs": runs,
        "retries": res.get("retries", {}),
        "records_per_s": {t: median([x["records_per_s"] for x in v]) for t, v in runs.items()},
        "p50_ms": {t: median([x["p50_ms"] for x in v]) for t, v in runs.items()},
        "p99_ms": {t: median([x["p99_ms"] for x in v]) for t, v in runs.items()},
        "ratio_to_direct": {t: median([runs[t][i]["records_per_s"] / runs["direct"][i]["records_per_s"]
                                       for i in range(n)]) for t in runs if t != "direct"},
    }
    if paths_of:
        summary["append_paths"] = {path: n - paths_before.get(path, 0.0)
                                   for path, n in _append_paths(paths_of).items()}
    rps, p50, p99, ratio = summary["records_per_s"], summary["p50_ms"], summary["p99_ms"], summary["ratio_to_direct"]
    line = f"appends c={c:>2}{' ' + label if label else ''}: raw add {rps['direct']:6.0f}/s p99 {p99['direct']:6.1f} ms"
    for name in ("kubo put", "gateway", "serial"):
        if name in rps:
            line += (f" | {name} {rps[name]:6.0f}/s p50 {p50[name]:6.1f} ms p99 {p99[name]:6.1f} ms"
                     f" ({ratio[name]:.2f}x)")
    ctx.say(line)
    return summary


def history(ctx: Ctx) -> None:
    """A page of 100 records from the middle of a long episode."""
    plan = ctx.plan
    ctx.say(f"history: building one episode of {plan.history_length} records (16 parallel writers)")
    build = ctx.loadgen({"kind": "history_build", "target": ctx.gateway_target(), "length": plan.history_length,
                         "parallel": 16, "budget_s": plan.history_budget_s}, plan.history_budget_s)
    length = build["length"]
    out: dict[str, Any] = {"wanted_length": plan.history_length, "length": length, "build": build,
                           "default_length": 100_000,
                           "append_rate_by_length": append_rates(build.get("progress", []))}
    ctx.results["history"] = out
    if length < plan.history_length:
        ctx.say(f"history: time budget reached at {length} records")
    if length < 101:
        raise BenchError(f"history: only {length} records appended, too few for a page of 100")
    cursor = length // 2 - 51  # records seq length/2-50 .. length/2+49
    page = ctx.loadgen({"kind": "history_page", "gateway": ctx.gateway_target(), "direct": ctx.raw_targets(),
                        "episode": build["episode"], "cursor": cursor, "limit": 100,
                        "samples": plan.history_samples, "budget_s": 90}, 90)
    out.update({"cursor": cursor, "limit": 100, "timings_ms": page["timings_ms"],
                "p50_ms": {t: median(v) for t, v in page["timings_ms"].items()},
                "retries": page.get("retries", {})})
    p50 = out["p50_ms"]
    rates = out["append_rate_by_length"]
    ctx.say(f"history: page of 100 at seq {cursor + 1} of {length}: gateway p50 {p50['gateway']:.1f} ms "
            f"(100 sequential dag/get: direct {p50['direct']:.1f} ms, via nginx {p50['nginx']:.1f} ms); "
            f"built at {build['records_per_s']:.0f} records/s"
            + (f" ({rates['first_tenth']:.0f}/s over the first tenth, {rates['last_tenth']:.0f}/s over the last)"
               if rates else ""))


def append_rates(progress: list) -> dict[str, float]:
    """Appends/s over the first and the last tenth of the build: whether an append gets slower
    as its episode grows."""
    if len(progress) < 4:
        return {}
    end = progress[-1][1]

    def rate(lo: float, hi: float) -> float:
        pts = [p for p in progress if lo * end <= p[1] <= hi * end] or progress
        first, last = pts[0], pts[-1]
        return (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else 0.0
    return {"first_tenth": rate(0, 0.1), "last_tenth": rate(0.9, 1.0)}


def rss(ctx: Ctx) -> None:
    """The gateway's peak RSS (VmHWM) while streaming cats, a fresh gateway for each size."""
    block = ctx.results.setdefault("rss", {})
    for size in ctx.plan.rss_sizes:
        gw = ctx.procs.restart_gateway()
        idle = gw.memory_kib()
        target = {"name": "gateway", "api": gw.url, "gw": gw.url, "headers": ctx.procs.auth.headers}
        spec = {"kind": "stream", "op": "cat", "size": size, "cid": ctx.cids[size], "targets": [target],
                "repeats": ctx.plan.repeats, "iterations": ctx.plan.iterations(size), "budget_s": 90}
        res = ctx.loadgen(spec, 90)
        after = gw.memory_kib()
        block[str(size)] = {"idle_rss_kib": idle["VmRSS"], "peak_rss_kib": after["VmHWM"],
                            "rss_after_kib": after["VmRSS"], "pid": gw.pid,
                            "bytes_streamed": size * (1 + ctx.plan.iterations(size) * len(res["rounds"])),
                            "mbps": median(res["samples"]["gateway"])}
        ctx.say(f"rss  {size_label(size):>8}: idle {idle['VmRSS'] / 1e3:.1f} MB, peak {after['VmHWM'] * 1024 / 1e6:.1f} MB "
                f"(VmHWM), cat through a fresh gateway")
    ctx.procs.restart_gateway()  # leave a gateway whose peak is not these


def encrypted_read(ctx: Ctx) -> dict:
    """Encrypted attachment read vs plaintext, both through the gateway.

    A blob added through the gateway with ``X-Medicon-Patient`` is an attachment of that
    patient, sealed before it reaches Kubo; ``cat`` and ``GET /ipfs/<cid>`` through the gateway
    decrypt it. Each is compared with the same read of a plaintext blob of the same size through
    the gateway, interleaved. Where the
    gateway cannot do that (no attachments, or it stores them in clear), the slot says
    "not available" and why; everything else about the run is unchanged.
    """
    size = max(s for s in ctx.plan.sizes if s <= 256 * MiB)
    gw = ctx.procs.ensure_gateway()
    direct = ctx.stream_targets()[0]
    sealed_target = {"name": "gateway", "api": gw.url, "gw": gw.url,
                     "headers": {**ctx.procs.auth.headers, "X-Medicon-Patient": "bench-attachments"}}
    try:
        added = ctx.loadgen({"kind": "prepare", "target": sealed_target, "sizes": [size], "check": direct}, 300)
    except BenchError as exc:
        return {"status": "not available", "reason": f"an attachment add through the gateway failed ({exc})"}
    cid, stored = added["cids"][str(size)], added["stored_bytes"][str(size)]
    if stored == size:
        return {"status": "not available", "cid": cid,
                "reason": "the gateway stored the attachment in clear (no encryption of attachments)"}
    plain = ctx.cids.get(size)
    if plain is None:
        plain = ctx.loadgen({"kind": "prepare", "target": direct, "sizes": [size]}, 300)["cids"][str(size)]
    headers = ctx.procs.auth.headers
    targets = [{"name": "plaintext", "api": gw.url, "gw": gw.url, "headers": headers, "cid": plain},
               {"name": "encrypted", "api": gw.url, "gw": gw.url, "headers": headers, "cid": cid}]
    budget = 120
    by_op = {}
    for op in ("cat", "ipfs"):  # the RPC `cat`, and GET /ipfs/<cid>
        res = ctx.loadgen({"kind": "stream", "op": op, "size": size, "targets": targets,
                           "repeats": ctx.plan.repeats, "iterations": ctx.plan.iterations(size),
                           "budget_s": budget}, budget)
        by_op[op] = {"mbps": {t: median(v) for t, v in res["samples"].items()},
                     "samples_mbps": res["samples"], "rounds": len(res["rounds"]),
                     "ratio": median([r["encrypted"] / r["plaintext"] for r in res["rounds"]])}
    return {"status": "measured", "size": size, "cid": cid, "plaintext_cid": plain,
            "stored_bytes": stored, "overhead_bytes": stored - size, "by_op": by_op}


def sync_cost(ctx: Ctx) -> None:
    """What fsyncing Kubo's blocks costs: Kubo as the gateway's managed node and
    deploy/kubo-harden.sh run it (flatfs ``sync: true``) against Kubo's own default (``false``),
    a second Kubo and gateway for the latter. Record appends through each gateway, and adds of
    the largest size up to 256 MiB directly on each Kubo and through each gateway; each pair
    interleaved round after round."""
    plan = ctx.plan
    other = Procs(ctx.procs.tmp / "nosync")
    block = ctx.results.setdefault("sync", {"appends": {}, "add": {}})
    try:
        other.start_kubo(sync=False)
        other.ensure_keyring()
        other.create_token()
        off_gw, on_gw = other.start_gateway(), ctx.procs.ensure_gateway()
        on_kubo, off_kubo = ctx.procs.kubo, other.kubo
        apps = [{"name": "sync on", "kind": "append", "url": on_gw.url, "headers": ctx.procs.auth.headers},
                {"name": "sync off", "kind": "append", "url": off_gw.url, "headers": other.auth.headers}]
        for c in (1, 8):
            res = ctx.loadgen({"kind": "append", "concurrency": c, "records_per_client": plan.records_per_client[c],
                               "episodes_per_client": 4, "targets": apps, "repeats": plan.append_repeats,
                               "budget_s": 150, "run_timeout_s": 60}, 150)
            runs = res["runs"]
            n = min(len(v) for v in runs.values())
            got = {"concurrency": c, "runs": runs,
                   "records_per_s": {t: median([x["records_per_s"] for x in v]) for t, v in runs.items()},
                   "p50_ms": {t: median([x["p50_ms"] for x in v]) for t, v in runs.items()},
                   "p99_ms": {t: median([x["p99_ms"] for x in v]) for t, v in runs.items()},
                   "on_to_off": median([runs["sync on"][i]["records_per_s"] / runs["sync off"][i]["records_per_s"]
                                        for i in range(n)])}
            block["appends"][str(c)] = got
            rps, p50 = got["records_per_s"], got["p50_ms"]
            ctx.say(f"sync appends c={c}: on {rps['sync on']:.0f}/s p50 {p50['sync on']:.1f} ms | off "
                    f"{rps['sync off']:.0f}/s p50 {p50['sync off']:.1f} ms ({got['on_to_off']:.2f}x)")
        size = max(s for s in plan.sizes if s <= 256 * MiB)
        for via, on_url, off_url, on_headers, off_headers in (
                ("kubo", on_kubo.api_url, off_kubo.api_url, on_kubo.rpc_headers, off_kubo.rpc_headers),
                ("gateway", on_gw.url, off_gw.url, ctx.procs.auth.headers, other.auth.headers)):
            targets = [{"name": "sync on", "api": on_url, "gw": on_url, "headers": on_headers},
                       {"name": "sync off", "api": off_url, "gw": off_url, "headers": off_headers}]
            budget = 150 * max(1, size // (256 * MiB))
            res = ctx.loadgen({"kind": "stream", "op": "add", "size": size, "targets": targets,
                               "repeats": plan.repeats, "iterations": plan.iterations(size), "budget_s": budget}, budget)
            got = {"size": size, "samples_mbps": res["samples"], "rounds": len(res["rounds"]),
                   "mbps": {t: median(v) for t, v in res["samples"].items()},
                   "on_to_off": median([r["sync on"] / r["sync off"] for r in res["rounds"]])}
            block["add"][via] = got
            ctx.say(f"sync add {size_label(size)} via {via}: on {got['mbps']['sync on']:.0f} MB/s, off "
                    f"{got['mbps']['sync off']:.0f} MB/s ({got['on_to_off']:.2f}x)")
    finally:
        other.close()


def encrypted(ctx: Ctx) -> None:
    ctx.results["encrypted_read"] = res = encrypted_read(ctx)
    if res["status"] == "measured":
        for op, r in res["by_op"].items():
            ctx.say(f"encrypted attachment {op} {size_label(res['size'])} through the gateway: "
                    f"{r['mbps']['encrypted']:.0f} MB/s vs plaintext {r['mbps']['plaintext']:.0f} MB/s "
                    f"({r['ratio']:.2f}x; {res['overhead_bytes']:,} bytes of sealing overhead in Kubo)")
    else:
        ctx.say(f"encrypted attachment read: {res['status']} ({res.get('reason', '')})")


def mix(ctx: Ctx) -> None:
    """A clinical mix through the gateway (``mix`` in bench/loadgen.py): many small FHIR
    records across many episodes, history pages, record reads and a few attachments, from
    ``clients`` clients at once; per operation count, ops/s, p50, p99 and errors, and
    records/s. Gateway only: Kubo has no records, episodes or history to compare with. Any
    failed operation fails the step (the numbers are kept in the json and the table)."""
    m = ctx.plan.mix
    spec = {"kind": "mix", "target": ctx.gateway_target(), **m}
    ctx.say(f"mix: {m['clients']} clients, {m['warmup_s']} s warm-up + {m['duration_s']:.0f} s, seed {m['seed']}")
    res = ctx.loadgen(spec, m["warmup_s"] + m["duration_s"])
    ctx.results["mix"] = res
    for op, r in res["ops"].items():
        if r["count"] or r["errors"]:
            ctx.say(f"mix {op:11}: {r['count']:6} ops {r['ops_per_s']:7.1f}/s  p50 {_ms(r['p50_ms'])}  "
                    f"p99 {_ms(r['p99_ms'])}  errors {r['errors']}")
    ctx.say(f"mix: {res['records_per_s']:.1f} records/s ({res['records']} records over {res['seconds']:.1f} s; "
            f"{res['patients']} patients, {res['episodes']} episodes)")
    errors = res["errors"]
    if errors["total"]:
        shown = "; ".join(f"{e['op']} {e['status']} ×{e['count']}: {e['message']}" for e in errors["examples"][:3])
        raise BenchError(f"mix: {errors['total']} operations failed ({errors['by_op_status']}): {shown}")
    if not res["records"]:
        raise BenchError("mix: no record written after the warm-up")


def _ms(value: float | None) -> str:
    return f"{value:7.1f} ms" if value is not None else "      — ms"


# --- machine ---------------------------------------------------------------------------------

def machine_info(procs: Procs) -> dict[str, Any]:
    def first(path: str, key: str) -> str | None:
        try:
            for line in Path(path).read_text().splitlines():
                if line.split(":")[0].strip() == key:
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    mem_kib = first("/proc/meminfo", "MemTotal")
    os_name = None
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": first("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(int(mem_kib.split()[0]) / 2**20, 1) if mem_kib else None,
        "kernel": platform.release(),
        "os": os_name,
        "python": platform.python_version(),
        "aiohttp": metadata.version("aiohttp"),
        "kubo": procs.kubo.version() if procs.kubo else None,
        "nginx": procs.nginx_version(),
        "git_commit": commit,
        "loadavg_at_start": os.getloadavg(),
    }


# --- main ------------------------------------------------------------------------------------

def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--big", action="store_true", help="add 1 GiB transfers")
    p.add_argument("--repeats", type=int, help="rounds per measurement (default 5; appends 3)")
    p.add_argument("--history-length", type=int, help="records in the history episode (default 100000)")
    p.add_argument("--history-budget", type=float,
                   help="seconds the history episode may take to build (default 1800)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test with small sizes; writes bench/results/quick.* instead of latest.*")
    p.add_argument("--only", help=f"comma-separated subset of: {','.join(SCENARIOS)}")
    p.add_argument("--mix-clients", type=int, default=16, help="clients of the clinical mix (default 16)")
    p.add_argument("--mix-duration", type=float,
                   help="seconds the clinical mix is measured, after its warm-up (default 100; 15 with --quick)")
    p.add_argument("--mix-seed", type=int, default=1, help="seed of the clinical mix (default 1)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary Kubo repo and logs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.from_args(args)
    # Ctrl-C, SIGTERM and SIGHUP all end the run through the cleanup below (SIGINT explicitly,
    # since a shell starts background jobs with it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    reap_stale(lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    procs = Procs(tmp)
    ctx = Ctx(procs, plan)
    try:
        ctx.say(f"temporary dir {tmp}; starting Kubo, the gateway and nginx")
        kubo = procs.start_kubo()
        keyring = procs.ensure_keyring()
        auth = procs.create_token()
        gw = procs.start_gateway()
        nginx = procs.start_nginx()
        ctx.say(f"Kubo {kubo.version()} api {kubo.api_url} gateway {kubo.gateway_url} | gateway {gw.url} "
                f"(pid {gw.pid}) | nginx {nginx}")
        ctx.say(f"auth: {auth.note}; keyring: {keyring}")
        ctx.results.update({
            "machine": machine_info(procs),
            "plan": {"sizes": plan.sizes, "repeats": plan.repeats, "append_repeats": plan.append_repeats,
                     "concurrency": plan.concurrency, "records_per_client": plan.records_per_client,
                     "history_length": plan.history_length, "rss_sizes": plan.rss_sizes,
                     "bytes_per_sample": plan.bytes_per_sample, "big": plan.big, "quick": plan.quick,
                     "only": sorted(plan.only), "mix": plan.mix},
            "auth": auth.note, "keyring": keyring,
        })
        steps: list[tuple[str, Callable[[], None]]] = []
        if plan.only & {"cat", "ipfs", "rss"}:
            steps.append(("prepare", lambda: prepare(ctx)))
        for op in ("cat", "ipfs", "add"):
            if op in plan.only:
                steps.append((op, lambda op=op: stream(ctx, op)))
        for name, fn in (("appends", appends), ("history", history), ("rss", rss), ("encrypted", encrypted),
                         ("sync", sync_cost), ("sites", sites), ("mix", mix)):
            if name in plan.only:
                steps.append((name, lambda fn=fn: fn(ctx)))
        for name, step in steps:
            try:
                step()
            except (BenchError, KeyError, ValueError, OSError) as exc:
                ctx.errors.append({"step": name, "error": f"{type(exc).__name__}: {exc}"})
                ctx.say(f"{name}: FAILED: {exc}")
                if name == "prepare":
                    break
        ctx.results["errors"] = ctx.errors
        ctx.results["elapsed_s"] = round(time.monotonic() - ctx.started, 1)
        ctx.results["machine"]["loadavg_at_end"] = os.getloadavg()
        if "encrypted_read" not in ctx.results:
            ctx.results["encrypted_read"] = {"status": "not measured in this run",
                                             "reason": "the `encrypted` scenario was not among --only"
                                             if "encrypted" not in plan.only else "the run stopped before it"}
        base = "quick" if plan.quick else "latest"
        written = report.write_all(ctx.results, args.out, base)
        print(report.markdown(ctx.results), flush=True)
        ctx.say("wrote " + ", ".join(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in written))
        return 1 if ctx.errors else 0
    except KeyboardInterrupt:
        ctx.say("interrupted: stopping Kubo, the gateway and nginx")
        return 130
    except BenchError as exc:
        ctx.say(f"FAILED: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        procs.close()
        if args.keep_tmp:
            ctx.say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
