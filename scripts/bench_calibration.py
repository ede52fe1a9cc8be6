#!/usr/bin/env python3
"""Benchmark: does a calibration measured here price a `doa run` cell as the ledger then measures it?

1. `doa calibrate --accelerator cpu --teacher tiny --student tiny --task demo --batch-size B` (this
   machine, the cell's models, lengths and batch size);
2. a distill cell and an annotate cell of the demo task, each in a fresh `doa run` process (as a user
   runs them), priced by that calibration (`COST_PROFILE=calibrated`);
3. per phase, from each cell's ledger: the seconds the calibration charged (its dollars / the CPU's
   rate) next to the seconds measured (wall time, compilation included), and their ratio.
Target (issue 11): within 10%. A calibration charges each run of a program its compilation and set-up
once (`startup_s`, `run_overhead_s`, measured by `doa calibrate`), as a cell in a fresh process pays
them; the table shows that part of the charge apart.
    python3 scripts/bench_calibration.py [--batch-size 32 --epochs 10 --json F]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from doa_jax.experiment.cost_profiles import ONCE_PER_RUN
from doa_jax.experiment.costs import get_accelerator

PHASE_PROGRAMS = {"teacher_finetune": ["teacher_train"], "teacher_inference": ["teacher_decode", "teacher_score"],
                  "student_training": ["student_train", "student_distill_stored"], "evaluation": ["eval_decode"]}


def doa(*args: str) -> None:
    # Cold compiles on both sides: `doa calibrate` times a cold compile (the cache off), so each cell
    # runs with the persistent compilation cache off too (a cached rerun would pay less than charged).
    env = {**os.environ, "DOA_COMPILATION_CACHE": "off"}
    done = subprocess.run([sys.executable, "-m", "doa_jax", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"doa {args[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def cell(out: pathlib.Path, strategy: str, cal: pathlib.Path, args) -> dict:
    doa("run", "--gin_file", "runs/experiment.gin", "--gin.TASK=demo", "--gin.VOCABULARY=None",
        f"--gin.STRATEGY={strategy}", "--gin.START_LABELS=200", "--gin.EXTRA_BUDGET_USD=100", f"--gin.OUTPUT_DIR={out}",
        "--gin.TEACHER_SIZE=tiny", "--gin.STUDENT_SIZE=tiny", "--gin.ACTIVATION_DTYPE=float32",
        f"--gin.BATCH_SIZE={args.batch_size}", f"--gin.TEACHER_EPOCHS={args.epochs}",
        f"--gin.STUDENT_EPOCHS={args.epochs}", f"--gin.DISTILL_EPOCHS={args.epochs}", "--gin.LEARNING_RATE=0.003",
        "--gin.COST_PROFILE='calibrated'", f"--gin.CALIBRATION={cal}", "--gin.MEASURED_ON=cpu",
        "--gin.MAX_EVAL_EXAMPLES=128", "--gin_bindings",
        "CellConfig.demo_sizes = {'labeled': 512, 'unlabeled': 1024, 'test': 128}",
        "--gin_bindings", "CellConfig.verbose = False")
    row = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    ledger = [json.loads(line) for line in (pathlib.Path(row["output"]) / "ledger.jsonl").read_text().splitlines()]
    return {"row": row, "ledger": ledger}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="doa_bench_calibration_"))
    cal = work / "calibration.json"
    doa("calibrate", "--accelerator", "cpu", "--teacher", "tiny", "--student", "tiny", "--task", "demo",
        "--batch-size", str(args.batch_size), "--dtype", "float32", "--out", str(cal))   # the cells' ACTIVATION_DTYPE
    record = json.loads(cal.read_text())
    rate = get_accelerator(record["accelerator"]).usd_per_chip_hour / 3600   # $ per chip-second, from the rate card
    rows = []
    for strategy in ("distill", "annotate"):
        got = cell(work / strategy, strategy, cal, args)
        for e in got["ledger"]:
            if e["phase"] == "labels" or not e["seconds"]:
                continue
            programs = [p for p in PHASE_PROGRAMS[e["phase"]] if p in record["programs"]
                        and (e["phase"] != "student_training" or (strategy == "distill") == (p != "student_train"))]
            once = sum(record["programs"][p].get(f, 0.0) for p in programs for f in ONCE_PER_RUN)
            rows.append(dict(cell=strategy, phase=e["phase"], charged_s=e["usd"] / rate, measured_s=e["seconds"],
                             once_s=once))
    print(f"calibration on {record['device_count']} x {record['device_kind']} ({record['date']}); "
          f"cells: tiny teacher/student, demo lengths, batch {args.batch_size}, {args.epochs} epochs")
    print(f"{'cell':<9} {'phase':<18} {'charged s':>9} {'of which once':>13} {'measured s':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['cell']:<9} {r['phase']:<18} {r['charged_s']:>9.2f} {r['once_s']:>13.2f} {r['measured_s']:>10.2f} "
              f"{r['charged_s'] / r['measured_s']:>6.2f}")
    total_c, total_m = sum(r["charged_s"] for r in rows), sum(r["measured_s"] for r in rows)
    total_once = sum(r["once_s"] for r in rows)
    print(f"{'all':<9} {'':<18} {total_c:>9.2f} {total_once:>13.2f} {total_m:>10.2f} {total_c / total_m:>6.2f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"calibration": record, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
