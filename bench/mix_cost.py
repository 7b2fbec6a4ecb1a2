"""What the clinical mix costs the gateway: the load generator's ``mix`` scenario (FHIR-bearing
records, history pages, record reads, sealed attachments; see bench/README.md) against one
freshly started Kubo and gateway, with the gateway's and Kubo's CPU time per operation (all
threads, from ``/proc/<pid>/stat``) beside the records written per second. On a saturated
2-core machine the rate moves with everything else running; CPU per operation is the steadier
number to compare two versions with (run this from each checkout, in turns). With
``--py-spy FILE``, also records the gateway with ``py-spy record --gil`` for the whole run and
prints the top inclusive lines (raw samples kept in FILE).

    .venv/bin/python -m bench.mix_cost [--clients 8] [--duration 30] [--py-spy FILE]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import Procs
from bench.read_cost import cpu_seconds, top_lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8, help="clients of the mix (default 8)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of mix (default 30)")
    p.add_argument("--seed", type=int, default=1, help="seed of the mix (default 1)")
    p.add_argument("--py-spy", type=Path, metavar="FILE", help="also record the gateway with py-spy into FILE")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="medicon-mix-cost-") as tmp:
        procs = Procs(Path(tmp))
        try:
            kubo = procs.start_kubo()
            procs.ensure_keyring()
            procs.create_token()
            gateway = procs.start_gateway()
            spec = {"kind": "mix", "target": {"name": "gateway", "kind": "append", "url": gateway.url,
                                              "headers": procs.auth.headers},
                    "clients": args.clients, "seed": args.seed, "warmup_s": 0.0, "duration_s": args.duration}
            recorder = None
            if args.py_spy:
                spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
                recorder = subprocess.Popen([spy, "record", "--gil", "-r", "200", "-f", "raw", "-o", str(args.py_spy),
                                             "-d", str(max(1, int(args.duration) - 2)), "-p", str(gateway.pid)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            gateway_cpu, kubo_cpu, started = cpu_seconds(gateway.pid), cpu_seconds(kubo.process.pid), time.perf_counter()
            result = procs.run_loadgen(spec, timeout=2 * args.duration + 300)
            elapsed = time.perf_counter() - started
            gateway_cpu, kubo_cpu = cpu_seconds(gateway.pid) - gateway_cpu, cpu_seconds(kubo.process.pid) - kubo_cpu
            ops = sum(r["count"] for r in result["ops"].values())
            if result["errors"]["total"] or not ops:
                raise SystemExit(f"mix failed: {result['errors']}")
            print(f"{result['records_per_s']:.1f} records/s, {ops} operations in {elapsed:.0f} s; "
                  f"gateway CPU {gateway_cpu * 1e3 / ops:.2f} ms/operation ({gateway_cpu / elapsed:.0%} of a core), "
                  f"Kubo {kubo_cpu * 1e3 / ops:.2f} ms/operation")
            if recorder is not None:
                if recorder.wait() != 0 or not args.py_spy.exists():
                    raise SystemExit(f"py-spy failed (exit {recorder.returncode}); is it installed and allowed to ptrace?")
                print("\npy-spy --gil, the clinical mix, top inclusive lines:")
                print("\n".join(top_lines(args.py_spy, 40)))
        finally:
            procs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
