"""Recommendation: the option with the highest expected metric; its interval; the best option of
another strategy (the runner-up); P(recommended beats it) over the curves' bootstrap replicates; and
"cannot tell apart" below a threshold. Mixed is predicted as `v_D(U) + v_A(L+N) - v_A(L)` (the
bought labels' gain adds to distillation's), an assumption no pilot tests.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from doa_jax.experiment import strategies
from doa_jax.experiment.advise.curves import Fit, fit_curves
from doa_jax.experiment.advise.options import Option, plan_options
from doa_jax.experiment.advise.pilots import Pilot
from doa_jax.experiment.advise.pricing import Pricing

METRIC_RANGE = (0.0, 100.0)               # doa-jax's metrics are scores in [0, 100]


@dataclasses.dataclass
class Advice:
    task: str
    metric: str
    start_labels: int
    budget_usd: float
    cost_profile: str
    level: float
    threshold: float
    recommended: Option
    runner_up: Optional[Option]
    p_best: float
    options: list[Option]
    fit: Fit
    notes: list[str]

    @property
    def cannot_tell_apart(self) -> bool:
        return self.runner_up is not None and self.p_best < self.threshold

    def verdict(self) -> str:
        r, u = self.recommended, self.runner_up
        head = (f"{r.name}: expected {self.metric} {r.expected:.1f} ({self.level:.0%} interval "
                f"{r.interval[0]:.1f}-{r.interval[1]:.1f})")
        if u is None:
            return head + "; no other strategy is feasible"
        tail = f"runner-up {u.name} {u.expected:.1f}; P({r.name} beats it) = {self.p_best:.2f}"
        if self.cannot_tell_apart:
            return (f"cannot tell apart: {r.name} and {u.name} (P = {self.p_best:.2f} < {self.threshold:.2f}); "
                    f"more pilots, or seeds, would separate them. Leaning: " + head + "; " + tail)
        return head + "; " + tail

    def as_json(self) -> dict:
        r = self.recommended
        return {
            "task": self.task, "metric": self.metric, "start_labels": self.start_labels, "budget_usd": self.budget_usd,
            "cost_profile": self.cost_profile, "recommended": r.strategy, "compute_share": r.compute_share,
            "expected": r.expected, "interval": list(r.interval), "level": self.level,
            "p_best": self.p_best, "cannot_tell_apart": self.cannot_tell_apart, "threshold": self.threshold,
            "runner_up": self.runner_up.as_json() if self.runner_up else None, "verdict": self.verdict(),
            "options": [o.as_json() for o in self.options],
            "fit": {"annotate": dict(zip("abc", map(float, self.fit.annotate))),
                    "distill": {"a": float(self.fit.distill[0]), "b": float(self.fit.distill[1]),
                                "c": float(self.fit.annotate[2])},
                    "sigma": self.fit.sigma, "dof": self.fit.dof,
                    "pilots": {"annotate": len(self.fit.annotate_points[0]),
                               "distill": len(self.fit.distill_points[0])}},
            "notes": self.notes,
        }


def _predict(fit: Fit, o: Option, start_labels: int) -> np.ndarray:
    """The option's metric per replicate, floored at 0: doa-jax's metrics are scores in [0, 100], and a
    power law extrapolated far below its pilots would otherwise fall without bound."""
    if o.strategy == "annotate":
        return np.maximum(fit.annotate_at(start_labels + o.labels_bought), 0.0)
    gain = 0.0
    if o.strategy == "mixed":
        gain = fit.annotate_at(start_labels + o.labels_bought) - fit.annotate_at(start_labels)
    return np.maximum(fit.distill_at(o.unlabeled) + gain, 0.0)


def _extrapolation_notes(fit: Fit, options: Sequence[Option], start_labels: int) -> list[str]:
    notes = []
    top_n, top_u = fit.annotate_points[0].max(), fit.distill_points[0].max()
    low_u = fit.distill_points[0].min()
    for o in options:
        n = start_labels + o.labels_bought
        if o.strategy != "annotate" and o.unlabeled < low_u / 2:
            notes.append(f"{o.name}: {o.unlabeled} inputs is below half the smallest distill pilot ({low_u:.0f}): "
                         f"an extrapolation")
        if o.strategy == "annotate" and n > 2 * top_n:
            notes.append(f"annotate: {n} labels is {n / top_n:.1f}x the largest annotate pilot ({top_n:.0f}): "
                         f"an extrapolation")
        if o.strategy == "distill" and o.unlabeled > 2 * top_u:
            notes.append(f"distill: {o.unlabeled} inputs is {o.unlabeled / top_u:.1f}x the largest distill pilot "
                         f"({top_u:.0f}): an extrapolation")
    return notes


def recommend(fit: Fit, options: list[Option], *, task: str, metric: str, budget: float, cost_profile: str,
              level: float = 0.8, threshold: float = 0.8, seed: int = 0) -> Advice:
    """The feasible option with the highest expected metric, its interval, the runner-up and P(best)."""
    feasible = [o for o in options if o.feasible]
    if not feasible:
        raise ValueError(f"a budget of ${budget:g} buys nothing: " + "; ".join(f"{o.name}: {o.reason}" for o in options))
    rng = np.random.default_rng(seed + 1)
    noise = fit.boot_sigma * rng.standard_normal(fit.boot_sigma.shape)
    q = (1 - level) / 2
    for o in feasible:
        o.samples = _predict(fit, o, fit.start_labels)
        o.expected = float(o.samples.mean())
        run = np.clip(o.samples + noise, *METRIC_RANGE)     # a run scores within the metric's range
        o.interval = (float(np.quantile(run, q)), float(np.quantile(run, 1 - q)))
    best_per = {}
    for o in feasible:
        if o.strategy not in best_per or o.expected > best_per[o.strategy].expected:
            best_per[o.strategy] = o
    ranked = sorted(best_per.values(), key=lambda o: -o.expected)
    rec, runner = ranked[0], (ranked[1] if len(ranked) > 1 else None)
    p_best = 1.0
    if runner is not None:
        others = np.max([o.samples for o in ranked[1:]], axis=0)
        p_best = float((rec.samples > others).mean())
    notes = list(fit.notes) + _extrapolation_notes(fit, feasible, fit.start_labels)
    notes += [f"{o.name} is not feasible: {o.reason}" for o in options if not o.feasible]
    if any(o.strategy == "mixed" for o in feasible):
        notes.append("mixed is predicted as distillation plus the bought labels' gain on the annotation curve, "
                     "an assumption no pilot tests")
    return Advice(task, metric, fit.start_labels, budget, cost_profile, level, threshold, rec, runner, p_best,
                  options, fit, notes)


def advise(pilots: Sequence[Pilot], pricing: Pricing, *, task: str, metric: str, start_labels: int, budget: float,
           strategies_: Sequence[str] = strategies.NAMES, shares: Sequence[float] = (0.25, 0.5, 0.75),
           label_pool: Optional[int] = None, unlabeled_pool: Optional[int] = None, n_boot: int = 2000,
           level: float = 0.8, threshold: float = 0.8, seed: int = 0) -> Advice:
    """Fit, price and recommend, in that order (a budget that buys nothing fails before fitting)."""
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= 0):
        raise ValueError(f"budget must be a non-negative number of dollars, got {budget!r}")
    options = plan_options(pricing, start_labels, budget, shares=shares, strategies_=strategies_,
                           label_pool=label_pool, unlabeled_pool=unlabeled_pool)
    if not any(o.feasible for o in options):
        raise ValueError(f"a budget of ${budget:g} buys nothing: " + "; ".join(f"{o.name}: {o.reason}" for o in options))
    fit = fit_curves(pilots, start_labels, n_boot=n_boot, seed=seed)
    return recommend(fit, options, task=task, metric=metric, budget=budget, cost_profile=pricing.profile,
                     level=level, threshold=threshold, seed=seed)

