"""doa-jax's own checkpoint: an Orbax composite checkpoint with items `params` and `config`.

`params` is the float32 param pytree (Orbax PyTree item); `config` is JSON: `T5Config.to_dict()`
plus `{"format": "doa_jax", "format_version": 1, "layout": "unscanned"}`. `save_native` always
writes per-layer names; a params item that holds stacked layers (a scanned model's trainer step,
`"layout": "scanned"`) is unstacked on load. The trainer's step
directories (an Orbax `CheckpointManager` root) carry the same two items next to their own
(optimizer state, data position); loading reads `params` and `config` and ignores the rest, and
a manager root (or a trainer MODEL_DIR holding one as `checkpoints/`) loads its latest step.
"""
from __future__ import annotations

import os
import pathlib
import re
from typing import Any, Mapping, Optional

from doa_jax import storage
from doa_jax.checkpoints.tensorstore_io import read_orbax_item
from doa_jax.checkpoints.tree import CheckpointError, check_params, flatten, float32_tree, unflatten
from doa_jax.model import T5Config
from doa_jax.model.scan import is_stacked, unstack_layers

PARAMS_ITEM = "params"
CONFIG_ITEM = "config"
FORMAT = {"format": "doa_jax", "format_version": 1, "layout": "unscanned"}
LAYOUTS = ("unscanned", "scanned")  # how the params item stores layers (per-layer names / stacked)
RUN_SUBDIR = "checkpoints"  # the trainer's MODEL_DIR/checkpoints/<step>/
_STEP_DIR = re.compile(r"^(?:.*_)?(\d+)$")  # '120' (CheckpointManager's default) or 'checkpoint_120'


def config_json(config: T5Config) -> dict[str, Any]:
    """The `config` item: the model, not how a run decodes or differentiates it (`model.config.EXECUTION_FIELDS` are the
    reader's choice; checkpoints read by versions before they existed stay readable)."""
    return {**config.to_dict(execution=False), **FORMAT}


def config_from_json(d: Mapping[str, Any], source: str) -> T5Config:
    """`T5Config` from the `config` item, after checking the format marker."""
    for key, value in FORMAT.items():
        if key == "layout" and d.get(key) in LAYOUTS:
            continue
        if d.get(key) != value:
            raise CheckpointError(f"{source}: config item has {key}={d.get(key)!r}, expected {value!r}"
                                  + (" (written by a newer doa-jax?)" if key == "format_version" else ""))
    try:
        return T5Config.from_dict({k: v for k, v in d.items() if k not in FORMAT})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: config item is not a valid T5Config ({e})") from None


def is_native(path: pathlib.Path) -> bool:
    return (path / PARAMS_ITEM).is_dir() and (path / CONFIG_ITEM).is_dir()


def step_dirs(root: pathlib.Path) -> dict[int, pathlib.Path]:
    """{step: dir} for the finished native step checkpoints under a CheckpointManager root."""
    steps = {}
    for child in root.iterdir() if root.is_dir() else ():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and is_native(child):
            steps[int(m.group(1))] = child
    return steps


def run_steps(path: pathlib.Path) -> dict[int, pathlib.Path]:
    """Step checkpoints of a run: under `path` itself or its `checkpoints/` (a trainer MODEL_DIR)."""
    return step_dirs(path) or step_dirs(path / RUN_SUBDIR)


def latest_step_dir(root: str | os.PathLike) -> pathlib.Path:
    steps = run_steps(storage.path(root))
    if not steps:
        raise CheckpointError(f"{root}: no step checkpoints (directories with '{PARAMS_ITEM}' and "
                              f"'{CONFIG_ITEM}' items)")
    return steps[max(steps)]


def save_native(path: str | os.PathLike, config: T5Config, params: Mapping[str, Any]) -> pathlib.Path:
    """Writes `params` (checked against `config`) and `config` as a new Orbax checkpoint at `path`."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    path = storage.absolute(path)
    check_params(config, flatten(params), "params to save")
    params = jax.tree_util.tree_map(
        lambda a: a if getattr(a, "dtype", None) == np.float32 else np.asarray(a, np.float32), params)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(path, ocp.args.Composite(**model_items(config, params)))
    return path


def model_items(config: T5Config, params: Any) -> dict[str, Any]:
    """The native format's two Orbax items as save args: the one writer of `params` + `config`,
    used by `save_native` and by the trainer's step checkpoints (`checkpoints.steps`)."""
    import orbax.checkpoint as ocp

    return {PARAMS_ITEM: ocp.args.StandardSave(params), CONFIG_ITEM: ocp.args.JsonSave(config_json(config))}


def read_config(path: str | os.PathLike) -> T5Config:
    """The `config` item of a native checkpoint (or step) directory."""
    import orbax.checkpoint as ocp

    path = storage.absolute(path)
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(path, ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot read the '{CONFIG_ITEM}' item ({e})") from None
    return config_from_json(restored[CONFIG_ITEM], str(path / CONFIG_ITEM))


def load_native(path: str | os.PathLike, config: Optional[T5Config] = None) -> tuple[T5Config, dict]:
    """(config, float32 params) from a native checkpoint, a trainer step, or a run's latest step."""
    path = storage.path(path)
    if not is_native(path):
        path = latest_step_dir(path)
    config = config or read_config(path)
    flat = {"/".join(p): a for p, a in read_orbax_item(path / PARAMS_ITEM).items()}
    if is_stacked(unflatten(flat)):
        flat = flatten(unstack_layers(unflatten(flat)))
    check_params(config, flat, str(path / PARAMS_ITEM))
    return config, float32_tree(flat)
