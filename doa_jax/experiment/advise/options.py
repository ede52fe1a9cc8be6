"""Options: what the extra budget B buys under each strategy, on top of the start labels L, as the
planner's search finds it (`planner.BudgetSearch.plan`, the search `doa plan` and the cells use):
annotate: the most labels N; distill: the most inputs U; mixed at share s: labels with (1-s) B,
inputs with the rest. Pools cap labels and inputs when given."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from doa_jax.experiment import strategies
from doa_jax.experiment.advise.pricing import Pricing


@dataclasses.dataclass
class Option:
    """What the extra budget buys under one strategy (and share), and what it is predicted to score."""

    strategy: str
    compute_share: float
    labels_bought: int
    unlabeled: int
    cost_usd: float
    feasible: bool
    reason: str = ""
    samples: Optional[np.ndarray] = None     # (R,) curve value per replicate
    expected: Optional[float] = None
    interval: Optional[tuple[float, float]] = None

    @property
    def name(self) -> str:
        return f"mixed {self.compute_share:.0%} compute" if self.strategy == "mixed" else self.strategy

    def as_json(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "samples"}
        d["interval"] = list(self.interval) if self.interval else None
        return d



def plan_options(pricing: Pricing, start_labels: int, budget: float, *, shares: Sequence[float] = (0.25, 0.5, 0.75),
                 strategies_: Sequence[str] = strategies.NAMES, label_pool: Optional[int] = None,
                 unlabeled_pool: Optional[int] = None) -> list[Option]:
    """Each strategy's purchase with `budget` extra dollars (pools cap labels and inputs when given): the
    planner's plans, each costed as its run (`Pricing.extra`) and, when it buys nothing, told why."""
    for s in strategies_:
        strategies.get(s)
    search, L = pricing.prices, start_labels
    options = []
    if "annotate" in strategies_:
        n = search.plan("annotate", L, budget, labels_available=label_pool).labels_bought
        more = label_pool is None or label_pool > L
        reason = "" if n > 0 else (f"${budget:g} buys no label (one costs ${pricing.usd_per_label:.3g})" if more
                                   else "the labeled pool has no more labels")
        options.append(Option("annotate", 0.0, n, 0, pricing.extra("annotate", L, L + n, 0), n > 0, reason))
    if "distill" in strategies_:
        u = search.plan("distill", L, budget, unlabeled_available=unlabeled_pool).unlabeled_used
        options.append(Option("distill", 1.0, 0, u, pricing.extra("distill", L, L, u), u > 0, "" if u > 0 else
                              f"${budget:g} does not cover the teacher's fine-tuning on {L} labels "
                              f"and one unlabeled input (${pricing.extra('distill', L, L, 1):.4g})"))
    for share in (shares if "mixed" in strategies_ else ()):
        plan = search.plan("mixed", L, budget, compute_share=share, labels_available=label_pool,
                           unlabeled_available=unlabeled_pool)
        n, u = plan.labels_bought, plan.unlabeled_used
        ok = n > 0 and u > 0
        options.append(Option("mixed", float(share), n, u, pricing.extra("mixed", L, L + n, u), ok, "" if ok else
                              f"{share:.0%} of ${budget:g} on compute buys {n} labels and "
                              f"{u} inputs (${budget - n * pricing.usd_per_label:.4g} left for compute)"))
    return options
