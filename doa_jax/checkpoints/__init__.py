"""Checkpoints: native Orbax save/restore, HuggingFace T5 and T5X import/export.

`load_checkpoint(path)` detects the format from the path and returns `(T5Config, params)`, params
being T5X's tree of float32 numpy arrays (what `Transformer(config).init` gives, unboxed), checked
against the config: every missing, unexpected or mis-shaped parameter is named in one
`CheckpointError`. Only safe formats are read (safetensors, msgpack, TensorStore, JSON; no pickle).

Every format stores T5X's per-layer names (`encoder/layers_0/...`). For a config with
`scan_layers=True` this module is the one place that converts: `load_checkpoint` returns the
stacked layout the scanned model uses, `save_checkpoint` writes per-layer names back
(`doa_jax.model.scan`, exact: a load-save round trip is bit-identical).

Formats (`detect_format`):
  'hf'          directory with config.json + model.safetensors (or model.safetensors.index.json)
  't5x_legacy'  T5X `checkpoint_N/` with a msgpack `checkpoint` file and zarr array directories,
                or a single msgpack file with every array inline (or the directory holding it)
  't5x_orbax'   T5X `checkpoint_N/` with an Orbax `state/` item (or that `state/` directory)
  'native'      doa-jax Orbax checkpoint (items `params` + `config`), also a trainer step
  'native_run'  a directory of native step checkpoints (or a trainer MODEL_DIR with them in
                `checkpoints/`): the latest step is loaded
Paths are resolved first, so relative paths, `..` and symlinks work for every format.

`save_checkpoint` writes 'native' (= 'orbax'), 'hf', or a T5X train state: 't5x' (= 't5x_orbax',
T5X's default) or 't5x_legacy', into `checkpoint_<step>` (`doa_jax.checkpoints.t5x_save`).
"""
from __future__ import annotations

import functools
import os
import pathlib
from typing import Any, Mapping, Optional

from doa_jax import storage
from doa_jax.checkpoints import hf, native, t5x, t5x_save
from doa_jax.checkpoints.native import load_native, save_native
from doa_jax.checkpoints.tree import CheckpointError
from doa_jax.model import T5Config
from doa_jax.model import config as model_config
from doa_jax.model.scan import is_stacked, stack_layers, unstack_layers

FORMATS = ("hf", "t5x_legacy", "t5x_orbax", "native", "native_run")

_LOADERS = {
    "hf": hf.load_hf,
    "t5x_legacy": t5x.load_t5x,
    "t5x_orbax": t5x.load_t5x,
    "native": load_native,
    "native_run": load_native,
}
_SAVERS = {"native": save_native, "orbax": save_native, "hf": hf.save_hf,
           "t5x": t5x_save.save_t5x,
           "t5x_orbax": functools.partial(t5x_save.save_t5x, format="orbax"),
           "t5x_legacy": functools.partial(t5x_save.save_t5x, format="legacy")}


def detect_format(path: str | os.PathLike) -> str:
    """One of `FORMATS`, from what the directory holds; `CheckpointError` when it is none of them."""
    if not storage.path(path).exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    path = storage.resolved(path)
    if path.is_file() and not t5x.is_legacy_file(path):
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory holding it ({path.parent})")
    has_weights = (path / hf.WEIGHTS_FILE).is_file() or (path / hf.INDEX_FILE).is_file()
    if (path / hf.CONFIG_FILE).is_file() and has_weights:
        return "hf"
    if t5x.legacy_file(path) is not None:
        return "t5x_legacy"
    if (path / t5x.ORBAX_ITEM / "_METADATA").is_file() or (
            path.name == t5x.ORBAX_ITEM and (path / "_METADATA").is_file()):
        return "t5x_orbax"
    if native.is_native(path):
        return "native"
    if native.run_steps(path):
        return "native_run"
    listing = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(listing[:12]) + (f", ... ({len(listing)} entries)" if len(listing) > 12 else "")
    hint = ""
    if (path / hf.CONFIG_FILE).is_file():
        hint = " (config.json without safetensors weights: PyTorch .bin files are not read)"
    elif any(p.name.startswith("checkpoint_") for p in path.iterdir()):
        hint = " (a T5X model directory? pass one of its checkpoint_N directories)"
    raise CheckpointError(
        f"unknown checkpoint format at {path}{hint}: expected an HF directory (config.json + "
        f"model.safetensors), a T5X checkpoint_N (msgpack 'checkpoint' or Orbax 'state/'), or a doa-jax "
        f"checkpoint ('params/' + 'config/') or run directory; found: {shown or 'nothing'}")


def load_checkpoint(path: str | os.PathLike, config: Optional[T5Config] = None) -> tuple[T5Config, dict]:
    """(config, params) from any supported checkpoint; `config` overrides the stored/inferred one.

    Params come in the layout of the returned config: stacked layers when `config.scan_layers`.
    """
    if not storage.is_url(path):
        path = pathlib.Path(path).resolve() if pathlib.Path(path).exists() else path
    config, params = _LOADERS[detect_format(path)](path, config)
    return config, (stack_layers(params) if config.scan_layers else params)


def stored_vocab_size(path: str | os.PathLike) -> int:
    """The vocab size (embedding rows) the checkpoint at `path` fixes, read from its config or its
    arrays' metadata: no weights are loaded."""
    fmt = detect_format(path)
    path = storage.resolved(path)
    if fmt == "hf":
        return hf.read_config(path).vocab_size
    if fmt in ("native", "native_run"):
        return native.read_config(path if native.is_native(path) else native.latest_step_dir(path)).vocab_size
    return t5x.embedding_rows(path)


def resolve_vocab_size(config: T5Config, num_ids: int, what: str,
                       checkpoint: Optional[str | os.PathLike] = None) -> T5Config:
    """`config` with the vocab size a run needs: the checkpoint's when one is loaded, else
    `MODEL_VOCAB_SIZE` (`config.vocab_size`) or, when None, the vocabulary's `num_ids` padded
    (`doa_jax.model.config.resolve_vocab_size`; `what` names the vocabulary in errors)."""
    rows = stored_vocab_size(checkpoint) if checkpoint else None
    return model_config.resolve_vocab_size(config, num_ids, what, checkpoint_rows=rows, checkpoint=checkpoint)


def save_checkpoint(path: str | os.PathLike, config: T5Config, params: Mapping[str, Any],
                    format: str = "native", **options: Any) -> pathlib.Path:
    """Writes a checkpoint in `format` (see the module doc) at `path`; returns the directory written.

    For T5X formats that is `path` when named `checkpoint_N`, else `path/checkpoint_<step>`
    (`options`: `step`). Params in the scanned layout (stacked `layers`) are written under
    per-layer names.
    """
    if format not in _SAVERS:
        raise CheckpointError(f"unknown checkpoint format {format!r} to save; choose from {sorted(_SAVERS)}")
    written = _SAVERS[format](path, config, unstack_layers(params) if is_stacked(params) else params,
                              **options)
    return written if format.startswith("t5x") else pathlib.Path(path)


__all__ = ["FORMATS", "CheckpointError", "detect_format", "load_checkpoint", "resolve_vocab_size",
           "save_checkpoint", "stored_vocab_size",
           "load_native", "save_native"]
