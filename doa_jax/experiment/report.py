"""Reports: results rows -> report.md (tables) and PNG plots, beside the paper's published numbers.

Input is `results.jsonl` (one row per experiment cell and seed, as `doa run` / `doa sweep` /
`doa demo` write them). Cells are grouped by task, start labels, extra budget, strategy (and a
mixed cell's compute share) and models, and summarised as mean ± std over seeds. The paper's
numbers come from `paper_results.csv` (data transcribed from the authors' poster) and are shown
where a cell matches: its main results by extra budget (T5 v1.1 XXL ⇒ Small), its student- and
teacher-size tables by total budget (starting labels' cost + extra). A cell run with stand-in
models priced as other sizes (`priced_as`, e.g. the demo's) is matched to the paper's row for the
sizes it stands for.

A paper number stands beside a row as comparable only when everything that decides it matches
(`comparability`): the paper's protocol (`protocol: paper`), metric, the models themselves (not
stand-ins), start labels, budget, the paper's data (a card that carves its test split out of
another file is not the paper's split) and the paper's cost profile (`cost_profile.name ==
'paper'`; a row without one is priced at an assumed MFU, profile 'mfu'). Otherwise the number is
shown marked "not comparable", with every reason.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import io
import json
import math
import os
import pathlib
import random
from typing import Any, Callable, Iterable, Optional

from doa_jax import storage
from doa_jax.data import cards, demo as demo_task
from doa_jax.experiment import results as results_lib, strategies
from doa_jax.experiment.costs import PHASES  # the ledger's phases, in its order

PAPER_RESULTS = pathlib.Path(__file__).with_name("paper_results.csv")
METRIC_LABELS = {"f1": "F1", "accuracy": "accuracy", "bert_ibleu": "BERT-iBLEU"}
# The paper's models: its main results distill T5 v1.1 XXL into T5 v1.1 Small.
PAPER_STUDENT, PAPER_TEACHER = "t5_1_1_small", "t5_1_1_xxl"


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a results.jsonl (`results.read_rows`: a torn last line is skipped, a bad line is an
    error naming file and line); a missing file is an error."""
    if not storage.log_exists(path):
        raise FileNotFoundError(f"no results file at {path}")
    return results_lib.read_rows(path)


def read_paper_results(path: str | os.PathLike = PAPER_RESULTS) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        lines = [line for line in f if not line.startswith("#")]
    rows = []
    for row in csv.DictReader(lines):
        row["value"] = float(row["value"])
        row["start_labels"] = int(row["start_labels"])
        for key in ("extra_budget_usd", "total_budget_usd"):
            row[key] = float(row[key]) if row[key] else None
        rows.append(row)
    return rows


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


BOOTSTRAP_RESAMPLES = 500


def _example_scores(cell: Cell) -> Optional[list[tuple[Callable[[list[int]], float], int]]]:
    """Per seed, (a function scoring a resample (example indices) of its test predictions, the number
    of examples), or None when a row's `predictions.jsonl` lacks references (cells written before
    they kept them). A resample sums the metric's per-example statistics where it has them
    (`Card.example_statistics`), else re-scores the picked predictions."""
    try:
        card = demo_task.card() if cell.task == demo_task.NAME else cards.load_card(cell.task)
    except (FileNotFoundError, ValueError):
        return None
    scorers = []
    for out in cell.outputs:
        path = storage.path(out) / "predictions.jsonl"
        if not out or not path.exists():
            return None
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows or any("target" not in r for r in rows):
            return None
        scorers.append((_resample_scorer(card, rows, cell.protocol), len(rows)))
    return scorers


def _resample_scorer(card: cards.Card, rows: list[dict], protocol: str) -> Callable[[list[int]], float]:
    """`indices -> the card's primary metric` over those prediction rows (see `_example_scores`)."""
    predictions, targets = [r["prediction"] for r in rows], [r["target"] for r in rows]
    stats = card.example_statistics(predictions, targets, protocol=protocol)
    if stats is not None and card.primary_metric in stats.score([0]):
        return lambda idx: float(stats.score(idx)[card.primary_metric] or 0.0)

    def score(idx):
        picked = [rows[i] for i in idx]
        result = card.score([r["prediction"] for r in picked], [r["target"] for r in picked],
                            sources=[r.get("source", "") for r in picked], protocol=protocol)
        return float(result[card.primary_metric] or 0.0)
    return score


def bootstrap(cell: Cell, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Optional[tuple[float, float]]:
    """95% percentile interval of the cell's mean metric: seeds resampled when there are several, and
    each seed's test examples resampled when its predictions keep their references; None with one
    seed and no per-example predictions (nothing to resample)."""
    return _bootstrap(cell, _example_scores(cell) if cell.values else None, resamples, seed)


def attach_intervals(cells: Iterable[Cell]) -> None:
    """Sets each cell's `interval` (see `bootstrap`) and `examples_resampled`, which the report's
    header counts to say what its intervals resampled."""
    for c in cells:
        scorers = _example_scores(c) if c.values else None
        c.examples_resampled = bool(scorers)
        c.interval = _bootstrap(c, scorers)


def _bootstrap(cell: Cell, scorers: Optional[list], resamples: int = BOOTSTRAP_RESAMPLES,
               seed: int = 0) -> Optional[tuple[float, float]]:
    rng = random.Random(seed)
    if not cell.values or (len(cell.values) < 2 and not scorers):
        return None
    means = []
    for _ in range(resamples):
        seeds = [rng.randrange(len(cell.values)) for _ in cell.values]
        if scorers:
            vals = [scorers[i][0]([rng.randrange(scorers[i][1]) for _ in range(scorers[i][1])]) for i in seeds]
        else:
            vals = [cell.values[i] for i in seeds]
        means.append(sum(vals) / len(vals))
    means.sort()
    return means[int(0.025 * (resamples - 1))], means[int(0.975 * (resamples - 1))]


def distinguishable(a: Cell, b: Cell) -> Optional[bool]:
    """Whether two cells' 95% bootstrap intervals are disjoint (None when either has none)."""
    if a.interval is None or b.interval is None:
        return None
    return a.interval[1] < b.interval[0] or b.interval[1] < a.interval[0]


def paper_match(paper: list[dict], cell: Cell) -> Optional[dict]:
    """The paper's row for a cell: its main results (T5 v1.1 XXL ⇒ Small) by extra budget, else its
    student- or teacher-size tables by total budget (start labels' cost + extra). Stand-in models
    match the sizes they are priced as; main results also match other models (not comparable)."""
    if not cell.kind.in_paper:
        return None
    return (_paper_row(paper, cell, cell.as_student, cell.as_teacher)
            or _paper_row(paper, cell, PAPER_STUDENT, PAPER_TEACHER if cell.kind.uses_teacher else "", main_only=True))


def _paper_row(paper: list[dict], cell: Cell, student: str, teacher: str, main_only: bool = False) -> Optional[dict]:
    start_usd = cell.start_usd
    for p in paper:
        if not (p["task"] == cell.task and p["start_labels"] == cell.start_labels and p["strategy"] == cell.strategy
                and p["student"] == student and (p["teacher"] or "") == teacher):
            continue
        if main_only and p["table"] != "main":
            continue
        if p["table"] == "main" and p["extra_budget_usd"] == cell.extra_budget_usd:
            return p
        if (p["table"] != "main" and start_usd is not None and p["total_budget_usd"] is not None
                and abs(start_usd + cell.extra_budget_usd - p["total_budget_usd"]) < 0.5):
            return p
    return None


def paper_value(paper: list[dict], cell: Cell) -> Optional[float]:
    """The paper's number for a cell, if it has one (see `paper_match`; comparable or not)."""
    match = paper_match(paper, cell)
    return None if match is None else match["value"]


# The paper's metric name -> the row metrics it is (the paper's "F1" of Stanceosaurus is read as
# macro F1, the card's primary metric; its poster does not say macro or micro).
PAPER_METRICS = {"f1": ("f1", "macro_f1"), "accuracy": ("accuracy",), "bert_ibleu": ("bert_ibleu",)}


def data_reason(task: str) -> Optional[str]:
    """Why a task's splits are not the paper's, or None: a test split carved out of another file."""
    try:
        card = cards.load_card(task)
    except (FileNotFoundError, ValueError):
        return f"no task card {task!r} to check its data"
    if "test" in card.pool_fractions:
        return (f"data: test, train and unlabeled carved from {card.files[card.carve_from]} (the paper's training "
                f"file and unlabeled pool for {card.name} are not released)")
    return None


def comparability(cell: Cell, match: dict) -> list[str]:
    """Why the paper's number `match` is not comparable with `cell` ([] when it is)."""
    reasons = []
    if cell.protocol != "paper":
        reasons.append(f"protocol {cell.protocol} (paper: the released code's; run with protocols/paper.gin)")
    if cell.metric not in PAPER_METRICS.get(match["metric"], (match["metric"],)):
        reasons.append(f"metric {cell.metric} (paper: {match['metric']})")
    teacher = cell.teacher if cell.kind.uses_teacher else ""
    if (cell.student, teacher) != (match["student"], match["teacher"] or ""):
        paper_models = " ⇒ ".join(m.replace("t5_1_1_", "") for m in (match["teacher"], match["student"]) if m)
        reasons.append(f"models {cell.models} (paper: {paper_models})")
    data = data_reason(cell.task)
    if data:
        reasons.append(data)
    if cell.cost_profile != "paper":
        reasons.append(f"cost profile {cell.cost_profile} (paper: the paper's own)")
    return reasons


def paper_comparison(paper: list[dict], cell: Cell) -> tuple[Optional[float], list[str]]:
    """(the paper's number or None, reasons it is not comparable: [] = comparable)."""
    match = paper_match(paper, cell)
    return (None, []) if match is None else (match["value"], comparability(cell, match))


def _paper_cell(paper: list[dict], cell: Cell) -> str:
    value, reasons = paper_comparison(paper, cell)
    if value is None:
        return ""
    return f"{value:.1f}" if not reasons else f"{value:.1f} (not comparable)"


def pareto_frontier(points: list[tuple[float, Optional[float]]]) -> list[tuple[float, float]]:
    """Points not dominated by a cheaper-or-equal point with a higher-or-equal metric. A metric of
    0 (or None/NaN) is a run that learned nothing: never the frontier, however little it spent."""
    frontier, best = [], -math.inf
    scored = [(cost, value) for cost, value in points if value is not None and value > 0]
    for cost, value in sorted(scored, key=lambda p: (p[0], -p[1])):
        if value > best:
            frontier.append((cost, value))
            best = value
    return frontier


def _fmt(cell: Cell) -> str:
    if not cell.values:
        return "infeasible"
    text = f"{cell.mean:.1f} ± {cell.std:.1f}" if len(cell.values) > 1 else f"{cell.mean:.1f}"
    return text + (f" [{cell.interval[0]:.1f}, {cell.interval[1]:.1f}]" if cell.interval else "")


def _money(x: Optional[float]) -> str:
    """Dollars with cents; amounts under a cent keep two significant digits (not a misleading 0.00)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:,.2f}" if x == 0 or abs(x) >= 0.01 else f"{x:.2g}"


def _notes(cell: Cell) -> str:
    notes = []
    repeats = len(cell.seeds) - len(set(cell.seeds))
    if repeats:
        notes.append(f"{repeats} row(s) repeat a seed: results of different configs are averaged here "
                     f"(their cell_key differs)")
    if cell.capped:
        notes.append(f"{cell.capped}/{len(cell.values)} stopped at the budget cap")
    if cell.infeasible and cell.values:
        notes.append(f"{cell.runs - len(cell.values)}/{cell.runs} infeasible: " + "; ".join(cell.infeasible))
    elif cell.infeasible:
        notes.append("; ".join(cell.infeasible))
    return "; ".join(notes)


def winners(cells: list[Cell], paper: list[dict]) -> list[dict[str, Any]]:
    """Per task, start and extra budget with both Ann. and Dist.: which wins here and in the paper."""
    out = []
    by = collections.defaultdict(dict)
    for c in cells:
        if c.kind.in_paper:
            by[(c.task, c.start_labels, c.extra_budget_usd)].setdefault(c.strategy, c)
    for (task, start, extra), pair in sorted(by.items()):
        if len(pair) < 2:
            continue
        ann, dist = (pair[name] for name in strategies.PAPER)
        row = {"task": task, "start_labels": start, "extra_budget_usd": extra, "mine": None, "paper": None}
        if ann.values and dist.values:
            row["mine"] = dist.mean - ann.mean
            row["distinguishable"] = distinguishable(ann, dist)
            row["nothing_learned"] = ann.mean == 0 and dist.mean == 0
        pa, pd = paper_value(paper, ann), paper_value(paper, dist)
        if pa is not None and pd is not None:
            row["paper"] = pd - pa
        out.append(row)
    return out


def _winner(margin: Optional[float]) -> str:
    if margin is None:
        return ""
    if margin == 0:
        return "tie"
    return f"{'Dist.' if margin > 0 else 'Ann.'} by {abs(margin):.1f}"


def _this_run(w: dict[str, Any]) -> str:
    """This run's verdict in the Ann. vs Dist. table."""
    if w.get("nothing_learned"):
        return "no answer: both arms scored 0 (nothing learned)"
    return (_winner(w["mine"]) or "n/a") + (
        " (not distinguishable: 95% intervals overlap)" if w.get("distinguishable") is False else "")


def render_markdown(cells: list[Cell], paper: list[dict], plots: list[str],
                    progress: Optional[tuple[int, int]] = None) -> str:
    out = ["# doa-jax report", ""]
    if progress is not None:
        done, total = progress
        out += [f"Sweep progress: {done} of {total} cells have a result"
                + ("." if done >= total else f"; rerun the same `doa sweep` command to run the other {total - done}."),
                ""]
    profiles = sorted({c.cost_profile for c in cells})
    out += ["Mean ± std over seeds (n = seeds with a result), then " + interval_text(cells)
            + " `extra $` is the budget on top of the starting "
            "labels; `spent $` is what the run spent of it (labels bought + teacher fine-tuning + teacher "
            "inference + student training, compute priced by the row's `cost profile`: `paper` = the paper's "
            "own accounting fitted to its published costs, `calibrated` = throughput measured by `doa calibrate`, "
            "`mfu` = an ASSUMED utilisation, not a measurement); `total $` adds the starting labels' cost. `paper` is "
            "the published PyTorch result (Kang, Xu, Ritter, ACL 2023; HF T5 v1.1, A100 at $1.875/GPU-hour) "
            "for the same task, starting labels, budget, strategy and models, where one exists; models "
            "written `A as B` are stand-ins priced as B. A paper number is comparable only when protocol, "
            "metric, models, start labels, budget, data and cost profile all match; otherwise it is marked "
            "`(not comparable)` and the section *Comparison with the paper* says why. `marginal $ / point`: "
            "the extra $ spent over the next smaller budget of the same arm, per metric point gained there "
            "(is the next budget step worth it?).", ""]
    if len(profiles) > 1:
        out += [f"**Rows here were priced under different cost profiles ({', '.join(profiles)}): their dollars "
                "are not comparable with each other.**", ""]
    out += ["## Results", "",
            "| task | start labels | extra $ | strategy | protocol | cost profile | metric | value | n | paper | spent $ | "
            "total $ | marginal $ / point | models | notes |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    marginal = marginal_usd_per_point(cells)
    for c in cells:
        total = None if c.start_usd is None or not c.values else c.start_usd + c.mean_spent
        out.append(f"| {c.task} | {c.start_labels} | {c.extra_budget_usd:g} | {c.label} | {c.protocol} | "
                   f"{profile_label(c.cost_profile, c.cost_fit)} | "
                   f"{c.metric} | "
                   f"{_fmt(c)} | {len(c.values)} | {_paper_cell(paper, c)} | "
                   f"{_money(c.mean_spent) if c.values else ''} | {_money(total)} | "
                   f"{marginal.get(id(c), '')} | {c.models} | {_notes(c)} |")
    out += _comparison_section(cells, paper)
    wins = winners(cells, paper)
    if wins:
        out += ["", "## Ann. vs Dist.", "",
                "The paper's question per budget: which arm gives the better metric, and by how many points.", "",
                "| task | start labels | extra $ | this run | paper |", "|---|---|---|---|---|"]
        out += [f"| {w['task']} | {w['start_labels']} | {w['extra_budget_usd']:g} | {_this_run(w)} | "
                f"{_winner(w['paper'])} |" for w in wins]
    out += ["", "## Cost breakdown by phase (mean $ per run)", "",
            "Projected $ per phase (what the budget is charged; evaluation is reported but not charged), "
            "and `measured $`: this machine's accelerator-seconds × its own rate card.", "",
            "| task | start labels | extra $ | strategy | " + " | ".join(PHASES) + " | total | measured $ |",
            "|---|---|---|---|" + "---|" * (len(PHASES) + 2)]
    for c in cells:
        if c.values:
            out.append(f"| {c.task} | {c.start_labels} | {c.extra_budget_usd:g} | {c.label} | "
                       + " | ".join(_money(c.phases[p]) for p in PHASES)
                       + f" | {_money(c.mean_spent)} | {_money(c.mean_measured)} |")
    infeasible = [c for c in cells if c.infeasible]
    if infeasible:
        out += ["", "## Infeasible cells", ""]
        out += [f"- {c.task}, {c.start_labels} labels, +${c.extra_budget_usd:g}, {c.label}: "
                + "; ".join(c.infeasible) for c in infeasible]
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def interval_text(cells: list[Cell]) -> str:
    """What the report's 95% intervals resampled, counted from its cells (not a fixed claim)."""
    done = [c for c in cells if c.values]
    if not done:
        return "[a 95% bootstrap interval] of the mean: no cell has a result, so there is none."
    examples = [c for c in done if c.interval is not None and c.examples_resampled]
    seeds_only = [c for c in done if c.interval is not None and not c.examples_resampled]
    none = [c for c in done if c.interval is None]
    its = lambda group: "its" if len(group) == 1 else "their"   # noqa: E731
    parts = []
    if examples:
        several = sum(len(c.values) > 1 for c in examples)
        parts.append(f"{len(examples)} resampled the test examples of {its(examples)} seeds' predictions.jsonl "
                     "(they keep references)" + (f", {several} of them the seeds too" if several else ""))
    if seeds_only:
        parts.append(f"{len(seeds_only)} resampled {its(seeds_only)} seeds only (no per-example predictions)")
    if none:
        parts.append(f"{len(none)} {'has' if len(none) == 1 else 'have'} no interval (one seed and no "
                     "per-example predictions)")
    seeds = sorted({len(c.values) for c in done})
    return (f"[a 95% bootstrap interval] of the mean ({BOOTSTRAP_RESAMPLES} resamples). Of the {len(done)} "
            f"cell(s) with a result, " + "; ".join(parts)
            + f". Seeds per cell: {seeds[0]}" + (f" to {seeds[-1]}." if len(seeds) > 1 else "."))


def marginal_usd_per_point(cells: list[Cell]) -> dict[int, str]:
    """Per cell (by id), what its extra points cost over the next smaller budget of the same task,
    start, strategy, models and protocol: (Δ spent $) / (Δ metric). It answers "is the next budget
    step worth it?", which spent $ over the absolute metric (the old "$ / point") did not."""
    groups: dict[tuple, list[Cell]] = collections.defaultdict(list)
    for c in cells:
        if c.values:
            groups[(c.task, c.start_labels, c.strategy, c.compute_share, c.models, c.protocol, c.cost_profile)].append(c)
    out = {}
    for members in groups.values():
        members.sort(key=lambda c: c.extra_budget_usd)
        for prev, cur in zip(members, members[1:]):
            gain = cur.mean - prev.mean
            out[id(cur)] = (f"{(cur.mean_spent - prev.mean_spent) / gain:,.2f}" if gain > 0
                            else f"no gain ({gain:+.1f})")
    return out


def _comparison_section(cells: list[Cell], paper: list[dict]) -> list[str]:
    """One line per row that has a paper number: comparable, or not and why."""
    lines = []
    for c in cells:
        value, reasons = paper_comparison(paper, c)
        if value is not None:
            verdict = "comparable" if not reasons else "not comparable: " + "; ".join(reasons)
            lines.append(f"| {c.task} | {c.start_labels} | {c.extra_budget_usd:g} | {c.label} | {c.protocol} | "
                         f"{value:.1f} | {verdict} |")
    if not lines:
        return []
    return ["", "## Comparison with the paper", "",
            "| task | start labels | extra $ | strategy | protocol | paper | comparable? |",
            "|---|---|---|---|---|---|---|"] + lines


# ----------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_label(metric: str) -> str:
    return f"{METRIC_LABELS.get(metric, metric)} (%)" if metric else "metric (%)"


def _start_short(start: int) -> str:
    return f"{start / 1000:g}K" if start >= 1000 and start % 100 == 0 else str(start)


def _start_text(task: str, start: int) -> str:
    rate = label_cost_usd(task)
    return f"{_start_short(start)} start labels" + ("" if rate is None else f" (${start * rate:,.0f})")


def profile_label(name: str, fit: str = "") -> str:
    """A cost profile's name as tables and plots show it: `mfu` is an assumption and says so, and a
    `paper` price for a task outside its fit says it is an extrapolation (`fit`, see `row_cost_fit`)."""
    label = f"{name} (ASSUMED)" if name == "mfu" else name
    return f"{label} ({fit})" if fit else label


INTERVAL_LABEL = "error bars: 95% bootstrap interval"


def _error_bar(c: Cell) -> tuple[float, float]:
    """Below/above the mean: the cell's 95% bootstrap interval, the one the report's table prints
    (none, 0 and 0, when the cell has no interval)."""
    if c.interval is None:
        return 0.0, 0.0
    return max(c.mean - c.interval[0], 0.0), max(c.interval[1] - c.mean, 0.0)


def _interval_key():
    """A legend entry saying what the error bars are."""
    from matplotlib.lines import Line2D

    return Line2D([], [], color="0.2", marker="|", ms=12, mew=1.5, ls="none", label=INTERVAL_LABEL)


def usd_decimals(values: Iterable[float], most: int = 6) -> int:
    """The fewest decimals (at most `most`) that write every value exactly: tick labels then follow
    the tick step ($52.5, not a rounded $52) and stay distinct however close the ticks are."""
    values = list(values)
    for d in range(most + 1):
        if all(abs(v - round(v, d)) <= 1e-9 * max(1.0, abs(v)) for v in values):
            return d
    return most


def _usd_formatter():
    """A matplotlib tick formatter: '$' and as many decimals as the axis's ticks need (`usd_decimals`)."""
    from matplotlib import ticker

    class UsdFormatter(ticker.Formatter):
        decimals = 0

        def set_locs(self, locs):
            super().set_locs(locs)
            self.decimals = usd_decimals(locs)

        def __call__(self, x, pos=None):
            return f"${x:,.{self.decimals}f}"

    return UsdFormatter()


def _draw_this_run(ax, mine: list[Cell], x_of: Callable[[Cell], float]) -> list[float]:
    """This run's cells, one line per start size and strategy, each cell with its interval; returns
    the y extents drawn."""
    starts = sorted({c.start_labels for c in mine})
    linestyles = ("-", "--", ":", "-.")
    ys: list[float] = []
    for si, start in enumerate(starts):
        for strategy in strategies.NAMES:
            kind = strategies.TABLE[strategy]
            group = sorted((c for c in mine if c.strategy == strategy and c.start_labels == start), key=x_of)
            if not group:
                continue
            label = kind.label + (f" {_start_short(start)}" if len(starts) > 1 else "")
            low, high = zip(*(_error_bar(c) for c in group))
            ax.errorbar([x_of(c) for c in group], [c.mean for c in group], yerr=[low, high],
                        marker=kind.marker, color=kind.color, capsize=3,
                        ls=linestyles[si % len(linestyles)], label=f"{label} (this run)")
            ys += [c.mean + h for c, h in zip(group, high)] + [c.mean - lo for c, lo in zip(group, low)]
    return ys


def _draw_paper_points(ax, paper: list[dict], task: str, starts: list[int]) -> list[float]:
    """The paper's main cells for the same start sizes (hollow markers, at their budgets); returns
    their values."""
    rate, ys = label_cost_usd(task), []
    for strategy in strategies.PAPER:
        kind = strategies.TABLE[strategy]
        labelled = False
        for start in starts:
            pts = sorted((start * rate + p["extra_budget_usd"], p["value"]) for p in paper
                         if p["table"] == "main" and p["task"] == task and p["strategy"] == strategy
                         and p["start_labels"] == start)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=kind.marker, ls=":",
                        mfc="none", color=kind.color, alpha=0.8,
                        label=None if labelled else f"{kind.label} (paper, at its budget)")
                labelled = True
                ys += [p[1] for p in pts]
    return ys


def plot_cost_vs_metric(cells: list[Cell], task: str, path: pathlib.Path, paper: Optional[list[dict]] = None):
    """Metric vs total cost (starting labels + extra spent) per strategy, with each cell's 95%
    bootstrap interval (the table's), this run's Pareto frontier marked (cells that scored 0 are not
    on it), and the paper's cells for the same start sizes; the x label names the cost profile(s)
    that priced the compute. Returns the figure (closed), for callers that inspect what was drawn."""
    plt = _pyplot()
    mine = [c for c in cells if c.task == task and c.values]
    with_start = all(c.start_usd is not None for c in mine)

    def x_of(c: Cell) -> float:
        return c.mean_spent + (c.start_usd if with_start else 0.0)

    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    ys = _draw_this_run(ax, mine, x_of)
    if paper and with_start:
        ys += _draw_paper_points(ax, paper, task, sorted({c.start_labels for c in mine}))
    frontier = pareto_frontier([(x_of(c), c.mean) for c in mine])
    if frontier:
        ax.plot([p[0] for p in frontier], [p[1] for p in frontier], color="0.3", lw=7, alpha=0.25, zorder=0,
                solid_capstyle="round", marker="o", ms=15, label="Pareto frontier (this run)")
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    span = max(hi - lo, 5.0)
    # A line plot need not start at 0: room below the lowest point, and above for the legend.
    ax.set_ylim(max(lo - 0.15 * span, -0.03 * span), hi + 0.5 * span)
    ax.xaxis.set_major_formatter(_usd_formatter())
    priced = ", ".join(profile_label(*p) for p in sorted({(c.cost_profile, c.cost_fit) for c in mine})) or "?"
    # Two lines: on one, the profile's name ran past the figure's right edge.
    ax.set_xlabel(("total cost (USD): starting labels + extra spent" if with_start else "extra spent (USD)")
                  + f"\ncompute priced by cost profile {priced}")
    ax.set_ylabel(metric_label(mine[0].metric if mine else ""))
    ax.set_title(f"{task}: {METRIC_LABELS.get(mine[0].metric, mine[0].metric) if mine else 'metric'} vs cost"
                 + (f" (protocol {mine[0].protocol})" if mine else ""))
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if any(c.interval is not None for c in mine):
        handles.append(_interval_key())
    ax.legend(handles=handles, fontsize=8, loc="upper left", ncol=2, framealpha=0.9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return fig


def _draw_bar(ax, x: float, width: float, cell: Cell, value: float, is_paper: bool):
    """One bar, this run's with its 95% bootstrap interval; returns (the bar, the top of what it drew)."""
    low, high = (0.0, 0.0) if is_paper else _error_bar(cell)
    bar = ax.bar(x, value, width, color=strategies.TABLE[cell.strategy].color, alpha=0.4 if is_paper else 0.9,
                 hatch="//" if is_paper else None, edgecolor="0.25" if is_paper else None,
                 yerr=None if is_paper or cell.interval is None else [[low], [high]], capsize=2)
    ax.annotate(f"{value:.1f}", (x, value + high), xytext=(0, 2),
                textcoords="offset points", ha="center", va="bottom", fontsize=7)
    return bar, value + high


def plot_budget_bars(cells: list[Cell], paper: list[dict], task: str, path: pathlib.Path):
    """Bars per extra budget (one panel per start size): each strategy's result with its 95%
    bootstrap interval (the table's) and the paper's bar (hatched) beside it, values printed on the
    bars. Returns the figure (closed), for callers that inspect what was drawn."""
    plt = _pyplot()
    mine = [c for c in cells if c.task == task]
    starts = sorted({c.start_labels for c in mine if c.values}) or sorted({c.start_labels for c in mine})
    with_paper = any(paper_value(paper, c) is not None for c in mine)
    series = [(s, is_paper) for s in strategies.NAMES for is_paper in (False, True)
              if any(c.strategy == s for c in mine) and (not is_paper or (with_paper and strategies.TABLE[s].in_paper))]
    fig, axes = plt.subplots(1, len(starts), figsize=(max(6.4, 4.2 * len(starts) + 1.6), 4.8), dpi=120,
                             squeeze=False, sharey=True)
    width = 0.8 / max(len(series), 1)
    top, handles = 1.0, {}
    for ax, start in zip(axes[0], starts):
        here = [c for c in mine if c.start_labels == start]
        budgets = sorted({c.extra_budget_usd for c in here})
        for i, (strategy, is_paper) in enumerate(series):
            for j, b in enumerate(budgets):
                cell = next((c for c in here if c.extra_budget_usd == b and c.strategy == strategy), None)
                if cell is None:
                    continue
                x = j + (i - (len(series) - 1) / 2) * width
                value = paper_value(paper, cell) if is_paper else (cell.mean if cell.values else None)
                if value is None:
                    if not is_paper:
                        ax.text(x, 0.5, "infeasible", rotation=90, ha="center", va="bottom", fontsize=7)
                    continue
                bar, drawn_top = _draw_bar(ax, x, width, cell, value, is_paper)
                top = max(top, drawn_top)
                source = "paper" if is_paper else "this run"
                handles[(strategy, is_paper)] = (bar, f"{strategies.TABLE[strategy].label} ({source})")
        ax.set_xticks(range(len(budgets)), [f"+${b:g}" for b in budgets])
        ax.set_xlabel("extra budget (USD)")
        ax.set_title(_start_text(task, start), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylim(0, top * 1.2)
    metric = next((c.metric for c in mine if c.metric), "")
    axes[0][0].set_ylabel(metric_label(metric))
    protocol = next((c.protocol for c in mine), "efficient")
    # Two short lines, so a narrow (one-panel) figure does not clip the title at its edges.
    fig.suptitle(f"{task}: {METRIC_LABELS.get(metric, metric or 'metric')} per extra budget (protocol {protocol})\n"
                 + ("this run and the paper" if with_paper else "the paper has no result for these cells"),
                 fontsize=11)
    ordered = [handles[k] for k in series if k in handles]
    if any(c.interval is not None for c in mine):
        ordered.append((_interval_key(), INTERVAL_LABEL))
    ncol = max(min(len(ordered), int(fig.get_figwidth() // 2.1)), 1)   # columns that fit the figure's width
    fig.legend([h for h, _ in ordered], [lbl for _, lbl in ordered], loc="lower center", ncol=ncol,
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.05 * math.ceil(len(ordered) / ncol), 1, 1))
    _save(fig, path)
    plt.close(fig)
    return fig


def _save(fig, path) -> None:
    """Saves a figure (PNG) to a local path or a URL, all at once (`storage.write_atomic`): a kill
    leaves the old figure or the new one, and a flaky store's write is retried."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    storage.write_atomic(path, buf.getvalue())


def sweep_progress(run_dir: pathlib.Path, rows: list[dict]) -> Optional[tuple[int, int]]:
    """(cells with a row, cells in the grid) when RUN_DIR holds a sweep's sweep.json."""
    state = run_dir / results_lib.SWEEP_STATE_FILE
    if not state.exists():
        return None
    try:
        keys = [c["cell_key"] for c in json.loads(state.read_text())["cells"]]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    have = {r.get("cell_key") for r in rows}
    return sum(k in have for k in keys), len(keys)


def write_report(run_dir: str | os.PathLike, results: Optional[str | os.PathLike] = None) -> pathlib.Path:
    """Writes RUN_DIR/report.md and RUN_DIR/plots/*.png from RUN_DIR/results.jsonl; returns report.md."""
    run_dir = storage.path(run_dir)
    rows = read_results(results or run_dir / results_lib.RESULTS_FILE)
    if not rows:
        raise ValueError(f"{results or run_dir / results_lib.RESULTS_FILE} has no result rows")
    cells, paper = summarise(rows), read_paper_results()
    attach_intervals(cells)
    plot_dir = run_dir / "plots"
    storage.makedirs(plot_dir)
    plots = []
    for task in sorted({c.task for c in cells if c.values}):
        protocols = sorted({c.protocol for c in cells if c.task == task})
        for protocol in protocols:   # one figure per protocol: its cells are not the other's
            mine = [c for c in cells if c.protocol == protocol]
            stem = task if len(protocols) == 1 else f"{task}_{protocol}"
            for name, draw in ((f"{stem}_cost_vs_metric.png", lambda p: plot_cost_vs_metric(mine, task, p, paper)),
                               (f"{stem}_budget_bars.png", lambda p: plot_budget_bars(mine, paper, task, p))):
                draw(plot_dir / name)
                plots.append(f"plots/{name}")
    report = run_dir / "report.md"
    storage.write_atomic(report, render_markdown(cells, paper, plots, sweep_progress(run_dir, rows)))
    return report
