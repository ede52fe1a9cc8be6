"""How a cell's compute is priced: its cost profile, and its work as the profile's `Work` items.

    PricingConfig (COST_PROFILE, CALIBRATION, ...) ──► cost profile ──► planner (the plan)
    each phase's work (planned, or as run: the steps it really took) ──► $ in the ledger

The profile is `calibrated` when a calibration file is given; else `paper` (the paper's own
accounting, fitted to its costs) when the cell runs the paper's programs (a teacher forward at every
distillation step, `SOFT_TARGETS='online'`); else `mfu`, an ASSUMED utilisation, because the paper
never ran stored top-k distillation and so has no price for it. COST_PROFILE overrides the choice.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from doa_jax import flops
from doa_jax.experiment import cost_profiles, planner
from doa_jax.experiment.config import CellConfig
from doa_jax.experiment.cost_profiles import CostProfile, Work


def profile_name(cfg: CellConfig) -> str:
    """The cell's cost profile (see the module docstring for the default)."""
    p = cfg.pricing
    if p.cost_profile is not None:
        return p.cost_profile
    return cost_profiles.default_profile_name(p.calibration, paper_programs=cfg.distill.soft_targets == "online")


def recipe_of(cfg: CellConfig) -> dict[str, Any]:
    """The cell's settings that set its price (`planner.build_planner`'s keywords)."""
    return dict(soft_targets=cfg.distill.soft_targets, teacher_epochs=cfg.epochs.teacher,
                student_epochs=cfg.epochs.student, distill_epochs=cfg.epochs.distill, batch_size=cfg.train.batch_size)


@dataclasses.dataclass
class Pricer:
    """The cell's profile and the planner built on it; prices each phase's work."""

    profile: CostProfile
    planner: planner.Planner
    lengths: dict[str, Any]

    @classmethod
    def for_cell(cls, cfg: CellConfig, card: Any, lengths: dict[str, int]) -> "Pricer":
        p, name = cfg.pricing, profile_name(cfg)
        profile = cost_profiles.load_profile(name, accelerator=p.accelerator if name == "mfu" else None,
                                             calibration=p.calibration, mfu=p.mfu)
        teacher, student = cfg.pricing_models()
        plan, priced = planner.build_planner(
            dataclasses.replace(card, feature_lengths=dict(lengths)), teacher, student, profile, **recipe_of(cfg))
        return cls(profile, plan, priced)

    def describe(self) -> dict[str, Any]:
        """What results rows and reports record about the pricing (for the `paper` profile: whether it
        was fitted to this task or extrapolates to it, and the error to expect)."""
        return {**self.profile.as_dict(self.planner.task), "lengths": self.lengths.get("source", "")}

    def teacher_finetune(self, labels: int) -> list[Work]:
        return [self.planner.teacher_finetune_work(labels)]

    def teacher_inference(self, inputs: int) -> list[Work]:
        return self.planner.teacher_inference_work(inputs)

    def student(self, uses_teacher: bool, rows: int) -> list[Work]:
        """The student's training: on gold labels (annotate) or on the teacher's outputs."""
        return [self.planner.distill_work(rows) if uses_teacher else self.planner.student_finetune_work(rows)]

    def evaluation(self, model: Any, examples: int) -> list[Work]:
        recipe = self.planner.recipe
        batches = math.ceil(examples / recipe.batch_size) if examples else 0
        lengths = (recipe.inputs_length, recipe.targets_length)
        fl, decoder = (examples * f(model, 1, *lengths) for f in (flops.forward_flops, flops.decoder_token_flops))
        return [Work("eval_decode", examples, batches * recipe.targets_length, fl, model.num_params(), decoder)]

    def usd(self, work: list[Work]) -> float:
        return sum(self.profile.usd(w) for w in work)

    def step_usd(self, work: list[Work]) -> float:
        """Dollars of one step of a training phase (for the per-step budget cap)."""
        return sum(self.planner.step_usd(w) for w in work)


def as_run(work: list[Work], steps: int) -> list[Work]:
    """Planned training work scaled to the steps it really took (a capped or resumed run)."""
    out = []
    for w in work:
        f = steps / w.steps if w.steps else 0.0
        out.append(dataclasses.replace(w, rows=w.rows * f, steps=steps, flops=w.flops * f,
                                       decoder_flops=w.decoder_flops * f))
    return out
