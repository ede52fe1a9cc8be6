"""Meshes, logical-axis rules, shardings of the train state and batches, multi-host start.

The model names every parameter and hot activation with T5X's logical axes (`batch`, `length`,
`embed`, `mlp`, `heads`, `kv`, `joined_kv`, `vocab`, `relpos_buckets`). This module maps those
names onto a `('data', 'model')` device mesh. Rules are tried in order and a mesh axis already
used by another dimension of the same array is skipped (so `embed` falls back to replicated in
activations when FSDP puts it on `data` for parameters).

Multi-host: `initialize_distributed` wraps `jax.distributed.initialize`; every host then feeds
its own shard of each global batch (`host_shard_info()`, SeqIO's `ShardInfo(shard_id,
num_shards)`), and `global_batch` assembles the global arrays without gathering. Every process
runs the same program; a decision that branches on shared files (is this cell done? is the
teacher stored?) is taken once, on process 0, and given to all (`from_chief`), and a file process 0
writes is read by the others only after it (`chief_first`); otherwise hosts take different
branches and wait forever in the next collective.

Starting the job and noticing a host that went away: `doa_jax.hosts` (`initialize_distributed`
is re-exported here).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, TypeVar, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from doa_jax.hosts import initialize_distributed  # noqa: F401  (the multi-host start, here since before)

MESH_AXES = ("data", "model")
Rules = list[tuple[str, Optional[str]]]

# Logical names that are never sharded.
_REPLICATED = ("relpos_buckets", "length", "kv", "layers", "stack", "mlp_activations")


def make_mesh(data: int = -1, model: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A `data` x `model` mesh. `data=-1` takes every device not used by `model`.

    Uses Auto axis types so XLA's GSPMD propagates shardings from the logical constraints.
    """
    all_devices = devices is None
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if model < 1 or n % model:
        raise ValueError(f"model axis {model} must be a positive divisor of the {n} devices")
    if data == -1:
        data = n // model
    if data < 1 or data * model > n:
        raise ValueError(f"mesh {data} (data) x {model} (model) needs {data * model} devices; "
                         f"{n} are available")
    auto = (jax.sharding.AxisType.Auto,) * 2
    if all_devices and data * model == n and jax.process_count() > 1:
        # Topology-aware device order (model axis within a host / on fast links).
        return jax.make_mesh((data, model), MESH_AXES, axis_types=auto)
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, MESH_AXES, axis_types=auto)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape and rules from config. `data=-1` (or 'auto') uses every device left by `model`.

    `fsdp=True` is T5X's 2-D parameter sharding (`embed` over `data`, ZeRO-3-like);
    `activation_partitioning_dims=2` also shards activations' `embed` over `model`.
    """

    data: Union[int, str] = -1
    model: int = 1
    fsdp: bool = False
    activation_partitioning_dims: int = 1

    def within(self, devices: int) -> "MeshConfig":
        """This layout cut to fit `devices` devices (one host's): every one on `data`, after a model
        axis of gcd(model, devices) ways (the widest that divides both: the heads, MLP and vocabulary
        the model axis split still divide by it)."""
        return dataclasses.replace(self, data=-1, model=math.gcd(int(self.model), devices))

    def build(self, devices: Optional[Sequence[Any]] = None) -> tuple[Mesh, Rules]:
        data = -1 if self.data in (-1, "auto", None) else int(self.data)
        return (make_mesh(data, int(self.model), devices),
                logical_axis_rules(fsdp=self.fsdp,
                                   activation_partitioning_dims=self.activation_partitioning_dims))


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


def model_shardings(module: nn.Module, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings of a T5 `Transformer`'s params on `mesh` by its logical axes (an abstract init:
    nothing is allocated)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return param_shardings(mesh, rules, logical_param_specs(module, tokens, tokens))


def abstract_params(module: nn.Module, shardings: Any) -> Any:
    """The module's params as `jax.ShapeDtypeStruct`s with `shardings` (what a sharded restore reads into)."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t, t), tokens))["params"]
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def rows_like(host: np.ndarray, other: Any) -> Any:
    """`host` rows placed as `other`'s mesh wants a batch: over `data` when `other` is an array on a
    mesh and the rows divide evenly (on a multi-process mesh `host` must be the same on every process:
    each device takes its rows from its own process's copy), else replicated over a multi-process mesh
    (`like_global`), else `host` itself."""
    if isinstance(other, jax.Array) and isinstance(other.sharding, NamedSharding):
        mesh = other.sharding.mesh
        if host.shape[0] % mesh.shape["data"] == 0:
            if other.is_fully_addressable:
                return jax.device_put(host, data_sharding(mesh))
            return jax.make_array_from_callback(host.shape, data_sharding(mesh), lambda idx: host[idx])
    return like_global(host, other)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Batch-major arrays: leading dimension over `data`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("data"))


def check_batch_size(batch_size: int, mesh: Mesh, num_hosts: int = 1, num_microbatches: int = 1) -> None:
    """The global batch must split evenly over the data axis, the hosts and the microbatches.

    Each microbatch is itself sharded over `data`, so `batch_size` must be a multiple of
    `num_microbatches * data`.
    """
    data = mesh.shape["data"]
    if batch_size % data:
        raise ValueError(f"batch size {batch_size} is not divisible by the mesh's data axis ({data}); "
                         f"use a multiple of {data}")
    if batch_size % num_hosts:
        raise ValueError(f"batch size {batch_size} is not divisible by the {num_hosts} hosts")
    if num_microbatches < 1 or batch_size % (num_microbatches * data):
        raise ValueError(f"batch size {batch_size} does not split into {num_microbatches} microbatches "
                         f"that are each divisible by the mesh's data axis ({data}); use a multiple of "
                         f"{max(num_microbatches, 1) * data}")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def opt_state_shardings(mesh: Mesh, params_abstract: Any, param_sharding_tree: Any,
                        opt_state_abstract: Any) -> Any:
    """Shardings for an optax state: a leaf shaped like its parameter inherits its sharding.

    Optax states embed copies of the param tree (Adam's `mu`/`nu`, Adafactor's full `v`); a leaf
    is matched to the parameter whose path is a suffix of the leaf's path. Other leaves (step
    counts, Adafactor's factored row/column vectors, placeholders) are small and replicated.
    """
    by_path: dict[tuple, tuple[tuple, NamedSharding]] = {}
    flat_params = jax.tree_util.tree_flatten_with_path(params_abstract)[0]
    flat_shard = jax.tree_util.tree_leaves(param_sharding_tree,
                                           is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(flat_params, flat_shard):
        by_path[_dict_keys(path)] = (tuple(leaf.shape), sharding)
    rep = replicated(mesh)

    def pick(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None:
                return hit[1] if hit[0] == tuple(leaf.shape) else rep
        return rep

    return jax.tree_util.tree_map_with_path(pick, opt_state_abstract)


def _dict_keys(path: Sequence[Any]) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


# ----------------------------------------------------------------------------- multi-host

class ShardInfo(NamedTuple):
    """Which slice of the data this host reads (the fields of `seqio.ShardInfo`)."""

    index: int
    num_shards: int


def is_chief() -> bool:
    """True on the process that writes shared files (process 0; the only process on one host)."""
    return jax.process_index() == 0


T = TypeVar("T")


def _buffer_size(size: int) -> int:
    """Bytes of the buffer JSON travels in between processes: a power of two, so a few shapes (each
    one compile) serve every call."""
    return max(64, 1 << (size - 1).bit_length())


def _broadcast_json(value: Any) -> Any:
    """Process 0's JSON-able `value`, on every process (the others' `value` is ignored)."""
    data = json.dumps(value).encode() if is_chief() else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buf = np.zeros(_buffer_size(size), np.uint8)
    if is_chief():
        buf[:size] = np.frombuffer(data, np.uint8)
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buf))[:size].tobytes())


class ChiefFailed(RuntimeError):
    """What process 0 raised in `from_chief`, raised on the other processes (one line)."""


class HostFailed(ChiefFailed):
    """What one process raised in `on_every_host`, raised on the others (one line, naming it)."""


def from_chief(compute: Callable[[], Any]) -> Any:
    """`compute()` run on process 0 only; its value (JSON-able) returned on every process.

    The others wait meanwhile, so this is also a barrier. An exception on process 0 is raised
    there and, as a `ChiefFailed` naming it, on every other process (no host is left waiting)."""
    if jax.process_count() == 1:
        return compute()
    message = None
    if is_chief():
        try:
            value = compute()
        except BaseException as e:
            _broadcast_json({"error": f"{type(e).__name__}: {e}"})
            raise
        message = {"ok": value}
    got = _broadcast_json(message)
    if "error" in got:
        raise ChiefFailed(f"process 0 failed: {got['error']}")
    return got["ok"]


def _gather_json(value: Any) -> list[Any]:
    """Every process's JSON-able `value`, in process order (every process must call this)."""
    data = json.dumps(value).encode()
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
    buf = np.zeros(_buffer_size(int(sizes.max())), np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    got = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(row[:n].tobytes()) for row, n in zip(got, sizes)]


def on_every_host(fn: Callable[[], T]) -> T:
    """`fn()` on every process, then a barrier. When it raised anywhere, it raises everywhere: the
    process that raised, its own exception; the others a `HostFailed` naming the first process that
    failed and what it raised (no host is left waiting in a later collective)."""
    if jax.process_count() == 1:
        return fn()
    error = value = None
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001  (said on every host below, then raised here)
        error = e
    said = _gather_json(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = next(((i, m) for i, m in enumerate(said) if m is not None), None)
    if failed is not None:
        raise HostFailed(f"process {failed[0]} failed: {failed[1]}")
    return value


def sum_over_processes(n: T) -> T:
    """`n` (an int or a float: every process the same kind) summed over every process of the job, exactly
    (gathered as JSON, whatever the processes' value types; each must call this: also a barrier)."""
    if jax.process_count() == 1:
        return n
    return type(n)(sum(_gather_json(n.item() if isinstance(n, np.generic) else n)))


def chief_first(fn: Callable[[], T]) -> T:
    """`fn()` on process 0, then on the others: what process 0 wrote (a store, a ledger) is there
    when they read it. Returns each process's own value (which need not be JSON-able)."""
    if jax.process_count() == 1:
        return fn()
    box = []
    from_chief(lambda: box.append(fn()))
    return box[0] if box else fn()


def host_shard_info() -> ShardInfo:
    """This host's data shard: `shard_id = jax.process_index()`, `num_shards = jax.process_count()`."""
    return ShardInfo(jax.process_index(), jax.process_count())


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays (leading dim over `data`) from this host's rows of the batch. Rows already on this
    host's devices (the online teacher's logits), in the row blocks the job's devices hold, move device
    to device; other rows go through host memory."""
    sharding = data_sharding(mesh)

    def put(v):
        if isinstance(v, jax.Array) and jax.process_count() == 1:
            return jax.device_put(v, sharding)
        if isinstance(v, jax.Array) and v.is_fully_addressable:
            moved = _from_local_rows_on_devices(v, sharding)
            if moved is not None:
                return moved
        return jax.make_array_from_process_local_data(sharding, np.asarray(v))

    return {k: put(v) for k, v in local_batch.items()}


def _row_range(index: tuple, rows: int) -> tuple[int, int]:
    return (index[0].start or 0, rows if index[0].stop is None else index[0].stop)


def _from_local_rows_on_devices(v: jax.Array, sharding: NamedSharding) -> Optional[jax.Array]:
    """The job's global array over `sharding` from this host's rows `v` (on this host's devices), moved
    device to device; None when `v`'s shards do not hold the row blocks the job's devices need (the
    caller copies through the host then). This host's devices hold blocks of the global rows: this
    host's rows, in global order."""
    shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
    rows = {d: _row_range(i, shape[0]) for d, i in sharding.addressable_devices_indices_map(shape).items()}
    blocks = sorted(set(rows.values()))
    if sum(stop - start for start, stop in blocks) != v.shape[0]:
        return None
    local_start = dict(zip(blocks, np.cumsum([0] + [stop - start for start, stop in blocks[:-1]]).tolist()))
    held: dict[tuple[int, int], dict[Any, jax.Array]] = {}   # local row range -> {device: its whole rows}
    for s in v.addressable_shards:
        if all(i == slice(None) or (i.start in (None, 0) and i.stop in (None, n))
               for i, n in zip(s.index[1:], v.shape[1:])):
            held.setdefault(_row_range(s.index, v.shape[0]), {})[s.device] = s.data
    sources = []
    for device, (start, stop) in rows.items():
        copies = held.get((local_start[(start, stop)], local_start[(start, stop)] + stop - start))
        if not copies:
            return None
        sources.append(copies.get(device, next(iter(copies.values()))))   # one already there, if any
    shards = [jax.device_put(x, device) for x, device in zip(sources, rows)]
    return jax.make_array_from_single_device_arrays(shape, sharding, shards, dtype=v.dtype)


def to_host(x: Any) -> np.ndarray:
    """A numpy copy of `x`; an array spread over several processes is gathered first (every
    process must call this then)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def like_global(host: np.ndarray, other: Any) -> Any:
    """`host` (the same value on every process) as an array replicated over the mesh of `other`
    when `other` spans several processes (jit refuses to mix host and multi-process arrays);
    else `host` itself."""
    if not (isinstance(other, jax.Array) and not other.is_fully_addressable):
        return host
    sharding = NamedSharding(other.sharding.mesh, PartitionSpec())
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def put_params(host_tree: Any, shardings: Any) -> Any:
    """Places a host (numpy) tree onto devices with `shardings`; each host copies only its shards."""
    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map(put, host_tree, shardings)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes `mesh` current and `rules` the logical-axis rules (for constraints inside jit)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
