"""Budget planner: before any compute, what an extra budget buys under each strategy.

The work each phase does is counted as `cost_profiles.Work` (train steps in whole padded batches,
decoded batches, analytic FLOPs from `doa_jax.flops`); a cost profile prices it (the paper's fitted
accounting, a measured calibration, or an assumed MFU) and labels are priced by the task card.
Every phase is charged against the extra budget: labels, teacher fine-tuning, teacher inference over
the unlabeled inputs, and student training.

- annotate: the most labels N such that N x $/label + fine-tuning the student on start + N labels
  fits the budget;
- distill: fine-tune the teacher on the starting labels, then the largest number U of unlabeled
  inputs (or the largest U on a grid, e.g. the paper's 10K/100K) whose teacher inference plus
  student distillation fits what is left; when the unlabeled pool caps U, the plan says so and
  reports the unspent budget;
- mixed: `compute_share` of the budget goes to distillation, the rest to labels (the teacher is
  then fine-tuned on start + bought labels, and the gold rows join the student's distillation data).
`price` prices a fixed (L, U) point instead. A plan that cannot run says why
(`feasible=False`, `reason`).

The search is written once, in `BudgetSearch`, over the dollars of each phase; `Planner` prices the
phases from their work under a cost profile, and `doa advise` asks a `BudgetSearch` (a `Planner`, or
the paper's own linear prices) what its budget buys.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

from doa_jax import flops
from doa_jax.experiment.cost_profiles import CostProfile, MfuProfile, PaperProfile, Work, check_calibration
from doa_jax.experiment import strategies
from doa_jax.experiment.costs import Accelerator
from doa_jax.model.config import T5Config

STRATEGIES = strategies.NAMES
# Beyond this a budget is a typo, not a plan (and label/input counts stop being meaningful).
MAX_BUDGET_USD = 1e9


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Training settings the plan prices (the paper's by default).

    Training runs whole batches (the last one padded), `ceil(epochs x ceil(n / batch_size))`
    steps for n examples, as the trainer does; the plan prices exactly those steps. Lengths may be
    fractional: the paper's profile prices dynamic padding at the examples' mean token lengths.
    `mfu` is only used when no profile is given (then an assumed-MFU profile prices the work).
    """

    teacher_epochs: float = 20
    student_epochs: float = 20
    distill_epochs: float = 50
    inputs_length: float = 128
    targets_length: float = 8
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
    cost_profile: dict = dataclasses.field(default_factory=dict)  # name + source of the prices
    note: str = ""  # e.g. the unlabeled pool capped U and left budget unspent

    @property
    def compute_usd(self) -> float:
        return self.teacher_finetune_usd + self.teacher_inference_usd + self.student_training_usd

    @property
    def total_usd(self) -> float:
        return self.labels_usd + self.compute_usd

    @property
    def unspent_usd(self) -> float:
        return max(0.0, self.budget_usd - self.total_usd) if self.feasible else 0.0

    def as_row(self) -> dict:
        row = dataclasses.asdict(self)
        row.update(total_usd=self.total_usd, compute_usd=self.compute_usd, unspent_usd=self.unspent_usd)
        return row


class BudgetSearch:
    """What an extra budget buys under each strategy (`plan`), from what each phase costs.

    A subclass prices the phases in dollars (`student_finetune_usd(labels)`,
    `teacher_finetune_usd(labels)`, `teacher_inference_usd(inputs)`, `distill_usd(examples)`, each
    non-decreasing in its count) and sets `usd_per_label`; `inference_batch` is the inputs one
    inference batch holds (bounding the search for U: a batch's price per input, times what is left,
    plus one batch). This class is the one search for the most labels and inputs a budget covers.
    """

    usd_per_label: float
    inference_batch: int = 1

    def student_finetune_usd(self, labels: int) -> float:
        raise NotImplementedError

    def teacher_finetune_usd(self, labels: int) -> float:
        raise NotImplementedError

    def teacher_inference_usd(self, inputs: int) -> float:
        raise NotImplementedError

    def distill_usd(self, examples: int) -> float:
        raise NotImplementedError

    def cost_profile_row(self) -> dict:
        """The name and source of the prices, as plans record them."""
        return {}

    def run_usd(self, strategy: str, labels: int, unlabeled: int) -> float:
        """Total dollars of a `strategy` run on `labels` labels (all paid for) and `unlabeled` inputs, phase by
        phase as a cell charges them (mixed: the gold rows join the student's distillation data)."""
        kind = strategies.get(strategy)
        if not kind.uses_teacher:
            return labels * self.usd_per_label + self.student_finetune_usd(labels)
        gold = labels if kind.mixes_gold else 0
        return (labels * self.usd_per_label + self.teacher_finetune_usd(labels) + self.teacher_inference_usd(unlabeled)
                + self.distill_usd(unlabeled + gold))

    def _plan(self, *fields: Any, note: str = "") -> Plan:
        return Plan(*fields, cost_profile=self.cost_profile_row(), note=note)

    @staticmethod
    def _largest(fits: Callable[[int], bool], upper: int) -> int:
        """The largest n in [0, upper] with fits(n) (fits is monotone: true up to some n)."""
        lo, hi = 0, upper
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    # ------------------------------------------------------------------ plans
    def plan(self, strategy: str, start_labels: int, budget_usd: float, *, unlabeled_available: Optional[int] = None,
             labels_available: Optional[int] = None, compute_share: float = 0.5,
             unlabeled_grid: Optional[Sequence[int]] = None) -> Plan:
        kind = strategies.get(strategy)
        _check_budget(budget_usd)
        if start_labels < 0:
            raise ValueError(f"start labels must be >= 0, got {start_labels}")
        grid = _check_grid(unlabeled_grid)
        if not kind.uses_teacher:
            return self._annotate(start_labels, budget_usd, labels_available)
        if not kind.splits_budget:
            return self._distill(start_labels, 0, 0.0, budget_usd, budget_usd, unlabeled_available, strategy, grid)
        if not 0 < compute_share < 1:
            raise ValueError(f"compute_share must be in (0, 1) for mixed, got {compute_share}")
        labels_budget = budget_usd * (1 - compute_share)
        bought = self._affordable_labels(labels_budget, labels_available, start_labels)
        labels_usd = bought * self.usd_per_label
        return self._distill(start_labels, bought, labels_usd, budget_usd - labels_usd, budget_usd, unlabeled_available,
                             strategy, grid)

    def price(self, start_labels: int, unlabeled: int, budget_usd: Optional[float] = None) -> Plan:
        """The distill arm at a fixed (L, U) point; feasible unless a given budget does not cover it."""
        if isinstance(unlabeled, bool) or not isinstance(unlabeled, int) or unlabeled < 0:
            raise ValueError(f"unlabeled inputs must be a whole number >= 0, got {unlabeled!r}")
        if start_labels <= 0:
            raise ValueError(f"the teacher needs labels to fine-tune on: start labels must be > 0, got {start_labels}")
        if budget_usd is not None:
            _check_budget(budget_usd)
        teacher_ft, inference = self.teacher_finetune_usd(start_labels), self.teacher_inference_usd(unlabeled)
        student = self.distill_usd(unlabeled) if unlabeled else 0.0
        total = teacher_ft + inference + student
        feasible, reason = True, ""
        if budget_usd is not None and total > budget_usd:
            feasible, reason = False, f"L={start_labels}, U={unlabeled} costs ${total:.2f} > budget ${budget_usd:.2f}"
        return self._plan("distill", feasible, reason, total if budget_usd is None else budget_usd, 0, start_labels,
                          unlabeled, 0.0, teacher_ft, inference, student)

    def _affordable_labels(self, budget: float, available: Optional[int], start: int) -> int:
        n = int(budget // self.usd_per_label)
        return n if available is None else max(0, min(n, available - start))

    def _annotate(self, start: int, budget: float, available: Optional[int]) -> Plan:
        # Largest N with N x price + fine-tuning the student on (start + N) labels <= budget. The bound is
        # one above the quotient: float floor division undercounts ($150 // $0.20 is 749.0), the test decides.
        upper = int(budget / self.usd_per_label) + 1
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
        note = ""
        if feasible and available is not None and n == available - start and n < int(budget // self.usd_per_label):
            note = f"the labeled pool ({available} examples) caps the labels bought"
        return self._plan("annotate", feasible, reason, budget, n, used, 0, n * self.usd_per_label, 0.0, 0.0,
                          self.student_finetune_usd(used), note=note)

    def _distill(self, start: int, bought: int, labels_usd: float, compute_budget: float, budget: float,
                 unlabeled_available: Optional[int], strategy: str, grid: Optional[tuple[int, ...]]) -> Plan:
        labels = start + bought
        teacher_ft = self.teacher_finetune_usd(labels)
        gold_rows = labels if strategies.get(strategy).mixes_gold else 0   # mixed: gold rows join the student's data

        def infeasible(reason: str) -> Plan:
            return self._plan(strategy, False, reason, budget, bought, labels, 0, labels_usd, teacher_ft, 0.0, 0.0)

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

        u, why_none = self._choose_unlabeled(cost, left, unlabeled_available, grid)
        if u < 1:
            return infeasible(f"after the teacher's fine-tuning (${teacher_ft:.2f}) the ${left:.2f} left does not "
                              f"cover {why_none}")
        plan = self._plan(strategy, True, "", budget, bought, labels, u, labels_usd, teacher_ft,
                          self.teacher_inference_usd(u), self.distill_usd(u + gold_rows))
        if unlabeled_available is not None and u == unlabeled_available and cost(u + 1) <= left:
            plan = dataclasses.replace(plan, note=f"the unlabeled pool ({unlabeled_available} inputs) caps U: "
                                                  f"${plan.unspent_usd:.2f} of the budget is unspent")
        return plan

    def _choose_unlabeled(self, cost: Callable[[int], float], left: float, available: Optional[int],
                          grid: Optional[tuple[int, ...]]) -> tuple[int, str]:
        """The U to buy (largest affordable, on the grid when given) and, for U = 0, what was not covered."""
        if grid is not None:
            # A pool smaller than every grid value: all of it (the cap note then says so).
            points = [g for g in grid if available is None or g <= available] or [available]
            fits = [g for g in points if cost(g) <= left]
            return (max(fits) if fits else 0), f"the grid's smallest U={min(points)} (${cost(min(points)):.2f})"
        batch = self.inference_batch
        per_input = self.teacher_inference_usd(batch) / batch
        upper = int(left // max(per_input, 1e-30)) + batch
        if available is not None:
            upper = min(upper, available)
        return self._largest(lambda k: cost(k) <= left, upper), f"one batch of unlabeled inputs (${cost(1):.4f})"


class Planner(BudgetSearch):
    """Phase dollars from their work (steps, batches, FLOPs) under a cost profile; the search is `BudgetSearch`'s."""

    def __init__(self, accelerator: Accelerator, student: T5Config, teacher: T5Config,
                 usd_per_label: float, recipe: Recipe = Recipe(), profile: Optional[CostProfile] = None,
                 task: Optional[str] = None):
        """`task` names the task priced (plans record whether the profile was fitted to it)."""
        if usd_per_label <= 0:
            raise ValueError(f"the annotation cost per label must be positive, got {usd_per_label}")
        profile = profile or MfuProfile("mfu", f"ASSUMED {recipe.mfu:.0%} MFU of {accelerator.name} (not measured)",
                                        accelerator, mfu=recipe.mfu)
        self.acc, self.student, self.teacher, self.usd_per_label, self.recipe, self.profile, self.task = (
            profile.accelerator, student, teacher, usd_per_label, recipe, profile, task)

    # ------------------------------------------------------------------ work
    def _lengths(self) -> tuple[float, float]:
        return self.recipe.inputs_length, self.recipe.targets_length

    def _train_work(self, program: str, cfg: T5Config, examples: int, epochs: float, teacher_forward: bool = False):
        steps = self.recipe.steps(examples, epochs)
        rows = steps * self.recipe.batch_size
        per_row = flops.train_flops(cfg, 1, *self._lengths())
        decoder = 3.0 * flops.decoder_token_flops(cfg, 1, *self._lengths())   # a train step: 3 forwards
        if teacher_forward:
            per_row += flops.forward_flops(self.teacher, 1, *self._lengths())
            decoder += flops.decoder_token_flops(self.teacher, 1, *self._lengths())
        params = max(cfg.num_params(), self.teacher.num_params() if teacher_forward else 0)
        return Work(program, rows, steps, rows * per_row, params, decoder_flops=rows * decoder)

    def teacher_finetune_work(self, labels: int) -> Work:
        return self._train_work("teacher_train", self.teacher, labels, self.recipe.teacher_epochs)

    def student_finetune_work(self, labels: int) -> Work:
        return self._train_work("student_train", self.student, labels, self.recipe.student_epochs)

    def teacher_inference_work(self, inputs: int) -> list[Work]:
        """Greedy decoding of every input; with stored soft targets, one scoring pass for the top-k too."""
        batches = math.ceil(inputs / self.recipe.batch_size) if inputs > 0 else 0
        forward = inputs * flops.forward_flops(self.teacher, 1, *self._lengths())
        decoder = inputs * flops.decoder_token_flops(self.teacher, 1, *self._lengths())
        params = self.teacher.num_params()
        work = [Work("teacher_decode", inputs, batches * self.recipe.targets_length, forward, params, decoder)]
        if not self.recipe.online_kd:
            work.append(Work("teacher_score", inputs, batches, forward, params, decoder))
        return work

    def distill_work(self, examples: int) -> Work:
        online = self.recipe.online_kd
        return self._train_work("student_distill_online" if online else "student_distill_stored", self.student,
                                examples, self.recipe.distill_epochs, teacher_forward=online)

    # ------------------------------------------------------------------ dollars
    def student_finetune_usd(self, labels: int) -> float:
        return self.profile.usd(self.student_finetune_work(labels))

    def teacher_finetune_usd(self, labels: int) -> float:
        return self.profile.usd(self.teacher_finetune_work(labels))

    def teacher_inference_usd(self, inputs: int) -> float:
        return sum(self.profile.usd(w) for w in self.teacher_inference_work(inputs))

    def distill_usd(self, examples: int) -> float:
        """Student training on `examples` rows of soft targets (plus the teacher forward if online)."""
        return self.profile.usd(self.distill_work(examples))

    def step_usd(self, work: Work) -> float:
        """Dollars of one step of `work` (for a per-step budget cap while the work runs)."""
        return self.profile.usd(work) / work.steps if work.steps else 0.0

    def cost_profile_row(self) -> dict:
        return self.profile.as_dict(self.task)

    @property
    def inference_batch(self) -> int:
        return self.recipe.batch_size


def _check_budget(budget_usd: Any) -> None:
    if isinstance(budget_usd, bool) or not isinstance(budget_usd, (int, float)) or not math.isfinite(budget_usd) \
            or budget_usd < 0:
        raise ValueError(f"budget must be a non-negative, finite number of dollars, got {budget_usd!r}")
    if budget_usd > MAX_BUDGET_USD:
        raise ValueError(f"budget ${budget_usd:.3g} is beyond what the planner prices (at most ${MAX_BUDGET_USD:.0e})")


def _check_grid(grid: Optional[Sequence[int]]) -> Optional[tuple[int, ...]]:
    if grid is None:
        return None
    if not grid or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
        raise ValueError(f"the unlabeled grid must be whole numbers >= 1, got {list(grid)!r}")
    return tuple(sorted(set(grid)))


def lengths_for(card: Any, profile: CostProfile) -> dict[str, Any]:
    """Token lengths a profile prices a task at, and where they come from.

    The paper's profile prices dynamic padding at the statistics of the paper's data its fit chose;
    the engine (calibrated / mfu) pads every batch to the card's lengths.
    """
    if isinstance(profile, PaperProfile):
        measured = profile.task_lengths(card.name)
        if measured is not None:
            return {"inputs": measured.inputs, "targets": measured.targets,
                    "source": f"token lengths of the {card.name} data ({measured.examples} examples; "
                              f"{measured.statistics})"}
        return {**card.feature_lengths, "source": f"the card's padded lengths: no mean lengths of {card.name} "
                                                  f"are recorded in cost_profiles.toml [paper_lengths]"}
    return {**card.feature_lengths, "source": "the card's lengths (every batch is padded to them)"}


def build_planner(card: Any, teacher: T5Config, student: T5Config, profile: CostProfile, *,
                  soft_targets: Optional[str] = None, teacher_epochs: Optional[float] = None,
                  student_epochs: Optional[float] = None, distill_epochs: Optional[float] = None,
                  batch_size: Optional[int] = None) -> tuple[Planner, dict[str, Any]]:
    """A planner for `card` priced by `profile`, and the lengths it prices at (with their source).

    Unset settings take the profile's recipe (the paper's: 20/20/50 epochs, batch 32, online soft
    targets) or the Recipe defaults; a calibration measured for other models, lengths or batch size
    is refused here.
    """
    base = profile.recipe if isinstance(profile, PaperProfile) else {}
    soft_targets = soft_targets or base.get("soft_targets", "stored")
    if soft_targets not in ("stored", "online"):
        raise ValueError(f"soft targets must be 'stored' or 'online', got {soft_targets!r}")
    defaults = Recipe()
    lengths = lengths_for(card, profile)
    recipe = Recipe(teacher_epochs=teacher_epochs or base.get("teacher_epochs", defaults.teacher_epochs),
                    student_epochs=student_epochs or base.get("student_epochs", defaults.student_epochs),
                    distill_epochs=distill_epochs or base.get("distill_epochs", defaults.distill_epochs),
                    batch_size=batch_size or base.get("batch_size", defaults.batch_size),
                    inputs_length=lengths["inputs"], targets_length=lengths["targets"],
                    online_kd=soft_targets == "online", mfu=getattr(profile, "mfu", defaults.mfu))
    check_calibration(profile, teacher=teacher, student=student, lengths=lengths, batch_size=recipe.batch_size)
    return Planner(profile.accelerator, student, teacher, card.annotation_cost_usd, recipe, profile,
                   task=card.name), lengths
