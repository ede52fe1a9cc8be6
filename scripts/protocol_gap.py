"""The gap between PROTOCOL=efficient and PROTOCOL=paper on one small real task, same data and seed.

Runs the same distill cell twice with `doa run` (tiny teacher and student on the paper's WLP files,
16 starting labels, 32 unlabeled inputs, 64 test sentences) — once under each protocol — and
prints, per protocol, the primary metric (WLP `f1`: span F1 under efficient, the released parse
under paper), both F1s, the student's steps and the cell's wall time. Tiny models trained for a
few steps do not learn WLP, so the metric gap here is the scoring difference, not a quality gap;
the time gap is the cost of the paper's online full-vocabulary teacher and float32.

    python3 scripts/protocol_gap.py [--out DIR] [--data-dir ../shared/data/doa]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

from doa_jax import cli
from doa_jax.data import vocab as vocab_lib
from doa_jax.data.demo import model_vocab_size

SETTINGS = dict(TASK="'wlp'", START_LABELS=16, EXTRA_BUDGET_USD=5.0, STRATEGY="'distill'", TEACHER_SIZE="'tiny'",
                STUDENT_SIZE="'tiny'", BATCH_SIZE=8, TEACHER_EPOCHS=1, DISTILL_EPOCHS=2, MAX_UNLABELED=32,
                MAX_EVAL_EXAMPLES=64, FEATURE_LENGTHS="{'inputs': 32, 'targets': 32}", SEED=0)
MODEL = dict(emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=1, num_decoder_layers=1)


def gin_file(out: pathlib.Path, data_dir: str) -> pathlib.Path:
    """The shared settings: a WLP vocabulary (2000 pieces), tiny models, the cell."""
    vocab = vocab_lib.Vocabulary(vocab_lib.build_vocab(vocab_lib.task_texts(["wlp"], f"{data_dir}/wlp"),
                                                       out / "wlp.model", vocab_size=2000))
    lines = [f"{k} = {v}" for k, v in SETTINGS.items()] + [f"VOCABULARY = '{vocab.path}'"]
    for role in ("teacher", "student"):
        lines += [f"{role}/T5Size.{k} = {v}" for k, v in {**MODEL, "vocab_size": model_vocab_size(vocab)}.items()]
    path = out / "gap.gin"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--data-dir", default=str(pathlib.Path(__file__).resolve().parents[1] / ".." / "shared"
                                                  / "data" / "doa"))
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="protocol_gap_"))
    out.mkdir(parents=True, exist_ok=True)
    settings = gin_file(out, args.data_dir)
    for protocol in ("efficient", "paper"):
        extra = ["--gin_file", "protocols/paper.gin"] if protocol == "paper" else []
        code = cli.main(["run", "--gin_file", "runs/experiment.gin", *extra, "--gin_file", str(settings),
                         f"--gin.OUTPUT_DIR='{out / protocol}'"])
        if code:
            return code
    print(f"\n{'protocol':<10} {'f1 (primary)':>12} {'span F1':>8} {'paper F1':>9} {'steps':>6} {'wall s':>8}")
    for protocol in ("efficient", "paper"):
        row = [json.loads(line) for line in (out / protocol / "results.jsonl").read_text().splitlines()][-1]
        m = row["metrics"]
        span = m.get("span_f1", m["f1"]) if protocol == "paper" else m["f1"]
        print(f"{protocol:<10} {row['value']:>12.2f} {span:>8.2f} {m['paper_f1']:>9.2f} {row['student_steps']:>6} "
              f"{row['wall_seconds']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
