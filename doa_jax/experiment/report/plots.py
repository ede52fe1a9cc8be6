"""The report's PNG plots: metric vs total cost with this run's Pareto frontier and the paper's
points, and bars per extra budget beside the paper's; both with each cell's 95% bootstrap interval."""
from __future__ import annotations

import io
import math
import pathlib
from typing import Callable, Iterable, Optional

from doa_jax import storage
from doa_jax.experiment import strategies
from doa_jax.experiment.report.paper import paper_value
from doa_jax.experiment.report.summary import METRIC_LABELS, Cell, label_cost_usd, metric_label, profile_label

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _start_short(start: int) -> str:
    return f"{start / 1000:g}K" if start >= 1000 and start % 100 == 0 else str(start)


def _start_text(task: str, start: int) -> str:
    rate = label_cost_usd(task)
    return f"{_start_short(start)} start labels" + ("" if rate is None else f" (${start * rate:,.0f})")


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

