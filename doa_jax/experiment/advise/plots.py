"""The advice as a figure: both fitted curves with their bands, the pilots, what the budget buys and
the chosen point (matplotlib, Agg backend, imported where a figure is drawn: only the picture needs it)."""
from __future__ import annotations

import io
import os
import textwrap

import numpy as np

from doa_jax import storage
from doa_jax.experiment import report
from doa_jax.experiment.advise.curves import annotate_value, distill_value
from doa_jax.experiment.advise.options import Option
from doa_jax.experiment.advise.recommendation import METRIC_RANGE, Advice


def _band(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    q = (1 - level) / 2
    return np.quantile(samples, q, axis=0), np.quantile(samples, 1 - q, axis=0)


def _panel(ax, xs: np.ndarray, samples: np.ndarray, point_fit: np.ndarray, pilots: tuple[np.ndarray, np.ndarray],
           color: str, fit_label: str, level: float) -> float:
    """One curve with its band and pilots, clipped to the metric's range; returns the highest y drawn."""
    lo, hi = (np.clip(b, *METRIC_RANGE) for b in _band(samples, level))
    ax.fill_between(xs, lo, hi, color=color, alpha=0.2, label=f"{level:.0%} band (curve)")
    ax.plot(xs, np.clip(point_fit, *METRIC_RANGE), color=color, label=fit_label)
    ax.scatter(*pilots, color="k", zorder=3, s=18, label="pilots")
    return float(max(hi.max(), pilots[1].max()))


def _buys(ax, advice: Advice, o: Option, x: int, unit: str) -> float:
    """What the budget buys under one strategy: where it lands, and its predicted run interval; returns
    the interval's top."""
    lv = advice.level
    ax.axvline(x, color="gray", ls="--", lw=1, label=f"${advice.budget_usd:g} buys ({x:,} {unit})")
    chosen = advice.recommended is o
    ax.errorbar([x], [o.expected], yerr=[[o.expected - o.interval[0]], [o.interval[1] - o.expected]],
                fmt="*" if chosen else "D", ms=14 if chosen else 7, color="crimson" if chosen else "gray",
                capsize=4, zorder=4,
                label=("chosen" if chosen else "predicted") + f" {o.expected:.1f} ({lv:.0%} run interval)")
    return o.interval[1]


def _infeasible_note(ax, advice: Advice, strategy: str) -> None:
    """Says on the panel that the budget cannot buy this strategy, and why."""
    o = next((o for o in advice.options if o.strategy == strategy and not o.feasible), None)
    if o is not None:
        ax.text(0.03, 0.96, textwrap.fill(f"infeasible at +${advice.budget_usd:g}: {o.reason}", 44),
                transform=ax.transAxes, ha="left", va="top", fontsize=9, color="crimson", parse_math=False,
                bbox=dict(boxstyle="round", fc="white", ec="crimson", alpha=0.9), zorder=5)


def figure(advice: Advice):
    """The advice as a figure: both fitted curves with their bands (clipped to the metric's range
    [0, 100]), the pilots, what the budget buys and the chosen point; a panel whose strategy the
    budget cannot buy says so. matplotlib is imported here (Agg backend): only this picture needs it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fit, L, lv = advice.fit, advice.start_labels, advice.level
    by = {o.strategy: o for o in advice.options if o.feasible and o.strategy != "mixed"}
    fig, (ax_a, ax_d) = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    n_a, u_d = fit.annotate_points[0], fit.distill_points[0]
    n_top = max(n_a.max(), L + by["annotate"].labels_bought if "annotate" in by else 0)
    n = np.geomspace(max(n_a.min() * 0.7, 1), n_top * 1.3, 120)
    top = _panel(ax_a, n, np.stack([fit.annotate_at(v) for v in n], axis=1), annotate_value(fit.annotate, n),
                 fit.annotate_points, "tab:blue", "fit: a - b n^-c", lv)
    u_top = max(u_d.max(), by["distill"].unlabeled if "distill" in by else 0)
    ex = np.geomspace(max(u_d.min() * 0.7, 1), u_top * 1.3, 120)
    top = max(top, _panel(ax_d, ex, np.stack([fit.distill_at(v) for v in ex], axis=1),
                          distill_value(fit.distill, fit.annotate, ex), fit.distill_points, "tab:orange",
                          "fit: a_D - b_D U^-c", lv))
    for ax, strategy in ((ax_a, "annotate"), (ax_d, "distill")):
        if strategy in by:
            o = by[strategy]
            x, unit = (L + o.labels_bought, "labels") if strategy == "annotate" else (o.unlabeled, "inputs")
            top = max(top, _buys(ax, advice, o, x, unit))
        _infeasible_note(ax, advice, strategy)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower right")
    ax_a.set_ylim(METRIC_RANGE[0], min(METRIC_RANGE[1], top * 1.08))
    ax_a.set_xlabel("labels n")
    ax_a.set_ylabel(report.metric_label(advice.metric))
    ax_a.set_title("annotate: metric vs labels")
    ax_d.set_xlabel("unlabeled inputs U")
    ax_d.set_title(f"distill: metric vs unlabeled inputs (teacher on {L:,} labels)")
    r = advice.recommended
    fig.suptitle(f"{advice.task}: +${advice.budget_usd:g} over {L:,} labels ({advice.cost_profile} prices) -> "
                 f"{r.name}, {r.expected:.1f} [{r.interval[0]:.1f}, {r.interval[1]:.1f}], P(best) {advice.p_best:.2f}",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot(advice: Advice, path: str | os.PathLike) -> str:
    """Writes `figure(advice)` as a PNG through `doa_jax.storage` (a local path or a URL such as gs://)."""
    import matplotlib.pyplot as plt

    fig = figure(advice)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    storage.write_atomic(path, png.getvalue())
    return os.fspath(path)

