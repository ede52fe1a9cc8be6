"""One budget cell of the paper's experiment, as a short sequence of phases.

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
import json
import sys
import time
from typing import Any, Callable, Optional

import numpy as np

from doa_jax import partitioning, storage
from doa_jax.data import vocab as vocab_lib
from doa_jax.data.encode import encode_examples
from doa_jax.distill import student_data
from doa_jax.experiment import costs, locking, phases, planner, results
from doa_jax.experiment.config import CellConfig, fingerprint
from doa_jax.experiment.phases import say
from doa_jax.experiment.pricing import Pricer, as_run, profile_name
from doa_jax.model import T5Config, Transformer
from doa_jax.model.config import size_of as size_name


@dataclasses.dataclass
class StudentData:
    """What the student trains on, and what that costs per step beyond its own FLOPs."""

    arrays: dict[str, np.ndarray]
    epochs: float
    kd: bool
    source_wrapper: Optional[Callable] = None
    unlabeled_used: int = 0
    pseudo_labels_kept: int = 0


def run_cell(cfg: CellConfig, *, take_over_lock: bool = False) -> dict[str, Any]:
    """Runs one cell and returns its results row (also appended to OUTPUT_DIR/results.jsonl).

    Idempotent: a cell whose key already has a row there is not run again (its row is returned).
    A cell killed part-way resumes its phases (teacher, store chunks, student) on the next run; the
    temporary files a kill left are removed first. `take_over_lock`: take the cell's lock even
    from a live holder (see `locking`).
    Multi-host: every process runs the cell's phases together; process 0 takes every decision that
    reads shared files and gives it to all, holds the lock and writes the shared files (ledger,
    teacher record and store, predictions, the results row). Models whose vocab size follows the vocabulary
    (MODEL_VOCAB_SIZE = None) are resolved first.
    """
    cfg = phases.resolve_models(cfg)
    out = storage.path(cfg.output_dir)
    storage.makedirs(out)
    path = out / results.RESULTS_FILE
    done = partitioning.from_chief(lambda: _finished_row(path, cfg.key(), warn=True))
    if done is not None:
        say(cfg, f"already in {path} (cell {cfg.key()}); not run again")
        return done
    with locking.hold_on_chief(out / "cells" / cfg.key() / ".lock", f"cell {cfg.key()} ({cfg.describe()})",
                               take_over=take_over_lock):
        # another process may have finished it meanwhile
        done = partitioning.from_chief(lambda: _finished_row(path, cfg.key()))
        if done is not None:
            return done
        if partitioning.is_chief():
            for folder in (out, phases.cache_dir(cfg)):
                storage.clean_orphans(folder)
        started = time.perf_counter()
        row = _run(cfg)
        row.wall_seconds = round(time.perf_counter() - started, 2)
        if partitioning.is_chief():
            results.append_row(path, row)
    return row.to_json()


def write_predictions(path: storage.AnyPath, examples: list, predictions: list[str]) -> None:
    """Per test example: its index, input, reference and the student's output, so that
    `doa score --task T --predictions P --references P` re-scores the cell from this file alone."""
    storage.write_atomic(path, "".join(
        json.dumps({"id": i, "source": ex["source"], "target": ex["target"], "prediction": p}, ensure_ascii=False)
        + "\n" for i, (ex, p) in enumerate(zip(examples, predictions))))


def _finished_row(path: storage.AnyPath, key: str, warn: bool = False) -> Optional[dict[str, Any]]:
    """The row of cell `key` in the results file, or None (noting rows of older keys when `warn`)."""
    rows = results.read_rows(path)
    if warn:
        _warn_stale(path, rows)
    return {r["cell_key"]: r for r in rows if "cell_key" in r}.get(key)


def _warn_stale(path: storage.AnyPath, rows: list[dict[str, Any]]) -> None:
    stale = results.stale_rows(rows)
    if stale:
        print(f"note: {path} has {len(stale)} row(s) keyed by an older doa-jax (key version "
              f"{stale[0].get('key_version', 1)}, now {results.KEY_VERSION}: the cell config became composed "
              f"of TrainConfig/DistillConfig/PricingConfig); those cells run again under new keys",
              file=sys.stderr)


def _run(cfg: CellConfig) -> results.ResultRow:
    setup = phases.load_task(cfg)
    phases.check_models(cfg, setup)
    say(cfg, f"models' vocab size: student {cfg.student.vocab_size}, teacher {cfg.teacher.vocab_size} "
             f"(task {vocab_lib.describe(setup.vocab)})")
    reason = phases.unfit_reason(cfg, setup)
    if reason:
        return _row(cfg, setup, status="infeasible", reason=reason)
    pricer = Pricer.for_cell(cfg, setup.card, setup.lengths)
    ledger = partitioning.chief_first(lambda: costs.Ledger(   # process 0 repairs it before the others read it
        storage.path(cfg.output_dir) / "cells" / cfg.key() / "ledger.jsonl",
        measured_on=costs.get_accelerator(cfg.pricing.measured_on), profile=pricer.profile,
        writable=partitioning.is_chief()))
    plan = _plan(cfg, setup, pricer)
    planned = {k: v for k, v in plan.as_row().items()
               if k.endswith(("_usd", "_used")) or k in ("labels_bought", "note")}
    if not plan.feasible:
        return _row(cfg, setup, status="infeasible", reason=plan.reason, plan=planned, cost_profile=pricer.describe())
    say(cfg, f"plan: buy {plan.labels_bought} labels, use {plan.unlabeled_used} unlabeled inputs "
             f"(projected ${plan.total_usd:.2f} of ${cfg.extra_budget_usd:g}; cost profile {pricer.profile.name}"
             f"{', ASSUMED' if pricer.profile.assumed else ''})" + (f"; {plan.note}" if plan.note else ""))
    budget = phases.Budget(ledger, cfg.extra_budget_usd)
    labels = setup.pools.annotate(cfg.start_labels + plan.labels_bought)
    if plan.labels_bought:
        ledger.add_labels(f"labels:{cfg.start_labels}+{plan.labels_bought}", plan.labels_bought,
                          setup.card.annotation_cost_usd)
    try:
        data = _student_data(cfg, setup, plan, labels, ledger, budget, pricer)
    except phases.BudgetExhausted as e:
        return _row(cfg, setup, status="infeasible", reason=str(e), cost_profile=pricer.describe())
    if isinstance(data, str):
        return _row(cfg, setup, status="infeasible", reason=data, cost_profile=pricer.describe())
    return _train_and_evaluate(cfg, setup, data, ledger, budget, planned, labels, plan, pricer)


def _plan(cfg: CellConfig, setup: phases.TaskSetup, pricer: Pricer) -> planner.Plan:
    pools = setup.pools
    unlabeled = len(pools.unlabeled) if cfg.distill.max_unlabeled is None else min(cfg.distill.max_unlabeled,
                                                                                   len(pools.unlabeled))
    return pricer.planner.plan(cfg.strategy, cfg.start_labels, cfg.extra_budget_usd, unlabeled_available=unlabeled,
                               labels_available=len(pools.train), compute_share=cfg.compute_share,
                               unlabeled_grid=cfg.pricing.unlabeled_grid)


def _student_data(cfg: CellConfig, setup: phases.TaskSetup, plan: planner.Plan, labels: list,
                  ledger: costs.Ledger, budget: phases.Budget, pricer: Pricer) -> StudentData | str:
    """The student's training data for the cell's strategy, or why there is none."""
    if not cfg.kind.uses_teacher:
        return StudentData(encode_examples(setup.card, setup.vocab, labels, setup.lengths), cfg.epochs.student,
                           kd=False)
    teacher_key, teacher_params = phases.fine_tune_teacher(cfg, setup, labels, ledger, budget, pricer)
    unlabeled = setup.pools.unlabeled[: plan.unlabeled_used]
    outputs, enc = phases.teacher_outputs(cfg, setup, teacher_key, teacher_params, unlabeled, ledger, pricer)
    keep = student_data.confident_rows(outputs, cfg.distill.min_teacher_confidence)
    if len(keep) == 0:
        return (f"no pseudo-label reaches MIN_TEACHER_CONFIDENCE {cfg.distill.min_teacher_confidence} "
                f"(best: {student_data.teacher_confidence(outputs).max():.3f})")
    arrays = student_data.from_store(outputs, enc, setup.lengths["targets"], keep)
    if cfg.kind.mixes_gold:
        gold = encode_examples(setup.card, setup.vocab, labels, setup.lengths)
        arrays = student_data.with_gold_rows(arrays, gold, Transformer(cfg.teacher), teacher_params, cfg.distill.topk)
    return StudentData(arrays, cfg.epochs.distill, kd=True, source_wrapper=phases.online_teacher(cfg, teacher_params),
                       unlabeled_used=len(unlabeled), pseudo_labels_kept=len(keep))


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


def _shared_run_path(cfg: CellConfig, plan: planner.Plan) -> storage.AnyPath:
    """Cells that differ only in budget but plan the same labels and unlabeled inputs train the same
    student: the first one's uncapped run is recorded here and reused (and charged) by the others."""
    work = fingerprint({"cell": dataclasses.replace(cfg, extra_budget_usd=0.0).key(),
                        "labels_bought": plan.labels_bought, "unlabeled_used": plan.unlabeled_used})
    return phases.cache_dir(cfg) / "students" / f"{work}.json"


def _train_student(cfg: CellConfig, setup: phases.TaskSetup, data: StudentData, pricer: Pricer,
                   budget: phases.Budget, test: list) -> StudentRun:
    cell_dir = storage.path(cfg.output_dir) / "cells" / cfg.key()
    work = pricer.student(data.kd, len(data.arrays["encoder_input_tokens"]))
    say(cfg, f"training the student on {len(data.arrays['encoder_input_tokens'])} examples ({data.epochs:g} epochs)")
    result, seconds = phases.train(cfg, cfg.student, data.arrays, cell_dir / "student", epochs=data.epochs,
                                   initial_checkpoint=cfg.student_checkpoint, kd=data.kd,
                                   source_wrapper=data.source_wrapper,
                                   step_allowed=budget.step_allowed(pricer.step_usd(work)))
    start = time.perf_counter()
    evaluation = phases.evaluate(cfg.student, result.state.params, setup, test, pricing=cfg.pricing_models()[1])
    values = {k: v for k, v in evaluation["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return StudentRun(result.step, seconds, sum(w.flops for w in as_run(work, result.step)),
                      time.perf_counter() - start, evaluation["flops"],
                      values, evaluation["predictions"], result.stopped_by_budget, cfg.key(), result.diverged,
                      result.lost_seconds)


def _train_and_evaluate(cfg: CellConfig, setup: phases.TaskSetup, data: StudentData, ledger: costs.Ledger,
                        budget: phases.Budget, planned: dict, labels: list, plan: planner.Plan,
                        pricer: Pricer) -> results.ResultRow:
    cell_dir = storage.path(cfg.output_dir) / "cells" / cfg.key()
    test = setup.pools.test[: cfg.max_eval_examples] if cfg.max_eval_examples else setup.pools.test
    shared = _shared_run_path(cfg, plan)
    recorded = partitioning.from_chief(lambda: json.loads(shared.read_text()) if shared.exists() else None)
    if recorded is not None:
        run = StudentRun(**recorded)
        say(cfg, f"the same plan was trained by cell {run.trained_by}: reusing its student ({shared})")
    else:
        run = _train_student(cfg, setup, data, pricer, budget, test)
        if not (run.capped or run.diverged) and partitioning.is_chief():   # a capped run depends on its budget: not shared
            storage.write_atomic(shared, json.dumps(dataclasses.asdict(run)))
    work = as_run(pricer.student(data.kd, len(data.arrays["encoder_input_tokens"])), run.steps)
    ledger.add_compute(f"student_training:{run.trained_by}:{run.steps}", "student_training", run.seconds, run.flops,
                       work=work)
    ledger.add_lost(f"lost:student_training:{run.trained_by}", "student_training", run.lost_seconds)
    ledger.add_compute(f"evaluation:{run.trained_by}:{run.steps}", "evaluation", run.eval_seconds, run.eval_flops,
                       work=pricer.evaluation(cfg.pricing_models()[1], len(test)))
    if partitioning.is_chief():
        storage.makedirs(cell_dir)
        write_predictions(cell_dir / "predictions.jsonl", test, run.predictions)
    by_phase = ledger.by_phase()
    status, reason = _status(run)
    return _row(cfg, setup, status=status, reason=reason,
                value=run.metrics.get(setup.card.primary_metric), metrics=run.metrics,
                spent_usd={p: by_phase[p] for p in costs.PHASES}, spent_total_usd=budget.spent(),
                measured_usd=ledger.measured_total(), labels_used=len(labels), labels_bought=plan.labels_bought,
                unlabeled_used=data.unlabeled_used, pseudo_labels_kept=data.pseudo_labels_kept,
                student_steps=run.steps, plan=planned, test_examples=len(test), output=str(cell_dir),
                student_trained_by=None if run.trained_by == cfg.key() else run.trained_by,
                cost_profile=pricer.describe())


def _status(run: StudentRun) -> tuple[str, str]:
    """`diverged` (the metric is of a broken model), `capped` (the budget stopped the student) or `ok`."""
    if run.diverged:
        return "diverged", f"the student diverged at step {run.steps}: {run.diverged}"
    if run.capped:
        return "capped", f"budget reached at student step {run.steps}"
    return "ok", ""


def _row(cfg: CellConfig, setup: Optional[phases.TaskSetup], **fields: Any) -> results.ResultRow:
    p = cfg.pricing
    return results.ResultRow(
        cell_key=cfg.key(), task=setup.card.name if setup else cfg.task, strategy=cfg.strategy,
        start_labels=cfg.start_labels, extra_budget_usd=cfg.extra_budget_usd, seed=cfg.seed,
        student=size_name(cfg.student), teacher=size_name(cfg.teacher),
        metric=setup.card.primary_metric if setup else None,
        compute_share=cfg.compute_share if cfg.kind.splits_budget else None,
        priced_as={"teacher": p.teacher_as, "student": p.student_as} if (p.teacher_as or p.student_as) else None,
        accelerator=(fields.get("cost_profile") or {}).get("accelerator", p.accelerator),
        mfu=p.mfu if profile_name(cfg) == "mfu" else None, protocol=cfg.protocol, **fields)
