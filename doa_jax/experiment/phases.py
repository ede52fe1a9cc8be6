"""The phases of a cell, each a function of its `CellRun`: plan, buy labels, fine-tune the teacher,
store its outputs, assemble the student's data, train and evaluate the student. Each phase charges
the cell's ledger for what it did; `cell.run_cell` calls them in order.

Shared work is keyed and cached under the cell's cache directory: a teacher fine-tuned on the same
labels with the same recipe, its outputs over the same inputs, and a student trained on the same
plan, are computed once and charged to every cell that uses them (the paper charges each cell its
teacher).

Multi-host: every process runs every phase. Training and evaluation are collective programs over
the job's mesh (each host feeds its share of each batch); the teacher's inference runs on each
host's own chips, with a replica of the teacher sharded over them (`CellRun.inference_mesh`): every
host computes its share of the teacher store's chunks, then reads the whole store, and runs the
online forward on its own rows. Process 0 decides whether the teacher is already trained and writes
the records; the others read what it wrote once it is there (`partitioning.from_chief`/`chief_first`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from doa_jax import checkpoints, decoding, flops, partitioning, storage
from doa_jax.checkpoints import native as native_checkpoints
from doa_jax.checkpoints import steps as train_checkpoints
from doa_jax.data.batches import ArrayBatches
from doa_jax.data.encode import encode_examples, encode_texts
from doa_jax.distill import store as teacher_store
from doa_jax.distill import student_data as student_data_lib
from doa_jax.experiment import planner
from doa_jax.experiment.cell_run import BudgetExhausted, CellRun
from doa_jax.experiment.config import CellConfig, fingerprint
from doa_jax.experiment.cost_profiles import Work
from doa_jax.experiment.pricing import as_run
from doa_jax.experiment.task_setup import TaskSetup
from doa_jax.model import T5Config, Transformer
from doa_jax.trainer import Trainer, TrainResult

# Rows per greedy decode of the test examples (evaluation); the teacher store's batch: `store_batch_size`.
EVAL_BATCH_SIZE = 64


def store_batch_size(cfg: CellConfig) -> int:
    """Rows per teacher decode and scoring call while building the teacher store: TEACHER_DECODE_BATCH,
    else min(64, 2 x BATCH_SIZE)."""
    return cfg.teacher_layout.decode_batch_size or min(64, cfg.train.batch_size * 2)


def eval_batch_size(cfg: CellConfig) -> int:
    """Rows per evaluation decode of the student: STUDENT_DECODE_BATCH, else EVAL_BATCH_SIZE."""
    return cfg.student_layout.decode_batch_size or EVAL_BATCH_SIZE


# ----------------------------------------------------------------------------- plan and labels

def plan(run: CellRun) -> planner.Plan:
    """What the budget buys under the cell's cost profile: labels, unlabeled inputs, each phase's $."""
    cfg, pools = run.cfg, run.setup.pools
    return run.pricer.planner.plan(cfg.strategy, cfg.start_labels, cfg.extra_budget_usd,
                                   unlabeled_available=cfg.distill.unlabeled_available(len(pools.unlabeled)),
                                   labels_available=len(pools.train), compute_share=cfg.compute_share,
                                   unlabeled_grid=cfg.pricing.unlabeled_grid)


def buy_labels(run: CellRun, bought: int) -> list:
    """The start labels plus `bought` more from the pool's annotation order; the bought ones charged."""
    cfg = run.cfg
    if bought:
        run.ledger.add_labels(f"labels:{cfg.start_labels}+{bought}", bought, run.setup.card.annotation_cost_usd)
    return run.setup.pools.annotate(cfg.start_labels + bought)


# ----------------------------------------------------------------------------- training

def train(cfg: CellConfig, model_cfg: T5Config, arrays: Mapping[str, np.ndarray], model_dir: storage.AnyPath, *,
          role: str, epochs: float, initial_checkpoint: Optional[str], kd: bool,
          step_allowed: Optional[Callable[[int], bool]] = None, source_wrapper=None) -> tuple[TrainResult, float]:
    """Fine-tunes `model_cfg` on in-memory arrays with the cell's TrainConfig laid out for `role`
    ('teacher' or 'student': its mesh and microbatches); (result, wall seconds)."""
    loss = cfg.train.loss if kd else dataclasses.replace(cfg.train.loss, kd_weight=0.0)
    config = dataclasses.replace(cfg.train_config(role), model_dir=str(model_dir), epochs=epochs, train_steps=None,
                                 loss=loss, initial_checkpoint=initial_checkpoint, verbose=cfg.verbose)
    shard = partitioning.host_shard_info()     # multi-host: each host feeds its rows of every batch
    source = ArrayBatches(arrays, cfg.train.batch_size, shuffle=True, seed=cfg.seed, pad_remainder=True,
                          shard_index=shard.index, num_shards=shard.num_shards)
    if source_wrapper is not None:
        source = source_wrapper(source)
    start = time.perf_counter()
    result = Trainer(model_cfg, config).fit(source, step_allowed=step_allowed)
    return result, time.perf_counter() - start


def fine_tune_teacher(run: CellRun, labels: list) -> tuple[str, Any]:
    """The teacher fine-tuned on `labels`, shared by every cell with the same teacher recipe.

    Its record (steps, seconds, FLOPs) is charged to each cell that uses it. Returns (key, params).
    With TEACHER_FINETUNED the teacher was fine-tuned elsewhere: `given_teacher`.
    """
    if run.cfg.teacher_finetuned:
        return given_teacher(run, labels)
    cfg, setup = run.cfg, run.setup
    recipe = {"teacher": layout_free(cfg.teacher), "ckpt": cfg.teacher_checkpoint, "task": setup.card.name,
              "labels": len(labels), "epochs": cfg.epochs.teacher, "seed": cfg.seed,
              "lr": cfg.train.optimizer.learning_rate, "opt": cfg.train.optimizer.name,
              "batch": cfg.train.batch_size, "lengths": setup.lengths, "vocab": setup.vocab.spec()["sha256"]}
    if cfg.protocol != "efficient":   # its schedule, clipping, dropout, ... (efficient keys stay as they were)
        recipe["protocol"] = cfg.protocol
        recipe["optimizer"] = dataclasses.asdict(cfg.train.optimizer)   # e.g. AdamW's eps placement (paper)
    key = fingerprint(recipe)
    run_dir = run.cache / "teachers" / key
    record_path = run_dir / "record.json"
    work = run.pricer.teacher_finetune(len(labels))
    if not partitioning.from_chief(record_path.exists):
        run.say(f"fine-tuning the teacher on {len(labels)} labels ({cfg.epochs.teacher:g} epochs) in {run_dir}")
        arrays = encode_examples(setup.card, setup.vocab, labels, setup.lengths)
        result, seconds = train(cfg, cfg.teacher, arrays, run_dir, role="teacher", epochs=cfg.epochs.teacher,
                                initial_checkpoint=cfg.teacher_checkpoint, kd=False,
                                step_allowed=run.budget.step_allowed(run.pricer.step_usd(work)))
        if result.stopped_by_budget:
            raise BudgetExhausted(f"the teacher's fine-tuning reached the budget at step {result.step}")
        if partitioning.is_chief():
            storage.write_atomic(record_path, json.dumps({
                "steps": result.step, "seconds": seconds, "lost_seconds": result.lost_seconds,
                "flops": sum(w.flops for w in as_run(work, result.step))}))
        del result   # its train state (params and optimizer moments) off the chips before inference's params
    else:
        run.say(f"reusing the fine-tuned teacher in {run_dir}")
    record = partitioning.from_chief(lambda: json.loads(record_path.read_text()))
    run.ledger.add_compute(f"teacher_finetune:{key}", "teacher_finetune", record["seconds"], record["flops"],
                           work=as_run(work, record["steps"]))
    run.ledger.add_lost(f"lost:teacher_finetune:{key}", "teacher_finetune", record.get("lost_seconds", 0.0))
    return key, teacher_params(run, run_dir / "checkpoints")


# Inputs per chunk of the teacher store: the unit a build resumes from, and that hosts share out.
STORE_CHUNK_SIZE = 256


def layout_free(model: T5Config) -> dict[str, Any]:
    """A model's config as a cache key: without how its layers are laid out (remat, scan) or how it
    is run (`EXECUTION_FIELDS`: decoded, differentiated), which change neither its parameters' values
    nor its outputs (keys made before those fields existed stay as they were)."""
    return dict(model.to_dict(execution=False), remat_policy="none", scan_layers=False)


def teacher_params(run: CellRun, directory: storage.AnyPath) -> Any:
    """The fine-tuned teacher's params for its inference phases, in the decoding dtypes: on one
    process, read straight onto the teacher's mesh, each device reading its own shards (never the
    whole tree on one chip or in host memory); on several processes, read on each host and placed
    on its inference mesh (`CellRun.inference_mesh`: a replica sharded over its own chips). A
    checkpoint written with the other layer layout (scanned or not) is converted on the host first
    (said)."""
    cfg = run.cfg
    if jax.process_count() == 1:
        stored_scan = native_checkpoints.read_config(native_checkpoints.latest_step_dir(directory)).scan_layers
        if stored_scan == cfg.teacher.scan_layers:
            module = Transformer(cfg.teacher)
            abstract = partitioning.abstract_params(module, partitioning.model_shardings(module, *run.mesh("teacher")))
            params = train_checkpoints.restore_step_directory(directory, abstract_params=abstract)[0]
            return decoding.decoding_params(params, module)
        run.say(f"the teacher's checkpoint has scan_layers={stored_scan}, this cell {cfg.teacher.scan_layers}: "
                "converting it on the host")
    return checkpoint_teacher_params(run, directory)


def checkpoint_teacher_params(run: CellRun, path: storage.AnyPath) -> Any:
    """The teacher's params from a checkpoint of any format doa-jax reads (T5X, HF, native), read on
    the host in the cell's teacher layout, in the decoding dtypes, placed on the teacher's inference
    mesh (on several processes: each host's own chips; each device copies only its shards)."""
    module = Transformer(run.cfg.teacher)
    # cast on the host: float32 and bf16 copies side by side would need 1.5x float32 on the chips
    params = decoding.decoding_params(checkpoints.load_checkpoint(path, config=run.cfg.teacher)[1], module)
    mesh, rules = run.inference_mesh("teacher")
    if jax.process_count() > 1:
        wanted = run.cfg.teacher_layout.mesh.model
        cut = f"; TEACHER_MESH_MODEL={wanted} cut to this host's chips" if wanted != mesh.shape["model"] else ""
        run.say(f"the teacher's inference runs on each host's own {mesh.devices.size} devices "
                f"(mesh data={mesh.shape['data']}, model={mesh.shape['model']}{cut})")
    return partitioning.put_params(params, partitioning.model_shardings(module, mesh, rules))


def checkpoint_identity(path: str) -> dict[str, Any]:
    """What names a given checkpoint in cache keys: its resolved path and format and, when local, the
    newest modification time of it and its entries (a checkpoint rewritten in place is another
    teacher); a URL (gs://) is named by its path alone."""
    resolved = storage.resolved(path)
    identity = {"path": str(resolved), "format": checkpoints.detect_format(path)}
    if not storage.is_url(path):
        entries = [resolved, *resolved.iterdir()] if resolved.is_dir() else [resolved]
        identity["modified_ns"] = max(p.stat().st_mtime_ns for p in entries)
    return identity


def given_teacher_key(cfg: CellConfig, setup: TaskSetup, identity: Mapping[str, Any]) -> str:
    """The store key of a teacher fine-tuned elsewhere: its weights (the checkpoint's identity, read
    as the cell's teacher config) under the task's vocabulary; no training recipe, none ran here."""
    return fingerprint({"teacher": layout_free(cfg.teacher), "finetuned_checkpoint": dict(identity),
                        "vocab": setup.vocab.spec()["sha256"]})


def given_teacher(run: CellRun, labels: list) -> tuple[str, Any]:
    """TEACHER_FINETUNED: the teacher at TEACHER_CHECKPOINT, fine-tuned elsewhere (`t5x.train` on
    `doa_<task>_L<n>`, `doa train`) on the labels this cell's teacher trains on, used as it is:
    nothing trains here. The fine-tune was paid elsewhere, but the cell is charged what its cost
    profile charges a teacher fine-tune on `labels` (the paper charges each cell its teacher), with 0
    measured seconds; the ledger entry's key names the checkpoint. Returns (key, params)."""
    cfg = run.cfg
    identity = partitioning.from_chief(lambda: checkpoint_identity(cfg.teacher_checkpoint))
    key = given_teacher_key(cfg, run.setup, identity)
    run.say(f"the teacher is already fine-tuned ({len(labels)} labels, TEACHER_FINETUNED): reading "
            f"{identity['path']} ({identity['format']}); charged as a fine-tune, not run")
    work = run.pricer.teacher_finetune(len(labels))
    run.ledger.add_compute(f"teacher_finetune:{key}:fine-tuned elsewhere:{identity['path']}", "teacher_finetune",
                           0.0, sum(w.flops for w in work), work=work)
    return key, checkpoint_teacher_params(run, cfg.teacher_checkpoint)


def teacher_outputs(run: CellRun, teacher_key: str, teacher_params: Any, unlabeled: list):
    """Teacher outputs over the unlabeled inputs: computed once per key, resumable, shared.

    Returns (TeacherOutputs, encoded inputs)."""
    cfg, setup = run.cfg, run.setup
    request = teacher_store.StoreRequest(
        teacher_key, [ex["source"] for ex in unlabeled], setup.card.input_prefix, setup.lengths["inputs"],
        setup.decode_length, num_beams=cfg.distill.teacher_num_beams, topk=cfg.distill.stored_topk)
    root = run.cache / "stores"
    hosts = f" (each of {jax.process_count()} hosts computes its share)" if jax.process_count() > 1 else ""
    run.say(f"teacher outputs for {len(request.sources)} unlabeled inputs -> {root}{hosts}")

    def build(check: str):   # each process its share of the chunks, on its own chips (one process: all of them)
        def share():
            with run.inference_context("teacher")():
                return teacher_store.build_store(
                    root, request, setup.vocab, Transformer(cfg.teacher), teacher_params,
                    batch_size=store_batch_size(cfg), chunk_size=STORE_CHUNK_SIZE,
                    on_chunk=lambda done, total, n: run.say(f"  teacher chunk {done}/{total}"),
                    shard=partitioning.host_shard_info(), chips=run.ledger.chips / jax.process_count(),
                    check=check)
        started = time.perf_counter()
        built = partitioning.on_every_host(share)
        return built, time.perf_counter() - started

    # A store that looks complete is taken on its markers and checked as it is read, once; a chunk that
    # is not whole then is recomputed by its host (each host checks its own chunks again).
    (store, enc, stats), seconds = build("markers")
    outputs, problem, missing, corrupt = load_store(store)
    if corrupt and not missing:
        run.say(f"  teacher store: {corrupt} host(s) found a chunk that is not whole; its host recomputes it")
        (store, enc, repaired), more = build("shard")
        stats, seconds = stats.then(repaired), seconds + more   # the first pass's chunks are this attempt's
        outputs, problem, missing, corrupt = load_store(store)
    if missing and jax.process_count() > 1:
        raise FileNotFoundError(f"teacher store {store.dir} is incomplete after every host computed its share "
                                f"({problem or 'on another host'}): the cache must be a folder every host sees "
                                "(OUTPUT_DIR / CACHE_DIR on gs:// or a shared disk)")
    if missing or corrupt:
        raise problem or FileNotFoundError(f"teacher store {store.dir}: another host could not read it whole")
    computed = partitioning.sum_over_processes(stats.computed_chunks)   # every host's chunks are written
    # Chunks earlier attempts finished that the store still holds: what they took (chip-seconds in the ledger's
    # unit of chips, each host's share of them), in this job's wall seconds. A chunk recomputed because it was
    # not whole counts once, as this attempt's; its lost first computation is a `lost:` entry, measured and not
    # charged, as a killed run's lost work is. Counted once the store was read whole.
    earlier = partitioning.sum_over_processes(stats.reused_chip_seconds) / run.ledger.chips
    unmeasured = partitioning.sum_over_processes(stats.unmeasured_chunks)
    record = partitioning.from_chief(
        lambda: store_record(store.dir / "record.json", seconds, computed, earlier, unmeasured))
    work = run.pricer.teacher_inference(len(request.sources))
    run.ledger.add_compute(f"teacher_inference:{store.key}", "teacher_inference", record.get("seconds", 0.0),
                           sum(w.flops for w in work), work=work)
    lost = partitioning.sum_over_processes(stats.lost_chip_seconds) / run.ledger.chips
    run.ledger.add_lost(f"lost:teacher_inference:{store.key}", "teacher_inference", lost,
                        why="teacher-store chunks computed again after their files were damaged")
    return outputs, enc


def load_store(store: teacher_store.TeacherStore):
    """(outputs, this host's problem, how many hosts found a chunk missing, how many a chunk failing its
    checksums): every host reads the whole store (an error other than an incomplete store raises on
    every host, naming the host)."""
    def load():
        try:
            return store.load(), None
        except teacher_store.StoreIncomplete as e:
            return None, e
    outputs, problem = partitioning.on_every_host(load)
    missing = partitioning.sum_over_processes(int(problem is not None and problem.missing))
    corrupt = partitioning.sum_over_processes(int(problem is not None and not problem.missing))
    return outputs, problem, missing, corrupt


def store_record(path: storage.AnyPath, seconds: float, computed: int, earlier: float, unmeasured: int) -> dict:
    """The teacher store's record (what building it took, charged to every cell that uses it), at `path`:
    written when this attempt computed chunks (`seconds`: its wall time) or when there is none yet (an
    earlier attempt finished every chunk but was killed before writing it); `earlier`: the seconds of the
    chunks earlier attempts finished, counted in either case; `unmeasured`: chunks whose markers hold no
    seconds (an older version's), whose share of a record already there is kept: the larger of the two
    figures is written (a lower bound, then: the record kept may count a chunk's lost first computation
    instead of its recompute)."""
    if computed or not path.exists():
        total = (seconds if computed else 0.0) + earlier
        if unmeasured and path.exists():
            total = max(total, float(json.loads(path.read_text()).get("seconds", 0.0)))
        storage.write_atomic(path, json.dumps({
            "seconds": total, "computed_chunks": computed, "earlier_attempts_seconds": earlier,
            "unmeasured_chunks": unmeasured}))
    return json.loads(path.read_text())


def online_teacher(cfg: CellConfig, teacher_params: Any, context: Callable[[], Any] = contextlib.nullcontext):
    """The batch-source wrapper that runs the teacher on every student batch (online soft targets), or
    None: stored targets, or sequence-level KD (KD_WEIGHT = 0), whose loss reads no soft targets, so the
    teacher's forward would be thrown away (the cell's price still charges it: the paper's program)."""
    if cfg.distill.soft_targets != "online" or cfg.train.loss.kd_weight == 0.0:
        return None
    module = Transformer(cfg.teacher)
    return lambda src: student_data_lib.OnlineTeacherBatches(src, module, teacher_params, context)


# ----------------------------------------------------------------------------- the student

@dataclasses.dataclass
class StudentData:
    """What the student trains on, and the work its training is priced as (per step)."""

    arrays: dict[str, np.ndarray]
    epochs: float
    kd: bool
    work: list[Work]
    source_wrapper: Optional[Callable] = None
    unlabeled_used: int = 0
    pseudo_labels_kept: int = 0

    @property
    def rows(self) -> int:
        return len(self.arrays["encoder_input_tokens"])


def student_data(run: CellRun, unlabeled_used: int, labels: list) -> StudentData | str:
    """The student's training data for the cell's strategy, or why there is none (the teacher's
    phases run here for the strategies that use it)."""
    cfg, setup = run.cfg, run.setup
    if not cfg.kind.uses_teacher:
        arrays = encode_examples(setup.card, setup.vocab, labels, setup.lengths)
        return StudentData(arrays, cfg.epochs.student, kd=False, work=run.pricer.student(False, len(arrays[
            "encoder_input_tokens"])))
    teacher_key, teacher_params = fine_tune_teacher(run, labels)
    unlabeled = setup.pools.unlabeled[:unlabeled_used]
    outputs, enc = teacher_outputs(run, teacher_key, teacher_params, unlabeled)
    keep = student_data_lib.confident_rows(outputs, cfg.distill.min_teacher_confidence)
    if len(keep) == 0:
        return (f"no pseudo-label reaches MIN_TEACHER_CONFIDENCE {cfg.distill.min_teacher_confidence} "
                f"(best: {student_data_lib.teacher_confidence(outputs).max():.3f})")
    arrays = student_data_lib.from_store(outputs, enc, setup.lengths["targets"], keep)
    if cfg.kind.mixes_gold:
        gold = encode_examples(setup.card, setup.vocab, labels, setup.lengths)
        with run.inference_context("teacher")():
            arrays = student_data_lib.with_gold_rows(arrays, gold, Transformer(cfg.teacher), teacher_params,
                                                     cfg.distill.topk)
    wrapper = online_teacher(cfg, teacher_params, run.inference_context("teacher"))
    if wrapper is not None:
        run.say("online soft targets: the teacher's forward runs on every student batch")
    return StudentData(arrays, cfg.epochs.distill, kd=True,
                       work=run.pricer.student(True, len(arrays["encoder_input_tokens"])),
                       source_wrapper=wrapper, unlabeled_used=len(unlabeled), pseudo_labels_kept=len(keep))


@dataclasses.dataclass
class StudentRun:
    """A trained and evaluated student: what it cost (measured) and what it scored."""

    steps: int
    seconds: float
    flops: float
    eval_seconds: float
    eval_flops: float
    metrics: dict[str, float]
    predictions: list[str]
    capped: bool
    trained_by: str      # the cell key whose run this is
    diverged: Optional[str] = None   # why training stopped as diverged (non-finite loss, exploding norms)
    lost_seconds: float = 0.0        # steps a kill undid, run again (measured, not charged)


def _shared_student_path(run: CellRun, the_plan: planner.Plan) -> storage.AnyPath:
    """Cells that differ only in budget but plan the same labels and unlabeled inputs train the same
    student: the first one's uncapped run is recorded here and reused (and charged) by the others."""
    work = fingerprint({"cell": dataclasses.replace(run.cfg, extra_budget_usd=0.0).key(),
                        "labels_bought": the_plan.labels_bought, "unlabeled_used": the_plan.unlabeled_used})
    return run.cache / "students" / f"{work}.json"


def _train_and_score_student(run: CellRun, data: StudentData, test: list) -> StudentRun:
    cfg = run.cfg
    run.say(f"training the student on {data.rows} examples ({data.epochs:g} epochs)")
    result, seconds = train(cfg, cfg.student, data.arrays, run.dir / "student", role="student", epochs=data.epochs,
                            initial_checkpoint=cfg.student_checkpoint, kd=data.kd, source_wrapper=data.source_wrapper,
                            step_allowed=run.budget.step_allowed(run.pricer.step_usd(data.work)))
    start = time.perf_counter()
    with run.inference_context("student")():
        evaluation = evaluate(cfg.student, result.state.params, run.setup, test, batch_size=eval_batch_size(cfg),
                              pricing=cfg.pricing_models()[1])
    values = {k: v for k, v in evaluation["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return StudentRun(result.step, seconds, sum(w.flops for w in as_run(data.work, result.step)),
                      time.perf_counter() - start, evaluation["flops"],
                      values, evaluation["predictions"], result.stopped_by_budget, cfg.key(), result.diverged,
                      result.lost_seconds)


def student(run: CellRun, data: StudentData, the_plan: planner.Plan, test: list) -> StudentRun:
    """The student trained on `data` and scored on `test` (or the same plan's run of another cell,
    reused), its training and evaluation charged to the cell."""
    shared = _shared_student_path(run, the_plan)
    recorded = partitioning.from_chief(lambda: json.loads(shared.read_text()) if shared.exists() else None)
    if recorded is not None:
        result = StudentRun(**recorded)
        run.say(f"the same plan was trained by cell {result.trained_by}: reusing its student ({shared})")
    else:
        result = _train_and_score_student(run, data, test)
        if not (result.capped or result.diverged) and partitioning.is_chief():   # a capped run depends on its budget
            storage.write_atomic(shared, json.dumps(dataclasses.asdict(result)))
    ledger, by = run.ledger, result.trained_by
    ledger.add_compute(f"student_training:{by}:{result.steps}", "student_training", result.seconds, result.flops,
                       work=as_run(data.work, result.steps))
    ledger.add_lost(f"lost:student_training:{by}", "student_training", result.lost_seconds)
    ledger.add_compute(f"evaluation:{by}:{result.steps}", "evaluation", result.eval_seconds, result.eval_flops,
                       work=run.pricer.evaluation(run.cfg.pricing_models()[1], len(test)))
    return result


def evaluate(model_cfg: T5Config, params: Any, setup: TaskSetup, examples: list, batch_size: int = EVAL_BATCH_SIZE,
             pricing: Optional[T5Config] = None) -> dict[str, Any]:
    """Greedy decodes of the test examples scored by the card's metric (percent), under the setup's
    protocol (`paper`: outputs decoded, references written and out-of-label outputs scored as the released
    code does)."""
    enc = encode_texts(setup.vocab, [ex["source"] for ex in examples], setup.lengths["inputs"], setup.card.input_prefix)
    preds = []
    for lo in range(0, len(enc), batch_size):
        chunk = enc[lo:lo + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, chunk.shape[1]), np.int32)])
        chunk = partitioning.rows_like(chunk, jax.tree_util.tree_leaves(params)[0])   # over the params' mesh
        tokens = partitioning.to_host(decoding.greedy(model_cfg, params, chunk, setup.decode_length).tokens)[:n]
        preds += [setup.decode(t) for t in tokens]
    result = setup.card.score(preds, setup.references(examples), sources=[ex["source"] for ex in examples],
                              protocol=setup.protocol)
    return {"metrics": result, "predictions": preds, "flops": flops.forward_flops(
        pricing or model_cfg, len(examples), setup.lengths["inputs"], setup.lengths["targets"])}
