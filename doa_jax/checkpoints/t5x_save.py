"""Writing T5X checkpoints: the train state T5X itself saves, in its Orbax or its legacy layout.

T5X restores a whole train state `{target: params, state: {step, param_states}}` whose optimizer
slots must match the optimizer in its gin config (`t5x.infer` builds one too), so the state here is
what T5X's `adafactor.Adafactor` (the T5 gins' optimizer, default hyper-parameters: factored,
`min_dim_size_to_factor=128`, no momentum) creates at init: zero second moments, factored into
`v_row`/`v_col` for 2-D params whose second-largest dim is >= 128, else a full `v`; `(1,)` zero
placeholders for the unused slots. Params are float32 (T5X's save dtype) under T5X's names.

Layouts (compared file by file with checkpoints real T5X wrote, tests/test_t5x_save.py):
  orbax   `checkpoint_N/state/` Orbax PyTree item (OCDBT, zarr2), `checkpoint_N/dataset/` (empty:
          no dataset iterator), `_CHECKPOINT_METADATA` naming T5X's item handlers.
  legacy  `checkpoint_N/checkpoint` flax-msgpack `{version: 3, optimizer: state}`, state keys sorted;
          params and full-size `v` in zarr directories `target.a.b/` (gzip level 1, chunks of at
          most 64 MiB dividing the shape), step and placeholders inline.
T5X finds the step in the directory name, so the checkpoint directory is always `checkpoint_<step>`.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import time
from typing import Any, Mapping, Optional

import numpy as np

from doa_jax.checkpoints.tree import CheckpointError, check_params, flatten, unflatten
from doa_jax.model import T5Config

FORMATS = ("orbax", "legacy")
LEGACY_VERSION = 3  # T5X's msgpack checkpoint version (native bfloat16 in TensorStore)
MIN_DIM_TO_FACTOR = 128  # adafactor.Adafactor's default min_dim_size_to_factor
CHUNK_BYTES = 64 * 2**20  # T5X's desired TensorStore chunk size
CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")
# What T5X's network hard-codes (t5x/examples/t5/network.py and layers.py), per T5Config field.
NETWORK_FIXED = {"relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
                 "layer_norm_epsilon": 1e-6}
# Our activation names -> the flax.linen name T5X's MlpBlock looks up (same function).
T5X_ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu", "relu": "relu", "silu": "silu", "linear": "linear"}
ORBAX_HANDLERS = {"dataset": "t5x.checkpoints.DatasetCheckpointHandler",
                  "state": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"}


def check_expressible(config: T5Config) -> None:
    """Raises one `CheckpointError` naming every config field T5X's T5 network cannot take."""
    bad = [f"{name}={getattr(config, name)} (T5X's network fixes {value})"
           for name, value in NETWORK_FIXED.items() if getattr(config, name) != value]
    if bad:
        raise CheckpointError("this model cannot be written as a T5X checkpoint: T5X's T5 network "
                              "(t5x/examples/t5/network.py) cannot express " + ", ".join(bad))


def t5x_gin(config: T5Config) -> str:
    """The `network.T5Config` bindings a T5X gin needs to build this model (T5X stores no config)."""
    acts = tuple(T5X_ACTIVATION[a] for a in config.mlp_activations)
    return (f"network.T5Config(vocab_size={config.vocab_size}, emb_dim={config.emb_dim}, "
            f"num_heads={config.num_heads}, num_encoder_layers={config.num_encoder_layers}, "
            f"num_decoder_layers={config.num_decoder_layers}, head_dim={config.head_dim}, "
            f"mlp_dim={config.mlp_dim}, mlp_activations={acts!r}, "
            f"logits_via_embedding={config.logits_via_embedding})")


def adafactor_slots(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Adafactor's initial slots for a param of `shape` (factored when two dims are >= 128)."""
    zero = np.zeros((1,), np.float32)
    slots = {"m": zero, "v": zero, "v_col": zero, "v_row": zero}
    order = np.argsort(shape) if len(shape) >= 2 else ()
    if len(shape) >= 2 and shape[order[-2]] >= MIN_DIM_TO_FACTOR:
        second, largest = int(order[-2]), int(order[-1])
        slots["v_row"] = np.zeros(tuple(np.delete(shape, largest)), np.float32)
        slots["v_col"] = np.zeros(tuple(np.delete(shape, second)), np.float32)
    else:
        slots["v"] = np.zeros(shape, np.float32)
    return slots


def train_state(config: T5Config, params: Mapping[str, Any], step: int = 0) -> dict[str, Any]:
    """T5X's train state dict for `params`: float32 target, int32 step, initial Adafactor slots."""
    check_expressible(config)
    flat = {p: np.asarray(a, np.float32) for p, a in flatten(params).items()}
    check_params(config, flat, "params to save")
    slots = {f"{p}/{k}": v for p, a in flat.items() for k, v in adafactor_slots(a.shape).items()}
    return {"target": unflatten(flat),
            "state": {"step": np.asarray(step, np.int32), "param_states": unflatten(slots)}}


def checkpoint_dir(path: str | os.PathLike, step: Optional[int]) -> tuple[pathlib.Path, int]:
    """(checkpoint directory, step): `path` itself when named `checkpoint_N`, else `path/checkpoint_<step>`.

    T5X reads the step off the directory name, so a `checkpoint_N` path fixes the step.
    """
    path = pathlib.Path(path)
    m = CHECKPOINT_DIR.match(path.name)
    if m:
        if step is not None and step != int(m.group(1)):
            raise CheckpointError(f"{path}: step {step} differs from the step in the directory name "
                                  f"({m.group(1)}); T5X reads the step from the name")
        return path, int(m.group(1))
    step = 0 if step is None else step
    if step < 0:
        raise CheckpointError(f"step must be >= 0, got {step}")
    return path / f"checkpoint_{step}", step


def _in_tensorstore(path: str, array: np.ndarray) -> bool:
    """T5X writes params and full-size `v` slots to TensorStore; step and (1,) placeholders inline."""
    return path.startswith("target/") or (path.endswith("/v") and array.shape != (1,))


def chunk_shape(shape: tuple[int, ...], itemsize: int, max_bytes: int = CHUNK_BYTES) -> list[int]:
    """The largest chunk of at most `max_bytes` whose dims divide `shape`, shrinking the largest dim first."""
    chunk = list(shape)
    while chunk and int(np.prod(chunk)) * itemsize > max_bytes:
        dim = int(np.argmax(chunk))
        chunk[dim] = max(d for d in range(1, chunk[dim]) if shape[dim] % d == 0) if chunk[dim] > 1 else 1
    return [max(1, c) for c in chunk]


def _msgpack_array(array: Any) -> Any:
    """flax-msgpack's array extension (type 1): packed `[shape, dtype name, C-order bytes]`."""
    import msgpack

    if not isinstance(array, np.ndarray):
        raise TypeError(f"cannot write {type(array).__name__} into a T5X msgpack checkpoint")
    return msgpack.ExtType(1, msgpack.packb([list(array.shape), array.dtype.name,
                                             np.ascontiguousarray(array).tobytes()]))


def _sorted(node: Any) -> Any:
    return {k: _sorted(node[k]) for k in sorted(node)} if isinstance(node, dict) else node


def save_legacy(ckpt_dir: pathlib.Path, state: Mapping[str, Any]) -> None:
    """T5X's legacy layout: msgpack `checkpoint` + one zarr directory per large array."""
    import msgpack
    import tensorstore as ts

    ckpt_dir.mkdir(parents=True)
    msgpack_tree, writes = {}, []
    for path, array in flatten(state).items():
        if not _in_tensorstore(path, array):
            msgpack_tree[path] = array
            continue
        name = path.replace("/", ".")
        metadata = {"chunks": chunk_shape(array.shape, array.itemsize),
                    "compressor": {"id": "gzip", "level": 1}, "shape": list(array.shape)}
        msgpack_tree[path] = {"driver": "zarr", "dtype": array.dtype.name,
                              "kvstore": {"driver": "file", "path": name + "/"}, "metadata": metadata}
        spec = {"driver": "zarr", "dtype": array.dtype.name, "metadata": metadata,
                "kvstore": {"driver": "file", "path": os.fspath(ckpt_dir.resolve() / name)}}
        writes.append(ts.open(spec, create=True, open=False).result().write(array))
    for write in writes:
        write.result()
    body = {"version": LEGACY_VERSION, "optimizer": _sorted(unflatten(msgpack_tree))}
    (ckpt_dir / "checkpoint").write_bytes(msgpack.packb(body, default=_msgpack_array, strict_types=True))


def save_orbax(ckpt_dir: pathlib.Path, state: Mapping[str, Any]) -> None:
    """T5X's Orbax layout: a `state` PyTree item (jax arrays, OCDBT) and an empty `dataset` item."""
    import jax
    import orbax.checkpoint as ocp

    # Replicated over a 1x1 ('data', 'model') mesh, as T5X's partitioner places them on one device.
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    arrays = jax.tree_util.tree_map(lambda a: jax.device_put(a, replicated), state)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.time_ns()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(ckpt_dir, ocp.args.Composite(state=ocp.args.PyTreeSave(arrays)))
    (ckpt_dir / "dataset").mkdir()
    (ckpt_dir / "dataset" / "commit_success.txt").write_text(
        f"Checkpoint commit was successful to {ckpt_dir / 'dataset'}")
    metadata = {"item_handlers": ORBAX_HANDLERS, "metrics": {}, "performance_metrics": {},
                "init_timestamp_nsecs": started, "commit_timestamp_nsecs": time.time_ns(),
                "custom_metadata": {}}
    (ckpt_dir / "_CHECKPOINT_METADATA").write_text(json.dumps(metadata))
    (ckpt_dir / "commit_success.txt").write_text(f"Checkpoint commit was successful to {ckpt_dir}")


def save_t5x(path: str | os.PathLike, config: T5Config, params: Mapping[str, Any],
             format: str = "orbax", step: Optional[int] = None) -> pathlib.Path:
    """Writes a T5X checkpoint (`format` 'orbax' or 'legacy'); returns its `checkpoint_<step>` directory.

    `path` is the checkpoint directory when named `checkpoint_N`, else a T5X model directory that
    gets `checkpoint_<step>` (step 0 by default). An existing checkpoint directory is refused.
    """
    if format not in FORMATS:
        raise CheckpointError(f"unknown T5X checkpoint format {format!r}; choose from {', '.join(FORMATS)}")
    ckpt_dir, step = checkpoint_dir(path, step)
    state = train_state(config, params, step)
    if ckpt_dir.exists():
        raise CheckpointError(f"{ckpt_dir} exists; refusing to overwrite a checkpoint")
    (save_orbax if format == "orbax" else save_legacy)(ckpt_dir.absolute(), state)
    return ckpt_dir
