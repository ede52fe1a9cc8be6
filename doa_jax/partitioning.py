"""Meshes and logical-axis rules, in one place.

The model names every parameter and hot activation with T5X's logical axes (`batch`, `length`,
`embed`, `mlp`, `heads`, `kv`, `joined_kv`, `vocab`, `relpos_buckets`). This module maps those
names onto a `('data', 'model')` device mesh. Rules are tried in order and a mesh axis already
used by another dimension of the same array is skipped (so `embed` falls back to replicated in
activations when FSDP puts it on `data` for parameters).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")
Rules = list[tuple[str, Optional[str]]]

# Logical names that are never sharded.
_REPLICATED = ("relpos_buckets", "length", "kv", "layers", "stack", "mlp_activations")


def make_mesh(data: int = -1, model: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A `data` x `model` mesh. `data=-1` takes every device not used by `model`.

    Uses Auto axis types so XLA's GSPMD propagates shardings from the logical constraints.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if model < 1 or n % model:
        raise ValueError(f"model axis {model} must be a positive divisor of the {n} devices")
    if data == -1:
        data = n // model
    if data < 1 or data * model > n:
        raise ValueError(f"mesh {data} (data) x {model} (model) needs {data * model} devices; "
                         f"{n} are available")
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def logical_axis_rules(*, fsdp: bool = False, activation_partitioning_dims: int = 1) -> Rules:
    """T5X's standard rules: Megatron-style `model` sharding; `fsdp` adds `embed` over `data`.

    `activation_partitioning_dims=2` also shards `embed` over `model` (2-D activations).
    """
    if activation_partitioning_dims not in (1, 2):
        raise ValueError("activation_partitioning_dims must be 1 or 2")
    rules: Rules = [("batch", "data"), ("vocab", "model"), ("mlp", "model"), ("heads", "model"),
                    ("joined_kv", "model")]
    if activation_partitioning_dims == 2:
        rules.append(("embed", "model"))
    if fsdp:
        rules.append(("embed", "data"))
    if not fsdp and activation_partitioning_dims == 1:
        rules.append(("embed", None))
    rules += [(name, None) for name in _REPLICATED]
    return rules


def validate_logical_axes(logical_specs: Any, rules: Rules) -> None:
    """Raises if any parameter names a logical axis that has no rule (it would silently replicate)."""
    known = {name for name, _ in rules}
    bad = []
    flat = jax.tree_util.tree_flatten_with_path(
        logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    for path, spec in flat:
        for axis in spec:
            names = axis if isinstance(axis, tuple) else (axis,)
            for name in names:
                if name is not None and name not in known:
                    bad.append(f"{jax.tree_util.keystr(path)}: {name!r}")
    if bad:
        raise ValueError("logical axes with no partitioning rule: " + ", ".join(bad))


def logical_param_specs(module: nn.Module, *init_args: Any) -> Any:
    """Logical PartitionSpecs of a module's params, from an abstract (shape-only) init."""
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *init_args))
    return nn.get_partition_spec(abstract)["params"]


def param_shardings(mesh: Mesh, rules: Rules, logical_specs: Any) -> Any:
    """NamedShardings for a pytree of logical PartitionSpecs (after checking every axis has a rule)."""
    validate_logical_axes(logical_specs, rules)
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Batch-major arrays: leading dimension over `data`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("data"))


def check_batch_size(batch_size: int, mesh: Mesh, num_hosts: int = 1) -> None:
    """The global batch must split evenly over the data axis and over the hosts feeding it."""
    data = mesh.shape["data"]
    if batch_size % data:
        raise ValueError(f"batch size {batch_size} is not divisible by the mesh's data axis ({data}); "
                         f"use a multiple of {data}")
    if batch_size % num_hosts:
        raise ValueError(f"batch size {batch_size} is not divisible by the {num_hosts} hosts")


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes `mesh` current and `rules` the logical-axis rules (for constraints inside jit)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
