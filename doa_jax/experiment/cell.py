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

import json
import sys
import time
from typing import Any, Optional

from doa_jax import partitioning, storage
from doa_jax.data import vocab as vocab_lib
from doa_jax.experiment import cell_run, costs, locking, phases, results, task_setup
from doa_jax.experiment.cell_run import BudgetExhausted, CellRun
from doa_jax.experiment.config import CellConfig
from doa_jax.experiment.pricing import profile_name
from doa_jax.model.config import size_of as size_name


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
    setup = task_setup.load_task(cfg)
    cfg = task_setup.resolve_models(cfg, setup.vocab)
    out = storage.path(cfg.output_dir)
    storage.makedirs(out)
    path = out / results.RESULTS_FILE
    done = partitioning.from_chief(lambda: _finished_row(path, cfg.key(), warn=True))
    if done is not None:
        cell_run.say(cfg, f"already in {path} (cell {cfg.key()}); not run again")
        return done
    with locking.hold_on_chief(out / "cells" / cfg.key() / ".lock", f"cell {cfg.key()} ({cfg.describe()})",
                               take_over=take_over_lock):
        # another process may have finished it meanwhile
        done = partitioning.from_chief(lambda: _finished_row(path, cfg.key()))
        if done is not None:
            return done
        if partitioning.is_chief():
            for folder in (out, task_setup.cache_dir(cfg)):
                storage.clean_orphans(folder)
        started = time.perf_counter()
        row = _run(cfg, setup)
        row.wall_seconds = round(time.perf_counter() - started, 2)
        if partitioning.is_chief():
            results.append_row(path, row)
    return row.to_json()


def write_predictions(path: storage.AnyPath, examples: list, predictions: list[str], references: list[str]) -> None:
    """Per test example: its index, input, the reference it was scored against (`target`; the data's own as
    `raw_target` where that differs: the paper's protocol scores the target as the released code's tokenizer
    writes it) and the student's output, so that `doa score --task T --predictions P --references P`
    re-scores the cell from this file alone."""
    def line(i, ex, ref, p):
        raw = {} if ref == ex["target"] else {"raw_target": ex["target"]}
        return json.dumps({"id": i, "source": ex["source"], "target": ref, **raw, "prediction": p},
                          ensure_ascii=False) + "\n"
    storage.write_atomic(path, "".join(line(i, ex, ref, p) for i, (ex, ref, p) in
                                       enumerate(zip(examples, references, predictions))))


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
    superseded = results.superseded_paper_rows(rows)
    if superseded:
        print(f"note: {path} has {len(superseded)} PROTOCOL='paper' row(s) scored against the data's text, not "
              "the released code's references (written through its tokenizer); those cells run again under new "
              "keys, and reports leave the old rows out", file=sys.stderr)


def _run(cfg: CellConfig, setup: task_setup.TaskSetup) -> results.ResultRow:
    """The phases in order (see the module doc); an infeasible cell's row says why it cannot run."""
    task_setup.check_models(cfg)
    cell_run.say(cfg, f"models' vocab size: student {cfg.student.vocab_size}, teacher {cfg.teacher.vocab_size} "
                      f"(task {vocab_lib.describe(setup.vocab)})")
    reason = task_setup.unfit_reason(cfg, setup)
    if reason:
        return _row(cfg, setup, status="infeasible", reason=reason)
    run = CellRun.open(cfg, setup)
    plan = phases.plan(run)
    planned = {k: v for k, v in plan.as_row().items()
               if k.endswith(("_usd", "_used")) or k in ("labels_bought", "note")}
    profile = run.pricer.describe()
    if not plan.feasible:
        return _row(cfg, setup, status="infeasible", reason=plan.reason, plan=planned, cost_profile=profile)
    run.say(f"plan: buy {plan.labels_bought} labels, use {plan.unlabeled_used} unlabeled inputs "
            f"(projected ${plan.total_usd:.2f} of ${cfg.extra_budget_usd:g}; cost profile {run.pricer.profile.name}"
            f"{', ASSUMED' if run.pricer.profile.assumed else ''})" + (f"; {plan.note}" if plan.note else ""))
    labels = phases.buy_labels(run, plan.labels_bought)
    try:
        data = phases.student_data(run, plan.unlabeled_used, labels)
    except BudgetExhausted as e:
        return _row(cfg, setup, status="infeasible", reason=str(e), cost_profile=profile)
    if isinstance(data, str):
        return _row(cfg, setup, status="infeasible", reason=data, cost_profile=profile)
    test = setup.pools.test[: cfg.max_eval_examples] if cfg.max_eval_examples else setup.pools.test
    student = phases.student(run, data, plan, test)
    if partitioning.is_chief():
        storage.makedirs(run.dir)
        write_predictions(run.dir / "predictions.jsonl", test, student.predictions, setup.references(test))
    by_phase = run.ledger.by_phase()
    status, reason = _status(student)
    return _row(cfg, setup, status=status, reason=reason,
                value=student.metrics.get(setup.card.primary_metric), metrics=student.metrics,
                spent_usd={p: by_phase[p] for p in costs.PHASES}, spent_total_usd=run.budget.spent(),
                measured_usd=run.ledger.measured_total(), labels_used=len(labels), labels_bought=plan.labels_bought,
                unlabeled_used=data.unlabeled_used, pseudo_labels_kept=data.pseudo_labels_kept,
                student_steps=student.steps, plan=planned, test_examples=len(test), output=str(run.dir),
                student_trained_by=None if student.trained_by == cfg.key() else student.trained_by,
                cost_profile=profile)


def _status(run: phases.StudentRun) -> tuple[str, str]:
    """`diverged` (the metric is of a broken model), `capped` (the budget stopped the student) or `ok`."""
    if run.diverged:
        return "diverged", f"the student diverged at step {run.steps}: {run.diverged}"
    if run.capped:
        return "capped", f"budget reached at student step {run.steps}"
    return "ok", ""


def _row(cfg: CellConfig, setup: Optional[task_setup.TaskSetup], **fields: Any) -> results.ResultRow:
    p = cfg.pricing
    return results.ResultRow(
        cell_key=cfg.key(), task=setup.card.name if setup else cfg.task, strategy=cfg.strategy,
        start_labels=cfg.start_labels, extra_budget_usd=cfg.extra_budget_usd, seed=cfg.seed,
        student=size_name(cfg.student), teacher=size_name(cfg.teacher),
        metric=setup.card.primary_metric if setup else None,
        compute_share=cfg.compute_share if cfg.kind.splits_budget else None,
        priced_as={"teacher": p.teacher_as, "student": p.student_as} if (p.teacher_as or p.student_as) else None,
        accelerator=(fields.get("cost_profile") or {}).get("accelerator", p.accelerator),
        mfu=p.mfu if profile_name(cfg) == "mfu" else None, protocol=cfg.protocol,
        references=results.PAPER_REFERENCES if cfg.protocol == "paper" else None,
        teacher_given=cfg.teacher_checkpoint if cfg.teacher_finetuned else None, **fields)
