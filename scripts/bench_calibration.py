#!/usr/bin/env python3
"""Benchmark: does a calibration price a real training run on this machine?

Calibrates tiny T5 models on the demo task's lengths (`doa_jax.experiment.calibration.calibrate`), then
fine-tunes the tiny teacher and distils the tiny student (stored top-k soft targets) with the
project's Trainer on random examples of the same shapes, and prints, per run, the seconds and
dollars the `calibrated` profile predicted next to what the run took: cold (compilation and the
final checkpoint included, what a ledger records for a first run) and warm (the same run again,
its step programs already compiled). Target (issue 11): within 10%.
    PYTHONPATH=$PWD python scripts/bench_calibration.py [--labels 256 --epochs 4 --batch-size 8 --json F]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

from doa_jax.experiment import calibration
from doa_jax.experiment import cost_profiles
from doa_jax.experiment import planner
from doa_jax.losses import LossConfig
from doa_jax.optimizers import OptimizerConfig
from doa_jax.data.batches import ArrayBatches
from doa_jax.trainer import TrainConfig, Trainer


def _fit(cfg, arrays, batch_size: int, epochs: float, kd: bool, directory: pathlib.Path) -> float:
    """Wall seconds of one Trainer.fit, as the experiment runs it."""
    loss = LossConfig(z_loss=0.0, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS", kd_weight=1.0 if kd else 0.0)
    config = TrainConfig(model_dir=str(directory), batch_size=batch_size, epochs=epochs,
                         optimizer=OptimizerConfig(name="adamw", learning_rate=3e-5), loss=loss, log_every=10 ** 6,
                         checkpoint_every=10 ** 6, keep_checkpoints=1, async_checkpointing=False, tensorboard=False,
                         verbose=False)
    source = ArrayBatches(arrays, batch_size, shuffle=True, seed=0, pad_remainder=True)
    start = time.perf_counter()
    Trainer(cfg, config).fit(source)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=int, default=256, help="training rows of each run (default 256)")
    ap.add_argument("--epochs", type=float, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--accelerator", default="cpu", help="rate card this machine is priced as (default cpu)")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    settings = calibration.Settings(accelerator=args.accelerator, teacher="tiny", student="tiny", task="demo",
                                    batch_size=args.batch_size)
    start = time.perf_counter()
    record = calibration.calibrate(settings)
    calibrate_s = time.perf_counter() - start
    work = pathlib.Path(tempfile.mkdtemp(prefix="doa_bench_calibration_"))
    cal_path = calibration.write_calibration(record, work / "calibration.json")
    profile = cost_profiles.load_profile("calibrated", calibration=cal_path)
    card = calibration.task_card("demo")
    teacher, student = calibration.model_configs(card, "tiny", "tiny")
    plan, lengths = planner.build_planner(card, teacher, student, profile, teacher_epochs=args.epochs,
                                          distill_epochs=args.epochs, batch_size=args.batch_size)
    arrays = calibration._batch(student.vocab_size, args.labels, lengths["inputs"], lengths["targets"], seed=5)
    rng = np.random.default_rng(6)
    kd_arrays = dict(arrays, teacher_topk_values=rng.standard_normal(
        (args.labels, lengths["targets"], 8)).astype(np.float32), teacher_topk_ids=rng.integers(
        0, student.vocab_size, (args.labels, lengths["targets"], 8), dtype=np.int32))
    runs = [("teacher fine-tune", teacher, arrays, False, plan.teacher_finetune_work(args.labels)),
            ("student distill (stored)", student, kd_arrays, True, plan.distill_work(args.labels))]
    rows = []
    for name, cfg, data, kd, w in runs:
        predicted_s = profile.chip_seconds(w)
        cold = _fit(cfg, data, args.batch_size, args.epochs, kd, work / f"{name[:7]}_cold")
        warm = _fit(cfg, data, args.batch_size, args.epochs, kd, work / f"{name[:7]}_warm")
        rows.append(dict(run=name, steps=w.steps, predicted_s=predicted_s, predicted_usd=profile.usd(w),
                         cold_s=cold, warm_s=warm, cold_usd=profile.accelerator.usd(cold),
                         warm_usd=profile.accelerator.usd(warm)))
    print(f"calibration: {calibrate_s:.1f} s on {record['device_count']} x {record['device_kind']}; {record['timing']}")
    print(f"{'run':<26} {'steps':>5} {'predicted s':>11} {'cold s':>8} {'warm s':>8} {'pred/cold':>9} "
          f"{'pred/warm':>9} {'predicted $':>12} {'warm $':>12}")
    for r in rows:
        print(f"{r['run']:<26} {r['steps']:>5} {r['predicted_s']:>11.2f} {r['cold_s']:>8.2f} {r['warm_s']:>8.2f} "
              f"{r['predicted_s'] / r['cold_s']:>9.2f} {r['predicted_s'] / r['warm_s']:>9.2f} "
              f"{r['predicted_usd']:>12.3g} {r['warm_usd']:>12.3g}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"calibration": record, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
