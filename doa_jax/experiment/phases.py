"""The phases of a cell, each a function: set up the task, fine-tune the teacher, store its
outputs, train the student, evaluate. `cell.run_cell` calls them in order.

Shared work is keyed and cached under the cell's cache directory: a teacher fine-tuned on the same
labels with the same recipe, and its outputs over the same inputs, are computed once and charged to
every cell that uses them (the paper charges each cell its teacher).

Multi-host: every process runs every phase. Training and evaluation are collective programs over
the job's mesh (each host feeds its share of each batch); process 0 decides whether the teacher is
already trained, builds the teacher store (on its own devices, as on one host) and writes the
records, and the others read what it wrote once it is there (`partitioning.from_chief`/`chief_first`).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from doa_jax import checkpoints, decoding, flops, partitioning, storage
from doa_jax.data import cards, demo, pools as pools_lib, vocab as vocab_lib
from doa_jax.data.batches import ArrayBatches
from doa_jax.data.encode import encode_examples, encode_texts
from doa_jax.distill import store as teacher_store
from doa_jax.distill import student_data
from doa_jax.experiment import costs
from doa_jax.experiment.config import CellConfig, fingerprint
from doa_jax.experiment.pricing import Pricer, as_run
from doa_jax.model import T5Config, Transformer
from doa_jax.trainer import Trainer, TrainResult

# The ledger phases charged against the extra budget (evaluation is recorded, not charged).
BUDGET_PHASES = ("labels", "teacher_finetune", "teacher_inference", "student_training")
# Rows per greedy decode of the test examples (evaluation); the teacher store's batch: `store_batch_size`.
EVAL_BATCH_SIZE = 64


def store_batch_size(cfg: CellConfig) -> int:
    """Rows per teacher decode and scoring call while building the teacher store."""
    return min(64, cfg.train.batch_size * 2)


def decode_length(lengths: Mapping[str, int], protocol: str) -> int:
    """Most tokens a decode may produce: the targets length, or under the paper's protocol one less
    (HF `generate(max_length=L)` counts the start token, so the released code gets L - 1)."""
    return lengths["targets"] - 1 if protocol == "paper" else lengths["targets"]


class BudgetExhausted(RuntimeError):
    """A phase that must finish to be useful (the teacher) ran out of budget."""


@dataclasses.dataclass
class TaskSetup:
    card: Any
    pools: Any
    vocab: Any
    lengths: dict[str, int]
    protocol: str = "efficient"   # how outputs are decoded and scored (see `decode_length`)

    @property
    def decode_length(self) -> int:
        return decode_length(self.lengths, self.protocol)


def say(cfg: CellConfig, text: str) -> None:
    if cfg.verbose:
        print(f"[{cfg.describe()}] {text}", flush=True)


def load_task(cfg: CellConfig) -> TaskSetup:
    """Card, pools (seeded, nested annotation order) and vocabulary of the cell's task."""
    if cfg.task == "demo":
        card, pools = demo.card(), demo.pools(seed=0, **dict(cfg.demo_sizes or {}))
        vocab = task_vocab(cfg, pools)
    else:
        card = cards.load_card(cfg.task)
        vocab = task_vocab(cfg)
        pools = pools_lib.make_pools(card)
    lengths = dict(cfg.feature_lengths or card.feature_lengths)
    if cfg.protocol == "paper" and lengths["targets"] < 2:
        raise ValueError(f"PROTOCOL='paper' decodes targets length - 1 tokens; targets length {lengths['targets']} "
                         "leaves none")
    return TaskSetup(card, pools, vocab, lengths, cfg.protocol)


def cache_dir(cfg: CellConfig) -> storage.AnyPath:
    """CACHE_DIR, else OUTPUT_DIR/cache (a local folder or a URL)."""
    return storage.path(cfg.cache_dir) if cfg.cache_dir else storage.path(cfg.output_dir) / "cache"


def _local_vocab_dir(cfg: CellConfig) -> pathlib.Path:
    """Where the demo's vocabulary is built: the cache when local; with a URL cache, a local folder
    (SentencePiece trains into local files; the build is deterministic, so any host rebuilds it alike)
    named by the demo's sizes, whose texts it is trained on (one folder for all sizes served a
    vocabulary trained on other texts)."""
    cache = cache_dir(cfg)
    sizes = fingerprint(dict(sorted((cfg.demo_sizes or {}).items())))
    return cache if not storage.is_url(cache) else pathlib.Path.home() / ".cache" / "doa_jax" / "vocab" / sizes


def task_vocab(cfg: CellConfig, demo_pools: Any = None) -> vocab_lib.Vocabulary:
    """The cell's vocabulary: VOCABULARY, or for the demo task without one the demo's own (built
    once in the cache directory)."""
    if cfg.vocab:
        return vocab_lib.load_vocab(cfg.vocab)
    if cfg.task == "demo":
        pools = demo_pools or demo.pools(seed=0, **dict(cfg.demo_sizes or {}))
        # process 0 first: processes that share a folder (several on one host) then find it built
        return partitioning.chief_first(lambda: demo.build_vocab(_local_vocab_dir(cfg), pools))
    raise ValueError(f"task {cfg.task} needs VOCABULARY: T5's spiece.model (or `doa vocab build`)")


def resolve_models(cfg: CellConfig, vocab: Optional[vocab_lib.Vocabulary] = None) -> CellConfig:
    """`cfg` with each model's vocab size fixed (before its key is taken): the rows of the checkpoint
    it starts from, else MODEL_VOCAB_SIZE, else the vocabulary's ids padded to 128. A size that does
    not fit is a configuration error (no results row) naming MODEL_VOCAB_SIZE. The teacher's
    checkpoint is read only by cells that use the teacher."""
    vocab = vocab or task_vocab(cfg)
    what = vocab_lib.describe(vocab)
    fixed = {}
    for role, model_cfg, ckpt in (("student", cfg.student, cfg.student_checkpoint),
                                  ("teacher", cfg.teacher, cfg.teacher_checkpoint)):
        try:
            fixed[role] = checkpoints.resolve_vocab_size(
                model_cfg, vocab.vocab_size, what, ckpt if role == "student" or cfg.kind.uses_teacher else None)
        except ValueError as e:
            raise ValueError(f"the {role}'s vocabulary does not fit the task's: {e}") from None
    return dataclasses.replace(cfg, **fixed) if fixed != {"student": cfg.student, "teacher": cfg.teacher} else cfg


def check_models(cfg: CellConfig, setup: TaskSetup) -> None:
    """Configuration errors, raised before any compute (no results row), after `resolve_models`
    (which refuses a model whose vocab size does not fit the task's vocabulary): a teacher and
    student with different vocabularies."""
    if cfg.kind.uses_teacher and cfg.student.vocab_size != cfg.teacher.vocab_size:
        raise ValueError(f"teacher and student vocabularies differ ({cfg.teacher.vocab_size} vs "
                         f"{cfg.student.vocab_size} ids): distillation needs one vocabulary")


def unfit_reason(cfg: CellConfig, setup: TaskSetup) -> Optional[str]:
    """Why the cell cannot run on this task's data (a results row says `infeasible`), or None."""
    if cfg.start_labels > len(setup.pools.train):
        return f"START_LABELS {cfg.start_labels} exceeds the labeled pool ({len(setup.pools.train)} examples)"
    return None


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


def train(cfg: CellConfig, model_cfg: T5Config, arrays: Mapping[str, np.ndarray], model_dir: storage.AnyPath, *,
          epochs: float, initial_checkpoint: Optional[str], kd: bool,
          step_allowed: Optional[Callable[[int], bool]] = None, source_wrapper=None) -> tuple[TrainResult, float]:
    """Fine-tunes `model_cfg` on in-memory arrays with the cell's TrainConfig; (result, wall seconds)."""
    loss = cfg.train.loss if kd else dataclasses.replace(cfg.train.loss, kd_weight=0.0)
    config = dataclasses.replace(cfg.train, model_dir=str(model_dir), epochs=epochs, train_steps=None, loss=loss,
                                 initial_checkpoint=initial_checkpoint, verbose=cfg.verbose)
    shard = partitioning.host_shard_info()     # multi-host: each host feeds its rows of every batch
    source = ArrayBatches(arrays, cfg.train.batch_size, shuffle=True, seed=cfg.seed, pad_remainder=True,
                          shard_index=shard.index, num_shards=shard.num_shards)
    if source_wrapper is not None:
        source = source_wrapper(source)
    start = time.perf_counter()
    result = Trainer(model_cfg, config).fit(source, step_allowed=step_allowed)
    return result, time.perf_counter() - start


def fine_tune_teacher(cfg: CellConfig, setup: TaskSetup, labels: list, ledger: costs.Ledger,
                      budget: Budget, pricer: Pricer) -> tuple[str, Any]:
    """The teacher fine-tuned on `labels`, shared by every cell with the same teacher recipe.

    Its record (steps, seconds, FLOPs) is charged to each cell that uses it. Returns (key, params).
    """
    recipe = {"teacher": cfg.teacher.to_dict(), "ckpt": cfg.teacher_checkpoint, "task": setup.card.name,
              "labels": len(labels), "epochs": cfg.epochs.teacher, "seed": cfg.seed,
              "lr": cfg.train.optimizer.learning_rate, "opt": cfg.train.optimizer.name,
              "batch": cfg.train.batch_size, "lengths": setup.lengths, "vocab": setup.vocab.spec()["sha256"]}
    if cfg.protocol != "efficient":   # its schedule, clipping, dropout, ... (efficient keys stay as they were)
        recipe["protocol"] = cfg.protocol
        recipe["optimizer"] = dataclasses.asdict(cfg.train.optimizer)   # e.g. AdamW's eps placement (paper)
    key = fingerprint(recipe)
    run_dir = cache_dir(cfg) / "teachers" / key
    record_path = run_dir / "record.json"
    work = pricer.teacher_finetune(len(labels))
    if not partitioning.from_chief(record_path.exists):
        say(cfg, f"fine-tuning the teacher on {len(labels)} labels ({cfg.epochs.teacher:g} epochs) in {run_dir}")
        arrays = encode_examples(setup.card, setup.vocab, labels, setup.lengths)
        result, seconds = train(cfg, cfg.teacher, arrays, run_dir, epochs=cfg.epochs.teacher,
                                initial_checkpoint=cfg.teacher_checkpoint, kd=False,
                                step_allowed=budget.step_allowed(pricer.step_usd(work)))
        if result.stopped_by_budget:
            raise BudgetExhausted(f"the teacher's fine-tuning reached the budget at step {result.step}")
        if partitioning.is_chief():
            storage.write_atomic(record_path, json.dumps({
                "steps": result.step, "seconds": seconds, "lost_seconds": result.lost_seconds,
                "flops": sum(w.flops for w in as_run(work, result.step))}))
    else:
        say(cfg, f"reusing the fine-tuned teacher in {run_dir}")
    record = partitioning.from_chief(lambda: json.loads(record_path.read_text()))
    ledger.add_compute(f"teacher_finetune:{key}", "teacher_finetune", record["seconds"], record["flops"],
                       work=as_run(work, record["steps"]))
    ledger.add_lost(f"lost:teacher_finetune:{key}", "teacher_finetune", record.get("lost_seconds", 0.0))
    _, params = checkpoints.load_checkpoint(run_dir / "checkpoints", config=cfg.teacher)
    return key, jax.tree_util.tree_map(np.asarray, params)


def teacher_outputs(cfg: CellConfig, setup: TaskSetup, teacher_key: str, teacher_params: Any, unlabeled: list,
                    ledger: costs.Ledger, pricer: Pricer):
    """Teacher outputs over the unlabeled inputs: computed once per key, resumable, shared.

    Returns (TeacherOutputs, encoded inputs)."""
    request = teacher_store.StoreRequest(
        teacher_key, [ex["source"] for ex in unlabeled], setup.card.input_prefix, setup.lengths["inputs"],
        setup.decode_length, num_beams=cfg.distill.teacher_num_beams, topk=cfg.distill.stored_topk)
    root = cache_dir(cfg) / "stores"
    start = time.perf_counter()
    say(cfg, f"teacher outputs for {len(request.sources)} unlabeled inputs -> {root}")

    def build():   # process 0 computes and writes the store; the others then find it complete and read it
        store, enc, stats = teacher_store.build_store(
            root, request, setup.vocab, Transformer(cfg.teacher), teacher_params,
            batch_size=store_batch_size(cfg), chunk_size=256,
            on_chunk=lambda done, total, n: say(cfg, f"  teacher chunk {done}/{total}"))
        if stats.computed_chunks:
            storage.write_atomic(store.dir / "record.json", json.dumps(
                {"seconds": time.perf_counter() - start, "computed_chunks": stats.computed_chunks}))
        return store, enc

    store, enc = partitioning.chief_first(build)
    record_path = store.dir / "record.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    work = pricer.teacher_inference(len(request.sources))
    ledger.add_compute(f"teacher_inference:{store.key}", "teacher_inference", record.get("seconds", 0.0),
                       sum(w.flops for w in work), work=work)
    return store.load(), enc


def evaluate(model_cfg: T5Config, params: Any, setup: TaskSetup, examples: list, batch_size: int = EVAL_BATCH_SIZE,
             pricing: Optional[T5Config] = None) -> dict[str, Any]:
    """Greedy decodes of the test examples scored by the card's metric (percent), under the setup's
    protocol (`paper`: out-of-label outputs scored as the released code scores them)."""
    enc = encode_texts(setup.vocab, [ex["source"] for ex in examples], setup.lengths["inputs"], setup.card.input_prefix)
    preds = []
    for lo in range(0, len(enc), batch_size):
        chunk = enc[lo:lo + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, chunk.shape[1]), np.int32)])
        chunk = partitioning.like_global(chunk, jax.tree_util.tree_leaves(params)[0])   # multi-host: on the mesh
        tokens = partitioning.to_host(decoding.greedy(model_cfg, params, chunk, setup.decode_length).tokens)[:n]
        preds += [setup.vocab.decode(t) for t in tokens]
    result = setup.card.score(preds, [ex["target"] for ex in examples], sources=[ex["source"] for ex in examples],
                              protocol=setup.protocol)
    return {"metrics": result, "predictions": preds, "flops": flops.forward_flops(
        pricing or model_cfg, len(examples), setup.lengths["inputs"], setup.lengths["targets"])}


def online_teacher(cfg: CellConfig, teacher_params: Any):
    """The batch-source wrapper that runs the teacher on every student batch (online soft targets), or
    None: stored targets, or sequence-level KD (KD_WEIGHT = 0), whose loss reads no soft targets, so the
    teacher's forward would be thrown away (the cell's price still charges it: the paper's program)."""
    if cfg.distill.soft_targets != "online" or cfg.train.loss.kd_weight == 0.0:
        return None
    module = Transformer(cfg.teacher)
    return lambda src: student_data.OnlineTeacherBatches(src, module, teacher_params)
