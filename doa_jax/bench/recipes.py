"""`doa aot`'s what-if flags as programs: one model size's train, decode, scoring and distillation
programs without a run's gin (a run's own programs: `experiment.programs`)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from doa_jax.bench.aot import PHASES, Program, TrainSpec
from doa_jax.losses import LossConfig
from doa_jax.model import T5Config
from doa_jax.model.config import config_for_size, size_of
from doa_jax.optimizers import OptimizerConfig
from doa_jax.partitioning import MeshConfig


@dataclasses.dataclass(frozen=True)
class Recipe:
    """`doa aot`'s what-if flags: one model size's programs without a run's gin. Defaults are the
    project's (T5Config, TrainConfig, OptimizerConfig, runs/experiment.gin's batch 32)."""

    size: str = "xxl"
    phase: str = "train"               # one of PHASES, or 'all'
    batch: int = 32
    lengths: tuple[int, int] = (512, 128)
    optimizer: str = OptimizerConfig().name
    param_dtype: str = "float32"
    remat: str = "none"
    scan: bool = False
    cross_kv: str = "cache"            # decode: T5Config.decode_cross_kv ('cache' | 'recompute')
    scan_backward: str = "auto"        # train, scanned: T5Config.scan_backward ('auto' | 'stack' | 'autodiff')
    mesh: tuple[int, int] = (-1, 1)    # data (-1: every device left), model
    fsdp: bool = False
    microbatches: int = 1
    fused_update: bool = False         # needs scan
    grad_clip_norm: Optional[float] = None
    dtype: str = "bfloat16"
    student: str = "small"             # distill: the student the teacher's logits feed
    vocab_size: int = 32128
    topk: int = 8                      # score: logits kept per position


def recipe_programs(r: Recipe) -> list[Program]:
    """The programs of `r`'s phase(s): a train step, a greedy decode of `lengths[1]` tokens, a top-k
    scoring pass, and for `distill` the teacher's full-vocabulary forward beside the student's step on it."""
    if r.phase not in PHASES + ("all",):
        raise ValueError(f"--phase must be one of {', '.join(PHASES + ('all',))}, got {r.phase!r}")
    model = config_for_size(r.size, dtype=r.dtype, scan_layers=r.scan, remat_policy=r.remat, vocab_size=r.vocab_size,
                            decode_cross_kv=r.cross_kv, scan_backward=r.scan_backward)
    mesh = MeshConfig(data=r.mesh[0], model=r.mesh[1], fsdp=r.fsdp)
    optimizer = OptimizerConfig(name=r.optimizer, grad_clip_norm=r.grad_clip_norm)
    name = config_name(model)
    out = []
    if r.phase in ("train", "all"):
        out.append(Program(f"{name}_train", "train", "train", model, r.batch, r.lengths, mesh,
                           TrainSpec(LossConfig(), optimizer, r.param_dtype, r.microbatches,
                                     fused_update=r.fused_update)))
    if r.phase in ("decode", "all"):
        out.append(Program(f"{name}_decode", "decode", "decode", model, r.batch, r.lengths, mesh))
    if r.phase in ("score", "all"):
        out.append(Program(f"{name}_score", "score", "score", model, r.batch, r.lengths, mesh, topk=r.topk))
    if r.phase in ("distill", "all"):
        student = config_for_size(r.student, dtype=r.dtype, scan_layers=r.scan, remat_policy=r.remat,
                                  vocab_size=r.vocab_size, scan_backward=r.scan_backward)
        step = f"{config_name(student)}_distill"
        out.append(Program(f"{name}_forward", "distill", "forward", model, r.batch, r.lengths, mesh,
                           co_resident=(step,)))
        out.append(Program(step, "distill", "train", student, r.batch, r.lengths, mesh,
                           TrainSpec(LossConfig(kd_weight=1.0), optimizer, r.param_dtype, r.microbatches,
                                     soft_targets=r.vocab_size, fused_update=r.fused_update),
                           co_resident=(f"{name}_forward",)))
    return out


def config_name(model: T5Config) -> str:
    """A short name of `model`'s size: `xxl`, `small`, or a description of a custom one."""
    return size_of(model).replace("t5_1_1_", "")
