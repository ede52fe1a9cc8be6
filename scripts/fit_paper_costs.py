"""Fit the `paper` cost profile's rates to what the paper paid (its §7.2 costs), choosing the terms out of sample.

The paper's compute dollars (doa_jax/experiment/paper_pareto.csv: 4 tasks x 5 start-label counts L x U in
{10K, 100K}) are modelled as the work `doa_jax.experiment.planner.Planner` counts for each (L, U) point, at the
paper's recipe (20 teacher epochs, greedy pseudo-labels, 50 distillation epochs with the teacher's
forward at every step, batch 32) and token lengths measured from each task's data, priced per program
(`teacher_train`, `teacher_decode`, `student_distill_online`) as

  chip-seconds = FLOPs / effective_FLOP/s  +  steps x seconds_per_step x params / XXL's params  [+ terms]

The non-negative constants minimise the sum of relative residuals |fit/paper - 1| with none above
MAX_RESIDUAL (raised to 1.01 x the smallest achievable maximum when that is larger): a linear programme.

Which terms the model has is chosen by the leave-one-task-out error (fit three tasks, predict the
fourth, for each task), not by the in-sample one: starting from FLOP and step terms at mean lengths,
each candidate term of CANDIDATES is tried; of those that lower the out-of-sample RMS error without
raising the largest out-of-sample error, the one with the lowest RMS is kept, and the search repeats
until none qualifies. Prints every trial, the chosen
model's in-sample and out-of-sample residuals, and its constants; `--write` rewrites the fitted block
of doa_jax/experiment/cost_profiles.toml and the tables of notes/costs.md. `--measure-lengths --vocab V`
first re-measures the tasks' length statistics from ../shared/data/doa and the built-in demo task
(written with --write). `--every-model` also fits every model the candidate terms make (each subset of
them), and says which meet issue 31's bars: out of sample, and on the withheld tasks as estimated from
the issue's observations (a check of the selection, not a criterion of it: the withheld points would
no longer be out of sample); --write always writes that table too.

  PYTHONPATH=$PWD python scripts/fit_paper_costs.py [--measure-lengths --vocab V] [--every-model] [--write]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import itertools
import json
import math
import pathlib
import re
import sys
import tempfile
from typing import Callable, Optional

import numpy as np
from scipy.optimize import linprog

from doa_jax.experiment import cost_profiles
from doa_jax.experiment import costs
from doa_jax.experiment import planner
from doa_jax.experiment.report import read_paper_results
from doa_jax.model import config_for_size

PAPER_COSTS = cost_profiles.PAPER_PARETO
WITHHELD = pathlib.Path(__file__).with_name("withheld_observations.csv")
WITHHELD_BAR = 0.25       # issue 31: on each withheld task, at least 8 of 10 points within 25%, median at most 15%
WITHHELD_WITHIN, WITHHELD_MEDIAN = 8, 0.15
LOO_MEDIAN_BAR, LOO_MAX_BAR = 0.15, 0.35   # issue 31: leave-one-task-out median at most 15%, no point over 35%
NOTES = pathlib.Path(__file__).resolve().parents[1] / "notes" / "costs.md"
FITTED = ("teacher_train", "teacher_decode", "student_distill_online")
MAX_RESIDUAL = 0.22  # in-sample cap; the plot is read to about +-2%
TEACHER, STUDENT = config_for_size("xxl"), config_for_size("small")
# The released run_t5.py (../shared/reference/released): inputs are cut at max_source_length, whose
# default the README's launch commands keep; both runs evaluate every eval_steps steps and once at the end.
RELEASED_MAX_SOURCE_LENGTH = 128
# Tasks measured but not fitted: the paper's other two, and the built-in demo (its cells are priced as the paper's).
EXTRAPOLATED = {"fever", "wlp", "demo"}
RELEASED_EVAL_STEPS = 2000


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model of the paper's costs: the lengths it prices at and the terms it has."""

    inputs: str = "inputs"          # a cost_profiles.LENGTH_STATISTICS key
    targets: str = "targets"
    split: bool = False             # decoder tokens at a FLOP rate of their own
    per_run: bool = False           # a fixed cost per (L, U) point, charged to the teacher's run
    evals: bool = False             # the released code's greedy evaluation every eval_steps, and at the end
    epochs_exponent: float = 1.0    # teacher steps ~ (L / batch)^x: epochs that depend on L (1: 20 at every L)
    pseudo_targets: str = ""        # the length statistic of the teacher's outputs, decoded and distilled on
                                    # ("": the same as `targets`)

    def terms(self) -> list[str]:
        names = {f.name: f.default for f in dataclasses.fields(self)}
        return [CHANGE_NAMES[(k, getattr(self, k))] for k in names if getattr(self, k) != names[k]]


# Candidate terms: the paper's runs plausibly had each (notes/costs.md says what each did).
CANDIDATES = {
    "inputs padded to the batch's longest": dict(inputs="inputs_padded"),
    f"inputs padded to the batch's longest, cut at {RELEASED_MAX_SOURCE_LENGTH}": dict(inputs="inputs_padded_cut"),
    "targets padded to the batch's longest": dict(targets="targets_padded"),
    "decoder tokens at their own FLOP rate": dict(split=True),
    "a fixed cost per run": dict(per_run=True),
    f"evaluation every {RELEASED_EVAL_STEPS} steps and at the end": dict(evals=True),
    "teacher epochs falling with L, as early stopping would (steps ~ L^0.9)": dict(epochs_exponent=0.9),
    # Greedy generate() runs until every sequence of the batch has ended, and the distillation pads the
    # teacher's outputs to the batch's longest: the work on unlabeled inputs at padded target lengths,
    # the teacher's fine-tuning on gold labels unchanged. It is the one term that raises WLP's per-input
    # cost (its targets are the longest, and the most spread: mean 34.0, a batch's longest 124.8).
    "pseudo-labels decoded and distilled to the batch's longest target": dict(pseudo_targets="targets_padded"),
}
# Not a candidate: epochs rising with L. Nothing in the paper's runs could do that (run_t5.py trains a
# fixed num_train_epochs; early stopping could only shorten the larger runs); tried, it lowered the
# leave-one-task-out error (notes/costs.md) by making the teacher's cost grow faster than L, which the
# withheld tasks' observations contradict (FEVER was already priced too high at large L).
CHANGE_NAMES = {(k, v): name for name, change in CANDIDATES.items() for k, v in change.items()}
PRICEABLE = ("inputs", "targets", "split", "per_run")   # what cost_profiles.Rate / the planner can price


def read_points(path=PAPER_COSTS) -> list[dict]:
    """The §7.2 points with distillation (U > 0): what the paper paid for compute."""
    return [dict(task=r["task"], labels=r["labels"], unlabeled=r["unlabeled"], compute_usd=r["compute_usd"])
            for r in cost_profiles.paper_pareto_points(path) if r["unlabeled"] > 0]


# ----------------------------------------------------------------------------- lengths

def expected_batch_max(lengths: np.ndarray, batch: int) -> float:
    """E[longest of `batch` examples drawn at random] over the empirical distribution of `lengths`."""
    x = np.sort(np.asarray(lengths, dtype=float))
    k = np.arange(1, len(x) + 1) / len(x)
    return float((x * (k ** batch - (k - 1 / len(x)) ** batch)).sum())


def length_statistics(inputs: np.ndarray, targets: np.ndarray, batch: int) -> dict[str, float]:
    """Every cost_profiles.LENGTH_STATISTICS of one task's token lengths."""
    stats = {"inputs": inputs.mean(), "targets": targets.mean(), "inputs_padded": expected_batch_max(inputs, batch),
             "targets_padded": expected_batch_max(targets, batch),
             "inputs_padded_cut": expected_batch_max(np.minimum(inputs, RELEASED_MAX_SOURCE_LENGTH), batch)}
    assert set(stats) == set(cost_profiles.LENGTH_STATISTICS)
    return {k: round(float(v), 2) for k, v in stats.items()}


def _task_data(task: str, vocab_path: str, scratch: str):
    """(card, every example, the vocabulary its cells use, its evaluation file's size) of one task; the
    built-in demo task's data and vocabulary are made in code (the vocabulary in `scratch`)."""
    from doa_jax.data import cards, demo, pools, vocab

    if task == demo.NAME:
        p = demo.pools()
        return demo.card(), p.train + p.validation + p.test + p.unlabeled, demo.build_vocab(scratch, p), len(p.test)
    card = cards.load_card(task)
    p = pools.make_pools(card)
    examples = p.train + p.validation + p.test + p.unlabeled
    return card, examples, vocab.Vocabulary(vocab_path), len(p.test) if "test" in card.files else len(examples)


def measure_lengths(vocab_path: str, tasks, batch: int) -> dict[str, dict]:
    """Length statistics (EOS included) over every example of each task's data, and its evaluation file's size."""
    from doa_jax.data import stats

    out = {}
    with tempfile.TemporaryDirectory() as scratch:
        for task in tasks:
            card, examples, v, eval_examples = _task_data(task, vocab_path, scratch)
            lengths = stats.token_lengths(card, examples, v)
            out[task] = dict(length_statistics(lengths["inputs"], lengths["targets"], batch), examples=len(examples),
                             eval_examples=eval_examples)
    return out


# ----------------------------------------------------------------------------- features

def columns(variant: Variant) -> list[tuple[str, str]]:
    """The model's constants, as (program, kind): one column of the design matrix each."""
    flop_kinds = ("encoder_flops", "decoder_flops") if variant.split else ("flops",)
    cols = [(p, k) for p in FITTED for k in (*flop_kinds, "steps")]
    if variant.per_run:
        cols.append(("teacher_train", "run"))
    if variant.evals:
        cols.append(("eval_decode", "steps"))
    return cols


def _planner(point: dict, lengths: dict, recipe_table: dict, variant: Variant) -> planner.Planner:
    task = lengths[point["task"]]
    recipe = planner.Recipe(teacher_epochs=recipe_table["teacher_epochs"],
                            distill_epochs=recipe_table["distill_epochs"],
                            batch_size=recipe_table["batch_size"], online_kd=True,
                            inputs_length=task[variant.inputs], targets_length=task[variant.targets])
    return planner.Planner(costs.get_accelerator("a100"), STUDENT, TEACHER, 1.0, recipe)


def _eval_positions(p: planner.Planner, teacher_steps: float, distill_steps: float, eval_examples: int) -> float:
    """Decoded positions of a batch (XXL-equivalent) of the released code's evaluations in both runs."""
    positions = math.ceil(eval_examples / p.recipe.batch_size) * p.recipe.targets_length
    evals = lambda steps: steps // RELEASED_EVAL_STEPS + 1  # noqa: E731
    small = STUDENT.num_params() / TEACHER.num_params()
    return positions * (evals(teacher_steps) + evals(distill_steps) * small)


def work_features(point: dict, lengths: dict, recipe_table: dict, variant: Variant = Variant()) -> np.ndarray:
    """The design-matrix row of one (task, L, U) point: each column's amount of work."""
    p = _planner(point, lengths, recipe_table, variant)
    teacher = p.teacher_finetune_work(point["labels"])
    if variant.epochs_exponent != 1.0:
        f = teacher.steps ** variant.epochs_exponent / teacher.steps
        teacher = dataclasses.replace(teacher, rows=teacher.rows * f, steps=teacher.steps * f, flops=teacher.flops * f,
                                      decoder_flops=teacher.decoder_flops * f)
    pseudo = (_planner(point, lengths, recipe_table, dataclasses.replace(variant, targets=variant.pseudo_targets))
              if variant.pseudo_targets else p)
    works = [teacher, *pseudo.teacher_inference_work(point["unlabeled"]), pseudo.distill_work(point["unlabeled"])]
    cols = columns(variant)
    row = np.zeros(len(cols))
    for w in works:
        amounts = {"flops": w.flops, "encoder_flops": w.flops - w.decoder_flops, "decoder_flops": w.decoder_flops,
                   "steps": w.steps * w.params / TEACHER.num_params(), "run": 1.0 if w.steps > 0 else 0.0}
        for i, (program, kind) in enumerate(cols):
            if program == w.program:
                row[i] += amounts[kind]
    if variant.evals:
        row[cols.index(("eval_decode", "steps"))] = _eval_positions(
            p, teacher.steps, works[-1].steps, lengths[point["task"]]["eval_examples"])
    return row


# ----------------------------------------------------------------------------- fitting

def fit(X: np.ndarray, y: np.ndarray, max_residual: float = 0.0) -> np.ndarray:
    """Non-negative theta minimising the sum of |X theta / y - 1| with none above `max_residual`
    (raised to 1.01 x the smallest achievable maximum when that is larger)."""
    scale = X.max(axis=0)
    scale[scale == 0] = 1.0
    A = X / scale / y[:, None]
    n, k = A.shape
    ones = np.ones((n, 1))
    minimax = linprog(np.r_[np.zeros(k), 1.0], A_ub=np.block([[A, -ones], [-A, -ones]]),
                      b_ub=np.r_[np.ones(n), -np.ones(n)], bounds=[(0, None)] * (k + 1))
    cap = max(minimax.x[-1] * 1.01, max_residual)
    eye = np.eye(n)
    l1 = linprog(np.r_[np.zeros(k), np.ones(n)], A_ub=np.block([[A, -eye], [-A, -eye], [A, 0 * eye], [-A, 0 * eye]]),
                 b_ub=np.r_[np.ones(n), -np.ones(n), np.full(n, 1 + cap), np.full(n, cap - 1)],
                 bounds=[(0, None)] * (k + n))
    return l1.x[:k] / scale


def task_fits(X: np.ndarray, y: np.ndarray, tasks, max_residual: float = MAX_RESIDUAL) -> dict[str, np.ndarray]:
    """Each task's constants as fitted to the other tasks' points only."""
    tasks = np.asarray(tasks)
    if len(set(tasks)) < 2:
        raise ValueError("leave-one-task-out needs points of at least two tasks")
    return {task: fit(X[tasks != task], y[tasks != task], max_residual) for task in sorted(set(tasks))}


def leave_one_task_out(X: np.ndarray, y: np.ndarray, tasks, max_residual: float = MAX_RESIDUAL) -> np.ndarray:
    """Each point's relative residual predicted by a fit to the other tasks' points only."""
    tasks = np.asarray(tasks)
    out = np.empty(len(y))
    for task, theta in task_fits(X, y, tasks, max_residual).items():
        held = tasks == task
        out[held] = X[held] @ theta / y[held] - 1
    return out


def summary(residuals: np.ndarray) -> dict[str, float]:
    r = np.abs(residuals)
    return {"median": float(np.median(r)), "max": float(r.max()), "rms": float(np.sqrt((r ** 2).mean()))}


@dataclasses.dataclass
class Result:
    variant: Variant
    theta: np.ndarray
    in_sample: np.ndarray
    loo: np.ndarray
    trials: list           # (step, tried term, variant, its constants, in-sample summary, LOO summary, kept)


def evaluate(variant: Variant, points: list, lengths: dict, recipe: dict, y: np.ndarray):
    X = np.array([work_features(p, lengths, recipe, variant) for p in points])
    theta = fit(X, y, MAX_RESIDUAL)
    return theta, X @ theta / y - 1, leave_one_task_out(X, y, [p["task"] for p in points])


def select(points: list, lengths: dict, recipe: dict, y: np.ndarray) -> Result:
    """Forward selection of CANDIDATES by the leave-one-task-out error, from FLOP and step terms at mean lengths:
    each step keeps the term with the lowest RMS error among those that lower it without raising the max."""
    current = Variant()
    theta, ins, loo = evaluate(current, points, lengths, recipe, y)
    trials, step = [(0, "(start) FLOP and step terms at mean lengths", current, theta, summary(ins), summary(loo),
                     True)], 1
    while True:
        tried = []
        for name, change in CANDIDATES.items():
            candidate = dataclasses.replace(current, **change)
            if candidate == current:
                continue
            t, i, o = evaluate(candidate, points, lengths, recipe, y)
            tried.append((summary(o)["rms"], name, candidate, t, i, o))
        now = summary(loo)
        better = [r for r in tried if r[0] < now["rms"] and summary(r[5])["max"] <= now["max"]]
        best = min(better, key=lambda r: r[0], default=None)
        keep = best is not None
        trials += [(step, name, cand, t, summary(i), summary(o), keep and name == best[1])
                   for _, name, cand, t, i, o in tried]
        if not keep:
            return Result(current, theta, ins, loo, trials)
        _, _, current, theta, ins, loo = best
        step += 1


def family() -> list[Variant]:
    """Every model the candidate terms make: each subset of CANDIDATES (one value per field), the start included."""
    values: dict[str, list] = {}
    for change in CANDIDATES.values():
        for field, value in change.items():
            values.setdefault(field, [getattr(Variant(), field)]).append(value)
    return [Variant(**dict(zip(values, combo))) for combo in itertools.product(*values.values())]


def meets_withheld(summary_: dict) -> bool:
    """Issue 31's bar on one withheld task, on the estimates: points within WITHHELD_BAR (a range only reaching
    into it does not count) and the median."""
    return summary_["within"] >= WITHHELD_WITHIN and summary_["median"] <= WITHHELD_MEDIAN


def meets_every_bar(row: dict) -> bool:
    """`meets_withheld` on each withheld task (an `every_model` row)."""
    return all(meets_withheld(t) for t in row["withheld"].values())


def every_model(points: list, data: dict) -> list[dict]:
    """Each model of `family()` fitted and checked: its leave-one-task-out errors, and the withheld tasks' points
    as estimated from issue 31's observations at its prices; `fit`: its leave-one-task-out residuals and its
    prices of the withheld points (models whose `fit` is the same are one fit)."""
    lengths, recipe = data["paper_lengths"], data["profiles"]["paper"]
    y = np.array([p["compute_usd"] for p in points]) / _usd_per_second(data)
    withheld = read_withheld()
    rows = []
    for variant in family():
        theta, _, loo = evaluate(variant, points, lengths, recipe, y)
        estimated = withheld_estimates(withheld, model_price(variant, theta, data))
        rows.append(dict(variant=variant, loo=summary(loo), withheld=withheld_summary(estimated),
                         fit=np.concatenate([loo, [r["usd"] for r in estimated]])))
    return rows


def _usd_per_second(data: dict) -> float:
    return costs.get_accelerator(data["profiles"]["paper"]["accelerator"]).usd_per_chip_hour / 3600


def run_fit(data: dict, points: list) -> Result:
    lengths = data.get("paper_lengths", {})
    missing = sorted({p["task"] for p in points} - {t for t, r in lengths.items() if isinstance(r, dict)})
    if missing:
        raise SystemExit(f"no lengths for {missing}: run with --measure-lengths --vocab V")
    recipe = data["profiles"]["paper"]
    y = np.array([p["compute_usd"] for p in points]) / _usd_per_second(data)
    result = select(points, lengths, recipe, y)
    unpriceable = [f.name for f in dataclasses.fields(Variant)
                   if f.name not in PRICEABLE and getattr(result.variant, f.name) != f.default]
    if unpriceable:
        raise SystemExit(f"the chosen model has terms {unpriceable} that cost_profiles.Rate cannot price: extend it")
    return result


# ----------------------------------------------------------------------------- the main results, out of sample

def main_results() -> list[dict]:
    """The paper's main-results cells (§7.1, six tasks: none of them was fitted): task, start labels, extra
    budget, and its Ann. and Dist. scores (Dist. 0.0: the paper could not run distillation on that budget)."""
    cells: dict = {}
    for r in read_paper_results():
        if r["table"] == "main":
            cells.setdefault((r["task"], r["start_labels"], r["extra_budget_usd"]), {})[r["strategy"]] = r["value"]
    return [dict(task=t, labels=L, budget=b, annotate=v["annotate"], distill=v["distill"])
            for (t, L, b), v in sorted(cells.items())]


PER_INPUT_AT = 100_000   # unlabeled inputs at which the per-input cost is taken (the paper's larger U; whole batches)


def model_price(variant: Variant, theta: np.ndarray, data: dict) -> Callable[[dict], float]:
    """A (task, labels, unlabeled) point's compute dollars under a model's constants."""
    per_usd = _usd_per_second(data)
    return lambda point: float(work_features(point, data["paper_lengths"], data["profiles"]["paper"], variant)
                               @ theta * per_usd)


def affordable(variant: Variant, theta: np.ndarray, cell: dict, data: dict) -> tuple[float, Optional[int]]:
    """(what the teacher's fine-tuning on the cell's L labels costs, how many unlabeled inputs the rest of its
    extra budget pseudo-labels and distills on; None where the teacher alone costs more than the budget)."""
    price = model_price(variant, theta, data)
    usd = lambda u: price(dict(cell, unlabeled=u))  # noqa: E731
    teacher, per_input = usd(0), (usd(PER_INPUT_AT) - usd(0)) / PER_INPUT_AT
    if teacher >= cell["budget"]:
        return teacher, None
    if per_input <= 0:
        raise ValueError(f"{variant.terms()}: the fit prices unlabeled inputs at ${per_input:g} each; "
                         "no budget would bound them")
    return teacher, int((cell["budget"] - teacher) / per_input)


def check_main_results(variant: Variant, theta: np.ndarray, points: list, data: dict) -> list[dict]:
    """Each main-results cell priced by a model's constants and, for the four fitted tasks, by the same model
    fitted to the other three tasks."""
    lengths, recipe = data["paper_lengths"], data["profiles"]["paper"]
    X = np.array([work_features(p, lengths, recipe, variant) for p in points])
    y = np.array([p["compute_usd"] for p in points]) / _usd_per_second(data)
    others = task_fits(X, y, [p["task"] for p in points])
    rows = []
    for cell in main_results():
        row = dict(cell, ran=cell["distill"] > 0)
        row["teacher_usd"], row["unlabeled"] = affordable(variant, theta, cell, data)
        if cell["task"] in others:
            row["loo_teacher_usd"], row["loo_unlabeled"] = affordable(variant, others[cell["task"]], cell, data)
        rows.append(row)
    return rows


def explains_main_results(rows: list[dict]) -> bool:
    """Whether prices tell the main results' three exceptions apart (by the fit and by each fit without the
    task): distillation is affordable exactly where the paper reports a Dist. score (all but NQ 10K +$50), and
    the cells where it ran but lost to Ann. (WLP 5K +$100, MultiPIT_Gen 10K +$100) buy fewer unlabeled inputs
    than any cell where it won."""
    for key in ("unlabeled", "loo_unlabeled"):
        priced = [r for r in rows if key in r]
        if any((r[key] is not None) != r["ran"] for r in priced):
            return False
        lost = [r[key] for r in priced if r["ran"] and r["distill"] < r["annotate"]]
        won = [r[key] for r in priced if r["ran"] and r["distill"] >= r["annotate"]]
        if lost and won and max(lost) >= min(won):
            return False
    return True


# ----------------------------------------------------------------------------- the withheld tasks, estimated

def reported_range(text: str, where: str) -> tuple[float, float]:
    """A residual as issue 31 reported it, as (low, high): '-27%' and 'about -20%' are points, 'within 5%' a range."""
    point = re.fullmatch(r"(?:about )?([+-]\d+(?:\.\d+)?)%", text.strip())
    if point:
        return (float(point[1]) / 100,) * 2
    bound = re.fullmatch(r"within (\d+(?:\.\d+)?)%", text.strip())
    if bound:
        return -float(bound[1]) / 100, float(bound[1]) / 100
    raise ValueError(f"{where}: reported {text!r} is not a residual ('-27%', 'about -20%') or a bound ('within 5%')")


def read_withheld(path=WITHHELD) -> list[dict]:
    """Issue 31's observations on the withheld tasks (scripts/withheld_observations.csv)."""
    with open(path, newline="") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if not line.startswith("#")]
    rows = []
    for (n, _), r in zip(lines[1:], csv.DictReader(line for _, line in lines)):
        where = f"{path}:{n}"
        try:
            rows.append(dict(task=r["task"], labels=int(r["labels"]), unlabeled=int(r["unlabeled"]),
                             issue_usd=float(r["issue_usd"]), reported=r["reported"],
                             range=reported_range(r["reported"], where)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(e.args[0] if str(e).startswith(where) else f"{where}: {e}") from None
    return rows


def withheld_estimates(rows: list[dict], price: Callable[[dict], float]) -> list[dict]:
    """Each withheld point at `price`, and its residual estimated by scaling the issue's by that price over the
    price the issue tested: (low, high) of (1 + reported) x new / issue - 1."""
    out = []
    for r in rows:
        usd = price(r)
        ratio = usd / r["issue_usd"]
        out.append(dict(r, usd=usd, ratio=ratio, estimate=tuple((1 + x) * ratio - 1 for x in r["range"])))
    return out


def withheld_summary(rows: list[dict]) -> dict[str, dict]:
    """Per task: the points estimated within WITHHELD_BAR (their whole range), those whose range only reaches
    into it, and the median |estimate| (a range's middle)."""
    def closest(e):
        return 0.0 if e[0] <= 0 <= e[1] else min(map(abs, e))

    out = {}
    for task in sorted({r["task"] for r in rows}):
        mine = [r["estimate"] for r in rows if r["task"] == task]
        within = [max(map(abs, e)) <= WITHHELD_BAR for e in mine]
        out[task] = dict(points=len(mine), within=sum(within),
                         maybe=sum(not w and closest(e) <= WITHHELD_BAR for w, e in zip(within, mine)),
                         median=float(np.median([abs(sum(e) / 2) for e in mine])))
    return out


def withheld_table(rows: list[dict]) -> str:
    """Markdown: each withheld point, this fit's price and its estimated residual; then each task's summary."""
    pct = lambda e: f"{e[0]:+.0%}" if e[0] == e[1] else f"{e[0]:+.0%} to {e[1]:+.0%}"  # noqa: E731
    out = ["| task | L | U | issue's $ | issue: its residual | this fit's $ | this / issue's | estimated residual |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['task']} | {r['labels']} | {r['unlabeled']} | {r['issue_usd']:g} | {r['reported']} | "
                   f"{r['usd']:.1f} | {r['ratio']:.2f} | {pct(r['estimate'])} |")
    out.append("")
    for task, t in withheld_summary(rows).items():
        maybe = f" ({t['maybe']} more may be)" if t["maybe"] else ""
        out.append(f"- {task}: {t['within']} of {t['points']} points estimated within {WITHHELD_BAR:.0%}{maybe}; "
                   f"median |estimate| about {t['median']:.1%}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- output

def _per_task(points: list, result: Result) -> list[str]:
    lines = []
    for task in sorted({p["task"] for p in points}):
        mine = np.array([p["task"] == task for p in points])
        ins, loo = summary(result.in_sample[mine]), summary(result.loo[mine])
        lines += [f"[paper_rates.fit.per_task.{task}]", f"in_sample_median = {ins['median']:.4f}",
                  f"in_sample_max = {ins['max']:.4f}", f"loo_median = {loo['median']:.4f}", f"loo_max = {loo['max']:.4f}"]
    return lines


def _rate_lines(result: Result) -> list[str]:
    theta = dict(zip(columns(result.variant), result.theta))
    tflops = lambda per_flop: "inf" if per_flop == 0 else f"{1 / per_flop / 1e12:.4g}"  # noqa: E731
    lines = []
    for program in FITTED:
        encoder = theta.get((program, "encoder_flops"), theta.get((program, "flops")))
        lines += [f"[paper_rates.{program}]", f"effective_tflops = {tflops(encoder)}"]
        if (program, "decoder_flops") in theta:
            lines.append(f"decoder_effective_tflops = {tflops(theta[(program, 'decoder_flops')])}")
        lines.append(f"seconds_per_step = {theta[(program, 'steps')]:.4g}")
        if (program, "run") in theta:
            lines.append(f"seconds_per_run = {theta[(program, 'run')]:.4g}")
        lines.append(f"reference_params = {TEACHER.num_params()}  # T5 v1.1 XXL, the paper's teacher")
    return lines


def fitted_block(result: Result, points: list, date: str) -> str:
    ins, loo = summary(result.in_sample), summary(result.loo)
    lines = ["# BEGIN FITTED RATES (written by scripts/fit_paper_costs.py --write; edit the script, not these lines)",
             "# chip-seconds = encoder FLOPs / (effective_tflops x 1e12) + decoder FLOPs / (decoder_effective_tflops",
             "#               x 1e12) + steps x seconds_per_step x params / reference_params + seconds_per_run",
             "# (inf: the fit found no such term; no decoder rate: the encoder's). A100 GPU-seconds paid (all GPUs).",
             *_rate_lines(result),
             "[paper_rates.student_train]", "charged = false",
             'why_not = "the paper priced its annotation arm as labels only (U = 0 points cost exactly L x $/label)"',
             "[paper_rates.eval_decode]", "charged = false",
             'why_not = "the paper\'s compute costs count training and pseudo-labelling, not evaluation"',
             "[paper_rates.fit]", f"points = {len(points)}",
             f"tasks = {json.dumps(sorted({p['task'] for p in points}))}", f"terms = {json.dumps(result.variant.terms())}", f'inputs_length = "{result.variant.inputs}"',
             f'targets_length = "{result.variant.targets}"',
             f"in_sample_median_abs_residual = {ins['median']:.4f}", f"in_sample_max_abs_residual = {ins['max']:.4f}",
             f"loo_median_abs_residual = {loo['median']:.4f}", f"loo_max_abs_residual = {loo['max']:.4f}",
             f"loo_rms_residual = {loo['rms']:.4f}", f'date = "{date}"',
             'data = "doa_jax/experiment/paper_pareto.csv (../shared/reference/paper_results.md §7.2)"',
             *_per_task(points, result), "# END FITTED RATES"]
    return "\n".join(lines)


def tables(result: Result, points: list, data: dict) -> str:
    """Markdown: every term tried (leave-one-task-out and in-sample errors, and whether the model tried explains
    the main results' exceptions), every point's residuals, the main-results cells as the fit prices them, then
    the withheld tasks' points as estimated from issue 31's observations."""
    out = ["| step | term tried | LOO median | LOO max | LOO rms | in-sample median | in-sample max | "
           "explains §7.1's exceptions | withheld, estimated: within 25% (median) | kept |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    withheld = read_withheld()
    for step, name, variant, theta, ins, loo, kept in result.trials:
        explains = explains_main_results(check_main_results(variant, theta, points, data))
        estimated = withheld_summary(withheld_estimates(withheld, model_price(variant, theta, data)))
        out.append(f"| {step} | {name} | {loo['median']:.1%} | {loo['max']:.1%} | {loo['rms']:.1%} | "
                   f"{ins['median']:.1%} | {ins['max']:.1%} | {'yes' if explains else 'no'} | "
                   f"{withheld_cell(estimated)} | {'**yes**' if kept else 'no'} |")
    out += ["", "| task | L | U | paper compute $ | fitted $ | in-sample residual | leave-one-task-out residual |",
            "|---|---|---|---|---|---|---|"]
    for p, r, o in zip(points, result.in_sample, result.loo):
        out.append(f"| {p['task']} | {p['labels']} | {p['unlabeled']} | {p['compute_usd']:g} | "
                   f"{p['compute_usd'] * (1 + r):.1f} | {r:+.1%} | {o:+.1%} |")
    out += ["", main_results_table(check_main_results(result.variant, result.theta, points, data))]
    out += ["", withheld_table(withheld_estimates(read_withheld(), model_price(result.variant, result.theta, data)))]
    return "\n".join(out)


def withheld_cell(estimated: dict[str, dict]) -> str:
    """'wlp 8/10 (14.5%), fever 8+1/10 (6.0%)': points within the bar, those that may be, and the median."""
    def cell(task, t):
        maybe = f"+{t['maybe']}" if t["maybe"] else ""
        return f"{task} {t['within']}{maybe}/{t['points']} ({t['median']:.1%})"
    return ", ".join(cell(task, t) for task, t in estimated.items())


def every_model_table(rows: list[dict], chosen: Variant) -> str:
    """Markdown: the models of `every_model` that meet the leave-one-task-out bar, best first, and how many meet
    each bar. Models with the same fit (the same out-of-sample residuals and withheld prices: a term the fit
    gives no weight) share a row, named by the chosen model if it is among them, else by the fewest terms."""
    loo_ok = [r for r in rows if r["loo"]["median"] <= LOO_MEDIAN_BAR and r["loo"]["max"] <= LOO_MAX_BAR]
    groups: list[list[dict]] = []
    for r in sorted(loo_ok, key=lambda r: (r["loo"]["rms"], len(r["variant"].terms()))):
        same = next((g for g in groups if np.allclose(g[0]["fit"], r["fit"], rtol=1e-9, atol=1e-12)), None)
        if same is None:
            groups.append([r])
        else:
            same.append(r)
    out = ["| terms | LOO median | LOO max | LOO rms | withheld, estimated: within 25% (median) | "
           "meets every bar (on the estimates) |", "|---|---|---|---|---|---|"]
    for same in groups:
        r = next((x for x in same if x["variant"] == chosen), min(same, key=lambda x: len(x["variant"].terms())))
        terms = "; ".join(r["variant"].terms()) or "(start) FLOP and step terms at mean lengths"
        if r["variant"] == chosen:
            terms = f"**{terms}** (chosen)"
        if len(same) > 1:
            terms += f" (and {len(same) - 1} more with the same fit)"
        out.append(f"| {terms} | {r['loo']['median']:.1%} | {r['loo']['max']:.1%} | {r['loo']['rms']:.1%} | "
                   f"{withheld_cell(r['withheld'])} | {'yes' if meets_every_bar(r) else 'no'} |")
    every = [r for r in loo_ok if meets_every_bar(r)]
    out += ["", f"- {len(rows)} models; {len(loo_ok)} meet the leave-one-task-out bar (median at most "
            f"{LOO_MEDIAN_BAR:.0%}, none over {LOO_MAX_BAR:.0%}); {len(every)} of those also meet the withheld bar "
            f"on the estimates ({WITHHELD_WITHIN} of 10 within {WITHHELD_BAR:.0%}, median at most "
            f"{WITHHELD_MEDIAN:.0%}, on each task)"]
    for task in sorted(rows[0]["withheld"]):
        n = sum(meets_withheld(r["withheld"][task]) for r in loo_ok)
        out.append(f"- {task}: {n} of the {len(loo_ok)} meet its withheld bar on the estimates")
    return "\n".join(out)


def main_results_table(rows: list[dict]) -> str:
    """Markdown: each main-results cell, what the teacher costs and how many inputs the rest buys."""
    money = lambda usd, u: "- | -" if usd is None else f"{usd:.1f} | {'too little' if u is None else f'{u:,}'}"  # noqa: E731
    out = ["| task | L | extra $ | paper Ann. | paper Dist. | teacher $ (fit) | U bought (fit) | "
           "teacher $ (other three tasks' fit) | U bought (other three) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['task']} | {r['labels']} | {r['budget']:g} | {r['annotate']:g} | {r['distill']:g} | "
                   f"{money(r['teacher_usd'], r['unlabeled'])} | "
                   f"{money(r.get('loo_teacher_usd'), r.get('loo_unlabeled'))} |")
    return "\n".join(out)


def rewrite(text: str, begin: str, end: str, block: str, where) -> str:
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{where}: markers {begin!r} ... {end!r} not found")
    return pattern.sub(lambda _: block, text)


def lengths_block(lengths: dict, vocab_spec: dict) -> str:
    lines = ["# BEGIN MEASURED LENGTHS (written by scripts/fit_paper_costs.py --measure-lengths)", "[paper_lengths]",
             f"vocabulary_pieces = {vocab_spec['vocab_size'] - vocab_spec['extra_ids']}",
             f'vocabulary_sha256 = "{vocab_spec["sha256"]}"']
    for task, r in sorted(lengths.items()):
        lines += [f"[paper_lengths.{task}]", *(f"{k} = {v}" for k, v in r.items())]
    return "\n".join(lines + ["# END MEASURED LENGTHS"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite the fitted block of cost_profiles.toml and the "
                                                         "tables of notes/costs.md")
    ap.add_argument("--measure-lengths", action="store_true", help="re-measure the length statistics from the data")
    ap.add_argument("--vocab", help="SentencePiece model for --measure-lengths")
    ap.add_argument("--every-model", action="store_true", help="also fit every model the candidate terms make, and "
                                                               "say which meet issue 31's bars (about 10 s more; "
                                                               "--write always does)")
    args = ap.parse_args(argv)
    path = cost_profiles.PROFILES_FILE
    text, data, points = path.read_text(), cost_profiles._read_profiles(path), read_points()
    if args.measure_lengths:
        if not args.vocab:
            ap.error("--measure-lengths needs --vocab")
        lengths = measure_lengths(args.vocab, sorted({p["task"] for p in points} | EXTRAPOLATED),
                                  data["profiles"]["paper"]["batch_size"])
        from doa_jax.data.vocab import Vocabulary

        text = rewrite(text, "# BEGIN MEASURED LENGTHS", "# END MEASURED LENGTHS",
                       lengths_block(lengths, Vocabulary(args.vocab).spec()), path)
        data["paper_lengths"] = {**data.get("paper_lengths", {}), **lengths}
    result = run_fit(data, points)
    md = tables(result, points, data)
    if args.every_model or args.write:   # notes/costs.md cites the table: --write always writes it
        md += "\n\n" + every_model_table(every_model(points, data), result.variant)
    block = fitted_block(result, points, datetime.date.today().isoformat())
    print(md + "\n\n" + block)
    if args.write:
        path.write_text(rewrite(text, "# BEGIN FITTED RATES", "# END FITTED RATES", block, path))
        notes = NOTES.read_text()
        NOTES.write_text(rewrite(notes, "<!-- BEGIN FIT TABLES", "<!-- END FIT TABLES -->",
                                 "<!-- BEGIN FIT TABLES (scripts/fit_paper_costs.py --write) -->\n" + md
                                 + "\n<!-- END FIT TABLES -->", NOTES))
        print(f"\nwrote {path} and {NOTES}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
