"""One budget cell of the paper's experiment: plan, buy labels or compute, train, evaluate, price.

    task + start labels + extra budget + strategy ──► plan (labels to buy, unlabeled inputs to use)
    annotate: student fine-tuned on the first start+N labels of the labeled pool
    distill:  teacher fine-tuned on the start labels (shared across cells) ──► teacher store over
              the first U unlabeled inputs (shared) ──► student trained on the teacher's outputs
    mixed:    part of the budget buys labels, the rest distills; gold rows mix into the student's data
    every phase ──► ledger (measured seconds and projected dollars) ──► one results row

The budget is a hard cap: each training phase asks the ledger before every step and stops at the
step boundary where the next step would cross it; the student is then evaluated as it is and the
row says `capped`. A cell that cannot run (too small a budget, an empty unlabeled pool, teacher and
student vocabularies that differ) yields a row with `status: infeasible` and the reason.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from doa_jax import costs, flops, planner
from doa_jax.model import T5Config

STRATEGIES = planner.STRATEGIES
BUDGET_PHASES = ("labels", "teacher_finetune", "teacher_inference", "student_training")


@dataclasses.dataclass(frozen=True)
class CellConfig:
    """Everything that defines one cell (gin: `gin/runs/experiment.gin`; experiments set macros)."""

    task: str                       # a task card name/path, or 'demo' (the built-in task)
    start_labels: int
    extra_budget_usd: float
    strategy: str                   # annotate | distill | mixed
    output_dir: str
    student: T5Config
    teacher: T5Config
    vocab: Optional[str] = None     # SentencePiece model; None: the demo builds one
    student_checkpoint: Optional[str] = None   # pretrained weights; None = random init
    teacher_checkpoint: Optional[str] = None
    compute_share: float = 0.5      # mixed: share of the budget spent on compute
    seed: int = 0
    accelerator: str = "a100"       # compute is charged as this accelerator at `mfu`
    mfu: float = 0.4
    # Price compute as other sizes' FLOPs (e.g. the demo's tiny models stand for 'xxl' / 'small').
    price_teacher_as: Optional[str] = None
    price_student_as: Optional[str] = None
    measured_on: str = "cpu"        # this machine's rate card (the measured view)
    batch_size: int = 32
    optimizer: str = "adamw"
    learning_rate: float = 3e-5
    teacher_epochs: float = 20
    student_epochs: float = 20
    distill_epochs: float = 50
    feature_lengths: Optional[Mapping[str, int]] = None   # None: the card's
    max_unlabeled: Optional[int] = None
    kd_weight: float = 1.0
    kd_temperature: float = 2.0
    kd_paper_exact: bool = False
    soft_targets: str = "stored"    # stored top-k logits, or 'online' (teacher forward every step)
    topk: int = 8
    teacher_num_beams: int = 1
    min_teacher_confidence: float = 0.0  # drop pseudo-labels whose mean token probability is lower
    max_eval_examples: Optional[int] = None
    cache_dir: Optional[str] = None  # shared teacher runs and stores (default: OUTPUT_DIR/cache)
    demo_sizes: Optional[Mapping[str, int]] = None  # demo pools: labeled, unlabeled, test
    log_every: int = 100
    checkpoint_every: int = 500     # steps (a final checkpoint is always written)
    verbose: bool = True

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"STRATEGY must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.soft_targets not in ("stored", "online"):
            raise ValueError(f"SOFT_TARGETS must be 'stored' or 'online', got {self.soft_targets!r}")
        if not isinstance(self.extra_budget_usd, (int, float)) or math.isnan(self.extra_budget_usd) \
                or self.extra_budget_usd < 0:
            raise ValueError(f"EXTRA_BUDGET_USD must be a non-negative number, got {self.extra_budget_usd!r}")
        if self.start_labels < 0:
            raise ValueError(f"START_LABELS must be >= 0, got {self.start_labels}")
        # 5 and 5.0 are the same budget: one cell key.
        object.__setattr__(self, "extra_budget_usd", float(self.extra_budget_usd))
        object.__setattr__(self, "compute_share", float(self.compute_share))

    def key(self) -> str:
        """The cell's identity: a hash of everything but where it writes and how chatty it is."""
        d = dataclasses.asdict(self)
        for k in ("output_dir", "cache_dir", "verbose", "log_every", "checkpoint_every"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- task setup

@dataclasses.dataclass
class TaskSetup:
    card: Any
    pools: Any
    vocab: Any
    lengths: dict[str, int]


def load_task(cfg: CellConfig) -> TaskSetup:
    """Card, pools (seeded, nested annotation order) and vocabulary of the cell's task."""
    from doa_jax.data import vocab as vocab_lib

    if cfg.task == "demo":
        from doa_jax import demo_task

        card, pools = demo_task.card(), demo_task.pools(seed=0, **dict(cfg.demo_sizes or {}))
        vocab = vocab_lib.load_vocab(cfg.vocab) if cfg.vocab else demo_task.build_vocab(
            pathlib.Path(cfg.cache_dir or pathlib.Path(cfg.output_dir) / "cache"), pools)
    else:
        from doa_jax.data import cards, pools as pools_lib

        card = cards.load_card(cfg.task)
        pools = pools_lib.make_pools(card)
        if cfg.vocab is None:
            raise ValueError(f"task {card.name} needs VOCABULARY: T5's spiece.model (or `doa vocab build`)")
        vocab = vocab_lib.load_vocab(cfg.vocab)
    lengths = dict(cfg.feature_lengths or card.feature_lengths)
    return TaskSetup(card, pools, vocab, lengths)


# ----------------------------------------------------------------------------- training phases

class Budget:
    """Charges phases to the ledger and says whether the next training step still fits the cap."""

    def __init__(self, ledger: costs.Ledger, cap_usd: float):
        self.ledger, self.cap = ledger, cap_usd

    def spent(self) -> float:
        return self.ledger.total(BUDGET_PHASES)

    def step_allowed(self, step_usd: float) -> Callable[[int], bool]:
        """A trainer hook: step `s` (0-based) of this phase may run if steps 0..s fit the cap."""
        before = self.spent()
        return lambda step: before + (step + 1) * step_usd <= self.cap + 1e-9


def _train(model_cfg: T5Config, arrays: Mapping[str, np.ndarray], model_dir: pathlib.Path, *, epochs: float,
           cfg: CellConfig, initial_checkpoint: Optional[str], kd: bool,
           step_allowed: Optional[Callable[[int], bool]] = None, source_wrapper=None):
    """Fine-tunes `model_cfg` on in-memory arrays; returns (TrainResult, wall seconds, batch shape)."""
    from doa_jax.losses import LossConfig
    from doa_jax.optimizers import OptimizerConfig
    from doa_jax.train_data import ArrayBatches
    from doa_jax.trainer import TrainConfig, Trainer

    loss = LossConfig(z_loss=0.0, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS",
                      kd_weight=cfg.kd_weight if kd else 0.0, kd_temperature=cfg.kd_temperature,
                      kd_paper_exact=cfg.kd_paper_exact)
    config = TrainConfig(model_dir=str(model_dir), batch_size=cfg.batch_size, epochs=epochs, seed=cfg.seed,
                         optimizer=OptimizerConfig(name=cfg.optimizer, learning_rate=cfg.learning_rate),
                         loss=loss, initial_checkpoint=initial_checkpoint, log_every=cfg.log_every,
                         checkpoint_every=cfg.checkpoint_every, keep_checkpoints=1, async_checkpointing=False,
                         tensorboard=False, verbose=cfg.verbose)
    source = ArrayBatches(arrays, cfg.batch_size, shuffle=True, seed=cfg.seed, pad_remainder=True)
    if source_wrapper is not None:
        source = source_wrapper(source)
    start = time.perf_counter()
    result = Trainer(model_cfg, config).fit(source, step_allowed=step_allowed)
    return result, time.perf_counter() - start


def pricing_configs(cfg: CellConfig) -> tuple[T5Config, T5Config]:
    """(teacher, student) whose FLOPs are charged: the trained models, or the sizes they stand for."""
    from doa_jax.model import config_for_size

    teacher = config_for_size(cfg.price_teacher_as) if cfg.price_teacher_as else cfg.teacher
    student = config_for_size(cfg.price_student_as) if cfg.price_student_as else cfg.student
    return teacher, student


def _step_usd(ledger: costs.Ledger, model_cfg: T5Config, cfg: CellConfig, lengths, extra_flops: float = 0.0):
    step_flops = flops.train_flops(model_cfg, cfg.batch_size, lengths["inputs"], lengths["targets"]) + extra_flops
    return step_flops, ledger.compute_usd(0.0, step_flops)


def _say(cfg: CellConfig, text: str) -> None:
    if cfg.verbose:
        print(f"[{cfg.task} {cfg.strategy} +${cfg.extra_budget_usd:g}] {text}", flush=True)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fine_tune_teacher(cfg: CellConfig, setup: TaskSetup, labels: list, ledger: costs.Ledger, budget: Budget,
                      cache: pathlib.Path):
    """The teacher fine-tuned on `labels`, shared by every cell with the same teacher recipe.

    Its record (steps, seconds, FLOPs) is charged to each cell that uses it.
    """
    from doa_jax import checkpoints
    from doa_jax.data.encode import encode_examples

    key = _fingerprint({"teacher": cfg.teacher.to_dict(), "ckpt": cfg.teacher_checkpoint, "task": setup.card.name,
                        "labels": len(labels), "epochs": cfg.teacher_epochs, "seed": cfg.seed,
                        "lr": cfg.learning_rate, "opt": cfg.optimizer, "batch": cfg.batch_size,
                        "lengths": setup.lengths, "vocab": setup.vocab.spec()["sha256"]})
    run_dir = cache / "teachers" / key
    record_path = run_dir / "record.json"
    step_flops, step_usd = _step_usd(ledger, pricing_configs(cfg)[0], cfg, setup.lengths)
    if not record_path.exists():
        _say(cfg, f"fine-tuning the teacher on {len(labels)} labels ({cfg.teacher_epochs:g} epochs) in {run_dir}")
        arrays = encode_examples(setup.card, setup.vocab, labels, setup.lengths)
        result, seconds = _train(cfg.teacher, arrays, run_dir, epochs=cfg.teacher_epochs, cfg=cfg,
                                 initial_checkpoint=cfg.teacher_checkpoint, kd=False,
                                 step_allowed=budget.step_allowed(step_usd))
        if result.stopped_by_budget:
            raise BudgetExhausted(f"the teacher's fine-tuning reached the budget at step {result.step}")
        record_path.write_text(json.dumps({"steps": result.step, "seconds": seconds,
                                           "flops": result.step * step_flops}))
    else:
        _say(cfg, f"reusing the fine-tuned teacher in {run_dir}")
    record = json.loads(record_path.read_text())
    ledger.add_compute(f"teacher_finetune:{key}", "teacher_finetune", record["seconds"], record["flops"])
    _, params = checkpoints.load_checkpoint(run_dir / "checkpoints", config=cfg.teacher)
    return key, jax.tree_util.tree_map(np.asarray, params)


class BudgetExhausted(RuntimeError):
    """A phase that must finish to be useful (the teacher) ran out of budget."""


def teacher_store_for(cfg: CellConfig, setup: TaskSetup, teacher_key: str, teacher_params, unlabeled: list,
                      ledger: costs.Ledger, cache: pathlib.Path):
    """Teacher outputs over the unlabeled inputs: computed once per key, resumable, shared."""
    from doa_jax import teacher_outputs, teacher_store
    from doa_jax.data.encode import encode_texts
    from doa_jax.model import Transformer

    sources = [ex["source"] for ex in unlabeled]
    settings = {"max_decode_len": setup.lengths["targets"], "num_beams": cfg.teacher_num_beams, "topk": cfg.topk,
                "inputs_length": setup.lengths["inputs"], "prefix": setup.card.input_prefix}
    key = teacher_store.store_key(teacher_key, sources, settings)
    store = teacher_store.TeacherStore(cache / "stores", key)
    enc = encode_texts(setup.vocab, sources, setup.lengths["inputs"], setup.card.input_prefix)
    start = time.perf_counter()
    if not store.is_complete():
        _say(cfg, f"teacher outputs for {len(sources)} unlabeled inputs -> {store.dir}")
        module = Transformer(cfg.teacher)
        predict = teacher_outputs.make_predict_fn(module, teacher_params, setup.lengths["targets"],
                                                  num_beams=cfg.teacher_num_beams, topk=cfg.topk,
                                                  batch_size=min(64, cfg.batch_size * 2))
        stats = store.build(sources, enc, predict, setup.vocab.decode, chunk_size=256, settings=settings,
                            on_chunk=lambda done, total, n: _say(cfg, f"  teacher chunk {done}/{total}"))
        seconds = time.perf_counter() - start
        (store.dir / "record.json").write_text(json.dumps({"seconds": seconds, "computed_chunks": stats.computed_chunks}))
    else:
        _say(cfg, f"reusing teacher outputs in {store.dir}")
    record = json.loads((store.dir / "record.json").read_text()) if (store.dir / "record.json").exists() else {}
    # Decoding plus one teacher-forced pass for the top-k logits: two forward passes per input.
    inference_flops = 2 * flops.forward_flops(pricing_configs(cfg)[0], len(sources), setup.lengths["inputs"],
                                              setup.lengths["targets"])
    ledger.add_compute(f"teacher_inference:{key}", "teacher_inference", record.get("seconds", 0.0), inference_flops)
    return store.load(), enc


def teacher_confidence(outputs) -> np.ndarray:
    """Per example, the teacher's mean token probability on its own output: exp(log p(y) / |y|)."""
    return np.exp(outputs.sequence_logprob / np.maximum(outputs.lengths, 1))


def confident_rows(outputs, min_confidence: float) -> np.ndarray:
    """Indices of pseudo-labels whose teacher confidence is at least `min_confidence` (0 keeps all)."""
    if not 0.0 <= min_confidence < 1.0:
        raise ValueError(f"MIN_TEACHER_CONFIDENCE must be in [0, 1), got {min_confidence}")
    return np.flatnonzero(teacher_confidence(outputs) >= min_confidence)


def student_data_from_store(outputs, enc: np.ndarray, targets_length: int,
                            keep: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Student arrays: teacher tokens as targets, their top-k logits as soft targets (rows `keep`)."""
    from doa_jax.data.encode import shift_right

    if keep is not None:
        outputs = dataclasses.replace(outputs, tokens=outputs.tokens[keep], topk_values=outputs.topk_values[keep],
                                      topk_ids=outputs.topk_ids[keep])
        enc = enc[keep]

    t = min(targets_length, outputs.tokens.shape[1])
    tokens = np.zeros((len(enc), targets_length), np.int32)
    tokens[:, :t] = outputs.tokens[:, :t]
    k = outputs.topk_values.shape[-1]
    values = np.zeros((len(enc), targets_length, k), np.float32)
    ids = np.zeros((len(enc), targets_length, k), np.int32)
    values[:, :t], ids[:, :t] = outputs.topk_values[:, :t], outputs.topk_ids[:, :t]
    return {"encoder_input_tokens": enc, "decoder_target_tokens": tokens, "decoder_input_tokens": shift_right(tokens),
            "decoder_loss_weights": (tokens > 0).astype(np.float32), "teacher_topk_values": values,
            "teacher_topk_ids": ids}


class OnlineTeacherBatches:
    """A batch source that runs the teacher on every batch for its full soft targets (the paper's code)."""

    def __init__(self, source, module, params):
        self.source, self.batch_size, self.steps_per_epoch = source, source.batch_size, source.steps_per_epoch
        self._logits = jax.jit(lambda p, e, d: module.apply({"params": p}, e, d))
        self.params = params
        self._ids = None

    def iterate(self, start: int = 0):
        for batch in self.source.iterate(start):
            logits = np.asarray(self._logits(self.params, batch["encoder_input_tokens"], batch["decoder_input_tokens"]))
            if self._ids is None or self._ids.shape != logits.shape:
                self._ids = np.broadcast_to(np.arange(logits.shape[-1], dtype=np.int32), logits.shape)
            yield dict(batch, teacher_topk_values=logits, teacher_topk_ids=self._ids)


# ----------------------------------------------------------------------------- evaluation

def evaluate(model_cfg: T5Config, params, setup: TaskSetup, examples: list, batch_size: int = 64,
             pricing: Optional[T5Config] = None) -> dict[str, Any]:
    """Greedy decodes of the test examples scored by the card's metric (percent)."""
    from doa_jax import decoding, metrics
    from doa_jax.data.encode import encode_texts

    enc = encode_texts(setup.vocab, [ex["source"] for ex in examples], setup.lengths["inputs"], setup.card.input_prefix)
    preds = []
    for lo in range(0, len(enc), batch_size):
        chunk = enc[lo:lo + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, chunk.shape[1]), np.int32)])
        tokens = np.asarray(decoding.greedy(model_cfg, params, chunk, setup.lengths["targets"]).tokens)[:n]
        preds += [setup.vocab.decode(t) for t in tokens]
    result = metrics.compute(setup.card, preds, [ex["target"] for ex in examples],
                             sources=[ex["source"] for ex in examples])
    return {"metrics": result, "predictions": preds, "flops": flops.forward_flops(
        pricing or model_cfg, len(examples), setup.lengths["inputs"], setup.lengths["targets"])}


# ----------------------------------------------------------------------------- the cell

def _row(cfg: CellConfig, setup: Optional[TaskSetup], **fields) -> dict[str, Any]:
    row = {"cell_key": cfg.key(), "task": setup.card.name if setup else cfg.task, "strategy": cfg.strategy,
           "start_labels": cfg.start_labels, "extra_budget_usd": cfg.extra_budget_usd,
           "budget_usd": cfg.extra_budget_usd, "compute_share": cfg.compute_share if cfg.strategy == "mixed" else None,
           "seed": cfg.seed, "student": _size_name(cfg.student), "teacher": _size_name(cfg.teacher),
           "priced_as": {"teacher": cfg.price_teacher_as, "student": cfg.price_student_as}
           if (cfg.price_teacher_as or cfg.price_student_as) else None,
           "accelerator": cfg.accelerator, "mfu": cfg.mfu,
           "metric": setup.card.primary_metric if setup else None}
    row.update(fields)
    return row


def _size_name(c: T5Config) -> str:
    from doa_jax.model.config import SIZES

    shape = ("emb_dim", "num_heads", "head_dim", "mlp_dim", "num_encoder_layers", "num_decoder_layers",
             "mlp_activations", "logits_via_embedding")
    for name, fields in SIZES.items():
        if all(getattr(c, k) == fields[k] for k in shape):
            return name
    return f"custom(d={c.emb_dim},L={c.num_encoder_layers}+{c.num_decoder_layers})"


def _infeasible(cfg, setup, reason: str, **fields) -> dict[str, Any]:
    return _row(cfg, setup, status="infeasible", reason=reason, value=None, **fields)


def finished_rows(results_path: pathlib.Path) -> dict[str, dict[str, Any]]:
    """Rows already in a results file, by cell key (a torn last line from a kill is ignored)."""
    rows = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "cell_key" in row:
                rows[row["cell_key"]] = row
    return rows


def run_cell(cfg: CellConfig) -> dict[str, Any]:
    """Runs one cell and returns its results row (also appended to OUTPUT_DIR/results.jsonl).

    Idempotent: a cell whose key already has a row there is not run again (its row is returned).
    A cell killed part-way resumes its phases (teacher, store chunks, student) on the next run.
    """
    out = pathlib.Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = finished_rows(out / "results.jsonl").get(cfg.key())
    if done is not None:
        _say(cfg, f"already in {out / 'results.jsonl'} (cell {cfg.key()}); not run again")
        return done
    started = time.perf_counter()
    row = _run_cell(cfg, out)
    row["wall_seconds"] = round(time.perf_counter() - started, 2)
    append_row(out / "results.jsonl", row)
    return row


def append_row(path: pathlib.Path, row: dict[str, Any]) -> None:
    """Appends one JSON line, first cutting a torn last line (a kill mid-write) back to its newline."""
    if path.exists() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _run_cell(cfg: CellConfig, out: pathlib.Path) -> dict[str, Any]:
    setup = load_task(cfg)
    try:
        return _run_arm(cfg, out, setup)
    except BudgetExhausted as e:
        return _infeasible(cfg, setup, str(e))


def _run_arm(cfg: CellConfig, out: pathlib.Path, setup: TaskSetup) -> dict[str, Any]:
    from doa_jax.data import vocab as vocab_lib
    from doa_jax.data.encode import encode_examples

    card, pools = setup.card, setup.pools
    cell_dir = out / "cells" / cfg.key()
    cache = pathlib.Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for role, model_cfg in (("student", cfg.student), ("teacher", cfg.teacher)):
        if cfg.strategy == "annotate" and role == "teacher":
            continue
        try:
            vocab_lib.check_vocab(setup.vocab, model_cfg.vocab_size)
        except ValueError as e:
            return _infeasible(cfg, setup, f"the {role}'s vocabulary does not fit the task's: {e}")
    if cfg.strategy != "annotate" and cfg.student.vocab_size != cfg.teacher.vocab_size:
        return _infeasible(cfg, setup, f"teacher and student vocabularies differ "
                                       f"({cfg.teacher.vocab_size} vs {cfg.student.vocab_size} ids)")
    if cfg.start_labels > len(pools.train):
        return _infeasible(cfg, setup, f"START_LABELS {cfg.start_labels} exceeds the labeled pool "
                                       f"({len(pools.train)} examples)")

    acc = costs.get_accelerator(cfg.accelerator)
    ledger = costs.Ledger(cell_dir / "ledger.jsonl", measured_on=costs.get_accelerator(cfg.measured_on),
                          project_to=acc, mfu=cfg.mfu)
    recipe = planner.Recipe(teacher_epochs=cfg.teacher_epochs, student_epochs=cfg.student_epochs,
                            distill_epochs=cfg.distill_epochs,
                            inputs_length=setup.lengths["inputs"], targets_length=setup.lengths["targets"],
                            batch_size=cfg.batch_size, online_kd=cfg.soft_targets == "online", mfu=cfg.mfu)
    unlabeled_available = len(pools.unlabeled) if cfg.max_unlabeled is None else min(cfg.max_unlabeled,
                                                                                     len(pools.unlabeled))
    price_teacher, price_student = pricing_configs(cfg)
    plan = planner.Planner(acc, price_student, price_teacher, card.annotation_cost_usd, recipe).plan(
        cfg.strategy, cfg.start_labels, cfg.extra_budget_usd, unlabeled_available=unlabeled_available,
        labels_available=len(pools.train), compute_share=cfg.compute_share)
    planned = {k: v for k, v in plan.as_row().items() if k.endswith("_usd") or k.endswith("_used") or
               k == "labels_bought"}
    if not plan.feasible:
        return _infeasible(cfg, setup, plan.reason, plan=planned)
    _say(cfg, f"plan: buy {plan.labels_bought} labels, use {plan.unlabeled_used} unlabeled inputs "
              f"(projected ${plan.total_usd:.2f} of ${cfg.extra_budget_usd:g})")

    budget = Budget(ledger, cfg.extra_budget_usd)
    labels = pools.annotate(cfg.start_labels + plan.labels_bought)
    if plan.labels_bought:
        ledger.add_labels(f"labels:{cfg.start_labels}+{plan.labels_bought}", plan.labels_bought,
                          card.annotation_cost_usd)
    student_dir = cell_dir / "student"
    unlabeled_used = kept = 0
    if cfg.strategy == "annotate":
        arrays = encode_examples(card, setup.vocab, labels, setup.lengths)
        epochs, wrapper, kd = cfg.student_epochs, None, False
        step_extra = 0.0
    else:
        teacher_key, teacher_params = fine_tune_teacher(cfg, setup, labels, ledger, budget, cache)
        unlabeled = pools.unlabeled[: plan.unlabeled_used]
        outputs, enc = teacher_store_for(cfg, setup, teacher_key, teacher_params, unlabeled, ledger, cache)
        unlabeled_used = len(unlabeled)
        keep = confident_rows(outputs, cfg.min_teacher_confidence)
        if len(keep) == 0:
            return _infeasible(cfg, setup, f"no pseudo-label reaches MIN_TEACHER_CONFIDENCE "
                                           f"{cfg.min_teacher_confidence} (best: {teacher_confidence(outputs).max():.3f})")
        arrays = student_data_from_store(outputs, enc, setup.lengths["targets"], keep)
        kept = len(keep)
        if cfg.strategy == "mixed":
            arrays = _with_gold_rows(arrays, labels, cfg, setup, teacher_params)
        epochs, kd = cfg.distill_epochs, True
        wrapper, step_extra = None, 0.0
        if cfg.soft_targets == "online":
            from doa_jax.model import Transformer

            module = Transformer(cfg.teacher)
            wrapper = lambda src: OnlineTeacherBatches(src, module, teacher_params)  # noqa: E731
            step_extra = flops.forward_flops(price_teacher, cfg.batch_size, setup.lengths["inputs"],
                                             setup.lengths["targets"])
    step_flops, step_usd = _step_usd(ledger, price_student, cfg, setup.lengths, step_extra)
    _say(cfg, f"training the student on {len(arrays['encoder_input_tokens'])} examples ({epochs:g} epochs)")
    result, seconds = _train(cfg.student, arrays, student_dir, epochs=epochs, cfg=cfg,
                             initial_checkpoint=cfg.student_checkpoint, kd=kd, source_wrapper=wrapper,
                             step_allowed=budget.step_allowed(step_usd))
    ledger.add_compute(f"student_training:{cfg.key()}:{result.step}", "student_training", seconds,
                       result.step * step_flops)

    test = pools.test[: cfg.max_eval_examples] if cfg.max_eval_examples else pools.test
    start = time.perf_counter()
    evaluation = evaluate(cfg.student, result.state.params, setup, test, pricing=price_student)
    ledger.add_compute(f"evaluation:{cfg.key()}:{result.step}", "evaluation", time.perf_counter() - start,
                       evaluation["flops"])
    (cell_dir / "predictions.jsonl").write_text("".join(
        json.dumps({"prediction": p}) + "\n" for p in evaluation["predictions"]))
    by_phase = ledger.by_phase()
    metric_values = {k: v for k, v in evaluation["metrics"].items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
    status = "capped" if result.stopped_by_budget else "ok"
    return _row(cfg, setup, status=status, reason=(f"budget reached at student step {result.step}"
                                                   if result.stopped_by_budget else ""),
                value=metric_values.get(card.primary_metric), metrics=metric_values,
                spent_usd={p: by_phase[p] for p in costs.PHASES},
                spent_total_usd=budget.spent(), measured_usd=ledger.measured_total(),
                labels_used=len(labels), labels_bought=plan.labels_bought, unlabeled_used=unlabeled_used,
                pseudo_labels_kept=kept,
                student_steps=result.step, plan=planned, test_examples=len(test), output=str(cell_dir))


def _with_gold_rows(arrays, labels, cfg: CellConfig, setup: TaskSetup, teacher_params) -> dict[str, np.ndarray]:
    """Mixed strategy: the bought gold labels join the pseudo-labeled rows, with the teacher's
    top-k logits on the gold targets (teacher-forced), so `kd_weight` mixes KD and gold CE."""
    from doa_jax import teacher_outputs
    from doa_jax.data.encode import encode_examples
    from doa_jax.model import Transformer

    gold = encode_examples(setup.card, setup.vocab, labels, setup.lengths)
    values, ids = teacher_outputs.score_targets(Transformer(cfg.teacher), teacher_params, gold["encoder_input_tokens"],
                                                gold["decoder_target_tokens"], cfg.topk)
    gold.update(teacher_topk_values=values, teacher_topk_ids=ids)
    return {k: np.concatenate([arrays[k], gold[k]]) for k in arrays}
