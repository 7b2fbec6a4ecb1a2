"""Turn a run's raw results into the table (with targets), ``latest.json``, ``latest.md`` and
``latest.png``. Pure functions of the results dict, so a saved ``latest.json`` can be
re-rendered: ``python -m bench.report bench/results/latest.json``."""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
BIG = 256 * MiB                  # the size the streaming targets are stated for
RSS_LIMIT_MB = 120.0             # MB = 10^6 bytes, like MB/s
RSS_FLAT_MB = 10.0               # "flat": the largest stream's peak within this of the 1 MiB peak
TARGETS = {
    "cat": "≥ 0.95× direct and ≥ nginx",
    "add": "≥ 0.90× direct",
    "append_rate": "≥ 0.8× raw add",
    "append_p99": "< 25 ms",
    "encrypted": "≥ 0.8× plaintext",
    "history": "< 50 ms",
    "rss": f"< {RSS_LIMIT_MB:.0f} MB",
    "rss_flat": f"< {RSS_LIMIT_MB:.0f} MB, ≤ +{RSS_FLAT_MB:.0f} MB over 1 MiB",
}
OPS = {"cat": "cat", "ipfs": "GET /ipfs", "add": "add"}


def size_label(size: int) -> str:
    return f"{size // GiB} GiB" if size >= GiB and size % GiB == 0 else f"{size // MiB} MiB"


def _row(metric: str, direct=None, nginx=None, gateway=None, ratio=None, target: str = "",
         met: bool | str | None = None, digits: int = 0) -> dict[str, Any]:
    return {"metric": metric, "direct": direct, "nginx": nginx, "gateway": gateway, "ratio": ratio,
            "target": target, "met": met, "digits": digits}


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The table: one row per metric, with its target and whether it is met."""
    out: list[dict[str, Any]] = []
    for op, label in OPS.items():
        for size_s, r in sorted(results.get("stream", {}).get(op, {}).items(), key=lambda kv: int(kv[0])):
            size, m, ratio = int(size_s), r["mbps"], r.get("ratio_to_direct", {})
            target, met = "", None
            if op == "cat" and size == BIG:
                target = TARGETS["cat"]
                met = ratio["gateway"] >= 0.95 and m["gateway"] >= m["nginx"]
            elif op == "add" and size == BIG:
                target = TARGETS["add"]
                met = ratio["gateway"] >= 0.90
            out.append(_row(f"{label} {size_label(size)} (MB/s)", m.get("direct"), m.get("nginx"), m.get("gateway"),
                            ratio.get("gateway"), target, met))

    for c_s, a in sorted(results.get("appends", {}).items(), key=lambda kv: int(kv[0])):
        c = int(c_s)
        rps, p50, p99 = a["records_per_s"], a["p50_ms"], a["p99_ms"]
        last = c == 32
        who = f"{c} client{'s' if c > 1 else ''}"
        out.append(_row(f"appends, {who} (records/s)", rps.get("direct"), rps.get("nginx"), rps.get("gateway"),
                        a["ratio_to_direct"].get("gateway"), TARGETS["append_rate"] if last else "",
                        a["ratio_to_direct"]["gateway"] >= 0.8 if last else None))
        out.append(_row(f"appends, {who}: p50 latency (ms)", p50.get("direct"), p50.get("nginx"), p50.get("gateway"),
                        _div(p50.get("gateway"), p50.get("direct")), digits=1))
        out.append(_row(f"appends, {who}: p99 latency (ms)", p99.get("direct"), p99.get("nginx"), p99.get("gateway"),
                        _div(p99.get("gateway"), p99.get("direct")), TARGETS["append_p99"] if last else "",
                        p99["gateway"] < 25 if last else None, digits=1))

    h = results.get("history")
    if h and "p50_ms" in h:
        p50 = h["p50_ms"]
        out.append(_row(f"history page of 100 from a {h['length']:,}-record episode, p50 (ms)",
                        p50.get("direct"), p50.get("nginx"), p50.get("gateway"),
                        _div(p50.get("gateway"), p50.get("direct")), TARGETS["history"], p50["gateway"] < 50, digits=1))

    rss = results.get("rss", {})
    sizes = sorted(int(s) for s in rss)
    for size in sizes:
        peak = rss[str(size)]["peak_rss_kib"] * 1024 / 1e6
        if size == sizes[0] or len(sizes) == 1:
            target, met = TARGETS["rss"], peak < RSS_LIMIT_MB
        else:
            base = rss[str(sizes[0])]["peak_rss_kib"] * 1024 / 1e6
            target, met = TARGETS["rss_flat"], peak < RSS_LIMIT_MB and peak - base <= RSS_FLAT_MB
        out.append(_row(f"gateway peak RSS, cat {size_label(size)} (MB)", gateway=peak, target=target, met=met,
                        digits=1))

    enc = results.get("encrypted_read")
    if enc is not None:
        if enc.get("status") == "measured":
            for op, r in enc["by_op"].items():
                out.append(_row(f"encrypted attachment, {OPS[op]} {size_label(enc['size'])} (MB/s; direct column = "
                                "a plaintext blob, through the gateway)", r["mbps"]["plaintext"],
                                None, r["mbps"]["encrypted"], r["ratio"], TARGETS["encrypted"], r["ratio"] >= 0.8))
        else:
            out.append(_row("encrypted attachment read vs plaintext", gateway=enc.get("status", "not available"),
                            target=TARGETS["encrypted"], met="n/a"))
    return out


def _div(a, b):
    return a / b if a is not None and b else None


def _fmt(value, digits: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}"


def _met(met) -> str:
    if met is None:
        return ""
    if isinstance(met, str):
        return met
    return "yes" if met else "**no**"


def markdown(results: dict[str, Any]) -> str:
    table = results.get("table") or rows(results)
    m = results.get("machine", {})
    plan = results.get("plan", {})
    lines = [
        "## medicon-gateway benchmark",
        "",
        f"{m.get('date', '?')} · {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, {m.get('ram_gib', '?')} GiB RAM · "
        f"Linux {m.get('kernel', '?')} · Kubo {m.get('kubo', '?')} · Python {m.get('python', '?')} · "
        f"nginx {m.get('nginx', '?')} · commit {m.get('git_commit') or '?'}"
        + (f" · load average {m['loadavg_at_start'][0]:.1f} at start, {m['loadavg_at_end'][0]:.1f} at end"
           if m.get("loadavg_at_start") and m.get("loadavg_at_end") else "")
        + (" · **quick smoke run, not results**" if plan.get("quick") else ""),
        "",
        "| metric | direct | nginx | gateway | gateway/direct | target | met? |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in table:
        cells = [_fmt(r["direct"], r["digits"]), _fmt(r["nginx"], r["digits"]), _fmt(r["gateway"], r["digits"]),
                 f"{r['ratio']:.2f}×" if r["ratio"] is not None else "—"]
        lines.append(f"| {r['metric']} | " + " | ".join(cells) + f" | {r['target']} | {_met(r['met'])} |")
    judged = [r for r in table if isinstance(r["met"], bool)]
    met = sum(r["met"] for r in judged)
    h = results.get("history", {})
    hist_note = ""
    if h:
        hist_note = (f"- History: a page of 100 records from the middle of one episode of {h.get('length', '?'):,} records"
                     + (f" (of {h['wanted_length']:,} wanted: the time budget ran out)" if h.get("length") != h.get("wanted_length") else "")
                     + f", built by 16 parallel writers at {h.get('build', {}).get('records_per_s', 0):.0f} records/s"
                     + (f" ({h['append_rate_by_length']['first_tenth']:.0f}/s over its first tenth, "
                        f"{h['append_rate_by_length']['last_tenth']:.0f}/s over its last)" if h.get("append_rate_by_length") else "")
                     + "."
                     " direct / nginx: the same 100 records read one `dag/get` after another from Kubo.")
    lines += [
        "",
        f"Targets met: **{met} of {len(judged)}**." + (" Errors: " + "; ".join(f"{e['step']}: {e['error']}" for e in results.get("errors", [])) if results.get("errors") else ""),
        "",
        "- direct = Kubo's own ports; nginx = a plain streaming reverse proxy (no buffering, keep-alive "
        "upstream); gateway = medicon-gateway. Loopback only; load from a separate process.",
        f"- Each number is the median of {plan.get('repeats', '?')} interleaved rounds (appends: "
        f"{plan.get('append_repeats', '?')}); gateway/direct is the median of the per-round ratios "
        "(for latencies: gateway ÷ direct, lower is better). MB = 10^6 bytes.",
        "- Appends: direct / nginx = a raw `add` of the same record JSON bytes on Kubo, same "
        "concurrency; gateway = `POST /medicon/v1/episodes/{e}/records` (validate, seal, sign, "
        "block/put with its pin, head move) through a gateway with `records.pipeline` on, each "
        "client over 4 episodes of its own (the default, serial path is measured in the same "
        "rounds: \"Appends against what they ask of Kubo\" below).",
    ]
    if hist_note:
        lines.append(hist_note)
    lines.append(f"- Peak RSS: VmHWM of a freshly started gateway after streaming only that size; auth: {results.get('auth', '?')}.")
    enc = results.get("encrypted_read", {})
    if enc.get("status") == "measured":
        lines.append(f"- Encrypted attachment: a {size_label(enc['size'])} blob added through the gateway with "
                     "`X-Medicon-Patient` (sealed before Kubo; Kubo holds "
                     f"{enc['overhead_bytes']:,} bytes more than the plaintext), read back through the gateway "
                     "(which fetches the ciphertext from Kubo's HTTP gateway by range and decrypts it), against the "
                     "same read of a plaintext blob of the same size through the gateway (RPC `cat`: Kubo's `cat`; "
                     "GET /ipfs: Kubo's HTTP gateway).")
    else:
        lines.append(f"- Encrypted attachment read: {enc.get('status', '?')} — {enc.get('reason', '')}.")
    lines += ceiling_lines(results)
    lines += sync_lines(results.get("sync"))
    lines += mix_lines(results.get("mix"))
    from bench.sites import sites_lines
    lines += sites_lines(results.get("sites"))
    return "\n".join(lines) + "\n"


def ceiling_lines(results: dict[str, Any]) -> list[str]:
    """Appends against what they ask of Kubo: one dag-cbor block stored and pinned per record
    (``block/put?pin=true`` directly on Kubo, same records and clients) — the most appends
    this Kubo allows any gateway that pins each record, measured in the same rounds."""
    measured = {**{f"{c} client{'s' if c != '1' else ''}": a for c, a in sorted(
                    results.get("appends", {}).items(), key=lambda kv: int(kv[0]))},
                **{f"{c} clients, one episode": a for c, a in results.get("appends_one_episode", {}).items()}}
    measured = {who: a for who, a in measured.items() if "kubo put" in a.get("records_per_s", {})}
    if not measured:
        return []
    lines = ["", "### Appends against what they ask of Kubo", "",
             "| clients | raw add | Kubo: block/put, pinned | gateway (pipelined) | serial | "
             "put / raw add | gateway / put | serial / put | pipelined gateway's appends that went serial |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for who, a in measured.items():
        rps, rounds = a["records_per_s"], a["runs"]
        n = min(len(v) for v in rounds.values())

        def per_round(num: str, den: str) -> str:
            if num not in rounds or den not in rounds:
                return "—"
            ratios = [rounds[num][i]["records_per_s"] / rounds[den][i]["records_per_s"] for i in range(n)]
            return f"{statistics.median(ratios):.2f}×"
        lines.append(f"| {who} | {_fmt(rps.get('direct'), 0)} | {_fmt(rps.get('kubo put'), 0)} | "
                     f"{_fmt(rps.get('gateway'), 0)} | {_fmt(rps.get('serial'), 0)} | "
                     f"{per_round('kubo put', 'direct')} | {per_round('gateway', 'kubo put')} | "
                     f"{per_round('serial', 'kubo put')} | {_went_serial(a.get('append_paths'))} |")
    lines += ["", "records/s, medians of the interleaved rounds; ratios are medians of per-round ratios. "
              "Kubo: block/put = each record's dag-cbor block stored with `block/put?pin=true` directly on "
              "Kubo by the same clients (what an append asks of Kubo, with no gateway in front): a gateway "
              "that stores and pins every record as a block of its own cannot append faster than this. "
              "With the pipeline on, an append that finds nothing of its episode in flight and no append "
              "waiting for it goes the serial way (last column: of the pipelined gateway's appends in that "
              "row, warm-up included)."]
    return lines


def _went_serial(paths: dict[str, float] | None) -> str:
    if not paths:
        return "—"
    total = sum(paths.values())
    return f"{paths.get('serial', 0) / total:.0%} of {total:.0f}" if total else "—"


def sync_lines(sync: dict[str, Any] | None) -> list[str]:
    """What fsyncing Kubo's blocks costs, side by side (sync on: the managed node and
    deploy/kubo-harden.sh; sync off: Kubo's default)."""
    if not sync or not (sync.get("appends") or sync.get("add")):
        return []
    lines = ["", "### Kubo's block store fsynced (sync on) or not (sync off, Kubo's default)", "",
             "| metric | sync off | sync on | on/off |", "| --- | ---: | ---: | ---: |"]
    for c_s, a in sorted(sync.get("appends", {}).items(), key=lambda kv: int(kv[0])):
        who = f"{c_s} client{'s' if c_s != '1' else ''}"
        rps, p50, p99 = a["records_per_s"], a["p50_ms"], a["p99_ms"]
        lines.append(f"| appends through the gateway, {who} (records/s) | {rps['sync off']:.0f} | "
                     f"{rps['sync on']:.0f} | {a['on_to_off']:.2f}× |")
        lines.append(f"| appends, {who}: p50 / p99 latency (ms) | {p50['sync off']:.1f} / {p99['sync off']:.1f} | "
                     f"{p50['sync on']:.1f} / {p99['sync on']:.1f} | |")
    for via, a in sync.get("add", {}).items():
        m = a["mbps"]
        lines.append(f"| add {size_label(a['size'])} {'directly on Kubo' if via == 'kubo' else 'through the gateway'} "
                     f"(MB/s) | {m['sync off']:.0f} | {m['sync on']:.0f} | {a['on_to_off']:.2f}× |")
    lines += ["", "Medians of interleaved rounds; on/off is the median of the per-round ratios. Each appended "
              "record is one block written, fsynced, and pinned (the pin, in leveldb, was always fsynced)."]
    return lines


MIX_LABELS = {
    "open": "open an episode (`POST …/patients/{p}/episodes`)",
    "append": "append a record (`POST …/episodes/{e}/records`)",
    "history": "history page (`GET …/episodes/{e}/history`)",
    "read": "read a record (`GET …/records/{cid}`)",
    "attach": "add an attachment (`POST /api/v0/add`, sealed)",
    "attach_read": "read it back (`GET /ipfs/{cid}`)",
}


def mix_lines(mix: dict[str, Any] | None) -> list[str]:
    """The clinical mix: one row per operation, then the records written per second."""
    if not mix or "ops" not in mix:
        return []
    w = mix["weights"]
    lines = ["", f"### Clinical mix: {mix['clients']} clients for {mix['seconds']:.0f} s, through the gateway", "",
             "| operation | count | ops/s | p50 (ms) | p99 (ms) | errors |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for op, label in MIX_LABELS.items():
        r = mix["ops"].get(op)
        if r is None:
            continue
        lines.append(f"| {label} | {r['count']:,} | {r['ops_per_s']:.1f} | {_fmt(r['p50_ms'], 1)} | "
                     f"{_fmt(r['p99_ms'], 1)} | {r['errors']}{' **failed**' if r['errors'] else ''} |")
    sizes = mix.get("record_bytes", {})
    lines.append(f"| **records written (open + append)** | {mix['records']:,} | **{mix['records_per_s']:.1f}** "
                 "| | | |")
    low, high = mix["attachment_kib"]
    lines += ["", f"Each client works over {mix['patients_per_client']} synthetic FHIR patients at a time "
              f"(`bench/fhir_synth.py`, seed {mix['seed']}), each with {mix['episodes_per_patient']} episodes "
              f"open at once, and at each step writes the next record of its patients ({w['record']} %), reads the "
              f"latest page of up to {mix['history_limit']} records of one of its episodes ({w['history']} %), "
              f"reads one of its records back ({w['read']} %), or adds an attachment of {low}–{high} KiB sealed "
              f"for one of its patients and reads it back whole ({w['attach']} %); "
              f"{mix['patients']} patients and {mix['episodes']} episodes in all, records of "
              f"{_fmt(sizes.get('p50'), 0)} bytes (median; up to {_fmt(sizes.get('max'), 0)}). "
              f"Counted after a {mix['warmup_s']:.0f} s warm-up; ops/s over the {mix['seconds']:.1f} s after it. "
              "Latency is one request's, answer read whole; p99 is the nearest-rank 99th percentile. "
              "Gateway only: Kubo on its own has no records, episodes or history to compare with "
              "(the `appends` rows compare an append with a raw `add` of the same bytes)."]
    errors = mix.get("errors", {})
    if errors.get("total"):
        lines += ["", f"**{errors['total']} operations failed**"
                  + (" (the run stopped there)" if mix.get("stopped_by_errors") else "")
                  + f" ({errors['by_op_status']}): "
                  + "; ".join(f"{e['op']} {e['status']} ×{e.get('count', 1)}: {e['message']}"
                              for e in errors["examples"][:5])]
    return lines


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)
    else:
        ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes,
                color="gray")


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    (ax_ratio, ax_mbps), (ax_lat, ax_rps) = axes
    stream = results.get("stream", {})
    colors = {"cat": "tab:blue", "ipfs": "tab:green", "add": "tab:orange"}

    # (a) throughput ratio to direct, per size
    sizes = sorted({int(s) for op in stream.values() for s in op})
    bars = [(op, who) for op in OPS if op in stream for who in ("nginx", "gateway")]
    width = 0.8 / max(1, len(bars))
    for i, (op, who) in enumerate(bars):
        xs, ys = [], []
        for j, size in enumerate(sizes):
            r = stream[op].get(str(size))
            if r:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(r["ratio_to_direct"][who])
        ax_ratio.bar(xs, ys, width, color=colors[op], alpha=0.45 if who == "nginx" else 0.95,
                     hatch="//" if who == "nginx" else None, edgecolor="black", linewidth=0.4,
                     label=f"{OPS[op]} via {who}")
    ax_ratio.axhline(1.0, color="black", linewidth=1)
    ax_ratio.axhline(0.95, color="tab:red", linestyle="--", linewidth=1, label="target: cat ≥ 0.95×")
    ax_ratio.axhline(0.90, color="tab:purple", linestyle=":", linewidth=1, label="target: add ≥ 0.90×")
    ax_ratio.set_xticks(range(len(sizes)), [size_label(s) for s in sizes])
    ax_ratio.set_ylabel("throughput ÷ direct Kubo")
    ax_ratio.set_title("Streaming throughput relative to direct Kubo (1.0 = direct)")
    _legend(ax_ratio, fontsize=7, ncol=4, loc="upper center")
    ax_ratio.set_ylim(0, max([1.45] + [stream[op][str(s)]["ratio_to_direct"][w] * 1.3
                                       for op, w in bars for s in sizes if str(s) in stream[op]]))

    # (b) absolute MB/s per target for each op at each size
    markers = {"direct": "o", "nginx": "s", "gateway": "^"}
    for op in OPS:
        if op not in stream:
            continue
        for who, marker in markers.items():
            pts = [(int(s), r["mbps"][who]) for s, r in stream[op].items() if who in r["mbps"]]
            pts.sort()
            ax_mbps.plot([p[0] / MiB for p in pts], [p[1] for p in pts], marker=marker, color=colors[op],
                         linestyle="-" if who == "gateway" else ("--" if who == "nginx" else ":"),
                         label=f"{OPS[op]} {who}")
    ax_mbps.set_xscale("log", base=2)
    ax_mbps.set_xticks([s / MiB for s in sizes], [size_label(s) for s in sizes])
    ax_mbps.set_ylabel("MB/s")
    ax_mbps.set_title("Streaming throughput (median)")
    _legend(ax_mbps, fontsize=7, ncol=3)

    # (c) append latency per concurrency
    appends = results.get("appends", {})
    cs = sorted(int(c) for c in appends)
    for who, color, label in (("gateway", "tab:red", "gateway append"), ("direct", "tab:gray", "raw add on Kubo"),
                              ("nginx", "tab:olive", "raw add via nginx")):
        if not cs or who not in appends[str(cs[0])]["p50_ms"]:
            continue
        ax_lat.plot(cs, [appends[str(c)]["p50_ms"][who] for c in cs], marker="o", color=color, label=f"{label} p50")
        ax_lat.plot(cs, [appends[str(c)]["p99_ms"][who] for c in cs], marker="^", linestyle="--", color=color,
                    label=f"{label} p99")
    ax_lat.axhline(25, color="tab:red", linestyle=":", linewidth=1, label="target: p99 < 25 ms at 32")
    ax_lat.set_xscale("log", base=2)
    ax_lat.set_yscale("log")
    ax_lat.set_xticks(cs, [str(c) for c in cs])
    ax_lat.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax_lat.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_lat.set_yticks([t for t in (1, 2, 5, 10, 25, 50, 100, 200, 500, 1000, 2000)
                       if ax_lat.get_ylim()[0] <= t <= ax_lat.get_ylim()[1]])
    ax_lat.set_xlabel("concurrent clients")
    ax_lat.set_ylabel("latency per request (ms)")
    ax_lat.set_title("Record append latency")
    _legend(ax_lat, fontsize=7)

    # (d) append rate per concurrency
    width = 0.27
    for k, (who, color, label) in enumerate((("direct", "tab:gray", "raw add on Kubo"),
                                             ("nginx", "tab:olive", "raw add via nginx"),
                                             ("gateway", "tab:red", "gateway append"))):
        if not cs or who not in appends[str(cs[0])]["records_per_s"]:
            continue
        ax_rps.bar([i + (k - 1) * width for i in range(len(cs))],
                   [appends[str(c)]["records_per_s"][who] for c in cs], width, color=color, label=label)
    ax_rps.set_xticks(range(len(cs)), [str(c) for c in cs])
    ax_rps.set_xlabel("concurrent clients")
    ax_rps.set_ylabel("records/s")
    ax_rps.set_title("Record append rate")
    _legend(ax_rps, fontsize=7)

    m = results.get("machine", {})
    fig.suptitle(f"medicon-gateway vs direct Kubo vs nginx — {m.get('date', '')} · {m.get('cpu_model', '')}, "
                 f"{m.get('cores', '?')} cores · Kubo {m.get('kubo', '?')}"
                 + (" · QUICK SMOKE RUN" if results.get("plan", {}).get("quick") else ""), fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_all(results: dict[str, Any], folder: Path, base: str = "latest") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    table = rows(results)
    results["table"] = table
    judged = [r for r in table if isinstance(r["met"], bool)]
    results["targets"] = {"met": sum(r["met"] for r in judged), "judged": len(judged)}
    paths = [folder / f"{base}.json", folder / f"{base}.md", folder / f"{base}.png"]
    _write(paths[0], json.dumps(results, indent=2, sort_keys=False) + "\n")
    _write(paths[1], markdown(results))
    try:
        chart(results, paths[2])
    except ImportError as exc:  # matplotlib missing: the numbers still count
        print(f"bench: no chart ({exc}); run bench/setup.sh", file=sys.stderr)
        paths.pop()
    return paths


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("results") / "latest.json")
    data = json.loads(source.read_text())
    data.pop("table", None)
    for p in write_all(data, source.parent, source.stem):
        print(p)
    print(markdown(data))
