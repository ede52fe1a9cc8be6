"""Learning-rate schedules: T5X's `create_learning_rate_scheduler` factor strings (`'constant'`,
`'constant * rsqrt_decay'`, `'constant * linear_warmup * rsqrt_decay'`, ...) plus `'linear_to_zero'`
(PyTorch/HF's linear decay from `warmup_steps` to the last step)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax.numpy as jnp

Schedule = Callable[[Any], Any]


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
