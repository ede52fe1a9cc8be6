"""The optimizers by name and the frozen config that builds one with its schedule.

* `adafactor`: T5X's fine-tuning defaults — second-moment decay `1 - (t+1)^-0.8`, factored
  second moments for matrices whose two largest dims are >= 128, update clipping at RMS 1.0, no
  momentum, updates scaled by the parameter's RMS (at least 1e-3). `optax.adafactor` implements
  exactly this rule; a fresh state starts at step 0 (T5X restores step 1e6 from the public
  checkpoints, so its decay starts near 1 — see t5x issue #1478).
* `adamw`: decoupled weight decay (the paper's PyTorch fine-tuning: lr 3e-5, batch 32); with
  `eps_before_bias_correction` the eps of transformers' AdamW (`scale_by_adam_hf`), which the
  paper's HF Trainer used.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

from doa_jax.optimizers.per_layer import per_layer
from doa_jax.optimizers.schedules import Schedule, learning_rate_schedule


def _adafactor(c: "OptimizerConfig", lr: Schedule) -> optax.GradientTransformation:
    return optax.adafactor(learning_rate=lr, decay_rate=c.decay_rate,
                           min_dim_size_to_factor=c.min_dim_size_to_factor,
                           clipping_threshold=c.clipping_threshold,
                           multiply_by_parameter_scale=c.multiply_by_parameter_scale,
                           momentum=c.momentum, eps=c.epsilon1)


def scale_by_adam_hf(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's scaling as transformers' AdamW (`adamw_hf`, HF Trainer's default optimizer until
    transformers 4.39, the paper's) computes it: eps joins sqrt(v) *before* the bias correction,
    `m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2^t))`, where optax and torch add eps to sqrt(v_hat).
    The effective eps is 32x larger at step 1 and falls to eps over ~1/(1-b2) steps; it matters
    where |gradient| is within a few eps/sqrt(1 - b2^t). Same state as `optax.scale_by_adam`."""
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def update(updates, state, params=None):
        _, state = adam.update(updates, state, params)        # the moments and the step count
        t = state.count.astype(jnp.float32)
        correction1, correction2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        scaled = jax.tree_util.tree_map(
            lambda m, v: (m / correction1) / (jnp.sqrt(v / correction2) + eps / jnp.sqrt(correction2)),
            state.mu, state.nu)
        return scaled, state

    return optax.GradientTransformation(adam.init, update)


def _adamw(c: "OptimizerConfig", lr: Schedule) -> optax.GradientTransformation:
    if not c.eps_before_bias_correction:
        return optax.adamw(learning_rate=lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    # optax.adamw's chain (the same state), with transformers' eps.
    return optax.chain(scale_by_adam_hf(c.b1, c.b2, c.eps), optax.add_decayed_weights(c.weight_decay),
                       optax.scale_by_learning_rate(lr))


OPTIMIZERS: dict[str, Callable[["OptimizerConfig", Schedule], optax.GradientTransformation]] = {
    "adafactor": _adafactor,
    "adamw": _adamw,
}
# Element-wise optimizers: updating a whole stacked array equals updating each layer, and XLA
# does it in place with no temporaries (notes/performance.md), so `per_layer` does not loop.
ELEMENTWISE = frozenset({"adamw"})


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
    # True: eps added to sqrt(v) before bias correction, as transformers' AdamW (`adamw_hf`, the
    # paper's; `scale_by_adam_hf`); False: after it, as optax and torch.optim.AdamW.
    eps_before_bias_correction: bool = False

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"OptimizerConfig.name {self.name!r}: known optimizers {sorted(OPTIMIZERS)}")
        if not self.learning_rate > 0:
            raise ValueError(f"OptimizerConfig.learning_rate must be > 0, got {self.learning_rate}")
        if isinstance(self.schedule, str):
            learning_rate_schedule(self.schedule)  # validates the factor names early
        if self.eps_before_bias_correction and self.name != "adamw":
            raise ValueError(f"OptimizerConfig.eps_before_bias_correction is AdamW's (transformers' eps); "
                             f"optimizer {self.name!r} has no such eps")

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
        tx = per_layer(OPTIMIZERS[self.name](self, schedule), clip_norm=self.grad_clip_norm,
                       loop=self.name not in ELEMENTWISE)
        return tx, schedule
