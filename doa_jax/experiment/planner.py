"""Budget planner: before any compute, what an extra budget buys under each strategy.

Costs are projected from analytic FLOPs (`doa_jax.flops`) onto a named accelerator at a stated
MFU, priced by its rate card; labels are priced by the task card. Every phase is charged against
the extra budget: labels, teacher fine-tuning, teacher inference over the unlabeled inputs,
and student training (cheap for a small student, but counted in both arms).

- annotate: the most labels N such that N x $/label + fine-tuning the student on start + N labels
  fits the budget;
- distill: fine-tune the teacher on the starting labels, then the largest number U of unlabeled
  inputs whose teacher inference (decode + one scoring pass) plus student distillation fits what
  is left;
- mixed: `compute_share` of the budget goes to distillation, the rest to labels (the teacher is
  then fine-tuned on start + bought labels, and the gold rows join the student's distillation data).
A plan that cannot run says why (`feasible=False`, `reason`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

from doa_jax import flops
from doa_jax.experiment.costs import Accelerator
from doa_jax.model.config import T5Config

STRATEGIES = ("annotate", "distill", "mixed")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Training settings the plan prices (the paper's by default).

    Training runs whole batches (the last one padded), `ceil(epochs x ceil(n / batch_size))`
    steps for n examples, as the trainer does; the plan prices exactly those steps.
    """

    teacher_epochs: float = 20
    student_epochs: float = 20
    distill_epochs: float = 50
    inputs_length: int = 128
    targets_length: int = 8
    batch_size: int = 32
    online_kd: bool = False  # the paper's code ran the teacher forward at every student step
    mfu: float = 0.4

    def __post_init__(self):
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu must be in (0, 1], got {self.mfu}")
        for f in ("teacher_epochs", "student_epochs", "distill_epochs", "inputs_length", "targets_length",
                  "batch_size"):
            if not getattr(self, f) > 0:
                raise ValueError(f"{f} must be > 0, got {getattr(self, f)}")

    def steps(self, examples: int, epochs: float) -> int:
        return math.ceil(epochs * math.ceil(examples / self.batch_size)) if examples > 0 else 0


@dataclasses.dataclass(frozen=True)
class Plan:
    strategy: str
    feasible: bool
    reason: str
    budget_usd: float
    labels_bought: int
    labels_used: int
    unlabeled_used: int
    labels_usd: float
    teacher_finetune_usd: float
    teacher_inference_usd: float
    student_training_usd: float

    @property
    def total_usd(self) -> float:
        return self.labels_usd + self.teacher_finetune_usd + self.teacher_inference_usd + self.student_training_usd

    def as_row(self) -> dict:
        row = dataclasses.asdict(self)
        row["total_usd"] = self.total_usd
        return row


class Planner:
    def __init__(self, accelerator: Accelerator, student: T5Config, teacher: T5Config,
                 usd_per_label: float, recipe: Recipe = Recipe()):
        if usd_per_label <= 0:
            raise ValueError(f"the annotation cost per label must be positive, got {usd_per_label}")
        self.acc, self.student, self.teacher, self.usd_per_label, self.recipe = (
            accelerator, student, teacher, usd_per_label, recipe)

    def _usd(self, total_flops: float) -> float:
        return self.acc.usd(self.acc.chip_seconds_for(total_flops, self.recipe.mfu))

    def _per_example(self, fn, cfg: T5Config) -> float:
        return self._usd(fn(cfg, 1, self.recipe.inputs_length, self.recipe.targets_length))

    def _training_usd(self, cfg: T5Config, examples: int, epochs: float, extra_per_example: float = 0.0) -> float:
        """Whole padded batches: steps x batch_size examples' worth of train FLOPs."""
        per_example = self._per_example(flops.train_flops, cfg) + extra_per_example
        return self.recipe.steps(examples, epochs) * self.recipe.batch_size * per_example

    def student_finetune_usd(self, labels: int) -> float:
        return self._training_usd(self.student, labels, self.recipe.student_epochs)

    def teacher_finetune_usd(self, labels: int) -> float:
        return self._training_usd(self.teacher, labels, self.recipe.teacher_epochs)

    def teacher_inference_usd(self, inputs: int) -> float:
        """Decoding plus one teacher-forced pass for the top-k logits: two forward passes per input."""
        return inputs * 2 * self._per_example(flops.forward_flops, self.teacher)

    def distill_usd(self, examples: int) -> float:
        """Student training on `examples` rows of soft targets (plus the teacher forward if online)."""
        online = self._per_example(flops.forward_flops, self.teacher) if self.recipe.online_kd else 0.0
        return self._training_usd(self.student, examples, self.recipe.distill_epochs, online)

    @staticmethod
    def _largest(fits: Callable[[int], bool], upper: int) -> int:
        """The largest n in [0, upper] with fits(n) (fits is monotone: true up to some n)."""
        lo, hi = 0, upper
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    def plan(self, strategy: str, start_labels: int, budget_usd: float, *, unlabeled_available: Optional[int] = None,
             labels_available: Optional[int] = None, compute_share: float = 0.5) -> Plan:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; strategies: {', '.join(STRATEGIES)}")
        if not isinstance(budget_usd, (int, float)) or math.isnan(budget_usd) or budget_usd < 0:
            raise ValueError(f"budget must be a non-negative number of dollars, got {budget_usd!r}")
        if start_labels < 0:
            raise ValueError(f"start labels must be >= 0, got {start_labels}")
        if strategy == "annotate":
            return self._annotate(start_labels, budget_usd, labels_available)
        if strategy == "distill":
            return self._distill(start_labels, 0, 0.0, budget_usd, budget_usd, unlabeled_available, "distill")
        if not 0 < compute_share < 1:
            raise ValueError(f"compute_share must be in (0, 1) for mixed, got {compute_share}")
        labels_budget = budget_usd * (1 - compute_share)
        bought = self._affordable_labels(labels_budget, labels_available, start_labels)
        return self._distill(start_labels, bought, bought * self.usd_per_label, budget_usd - bought * self.usd_per_label,
                             budget_usd, unlabeled_available, "mixed")

    def _affordable_labels(self, budget: float, available: Optional[int], start: int) -> int:
        n = int(budget // self.usd_per_label)
        return n if available is None else max(0, min(n, available - start))

    def _annotate(self, start: int, budget: float, available: Optional[int]) -> Plan:
        # Largest N with N x price + fine-tuning the student on (start + N) labels <= budget.
        upper = int(budget // self.usd_per_label)
        if available is not None:
            upper = max(0, min(upper, available - start))
        n = self._largest(lambda k: k * self.usd_per_label + self.student_finetune_usd(start + k) <= budget, upper)
        used = start + n
        feasible, reason = True, ""
        if used == 0:
            feasible, reason = False, "no labels: the budget buys none and there are no starting labels"
        elif self.student_finetune_usd(used) + n * self.usd_per_label > budget:
            feasible = False
            reason = (f"fine-tuning the student on the {start} starting labels costs "
                      f"${self.student_finetune_usd(start):.2f} > budget ${budget:.2f}")
        elif n == 0 and budget > 0:
            feasible = False
            reason = (f"budget ${budget:.2f} buys no label: after fine-tuning the student on the {start} starting "
                      f"labels (${self.student_finetune_usd(start):.2f}) it is below one label's cost "
                      f"(${self.usd_per_label:.3f} plus its training)")
        return Plan("annotate", feasible, reason, budget, n, used, 0, n * self.usd_per_label, 0.0, 0.0,
                    self.student_finetune_usd(used))

    def _distill(self, start: int, bought: int, labels_usd: float, compute_budget: float, budget: float,
                 unlabeled_available: Optional[int], strategy: str) -> Plan:
        labels = start + bought
        teacher_ft = self.teacher_finetune_usd(labels)
        gold_rows = labels if strategy == "mixed" else 0   # mixed: gold rows join the student's data

        def infeasible(reason: str) -> Plan:
            return Plan(strategy, False, reason, budget, bought, labels, 0, labels_usd, teacher_ft, 0.0, 0.0)

        if labels == 0:
            return infeasible("the teacher needs labels to fine-tune on and there are none")
        if unlabeled_available is not None and unlabeled_available <= 0:
            return infeasible("the unlabeled pool is empty")
        if teacher_ft > compute_budget:
            return infeasible(f"fine-tuning the teacher on {labels} labels costs ${teacher_ft:.2f} > "
                              f"${compute_budget:.2f} available for compute")
        left = compute_budget - teacher_ft

        def cost(u: int) -> float:
            return self.teacher_inference_usd(u) + self.distill_usd(u + gold_rows)

        per_input = self.teacher_inference_usd(1) + self.distill_usd(1) / max(self.recipe.steps(1, 1), 1)
        upper = int(left // max(self.teacher_inference_usd(1), 1e-30)) + self.recipe.batch_size
        if unlabeled_available is not None:
            upper = min(upper, unlabeled_available)
        u = self._largest(lambda k: cost(k) <= left, upper)
        if u < 1:
            return infeasible(f"after the teacher's fine-tuning (${teacher_ft:.2f}) the budget does not cover "
                              f"one batch of unlabeled inputs (${cost(1):.4f}; ~${per_input:.4f} per input)")
        return Plan(strategy, True, "", budget, bought, labels, u, labels_usd, teacher_ft,
                    self.teacher_inference_usd(u), self.distill_usd(u + gold_rows))
