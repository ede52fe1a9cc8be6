#!/usr/bin/env python3
"""bfloat16 params with stochastic rounding against float32 training, side by side (CPU is enough).

`python3 scripts/bf16_vs_f32.py [--steps 300] [--size tiny] [--optimizer adafactor]`

Trains the same model on the same copy task from the same seed three times with the trainer:
float32 params; `param_dtype='bfloat16'` (updates in float32, stochastically rounded when written
back); and, as the ablation that shows why, bfloat16 rounded to nearest. Prints the loss curve
(mean train loss per logging window) and the final dev metrics as a markdown table.
"""
import argparse
import json
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from doa_jax import optimizers  # noqa: E402
from doa_jax.model import config_for_size  # noqa: E402
from doa_jax.optimizers import OptimizerConfig  # noqa: E402
from doa_jax.partitioning import MeshConfig  # noqa: E402
from doa_jax.data.batches import ArrayBatches, copy_task  # noqa: E402
from doa_jax.trainer import TrainConfig, Trainer, step_program, token_sequence_accuracy  # noqa: E402

VARIANTS = (("float32", "float32", True), ("bfloat16 + stochastic rounding", "bfloat16", True),
            ("bfloat16, round to nearest", "bfloat16", False))


def train(args, param_dtype: str, stochastic: bool, model_dir: str):
    """One run; returns (mean loss per window, dev metrics)."""
    cfg = config_for_size(args.size, vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                          num_encoder_layers=2, num_decoder_layers=2, dtype="float32", scan_layers=True)
    run = TrainConfig(model_dir=model_dir, batch_size=32, train_steps=args.steps, log_every=args.window,
                      checkpoint_every=None, tensorboard=False, verbose=False, async_checkpointing=False,
                      optimizer=OptimizerConfig(name=args.optimizer, learning_rate=args.lr),
                      mesh=MeshConfig(data=1, model=1), param_dtype=param_dtype, seed=0)
    saved = optimizers.stochastic_round
    step_program.cache_clear()   # compiled programs are cached by settings; the ablation needs its own
    if not stochastic:   # the ablation: write back rounded to nearest
        optimizers.stochastic_round = lambda x, dtype, key: x.astype(dtype)
    try:
        trainer = Trainer(cfg, run, devices=jax.devices()[:1])
        result = trainer.fit(ArrayBatches(copy_task(512, 8, 32, seed=0), 32, shuffle=True, seed=0))
        dev = trainer.evaluate(result.state.params,
                               ArrayBatches(copy_task(128, 8, 32, seed=1), 32, pad_remainder=True, num_epochs=1),
                               decode_metrics=token_sequence_accuracy)
    finally:
        optimizers.stochastic_round = saved
    rows = [json.loads(line) for line in (pathlib.Path(model_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r], dev


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bf16_vs_f32.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=50, help="steps per loss point")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--optimizer", choices=sorted(optimizers.OPTIMIZERS), default="adafactor")
    parser.add_argument("--lr", type=float, default=1e-3, help="T5X's fine-tuning rate (default 1e-3)")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, dtype, stochastic in VARIANTS:
            results[name] = train(args, dtype, stochastic, os.path.join(tmp, dtype + str(stochastic)))
            print(f"done: {name}", file=sys.stderr, flush=True)
    names = [n for n, _, _ in VARIANTS]
    print(f"{args.optimizer}, lr {args.lr}, batch 32, copy task; mean train loss per {args.window} steps\n")
    print("| step | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for i, (step, _) in enumerate(results[names[0]][0]):
        print(f"| {step} | " + " | ".join(f"{results[n][0][i][1]:.4f}" for n in names) + " |")
    for metric in ("loss", "token_accuracy", "sequence_accuracy"):
        print(f"| dev {metric} | " + " | ".join(f"{results[n][1][metric]:.4f}" for n in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
