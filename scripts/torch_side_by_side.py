"""doa-jax's PROTOCOL=paper training next to the paper's released PyTorch training, step for step.

One tiny random HF T5 (and, distilling, a tiny random teacher) is saved once and loaded by both
sides; both see the same examples in the same batches (one permutation per epoch, drawn by doa-jax's
batch source and given to the PyTorch sampler), dropout off (a dropout mask cannot be shared across
frameworks). The PyTorch side is the released code under transformers 4.22's behaviour
(`released_torch.py`): `Seq2SeqTrainer` with `--kd-weight 0`, the released `DistillationTrainer`
(the teacher's greedy output as decoder input, T^2 KL at T = 2) with `--kd-weight 1`. The doa-jax
side is a cell's own training phase (`experiment.phases.train`) under the TrainConfig that
gin/protocols/paper.gin gives, with the online teacher under `--kd-weight 1`.

    python3 scripts/torch_side_by_side.py --arch t5_1_1 --steps 50 --seed 0 --kd-weight 1 --json
    python3 scripts/torch_side_by_side.py --arch t5 --kd-weight 0 --lr 1e-3 --plot losses.png

Prints each step's loss and learning rate on both sides (or with `--json` one object: `steps`,
`max_rel_loss_diff`, `max_abs_param_diff`, `max_rel_lr_diff`); `--plot FILE` draws both loss curves.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import pathlib
import sys
import tempfile
from typing import Any, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import released_torch  # noqa: E402  (beside this script)

from doa_jax import checkpoints, configurables, decoding, gin_utils  # noqa: E402
from doa_jax.checkpoints import hf  # noqa: E402
from doa_jax.data.batches import ArrayBatches  # noqa: E402
from doa_jax.data.encode import shift_right  # noqa: E402
from doa_jax.distill import student_data  # noqa: E402
from doa_jax.distill.store import TeacherOutputs  # noqa: E402
from doa_jax.experiment import config as cell_config, phases  # noqa: E402
from doa_jax.model import config_for_size  # noqa: E402

TINY = dict(dtype="float32", vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
            num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0)
ARCHS = {"t5_1_1": "tiny", "t5": "t5_small"}      # --arch -> the size whose architecture it takes
TEACHER = dict(emb_dim=24, num_heads=3, mlp_dim=48, num_encoder_layers=3, num_decoder_layers=3)
INPUTS_LENGTH, TARGETS_LENGTH = 16, 8             # 8: the released max_target_length default
EOS_SCALES = (1.0, 2.0, 3.0, 4.0, 6.0, 9.0, 13.0)


def model_config(arch: str, teacher: bool = False):
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    return config_for_size(ARCHS[arch], **{**TINY, **(TEACHER if teacher else {})})


def save_random_t5(cfg, seed: int, directory: pathlib.Path, eos_scale: Optional[float] = None) -> pathlib.Path:
    """A random HF T5 for `cfg` (HF's initialisation; v1.1 gets its own lm_head), saved once. A
    teacher (`eos_scale`) has EOS's output row scaled, so that greedy decodes end early, and the pad
    id's zeroed (its logit 0 is below the best of the others: a real teacher does not emit pad; for
    the original T5 that row is also the start token's embedding)."""
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config.from_dict(hf.config_to_hf(cfg)))
    if not cfg.logits_via_embedding:
        model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.emb_dim) * cfg.emb_dim ** -0.5)
    if eos_scale is not None:
        with torch.no_grad():
            model.lm_head.weight[released_torch.EOS] *= eos_scale
            model.lm_head.weight[released_torch.PAD] = 0.0
    model.save_pretrained(directory)
    return directory


def save_teacher(cfg, seed: int, directory: pathlib.Path, encoder_inputs: np.ndarray,
                 first_epoch: list[int], batch: int) -> tuple[Any, Any]:
    """A random teacher whose greedy outputs do not contain the pad id (a real teacher's do not:
    doa-jax's targets end at the first 0) and end at different lengths, so that the first epoch's
    batches pad to different lengths (the released reduction and its cache then matter): of a few
    seeds and EOS scales, the first that gives two or more padded lengths, else the one with the
    most. Returns (config, params)."""
    best = None
    for candidate in itertools.product(range(seed, seed + 3), EOS_SCALES):
        save_random_t5(cfg, *candidate[:1], directory, eos_scale=candidate[1])
        teacher = checkpoints.load_checkpoint(directory, config=cfg)
        result = decoding.greedy(*teacher, encoder_inputs, TARGETS_LENGTH - 1)
        tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
        if np.any((tokens == 0) & (np.arange(tokens.shape[1]) < lengths[:, None])):
            continue
        padded = {int(lengths[first_epoch[i:i + batch]].max()) for i in range(0, len(first_epoch), batch)}
        if best is None or len(padded) > best[0]:
            best = (len(padded), candidate)
        if len(padded) >= 2:
            return teacher
    if best is None:
        raise ValueError(f"every random teacher tried (seeds {seed}-{seed + 2}) emits the pad id: try another --seed")
    save_random_t5(cfg, best[1][0], directory, eos_scale=best[1][1])
    return checkpoints.load_checkpoint(directory, config=cfg)


def make_examples(num: int, vocab_size: int, seed: int) -> list[dict]:
    """Tokenised examples as the released preprocessing gives them: inputs up to INPUTS_LENGTH and
    labels up to TARGETS_LENGTH ids, each ending in EOS (1); word ids from 3."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        source = list(rng.integers(3, vocab_size, int(rng.integers(2, INPUTS_LENGTH)))) + [1]
        target = list(rng.integers(3, vocab_size, int(rng.integers(1, TARGETS_LENGTH)))) + [1]
        out.append({"input_ids": [int(t) for t in source], "attention_mask": [1] * len(source),
                    "labels": [int(t) for t in target]})
    return out


def as_arrays(examples: list[dict]) -> dict[str, np.ndarray]:
    """The same examples as doa-jax's fixed-length features (0 = padding)."""
    enc = np.zeros((len(examples), INPUTS_LENGTH), np.int32)
    tgt = np.zeros((len(examples), TARGETS_LENGTH), np.int32)
    for i, ex in enumerate(examples):
        enc[i, :len(ex["input_ids"])], tgt[i, :len(ex["labels"])] = ex["input_ids"], ex["labels"]
    return {"encoder_input_tokens": enc, "decoder_target_tokens": tgt, "decoder_input_tokens": shift_right(tgt),
            "decoder_loss_weights": (tgt > 0).astype(np.float32)}


def epoch_orders(num: int, batch: int, seed: int, epochs: int) -> list[list[int]]:
    """The example order of each epoch as the cell's training source draws it (`phases.train`)."""
    source = ArrayBatches({"row": np.arange(1, num + 1)}, batch, shuffle=True, seed=seed, pad_remainder=True)
    batches = itertools.islice(source.iterate(0), epochs * source.steps_per_epoch)
    rows = [int(r) - 1 for b in batches for r in b["row"] if r]     # 0: a padding row of a short batch
    return [rows[e * num:(e + 1) * num] for e in range(epochs)]


def paper_cell(out: pathlib.Path, *, batch: int, seed: int, lr: float, teacher_cfg) -> cell_config.CellConfig:
    """The cell gin/protocols/paper.gin configures (its TrainConfig trains both phases); a learning
    rate other than the paper's 3e-5 leaves the protocol and is the one setting changed."""
    configurables.register()
    gin_utils.parse(["runs/experiment.gin", "protocols/paper.gin"], [
        "TASK = 'demo'", "START_LABELS = 0", "EXTRA_BUDGET_USD = 0.0", "STRATEGY = 'distill'",
        f"OUTPUT_DIR = '{out}'", "VOCABULARY = None", f"BATCH_SIZE = {batch}", f"SEED = {seed}"])
    try:
        cell = gin_utils.macro("CELL")
    finally:
        gin.clear_config()
    # The teacher runs in eval mode (no dropout); the paper's 0.1 keeps the protocol's check happy.
    cell = dataclasses.replace(cell, teacher=dataclasses.replace(teacher_cfg, dropout_rate=0.1))
    train = dataclasses.replace(cell.train, log_every=1, checkpoint_every=None,
                                optimizer=dataclasses.replace(cell.train.optimizer, learning_rate=lr))
    if lr == cell_config.PAPER_LEARNING_RATE:
        return dataclasses.replace(cell, train=train, verbose=False)
    cell = dataclasses.replace(cell, train=train, protocol="efficient", verbose=False)
    others = [c for c in cell_config.paper_contradictions(cell) if not c.startswith("LEARNING_RATE=")]
    if others:
        raise RuntimeError(f"paper.gin's cell contradicts the paper beyond the learning rate: {others}")
    return cell


def teacher_arrays(teacher_cfg, teacher_params, arrays) -> dict[str, np.ndarray]:
    """The student's arrays of a distill cell: the teacher's greedy tokens (targets length - 1 of
    them, as PROTOCOL=paper decodes) as targets (`student_data.from_store`)."""
    enc = arrays["encoder_input_tokens"]
    result = decoding.greedy(teacher_cfg, teacher_params, enc, TARGETS_LENGTH - 1)
    tokens = np.asarray(result.tokens)
    n = len(enc)
    outputs = TeacherOutputs([""] * n, [""] * n, tokens, np.asarray(result.lengths),
                             np.asarray(result.log_probs), np.zeros(tokens.shape + (1,), np.float32),
                             np.zeros(tokens.shape + (1,), np.int32))
    return student_data.from_store(outputs, enc, TARGETS_LENGTH)


def run_doa(cell, student_dir: pathlib.Path, arrays, epochs: float, model_dir: pathlib.Path,
            teacher: Optional[tuple] = None) -> dict[str, Any]:
    """The cell's training phase (`phases.train`) from the saved student: per-step loss and learning
    rate (metrics.jsonl, one row a step) and the final params."""
    student_cfg, _ = checkpoints.load_checkpoint(student_dir)
    student_cfg = dataclasses.replace(student_cfg, dtype="float32", dropout_rate=0.0)
    wrapper = phases.online_teacher(cell, teacher[1]) if teacher else None
    result, _ = phases.train(cell, student_cfg, arrays, model_dir, role="student", epochs=epochs,
                             initial_checkpoint=str(student_dir),
                             kd=teacher is not None, source_wrapper=wrapper)
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return {"losses": np.array([r["loss"] for r in rows]), "learning_rates": np.array([r["learning_rate"] for r in rows]),
            "params": jax.tree_util.tree_map(np.asarray, result.state.params), "config": student_cfg}


def flat(tree, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}/").items()}
    return {prefix.rstrip("/"): np.asarray(tree)}


def compare(theirs: dict, ours: dict) -> dict[str, Any]:
    """The summary `--json` prints; params compared in doa-jax's layout (the HF importer's mapping)."""
    steps = len(theirs["losses"])
    if steps != len(ours["losses"]):
        raise RuntimeError(f"PyTorch ran {steps} steps, doa-jax {len(ours['losses'])}")
    torch_params = flat(hf.params_from_hf_tensors(theirs["params"], ours["config"], "PyTorch's final state"))
    jax_params = flat(ours["params"])
    rel = lambda a, b: float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-30)))   # noqa: E731
    return {"steps": steps,
            "max_rel_loss_diff": rel(theirs["losses"], ours["losses"]),
            "max_abs_param_diff": max(float(np.max(np.abs(torch_params[k] - jax_params[k]))) for k in torch_params),
            "max_rel_lr_diff": rel(theirs["learning_rates"], ours["learning_rates"])}


def side_by_side(arch: str, steps: int, seed: int, kd_weight: float, lr: float, batch: int,
                 work: pathlib.Path) -> tuple[dict, dict, dict]:
    """Runs both sides in `work`: (PyTorch trajectory, doa-jax trajectory, `compare` summary)."""
    if kd_weight not in (0.0, 1.0):
        raise ValueError(f"--kd-weight must be 0 (Seq2SeqTrainer on labels) or 1 (the released DistillationTrainer): "
                         f"the released code has no mix, got {kd_weight}")
    if steps < 1 or batch < 1:
        raise ValueError(f"--steps and --batch must be >= 1, got {steps}, {batch}")
    num = 2 * batch + (batch + 1) // 2                      # three batches an epoch, the last one short
    per_epoch = math.ceil(num / batch)
    epochs = steps / per_epoch
    while math.ceil(epochs * per_epoch) > steps:           # both sides take ceil(epochs x batches)
        epochs = math.nextafter(epochs, 0.0)
    student_dir = save_random_t5(model_config(arch), seed, work / "student")
    examples = make_examples(num, TINY["vocab_size"], seed)
    orders = epoch_orders(num, batch, seed, math.ceil(steps / per_epoch))
    arrays, teacher, teacher_dir = as_arrays(examples), None, None
    teacher_cfg = model_config(arch, teacher=True)
    if kd_weight:
        teacher_dir = work / "teacher"
        teacher = save_teacher(teacher_cfg, seed + 1000, teacher_dir, arrays["encoder_input_tokens"], orders[0],
                               batch)
        arrays = teacher_arrays(teacher[0], teacher[1], arrays)
    theirs = released_torch.run(student_dir, examples, orders, batch_size=batch, epochs=epochs, learning_rate=lr,
                                seed=seed, output_dir=work / "torch", teacher_dir=teacher_dir,
                                max_target_length=TARGETS_LENGTH)
    cell = paper_cell(work / "doa", batch=batch, seed=seed, lr=lr, teacher_cfg=teacher_cfg)
    ours = run_doa(cell, student_dir, arrays, epochs, work / "doa" / "student", teacher)
    return theirs, ours, compare(theirs, ours)


def plot(theirs: dict, ours: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, len(theirs["losses"]) + 1)
    ax.plot(steps, theirs["losses"], "-", lw=3, alpha=0.5, label="PyTorch: released code (transformers, 4.22 pinned)")
    ax.plot(steps, ours["losses"], "k--", lw=1, label="doa-jax: PROTOCOL=paper")
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="t5_1_1", choices=sorted(ARCHS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kd-weight", type=float, default=1.0, help="0: Seq2SeqTrainer; 1: DistillationTrainer")
    parser.add_argument("--lr", type=float, default=cell_config.PAPER_LEARNING_RATE)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print only the summary object")
    parser.add_argument("--plot", default=None, metavar="FILE", help="both loss curves as a PNG")
    parser.add_argument("--work", default=None, help="folder for the models and runs (default: temporary)")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="side_by_side_") as tmp:
            theirs, ours, summary = side_by_side(args.arch, args.steps, args.seed, args.kd_weight, args.lr,
                                                 args.batch, pathlib.Path(args.work or tmp))
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if args.plot:
        plot(theirs, ours, args.plot, f"{args.arch}, kd-weight {args.kd_weight:g}, lr {args.lr:g}, "
                                      f"batch {args.batch}, seed {args.seed}")
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{'step':>4} {'loss PyTorch':>14} {'loss doa-jax':>14} {'rel diff':>9} {'lr PyTorch':>11} {'lr doa-jax':>11}")
    for i, (a, b, la, lb) in enumerate(zip(theirs["losses"], ours["losses"], theirs["learning_rates"],
                                           ours["learning_rates"]), 1):
        print(f"{i:>4} {a:>14.8f} {b:>14.8f} {abs(a - b) / abs(a):>9.2e} {la:>11.4e} {lb:>11.4e}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
