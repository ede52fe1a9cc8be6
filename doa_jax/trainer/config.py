"""A fine-tuning run's settings (`TrainConfig`, what gin's TRAIN_CONFIG builds) and its outcome
(`TrainResult`)."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

from doa_jax import fused_update, optimizers
from doa_jax.losses import LossConfig
from doa_jax.optimizers import OptimizerConfig
from doa_jax.partitioning import MeshConfig
from doa_jax.trainer.program import TrainState

_FIELD_TYPES = {"batch_size": (int,), "train_steps": (int, type(None)), "epochs": (int, float, type(None)),
                "num_microbatches": (int,), "seed": (int,), "keep_checkpoints": (int, type(None)),
                "max_grad_norm": (int, float, type(None)), "max_param_growth": (int, float, type(None)),
                "param_dtype": (str,), "log_seconds": (int, float, type(None)), "fused_update": (bool,)}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a fine-tuning run except the model and the data.

    Length: exactly one of `train_steps` or `epochs` (epochs need a source that knows its
    epoch size). `batch_size` is global (all hosts); `num_microbatches` splits it for gradient
    accumulation. `eval_metric` names the dev metric for best checkpoints and early stopping:
    'loss', 'token_accuracy' (teacher-forced) or a decode metric's name (e.g. 'accuracy', 'f1');
    `eval_mode` 'min'/'max' (default: 'min' for loss, else 'max'). `eval_every` / `checkpoint_every` are step counts or
    'epoch'; evaluation (when a dev source is given) and a checkpoint also happen at the end.
    """

    model_dir: str
    batch_size: int
    train_steps: Optional[int] = None
    epochs: Optional[float] = None
    num_microbatches: int = 1
    seed: int = 0
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    mesh: MeshConfig = MeshConfig()
    initial_checkpoint: Optional[str] = None
    initial_checkpoint_mode: str = "params"
    resume: bool = True
    log_every: int = 100
    # A console line at least this often (seconds) between logged steps, and a counter during
    # validation decoding; None: only every `log_every` steps. Console only (metrics.jsonl keeps
    # its `log_every` rows).
    log_seconds: Optional[float] = 30.0
    checkpoint_every: Optional[Union[int, str]] = 1000
    keep_checkpoints: Optional[int] = 2
    async_checkpointing: bool = True
    eval_every: Optional[Union[int, str]] = None
    eval_metric: str = "loss"
    eval_mode: Optional[str] = None
    keep_best: bool = True
    early_stopping_patience: Optional[int] = None
    max_decode_len: Optional[int] = None
    tensorboard: bool = True
    verbose: bool = True
    max_grad_norm: Optional[float] = None
    max_param_growth: Optional[float] = 100.0
    handle_signals: bool = True
    # 'bfloat16': params stored (and checkpointed) in bf16, updates computed in float32 and written
    # back with stochastic rounding (`optimizers.apply_updates`); optimizer slots stay float32.
    param_dtype: str = "float32"
    # The optimizer inside the backward pass, layer by layer (doa_jax/fused_update.py): no whole
    # gradient tree is alive; needs scanned layers and one microbatch.
    fused_update: bool = False

    def __post_init__(self):
        for name, kinds in _FIELD_TYPES.items():
            value = getattr(self, name)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                what = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
                raise TypeError(f"{name} must be {what}, got {value!r}")
        if (self.train_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of TRAIN_STEPS (train_steps) and EPOCHS (epochs); "
                             f"got train_steps={self.train_steps}, epochs={self.epochs}")
        if self.train_steps is not None and self.train_steps < 1:
            raise ValueError(f"train_steps must be >= 1, got {self.train_steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1 or self.num_microbatches < 1:
            raise ValueError(f"batch_size ({self.batch_size}) and num_microbatches "
                             f"({self.num_microbatches}) must be >= 1")
        if self.initial_checkpoint_mode not in ("params", "full"):
            raise ValueError(f"initial_checkpoint_mode must be 'params' (weights only, fresh optimizer) or "
                             f"'full' (resume a doa_jax trainer checkpoint), got {self.initial_checkpoint_mode!r}")
        if self.fused_update:
            fused_update.check_microbatches(self.num_microbatches)
        if self.param_dtype not in optimizers.PARAM_DTYPES:
            raise ValueError(f"param_dtype must be one of {optimizers.PARAM_DTYPES}, got {self.param_dtype!r}")
        if self.log_seconds is not None and not self.log_seconds > 0:
            raise ValueError(f"log_seconds must be > 0 or None, got {self.log_seconds!r}")
        if self.eval_mode not in (None, "min", "max"):
            raise ValueError(f"eval_mode must be 'min', 'max' or None, got {self.eval_mode!r}")
        for name in ("log_every", "checkpoint_every", "eval_every", "early_stopping_patience"):
            value = getattr(self, name)
            if value == "epoch" and name in ("checkpoint_every", "eval_every"):
                continue
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive number of steps"
                                 + (", 'epoch'" if name in ("checkpoint_every", "eval_every") else "")
                                 + f" or None, got {value!r}")

    @property
    def metric_mode(self) -> str:
        return self.eval_mode or ("min" if self.eval_metric == "loss" else "max")


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int
    best_metric: Optional[float]
    best_step: Optional[int]
    stopped_early: bool
    last_metrics: dict[str, float]
    stopped_by_budget: bool = False
    diverged: Optional[str] = None     # why training stopped as diverged (None: it did not)
    lost_seconds: float = 0.0          # steps a kill undid before this resume, as logged (redone here)


def _period(value: Optional[Union[int, str]], steps_per_epoch: Optional[int], name: str) -> Optional[int]:
    """`eval_every` / `checkpoint_every` in steps ('epoch': the source's epoch size)."""
    if value != "epoch":
        return value
    if not steps_per_epoch:
        raise ValueError(f"{name}='epoch' needs a training source that knows its epoch size")
    return steps_per_epoch


@dataclasses.dataclass(frozen=True)
class Due:
    """What a step is followed by: a metrics row (`log`), an evaluation, a checkpoint."""

    log: bool
    eval: bool
    checkpoint: bool


@dataclasses.dataclass(frozen=True)
class Cadence:
    """A run's length and when it logs, evaluates and checkpoints, in steps. Evaluation (when a
    dev source is given) and a checkpoint also happen at the last step; a checkpoint also on a
    stop signal; a step that evaluates or checkpoints also logs."""

    total_steps: int
    log_every: int
    eval_every: Optional[int]
    checkpoint_every: Optional[int]
    evaluates: bool

    @classmethod
    def of(cls, config: TrainConfig, steps_per_epoch: Optional[int], evaluates: bool) -> "Cadence":
        if config.epochs is None:
            total = config.train_steps
        elif not steps_per_epoch:
            raise ValueError("EPOCHS needs a training source that knows its epoch size; set TRAIN_STEPS")
        else:
            total = max(1, math.ceil(config.epochs * steps_per_epoch))
        return cls(total, config.log_every, _period(config.eval_every, steps_per_epoch, "eval_every"),
                   _period(config.checkpoint_every, steps_per_epoch, "checkpoint_every"), evaluates)

    def due(self, step: int, signalled: bool) -> Due:
        last = step == self.total_steps
        evaluate = self.evaluates and (bool(self.eval_every and step % self.eval_every == 0) or last)
        checkpoint = bool(self.checkpoint_every and step % self.checkpoint_every == 0) or last or signalled
        return Due(step % self.log_every == 0 or evaluate or checkpoint, evaluate, checkpoint)
