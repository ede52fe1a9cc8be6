"""report.md: the results table (mean ± std and interval, the paper's number, spent, total and
marginal dollars), the comparison with the paper, Ann. vs Dist., the cost breakdown by phase and
the infeasible cells."""
from __future__ import annotations

import collections
import math
from typing import Any, Optional

from doa_jax.experiment.costs import PHASES  # the ledger's phases, in its order
from doa_jax.experiment.report.intervals import interval_text
from doa_jax.experiment.report.paper import paper_comparison, winners
from doa_jax.experiment.report.summary import Cell, profile_label

def _paper_cell(paper: list[dict], cell: Cell) -> str:
    value, reasons = paper_comparison(paper, cell)
    if value is None:
        return ""
    return f"{value:.1f}" if not reasons else f"{value:.1f} (not comparable)"


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

