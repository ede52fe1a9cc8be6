"""Results rows -> cells: rows grouped by task, start labels, extra budget, strategy (and a mixed
cell's compute share), models, protocol and cost profile, each summarised over its seeds; and the
names tables and plots give a cell's metric and cost profile."""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import pathlib
from typing import Any, Iterable, Optional

from doa_jax import storage
from doa_jax.data import cards, demo as demo_task
from doa_jax.experiment import results as results_lib, strategies
from doa_jax.experiment.costs import PHASES  # the ledger's phases, in its order

METRIC_LABELS = {"f1": "F1", "accuracy": "accuracy", "bert_ibleu": "BERT-iBLEU"}



def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a results.jsonl (`results.read_rows`: a torn last line is skipped, a bad line is an
    error naming file and line); a missing file is an error."""
    if not storage.log_exists(path):
        raise FileNotFoundError(f"no results file at {path}")
    return results_lib.read_rows(path)


def model_name(name: Optional[str]) -> str:
    """A size as the paper's table names it: 'xxl' and 't5_1_1_xxl' are both 't5_1_1_xxl'."""
    if not name:
        return ""
    return name if name.startswith(("t5_", "custom")) else f"t5_1_1_{name}"


def task_name(task: str) -> str:
    """The task's card name ('demo' is the built-in task; a card path names its card)."""
    if task == "demo":
        return demo_task.NAME
    return pathlib.Path(task).stem if task.endswith(".toml") else task


@functools.lru_cache(maxsize=None)
def label_cost_usd(task: str) -> Optional[float]:
    """$ per label from the task's card (None when the card cannot be found)."""
    if task == demo_task.NAME:
        return demo_task.ANNOTATION_COST_USD
    try:
        return cards.load_card(task).annotation_cost_usd
    except (FileNotFoundError, ValueError):
        return None


@dataclasses.dataclass
class Cell:
    """One experiment cell summarised over its seeds."""

    task: str
    start_labels: int
    extra_budget_usd: float
    strategy: str
    student: str
    teacher: str
    metric: str
    values: list[float]
    spent: list[float]
    phases: dict[str, float]
    infeasible: list[str]
    compute_share: Optional[float] = None
    priced_student: str = ""     # the size the student is priced (and compared) as, if not its own
    priced_teacher: str = ""
    measured: list[float] = dataclasses.field(default_factory=list)
    capped: int = 0
    runs: int = 0                # rows, feasible or not
    seeds: list[int] = dataclasses.field(default_factory=list)    # of the rows with a result
    protocol: str = "efficient"
    cost_profile: str = "mfu"
    cost_fit: str = ""           # e.g. "extrapolated, ±5%": the `paper` profile was not fitted to this task
    outputs: list[str] = dataclasses.field(default_factory=list)   # cell dirs of the rows with a result
    interval: Optional[tuple[float, float]] = None                 # 95% bootstrap interval (see `bootstrap`)
    examples_resampled: bool = False     # whether `interval` resampled test examples (see `attach_intervals`)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        if len(self.values) < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (len(self.values) - 1))

    @property
    def mean_spent(self) -> float:
        return sum(self.spent) / len(self.spent) if self.spent else math.nan

    @property
    def mean_measured(self) -> float:
        return sum(self.measured) / len(self.measured) if self.measured else math.nan


    @property
    def start_usd(self) -> Optional[float]:
        rate = label_cost_usd(self.task)
        return None if rate is None else self.start_labels * rate

    @property
    def as_student(self) -> str:
        return self.priced_student or self.student

    @property
    def as_teacher(self) -> str:
        return (self.priced_teacher or self.teacher) if self.kind.uses_teacher else ""

    @property
    def label(self) -> str:
        name = self.kind.label
        if self.kind.splits_budget and self.compute_share is not None:
            name += f" ({self.compute_share:.0%} compute)"
        return name

    @property
    def models(self) -> str:
        def one(actual: str, priced: str) -> str:
            short = actual.replace("t5_1_1_", "")
            return f"{short} as {priced.replace('t5_1_1_', '')}" if priced and priced != actual else short

        student = one(self.student, self.priced_student)
        return f"{one(self.teacher, self.priced_teacher)} ⇒ {student}" if self.kind.uses_teacher else student

    @property
    def kind(self) -> strategies.Strategy:
        return strategies.get(self.strategy)


def _group_key(r: dict[str, Any]) -> tuple:
    priced = r.get("priced_as") or {}
    kind = strategies.get(r["strategy"])
    distills = kind.uses_teacher
    return (task_name(r["task"]), int(r.get("start_labels", 0)), float(r["extra_budget_usd"]), r["strategy"],
            model_name(r.get("student", "")), model_name(r.get("teacher", "")) if distills else "",
            float(r["compute_share"]) if kind.splits_budget and r.get("compute_share") is not None else None,
            model_name(priced.get("student")), model_name(priced.get("teacher")) if distills else "",
            row_protocol(r), row_cost_profile(r))


def row_protocol(r: dict[str, Any]) -> str:
    """A row's protocol; rows written before protocols existed were 'efficient'."""
    return r.get("protocol") or "efficient"


def row_cost_profile(r: dict[str, Any]) -> str:
    """A row's cost profile name; rows without one were priced at an assumed MFU ('mfu')."""
    profile = r.get("cost_profile")
    return (profile.get("name") if isinstance(profile, dict) else profile) or "mfu"


def row_cost_fit(r: dict[str, Any]) -> str:
    """"extrapolated, ±X% (up to Y%)" when the row's profile was not fitted to its task (the `paper` profile
    outside the tasks of its fit; X and Y: its leave-one-task-out error), else ""."""
    profile = r.get("cost_profile")
    fit = profile.get("fit") if isinstance(profile, dict) else None
    if not isinstance(fit, dict) or fit.get("status") != "extrapolation":
        return ""
    error = fit.get("expected_error", {})
    return f"extrapolated, ±{error.get('median', math.nan):.0%} (up to {error.get('max', math.nan):.0%})"


def summarise(rows: Iterable[dict[str, Any]]) -> list[Cell]:
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in rows:
        groups[_group_key(r)].append(r)
    cells = []
    order = {s: i for i, s in enumerate(strategies.NAMES)}
    for key, members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], order.get(kv[0][3], 9),
                                                               kv[0][4:6], kv[0][6] or 0.0, kv[0][7:])):
        task, start, extra, strategy, student, teacher, share, p_student, p_teacher, protocol, profile = key
        ok = [m for m in members if m.get("status", "ok") != "infeasible" and m.get("value") is not None]
        phases = {p: (sum((m.get("spent_usd") or {}).get(p, 0.0) for m in ok) / len(ok) if ok else 0.0)
                  for p in PHASES}
        metric = next((m["metric"] for m in members if m.get("metric")), "")
        cells.append(Cell(task, start, extra, strategy, student, teacher, metric,
                          values=[float(m["value"]) for m in ok],
                          spent=[float(m.get("spent_total_usd") or 0.0) for m in ok], phases=phases,
                          infeasible=sorted({m.get("reason", "") for m in members if m not in ok}),
                          compute_share=share, priced_student=p_student, priced_teacher=p_teacher,
                          measured=[float(m["measured_usd"]) for m in ok if m.get("measured_usd") is not None],
                          capped=sum(m.get("status") == "capped" for m in ok), runs=len(members),
                          seeds=[m.get("seed", 0) for m in ok],
                          protocol=protocol, cost_profile=profile,
                          cost_fit=next((f for f in map(row_cost_fit, members) if f), ""),
                          outputs=[m.get("output") or "" for m in ok]))
    return cells


def metric_label(metric: str) -> str:
    return f"{METRIC_LABELS.get(metric, metric)} (%)" if metric else "metric (%)"


def profile_label(name: str, fit: str = "") -> str:
    """A cost profile's name as tables and plots show it: `mfu` is an assumption and says so, and a
    `paper` price for a task outside its fit says it is an extrapolation (`fit`, see `row_cost_fit`)."""
    label = f"{name} (ASSUMED)" if name == "mfu" else name
    return f"{label} ({fit})" if fit else label

