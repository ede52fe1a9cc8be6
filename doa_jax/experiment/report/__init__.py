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

The package, by role:
    summary.py    results rows -> cells summarised over seeds (`summarise`), and how cells are named
    intervals.py  95% bootstrap intervals, and whether two cells can be told apart
    paper.py      the paper's published rows: the match for a cell, comparable or why not, winners
    tables.py     report.md's tables (`render_markdown`)
    plots.py      the PNG plots (cost vs metric, bars per budget)
This module writes a run directory's report (`write_report`) and names the public pieces.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Optional

from doa_jax import storage
from doa_jax.experiment import results as results_lib
from doa_jax.experiment.report.intervals import (BOOTSTRAP_RESAMPLES, attach_intervals, bootstrap, distinguishable,
                                                 interval_text)
from doa_jax.experiment.report.paper import (PAPER_METRICS, PAPER_RESULTS, PAPER_STUDENT, PAPER_TEACHER, comparability,
                                             data_reason, paper_comparison, paper_match, paper_value,
                                             read_paper_results, winners)
from doa_jax.experiment.report.plots import (INTERVAL_LABEL, pareto_frontier, plot_budget_bars, plot_cost_vs_metric,
                                             usd_decimals)
from doa_jax.experiment.report.summary import (METRIC_LABELS, Cell, label_cost_usd, metric_label, model_name,
                                               profile_label, read_results, row_cost_fit, row_cost_profile,
                                               row_protocol, summarise, task_name)
from doa_jax.experiment.report.tables import marginal_usd_per_point, render_markdown

__all__ = ["BOOTSTRAP_RESAMPLES", "Cell", "INTERVAL_LABEL", "METRIC_LABELS", "PAPER_METRICS", "PAPER_RESULTS",
           "PAPER_STUDENT", "PAPER_TEACHER", "attach_intervals", "bootstrap", "comparability", "data_reason",
           "distinguishable", "interval_text", "label_cost_usd", "marginal_usd_per_point", "metric_label",
           "model_name", "paper_comparison", "paper_match", "paper_value", "pareto_frontier", "plot_budget_bars",
           "plot_cost_vs_metric", "profile_label", "read_paper_results", "read_results", "render_markdown",
           "row_cost_fit", "row_cost_profile", "row_protocol", "summarise", "sweep_progress", "task_name",
           "usd_decimals", "winners", "write_report"]


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
    path = results or run_dir / results_lib.RESULTS_FILE
    rows = read_results(path)
    superseded = results_lib.superseded_paper_rows(rows)
    if superseded:   # their reruns are the cells' rows: averaging both would mix two scorings
        print(f"note: the report leaves out {len(superseded)} PROTOCOL='paper' row(s) of {path} scored against the "
              "data's text, not the released code's references (rerun their cells for rows that are)",
              file=sys.stderr)
        rows = [r for r in rows if not results_lib.is_superseded_paper_row(r)]
    if not rows:
        raise ValueError(f"{path} has no result rows" + (" left" if superseded else ""))
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

