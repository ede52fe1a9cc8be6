"""Reports: results rows -> report.md (tables) and PNG plots, beside the paper's published numbers.

Input is `results.jsonl` (one row per experiment cell and seed, as `doa run` / `doa sweep` write
them). Cells are grouped by (task, start labels, extra budget, strategy, student, teacher) and
summarised as mean ± std over seeds. The paper's numbers come from `paper_results.csv` (data
transcribed from the authors' poster) and are shown where a cell matches.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Iterable, Optional

PAPER_RESULTS = pathlib.Path(__file__).with_name("paper_results.csv")
PHASES = ("labels", "teacher_finetune", "teacher_inference", "student_training", "evaluation")
STRATEGY_LABELS = {"annotate": "Ann.", "distill": "Dist.", "mixed": "Mixed"}


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a results.jsonl; a bad line is an error naming file and line."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results file at {path}")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        missing = [k for k in ("task", "strategy", "extra_budget_usd", "metric", "value") if k not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: results row lacks {', '.join(missing)}")
        rows.append(row)
    return rows


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
    def usd_per_point(self) -> float:
        return self.mean_spent / self.mean if self.values and self.mean > 0 else math.nan


def summarise(rows: Iterable[dict[str, Any]]) -> list[Cell]:
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in rows:
        key = (r["task"], int(r.get("start_labels", 0)), float(r["extra_budget_usd"]), r["strategy"],
               r.get("student", ""), r.get("teacher", "") if r["strategy"] != "annotate" else "", r["metric"])
        groups[key].append(r)
    cells = []
    for key, members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
        ok = [m for m in members if m.get("status", "ok") != "infeasible"]
        phases = {p: (sum(m.get("spent_usd", {}).get(p, 0.0) for m in ok) / len(ok) if ok else 0.0)
                  for p in PHASES}
        cells.append(Cell(*key, values=[float(m["value"]) for m in ok],
                          spent=[float(m.get("spent_total_usd", 0.0)) for m in ok], phases=phases,
                          infeasible=sorted({m.get("reason", "") for m in members if m.get("status") == "infeasible"})))
    return cells


def paper_value(paper: list[dict], cell: Cell) -> Optional[float]:
    """The paper's number for a cell of the main grid, if it has one."""
    for p in paper:
        if (p["table"] == "main" and p["task"] == cell.task and p["start_labels"] == cell.start_labels
                and p["extra_budget_usd"] == cell.extra_budget_usd and p["strategy"] == cell.strategy):
            return p["value"]
    return None


def pareto_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by a cheaper-or-equal point with a higher-or-equal metric."""
    frontier, best = [], -math.inf
    for cost, value in sorted(points, key=lambda p: (p[0], -p[1])):
        if value > best:
            frontier.append((cost, value))
            best = value
    return frontier


def _fmt(cell: Cell) -> str:
    if not cell.values:
        return "infeasible"
    return f"{cell.mean:.1f} ± {cell.std:.1f}" if len(cell.values) > 1 else f"{cell.mean:.1f}"


def render_markdown(cells: list[Cell], paper: list[dict], plots: list[str]) -> str:
    out = ["# doa-jax report", "",
           "Mean ± std over seeds (n = seeds per cell). `paper` is the published PyTorch result for the "
           "same task, starting labels, extra budget and strategy (T5-XXL ⇒ T5-Small), where one exists.", ""]
    out += ["## Results", "",
            "| task | start labels | extra $ | strategy | metric | value | n | paper | spent $ | $ / point |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        pv = paper_value(paper, c)
        out.append(f"| {c.task} | {c.start_labels} | {c.extra_budget_usd:g} | "
                   f"{STRATEGY_LABELS.get(c.strategy, c.strategy)} | {c.metric} | {_fmt(c)} | {len(c.values)} | "
                   f"{'' if pv is None else f'{pv:.1f}'} | {c.mean_spent:.2f} | "
                   f"{'' if math.isnan(c.usd_per_point) else f'{c.usd_per_point:.3f}'} |")
    out += ["", "## Cost breakdown by phase (mean $ per run)", "",
            "| task | start labels | extra $ | strategy | " + " | ".join(PHASES) + " | total |",
            "|---|---|---|---|" + "---|" * (len(PHASES) + 1)]
    for c in cells:
        if c.values:
            out.append(f"| {c.task} | {c.start_labels} | {c.extra_budget_usd:g} | {c.strategy} | "
                       + " | ".join(f"{c.phases[p]:.2f}" for p in PHASES) + f" | {c.mean_spent:.2f} |")
    infeasible = [c for c in cells if c.infeasible]
    if infeasible:
        out += ["", "## Infeasible cells", ""]
        out += [f"- {c.task}, {c.start_labels} labels, +${c.extra_budget_usd:g}, {c.strategy}: "
                + "; ".join(c.infeasible) for c in infeasible]
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def plot_cost_vs_metric(cells: list[Cell], task: str, path: pathlib.Path) -> None:
    """Metric vs total $ per strategy, with the Pareto frontier over all strategies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [c for c in cells if c.task == task and c.values]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for strategy, marker in (("annotate", "o"), ("distill", "s"), ("mixed", "^")):
        pts = sorted((c.mean_spent, c.mean, c.std) for c in mine if c.strategy == strategy)
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker=marker,
                        capsize=3, label=STRATEGY_LABELS[strategy])
    frontier = pareto_frontier([(c.mean_spent, c.mean) for c in mine])
    if frontier:
        ax.plot([p[0] for p in frontier], [p[1] for p in frontier], color="0.5", lw=6, alpha=0.35,
                zorder=0, solid_capstyle="round", label="Pareto frontier")
    metric = mine[0].metric if mine else ""
    ax.set(xlabel="total spent (USD)", ylabel=f"{metric} (%)", title=f"{task}: metric vs cost")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_budget_bars(cells: list[Cell], paper: list[dict], task: str, path: pathlib.Path) -> None:
    """Bars per extra budget, Ann. vs Dist., with the paper's bars (hatched) beside this run's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [c for c in cells if c.task == task and c.values and c.strategy in ("annotate", "distill")]
    budgets = sorted({c.extra_budget_usd for c in mine})
    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=120)
    width = 0.2
    series = [("annotate", False), ("distill", False), ("annotate", True), ("distill", True)]
    for i, (strategy, is_paper) in enumerate(series):
        xs, ys = [], []
        for j, b in enumerate(budgets):
            cell = next((c for c in mine if c.extra_budget_usd == b and c.strategy == strategy), None)
            value = paper_value(paper, cell) if (cell and is_paper) else (cell.mean if cell else None)
            if value is not None:
                xs.append(j + (i - 1.5) * width)
                ys.append(value)
        if xs:
            label = f"{STRATEGY_LABELS[strategy]} ({'paper' if is_paper else 'this run'})"
            ax.bar(xs, ys, width, label=label, hatch="//" if is_paper else None,
                   color="tab:blue" if strategy == "annotate" else "tab:orange", alpha=0.45 if is_paper else 0.9)
    ax.set_xticks(range(len(budgets)), [f"+${b:g}" for b in budgets])
    metric = mine[0].metric if mine else ""
    ax.set(xlabel="extra budget (USD)", ylabel=f"{metric} (%)", title=f"{task}: Ann. vs Dist. per budget")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(run_dir: str | os.PathLike, results: Optional[str | os.PathLike] = None) -> pathlib.Path:
    """Writes RUN_DIR/report.md and RUN_DIR/plots/*.png from RUN_DIR/results.jsonl; returns report.md."""
    run_dir = pathlib.Path(run_dir)
    rows = read_results(results or run_dir / "results.jsonl")
    if not rows:
        raise ValueError(f"{results or run_dir / 'results.jsonl'} has no result rows")
    cells, paper = summarise(rows), read_paper_results()
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    for task in sorted({c.task for c in cells if c.values}):
        for name, draw in ((f"{task}_cost_vs_metric.png", lambda p: plot_cost_vs_metric(cells, task, p)),
                           (f"{task}_budget_bars.png", lambda p: plot_budget_bars(cells, paper, task, p))):
            draw(plot_dir / name)
            plots.append(f"plots/{name}")
    report = run_dir / "report.md"
    report.write_text(render_markdown(cells, paper, plots))
    return report
