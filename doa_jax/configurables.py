"""The registry of gin configurables: every class a gin file can build, by its gin name.

It sits at the top of the package (it names classes from every layer) and is registered once by
the `doa` CLI before any gin file is parsed; library users call `register()` themselves.
`doa_jax.gin_utils` only parses. Factories, not the classes, are registered, so gin never
subclasses a frozen dataclass.
"""
from __future__ import annotations

from typing import Any, Callable

import gin

from doa_jax import gin_utils
from doa_jax.data.batches import CopyTaskData, TaskData
from doa_jax.experiment.config import CellConfig, DistillConfig, Epochs, PhaseLayout, PricingConfig
from doa_jax.experiment.sweep import Grid
from doa_jax.losses import LossConfig
from doa_jax.model.config import T5Config, config_for_size
from doa_jax.optimizers import OptimizerConfig
from doa_jax.partitioning import MeshConfig
from doa_jax.trainer import TrainConfig

# gin name -> what builds it.
CONFIGURABLES: dict[str, Callable[..., Any]] = {
    "T5Config": T5Config,
    "T5Size": config_for_size,
    "TrainConfig": TrainConfig,
    "OptimizerConfig": OptimizerConfig,
    "LossConfig": LossConfig,
    "MeshConfig": MeshConfig,
    "TaskData": TaskData,
    "CopyTaskData": CopyTaskData,
    "CellConfig": CellConfig,
    "Epochs": Epochs,
    "DistillConfig": DistillConfig,
    "PricingConfig": PricingConfig,
    "PhaseLayout": PhaseLayout,
    "SweepGrid": Grid,
}


def _factory(build: Callable[..., Any], name: str) -> Callable[..., Any]:
    def factory(*args: Any, **fields: Any) -> Any:
        try:
            return build(*args, **fields)
        except ValueError as e:   # say which one of a scoped pair (teacher/T5Size, student/T5Size) was wrong
            scope = gin.current_scope_str()
            if not scope:
                raise
            raise ValueError(f"{scope}/{name}: {e}") from None

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = build.__doc__
    return factory


def register() -> None:
    """Registers every gin configurable of the project (idempotent)."""
    if gin_utils.registered():
        return
    for name, build in CONFIGURABLES.items():
        gin.external_configurable(_factory(build, name), name=name)
    gin_utils.mark_registered()
