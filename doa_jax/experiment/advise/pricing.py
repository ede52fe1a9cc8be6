"""What the advised runs cost: a `Pricing` holds phase prices (a `planner.BudgetSearch`: the FLOP
planner under a cost profile, or the paper's own linear dollars) and prices a run of any strategy as
the total dollars of a run that trains on `labels` labels (all paid for) and `unlabeled` inputs, as
in the paper's Pareto plot ("total $")."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import numpy as np

from doa_jax.experiment import cost_profiles, planner
from doa_jax.experiment.advise.pilots import PARETO_CSV, read_pareto
from doa_jax.model.config import T5Config


@dataclasses.dataclass(frozen=True)
class Pricing:
    """What runs cost (`prices`, whose `plan` is the search for what a budget buys), and where the prices come from."""

    prices: planner.BudgetSearch
    profile: str
    note: str

    @property
    def usd_per_label(self) -> float:
        return self.prices.usd_per_label

    def price(self, strategy: str, labels: int, unlabeled: int) -> float:
        """Total dollars of a run on `labels` labels (all paid for) and `unlabeled` inputs."""
        return self.prices.run_usd(strategy, labels, unlabeled)

    def extra(self, strategy: str, start_labels: int, labels: int, unlabeled: int) -> float:
        """Dollars beyond the start labels already bought."""
        return self.price(strategy, labels, unlabeled) - start_labels * self.usd_per_label


@dataclasses.dataclass(frozen=True)
class LinearPrices(planner.BudgetSearch):
    """Phase prices linear in the counts: labels at `usd_per_label`; a teacher's fine-tuning at
    `teacher_usd_per_label` per label; `usd_per_input` per unlabeled input for the teacher's
    inference and the student's distillation together (charged as inference; the gold rows a mixed
    student also trains on cost nothing more); the student's own fine-tuning free, as the paper's
    accounting charges annotation its labels only."""

    usd_per_label: float
    teacher_usd_per_label: float
    usd_per_input: float

    def student_finetune_usd(self, labels: int) -> float:
        return 0.0

    def teacher_finetune_usd(self, labels: int) -> float:
        return self.teacher_usd_per_label * labels

    def teacher_inference_usd(self, inputs: int) -> float:
        return self.usd_per_input * inputs

    def distill_usd(self, examples: int) -> float:
        return 0.0


def paper_pricing(task: str, path: str | os.PathLike = PARETO_CSV) -> Pricing:
    """The paper's own dollars for `task`: labels at its $/label, and compute $ = alpha L + beta U.

    alpha (teacher fine-tuning per label) and beta (pseudo-labelling plus 50 distillation epochs per
    input) are least squares, without intercept, over the task's U > 0 points of the paper's Pareto
    plot (compute $ = total $ - labels $, section 7.2). Annotation is priced at its labels only, as
    the paper's U = 0 points are (total $ = L x $/label).
    """
    rows = [r for r in read_pareto(path) if r["task"] == task]
    if not rows:
        tasks = sorted({r["task"] for r in read_pareto(path)})
        raise ValueError(f"cost profile 'paper' has the paper's costs for {', '.join(tasks)} only, not {task!r}")
    per_label = sum(r["labels_usd"] for r in rows) / sum(r["labels"] for r in rows)
    dist = [r for r in rows if r["unlabeled"] > 0]
    design = np.array([[r["labels"], r["unlabeled"]] for r in dist], dtype=float)
    (alpha, beta), *_ = np.linalg.lstsq(design, np.array([r["compute_usd"] for r in dist]), rcond=None)
    return Pricing(LinearPrices(per_label, float(alpha), float(beta)), "paper",
                   f"the paper's $ (section 7.2 fit): ${per_label:.3f}/label, compute ${alpha * 1000:.2f} per 1K labels "
                   f"+ ${beta * 1000:.2f} per 1K unlabeled inputs")


def pricing_for(card, profile_name: Optional[str], calibration_path: Optional[str], *, teacher: T5Config,
                student: T5Config, accelerator: Optional[str] = None, mfu: Optional[float] = None,
                **recipe: Any) -> Pricing:
    """The pricing for `card` under a cost profile, through the planner (`build_planner`): `paper`
    (the paper's accounting, fitted to its costs), `calibrated` (a `doa calibrate` file) or `mfu` (an
    assumed MFU, said so). None: `calibrated` when a calibration is given, else `paper`. `recipe`
    (epochs, batch size, soft targets: `build_planner`'s settings) prices the runs the advice is
    about as they will run; unset, the profile's recipe (the paper's runs) applies."""
    name = profile_name or cost_profiles.default_profile_name(calibration_path)
    profile = cost_profiles.load_profile(name, accelerator=accelerator if name == "mfu" else None,
                                         calibration=calibration_path, mfu=mfu)
    plan, lengths = planner.build_planner(card, teacher, student, profile, **recipe)
    fit = profile.as_dict(card.name).get("fit")
    return Pricing(plan, name, f"cost profile {name}: {profile.source}{'; ' + fit['note'] if fit else ''}; "
                               f"lengths: {lengths['source']}")
