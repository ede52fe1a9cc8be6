#!/usr/bin/env python3
"""Benchmark: `doa demo` end to end on this machine (target: under 5 minutes on 2 CPU cores).

Runs the demo in a fresh output directory, in a subprocess (so start-up and compilation count),
and prints a table of the wall time per cell and in total, and the CPU seconds; `--json PATH` also
writes the figures. The compilation cache starts empty (a fresh JAX_COMPILATION_CACHE_DIR: what the
first `doa demo` on a machine pays), unless --warm (doa's own cache, as a second run finds it).
    python3 scripts/bench_demo.py [--warm] [--json demo_bench.json]
"""
import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

TARGET_S = 300.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--warm", action="store_true", help="use doa's compilation cache as it is (default: an empty one)")
    args = parser.parse_args()
    out = pathlib.Path(tempfile.mkdtemp(prefix="doa_demo_bench_"))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if not args.warm:
        env["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="doa_xla_cold_")
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "doa_jax", "demo", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=env)
    total = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        return proc.returncode
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    print(f"doa demo on {os.cpu_count()} CPU cores ({out}); compilation cache "
          f"{'as doa left it (warm)' if args.warm else 'empty at the start (cold)'} "
          f"({env.get('JAX_COMPILATION_CACHE_DIR', '~/.cache/doa_jax/xla')}); load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'cell':<22} {'status':<10} {'metric':>8} {'bought':>16} {'spent $':>9} {'wall s':>8}")
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.1f}"
        spent = r.get("spent_total_usd")
        print(f"{r['strategy'] + ' +$' + format(r['extra_budget_usd'], 'g'):<22} {r['status']:<10} {value:>8} "
              f"{bought(r):>16} {'-' if spent is None else format(spent, '.3f'):>9} {r['wall_seconds']:>8.1f}")
    summary = proc.stdout[proc.stdout.find("who wins"):] if "who wins" in proc.stdout else ""
    print(summary.rstrip())
    verdict = "PASS" if total < TARGET_S else "FAIL"
    print(f"{'total (incl. start-up, report)':<22} {'':<10} {'':>8} {'':>9} {total:>8.1f}  "
          f"target < {TARGET_S:.0f} s: {verdict}; {cpu:.0f} CPU s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({
            "total_s": total, "cpu_s": cpu, "target_s": TARGET_S, "cache": "warm" if args.warm else "cold", "cells": [
            {k: r.get(k) for k in ("strategy", "extra_budget_usd", "status", "value", "labels_bought", "unlabeled_used",
                            "spent_total_usd", "wall_seconds")} for r in rows]},
            indent=1))
    return 0 if total < TARGET_S else 1


def bought(row: dict) -> str:
    """What the cell's budget bought: labels (annotate) or unlabeled inputs the teacher labelled."""
    if row.get("unlabeled_used"):
        return f"{row['unlabeled_used']:,} inputs"
    if row.get("labels_bought") is not None and row.get("status") != "infeasible":
        return f"{row['labels_bought']:,} labels"
    return "-"


if __name__ == "__main__":
    sys.exit(main())
