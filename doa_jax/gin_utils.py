"""Gin plumbing: registers the configurable pieces and parses gin files plus `--gin.X=V` flags.

Code never reads global gin state: gin builds objects (e.g. `MODEL_CONFIG = @T5Config()`) and the
caller passes them on explicitly.
"""
from __future__ import annotations

import pathlib
from typing import Any, Iterable

import gin

GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin"

_registered = False


def _t5_config(**fields: Any):
    from doa_jax.model.config import T5Config

    return T5Config(**fields)


def register() -> None:
    """Registers every gin configurable of the project (idempotent)."""
    global _registered
    if _registered:
        return
    gin.external_configurable(_t5_config, name="T5Config")
    _registered = True


def parse(gin_files: Iterable[str], bindings: Iterable[str] = (), *, finalize: bool = True) -> None:
    """Clears gin, then parses files (searched in cwd and the project's `gin/`) and bindings."""
    register()
    gin.clear_config()
    gin.add_config_file_search_path(str(GIN_DIR))
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=finalize)


def macro(name: str) -> Any:
    """The value of macro `name`, with `@configurable()` references built (e.g. 'MODEL_CONFIG')."""
    value = gin.query_parameter(f"{name}/macro.value")
    if isinstance(value, gin.config.ConfigurableReference):
        return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
    return value
