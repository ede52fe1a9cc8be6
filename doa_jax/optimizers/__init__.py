"""Optimizers (optax) and learning-rate schedules, named by one frozen config, one role a module:

    config.py     the optimizers by name (`OPTIMIZERS`) and `OptimizerConfig`, which builds one
    schedules.py  learning-rate schedules (T5X's factor strings, plus `linear_to_zero`)
    per_layer.py  the optimizer run once per layer of scanned (stacked) params, with its fused
                  `apply` (update and write back in place) and global-norm clipping
    rounding.py   bfloat16 params: the cast and stochastic rounding of float32 updates
"""
from doa_jax.optimizers.config import ELEMENTWISE, OPTIMIZERS, OptimizerConfig, scale_by_adam_hf
from doa_jax.optimizers.per_layer import (PerLayerState, PerLayerTransformation, apply_gradients, apply_layer,
                                          clip_factor, merge_stacks, per_layer, split_stacks, sq_norm, stack_paths,
                                          update_keys)
from doa_jax.optimizers.rounding import PARAM_DTYPES, apply_updates, cast_params, stochastic_round
from doa_jax.optimizers.schedules import SCHEDULE_FACTORS, Schedule, learning_rate_schedule

__all__ = ["ELEMENTWISE", "OPTIMIZERS", "OptimizerConfig", "PerLayerState", "PerLayerTransformation",
           "SCHEDULE_FACTORS", "PARAM_DTYPES", "Schedule", "apply_gradients", "apply_layer", "apply_updates",
           "cast_params", "clip_factor", "learning_rate_schedule", "merge_stacks", "per_layer", "scale_by_adam_hf",
           "split_stacks", "sq_norm", "stack_paths", "stochastic_round", "update_keys"]
