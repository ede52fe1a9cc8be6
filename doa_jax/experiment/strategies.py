"""The three ways to spend an extra budget, as one table: what each buys and what it runs.

    annotate  buys labels, fine-tunes the student on them (no teacher)
    distill   spends the budget on compute: a teacher fine-tuned on the start labels labels the
              unlabeled inputs, and the student learns from its outputs
    mixed     `compute_share` of the budget goes to distillation, the rest buys labels, whose gold
              rows join the student's distillation data

Code asks a strategy what it does (`uses_teacher`, `buys_labels`, ...) instead of comparing names.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    label: str            # the paper's column name in tables and plots
    buys_labels: bool     # part of the budget buys labels
    uses_teacher: bool    # fine-tunes a teacher and distils from its outputs
    mixes_gold: bool      # gold rows join the student's distillation data
    splits_budget: bool   # the budget is split by `compute_share`
    in_paper: bool        # the paper reports this strategy (Ann. / Dist.)
    color: str            # plots
    marker: str


TABLE: dict[str, Strategy] = {s.name: s for s in (
    Strategy("annotate", "Ann.", buys_labels=True, uses_teacher=False, mixes_gold=False, splits_budget=False,
             in_paper=True, color="tab:blue", marker="o"),
    Strategy("distill", "Dist.", buys_labels=False, uses_teacher=True, mixes_gold=False, splits_budget=False,
             in_paper=True, color="tab:orange", marker="s"),
    Strategy("mixed", "Mixed", buys_labels=True, uses_teacher=True, mixes_gold=True, splits_budget=True,
             in_paper=False, color="tab:green", marker="^"),
)}
NAMES = tuple(TABLE)
PAPER = tuple(s.name for s in TABLE.values() if s.in_paper)   # ("annotate", "distill"): the paper's pair


def get(name: str, what: str = "strategy") -> Strategy:
    """The strategy called `name`; an unknown one is an error listing the known ones."""
    if name not in TABLE:
        raise ValueError(f"unknown {what} {name!r}; strategies: {', '.join(NAMES)}")
    return TABLE[name]
