"""Optimizers (optax) and learning-rate schedules, named by one frozen config.

* `adafactor`: T5X's fine-tuning defaults — second-moment decay `1 - (t+1)^-0.8`, factored
  second moments for matrices whose two largest dims are >= 128, update clipping at RMS 1.0, no
  momentum, updates scaled by the parameter's RMS (at least 1e-3). `optax.adafactor` implements
  exactly this rule; a fresh state starts at step 0 (T5X restores step 1e6 from the public
  checkpoints, so its decay starts near 1 — see t5x issue #1478).
* `adamw`: decoupled weight decay (the paper's PyTorch fine-tuning: lr 3e-5, batch 32).

Schedules are T5X's `create_learning_rate_scheduler` factor strings (`'constant'`,
`'constant * rsqrt_decay'`, `'constant * linear_warmup * rsqrt_decay'`, ...) plus
`'linear_to_zero'` (PyTorch/HF's linear decay from `warmup_steps` to the last step).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Union

import jax.numpy as jnp
import optax

Schedule = Callable[[Any], Any]


# ----------------------------------------------------------------------------- schedules

def _warmup(step, c):
    return jnp.minimum(1.0, step / c.warmup_steps) if c.warmup_steps > 0 else 1.0


def _rsqrt(step, c):
    return 1.0 / jnp.sqrt(jnp.maximum(step, max(c.warmup_steps, 1)))


def _rsqrt_normalized(step, c):
    return math.sqrt(max(c.warmup_steps, 1)) * _rsqrt(step, c)


def _cosine(step, c):
    progress = jnp.maximum(0.0, (step - c.warmup_steps) / float(c.steps_per_cycle))
    return jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * (progress % 1.0))))


def _linear_to_zero(step, c):
    span = max(c.total_steps - c.warmup_steps, 1)
    return jnp.clip((c.total_steps - step) / span, 0.0, 1.0)


# Factor name -> f(step, ScheduleParams). The schedule is the product of the named factors.
SCHEDULE_FACTORS: dict[str, Callable[[Any, "_ScheduleParams"], Any]] = {
    "constant": lambda step, c: c.base_learning_rate,
    "linear_warmup": _warmup,
    "rsqrt_decay": _rsqrt,
    "rsqrt_normalized_decay": _rsqrt_normalized,
    "decay_every": lambda step, c: c.decay_factor ** (step // c.steps_per_decay),
    "cosine_decay": _cosine,
    "linear_to_zero": _linear_to_zero,
}


@dataclasses.dataclass(frozen=True)
class _ScheduleParams:
    base_learning_rate: float
    warmup_steps: int
    total_steps: int
    decay_factor: float
    steps_per_decay: int
    steps_per_cycle: int


def learning_rate_schedule(factors: str = "constant", *, base_learning_rate: float = 1e-3,
                           warmup_steps: int = 0, total_steps: int = 1, decay_factor: float = 0.5,
                           steps_per_decay: int = 20000, steps_per_cycle: int = 100000,
                           min_learning_rate: float = 0.0) -> Schedule:
    """`step -> learning rate` as the product of `factors` ('constant * rsqrt_decay', ...)."""
    names = [n.strip() for n in factors.split("*") if n.strip()]
    unknown = [n for n in names if n not in SCHEDULE_FACTORS]
    if unknown or not names:
        raise ValueError(f"learning-rate schedule {factors!r}: unknown factor(s) {unknown}; known: "
                         f"{sorted(SCHEDULE_FACTORS)}")
    params = _ScheduleParams(base_learning_rate, warmup_steps, total_steps, decay_factor,
                             steps_per_decay, steps_per_cycle)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        value = jnp.float32(1.0)
        for name in names:
            value = value * SCHEDULE_FACTORS[name](step, params)
        return jnp.maximum(jnp.asarray(value, jnp.float32), min_learning_rate)

    return schedule


# ----------------------------------------------------------------------------- optimizers

def _adafactor(c: "OptimizerConfig", lr: Schedule) -> optax.GradientTransformation:
    return optax.adafactor(learning_rate=lr, decay_rate=c.decay_rate,
                           min_dim_size_to_factor=c.min_dim_size_to_factor,
                           clipping_threshold=c.clipping_threshold,
                           multiply_by_parameter_scale=c.multiply_by_parameter_scale,
                           momentum=c.momentum, eps=c.epsilon1)


def _adamw(c: "OptimizerConfig", lr: Schedule) -> optax.GradientTransformation:
    return optax.adamw(learning_rate=lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)


OPTIMIZERS: dict[str, Callable[["OptimizerConfig", Schedule], optax.GradientTransformation]] = {
    "adafactor": _adafactor,
    "adamw": _adamw,
}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer + schedule. Defaults are T5X's fine-tuning run (Adafactor, constant lr 1e-3).

    The paper's PyTorch setting is `name='adamw', learning_rate=3e-5`. `schedule` is a factor
    string (see `SCHEDULE_FACTORS`) or, from Python, any optax schedule `step -> lr`.
    `grad_clip_norm` clips the global gradient norm first (any optimizer).
    """

    name: str = "adafactor"
    learning_rate: float = 1e-3
    schedule: Union[str, Schedule] = "constant"
    warmup_steps: int = 0
    decay_factor: float = 0.5
    steps_per_decay: int = 20000
    steps_per_cycle: int = 100000
    min_learning_rate: float = 0.0
    grad_clip_norm: Optional[float] = None
    # Adafactor (T5X fine-tuning defaults).
    decay_rate: float = 0.8
    min_dim_size_to_factor: int = 128
    clipping_threshold: Optional[float] = 1.0
    multiply_by_parameter_scale: bool = True
    momentum: Optional[float] = None
    epsilon1: float = 1e-30
    # AdamW.
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"OptimizerConfig.name {self.name!r}: known optimizers {sorted(OPTIMIZERS)}")
        if not self.learning_rate > 0:
            raise ValueError(f"OptimizerConfig.learning_rate must be > 0, got {self.learning_rate}")
        if isinstance(self.schedule, str):
            learning_rate_schedule(self.schedule)  # validates the factor names early

    @property
    def uses_total_steps(self) -> bool:
        """Whether the schedule depends on the run's length (so programs can be shared otherwise)."""
        return isinstance(self.schedule, str) and "linear_to_zero" in self.schedule

    def make_schedule(self, total_steps: int) -> Schedule:
        if callable(self.schedule):
            return self.schedule
        return learning_rate_schedule(
            self.schedule, base_learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
            total_steps=total_steps, decay_factor=self.decay_factor,
            steps_per_decay=self.steps_per_decay, steps_per_cycle=self.steps_per_cycle,
            min_learning_rate=self.min_learning_rate)

    def build(self, total_steps: int) -> tuple[optax.GradientTransformation, Schedule]:
        """`(optax transformation, schedule)`; `total_steps` feeds decays that end with training."""
        schedule = self.make_schedule(total_steps)
        tx = OPTIMIZERS[self.name](self, schedule)
        if self.grad_clip_norm is not None:
            tx = optax.chain(optax.clip_by_global_norm(self.grad_clip_norm), tx)
        return tx, schedule


__all__ = ["OPTIMIZERS", "OptimizerConfig", "SCHEDULE_FACTORS", "learning_rate_schedule"]
