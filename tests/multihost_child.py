"""One process of the multi-host test: `python multihost_child.py PROCESS_ID NUM_PROCESSES PORT MODEL_DIR MODE`.

NUM_PROCESSES=1 runs on 8 CPU devices; 2 runs on 4 CPU devices each, joined by
`jax.distributed` on 127.0.0.1:PORT with gloo CPU collectives. The run is like `resume_child`'s
(12 steps, a checkpoint every 4, mesh data=2 x model=4). MODE `slow` sleeps 0.2 s per batch so
the parent can kill it. Each process appends the example indices it read per step to
`MODEL_DIR/rows_<PROCESS_ID>.jsonl`; process 0 writes the final parameters to `MODEL_DIR/final.npz`.
MODE `gcs`: MODEL_DIR is a gs:// URL (the emulator of tests/gcs_helpers.py, from the environment);
the process trains 4 steps with a checkpoint every 2, then writes the run's results row to
MODEL_DIR/results.jsonl the way `run_cell` does (only process 0 writes shared files), and exits.
MODE `rows`: places 64 rows (the same on both processes) as `partitioning.rows_like` does beside an array on
the job's mesh (data=8), and writes each local device's rows to MODEL_DIR/placed_<PROCESS_ID>.json; then
builds the job's batch from this host's own 32 rows with `partitioning.global_batch`, from the rows on this
host's devices (several layouts and job meshes) and from host memory, and writes both.
MODE `loadstore`: MODEL_DIR holds teacher stores the parent wrote; each process reads each with
`phases.load_store` (store `<name>` or, when there is one, `<name>_<PROCESS_ID>`: a cache one host does not
share) and writes what it found to MODEL_DIR/loaded_<PROCESS_ID>.json.
A process whose peer went away says who in one line and exits 75, as `doa` does.
"""
import json
import os
import pathlib
import sys
import time

PROCESS_ID, NUM_PROCESSES, PORT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import xla_env  # noqa: E402

os.environ["XLA_FLAGS"] = xla_env.flags(8 // NUM_PROCESSES)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if NUM_PROCESSES > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
# The compilation cache comes from the environment (tests/conftest.py sets JAX_COMPILATION_CACHE_DIR).

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from doa_jax import hosts, partitioning  # noqa: E402
from doa_jax.optimizers import OptimizerConfig  # noqa: E402
from doa_jax.data.batches import ArrayBatches  # noqa: E402
from doa_jax.trainer import Trainer  # noqa: E402
from train_helpers import copy_arrays, run_config, tiny_config  # noqa: E402

TRAIN_STEPS, CHECKPOINT_EVERY = 12, 4


class RecordingBatches(ArrayBatches):
    """This host's rows, recording the example indices it yields (and sleeping in `slow` mode)."""

    def __init__(self, arrays, *, log: pathlib.Path, slow: bool, **kw):
        super().__init__(arrays, 16, shuffle=True, seed=0, **kw)
        self.log, self.slow = log, slow

    def iterate(self, start=0):
        for step, batch in enumerate(super().iterate(start), start + 1):
            if self.slow:
                time.sleep(0.2)
            with open(self.log, "a") as f:
                f.write(json.dumps({"step": step, "index": batch["index"].tolist()}) + "\n")
            yield batch


def shared_store(model_dir: str) -> None:
    """Both processes train into one gs:// MODEL_DIR; process 0 alone appends the results row."""
    from doa_jax.experiment import results

    arrays = copy_arrays()
    shard = partitioning.host_shard_info()
    source = ArrayBatches(arrays, 16, shuffle=True, seed=0, shard_index=shard.index, num_shards=shard.num_shards)
    config = run_config(model_dir, data=2, model=4, train_steps=4, checkpoint_every=2, async_checkpointing=True)
    result = Trainer(tiny_config(), config).fit(source)
    if partitioning.is_chief():
        results.append_row(f"{model_dir}/results.jsonl", {
            "cell_key": "multihost", "task": "copy", "strategy": "annotate", "extra_budget_usd": 0.0,
            "metric": "loss", "value": float(result.last_metrics["loss"]), "student_steps": result.step})


def loaded_stores(model_dir: pathlib.Path) -> None:
    """What `phases.load_store` finds on this host, for each store the parent wrote."""
    from doa_jax.distill.store import TeacherStore
    from doa_jax.experiment import phases

    found = {}
    for name in sorted(p.name for p in model_dir.iterdir() if p.is_dir() and not p.name[-1].isdigit()):
        own = model_dir / f"{name}_{PROCESS_ID}"
        outputs, problem, missing, corrupt = phases.load_store(TeacherStore(own if own.exists() else model_dir,
                                                                            name if not own.exists() else "k"))
        found[name] = {"rows": None if outputs is None else len(outputs), "missing": missing, "corrupt": corrupt,
                       "problem": None if problem is None else str(problem)}
    (model_dir / f"loaded_{PROCESS_ID}.json").write_text(json.dumps(found))


def placed_rows(model_dir: str) -> None:
    """Which rows of an evaluation batch each local device holds when placed beside the job's params."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()).reshape(8, 1), ("data", "model"))
    leaf = jax.make_array_from_callback((8,), NamedSharding(mesh, PartitionSpec()), lambda idx: np.zeros(8)[idx])
    rows = partitioning.rows_like(np.arange(64 * 3).reshape(64, 3), leaf)
    placed = {str(s.device.id): s.data[:, 0].tolist() for s in rows.addressable_shards}
    back = partitioning.to_host(rows)
    # This host's own rows (100 x process + i), on its own devices (as the online teacher's logits are) and
    # on the host: the job's batch from either is the same, every host's rows in process order.
    local = np.arange(32 * 3).reshape(32, 3) + 100 * PROCESS_ID
    # the host's devices in reverse: each block moves to another device than the one computing it
    host_mesh = Mesh(np.array(jax.local_devices()[::-1]).reshape(4, 1), ("data", "model"))
    on_devices = jax.device_put(local, NamedSharding(host_mesh, PartitionSpec("data")))   # 8 rows per device
    by_host = partitioning.global_batch({"x": local}, mesh)["x"]
    direct = partitioning._from_local_rows_on_devices(on_devices, partitioning.data_sharding(mesh))
    assert direct is not None
    batches = [partitioning.to_host(x) for x in (partitioning.global_batch({"x": on_devices}, mesh)["x"], by_host)]
    # Other job meshes: data=2 x model=4 (each host one block, its rows replicated over its 4 devices; the rows
    # replicated on the host's mesh too), and data=8 with the hosts' devices interleaved.
    replicated = jax.device_put(local, NamedSharding(host_mesh, PartitionSpec()))
    for job, rows_ in ((Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model")), replicated),
                       (Mesh(np.array(jax.devices()).reshape(2, 4).T.reshape(8, 1), ("data", "model")), None)):
        if rows_ is None:   # interleaved: this host's devices hold blocks 0, 2, 4, 6 (or 1, 3, 5, 7)
            per = partitioning.data_sharding(job).addressable_devices_indices_map((64, 3))
            order = [d for d, _ in sorted(per.items(), key=lambda kv: kv[1][0].start or 0)]
            rows_ = jax.device_put(local, NamedSharding(Mesh(np.array(order).reshape(4, 1), ("data", "model")),
                                                        PartitionSpec("data")))
        moved = partitioning._from_local_rows_on_devices(rows_, partitioning.data_sharding(job))
        assert moved is not None
        assert (partitioning.to_host(moved) == partitioning.to_host(partitioning.global_batch({"x": local}, job)["x"])
                ).all()
    # Not the blocks the job's devices hold: all rows on one device, or each device only part of a row (a
    # vocabulary split over `model`): None, and global_batch copies them through the host.
    sharding = partitioning.data_sharding(mesh)
    assert partitioning._from_local_rows_on_devices(jax.device_put(local, jax.local_devices()[0]), sharding) is None
    wide = jax.device_put(np.zeros((32, 4)), NamedSharding(Mesh(np.array(jax.local_devices()).reshape(1, 4),
                                                                ("data", "model")), PartitionSpec(None, "model")))
    assert partitioning._from_local_rows_on_devices(wide, sharding) is None
    pathlib.Path(model_dir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(model_dir) / f"placed_{PROCESS_ID}.json").write_text(json.dumps(
        {"placed": placed, "gathered": back[:, 0].tolist(), "global_from_devices": batches[0][:, 0].tolist(),
         "global_from_host": batches[1][:, 0].tolist()}))


def main(model_dir: str, mode: str) -> None:
    if NUM_PROCESSES > 1:
        partitioning.initialize_distributed(f"127.0.0.1:{PORT}", NUM_PROCESSES, PROCESS_ID, label="multihost_child")
    assert jax.process_count() == NUM_PROCESSES and jax.device_count() == 8
    if mode == "gcs":
        return shared_store(model_dir)
    if mode == "rows":
        return placed_rows(model_dir)
    if mode == "loadstore":
        return loaded_stores(pathlib.Path(model_dir))
    model_dir = pathlib.Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    arrays = dict(copy_arrays(), index=np.arange(64))
    shard = partitioning.host_shard_info()
    source = RecordingBatches(arrays, log=model_dir / f"rows_{PROCESS_ID}.jsonl", slow=mode == "slow",
                              shard_index=shard.index, num_shards=shard.num_shards)
    config = run_config(model_dir, data=2, model=4, train_steps=TRAIN_STEPS, checkpoint_every=CHECKPOINT_EVERY,
                        async_checkpointing=True, verbose=True,
                        optimizer=OptimizerConfig(name="adamw", learning_rate=3e-3))
    result = Trainer(tiny_config(dropout_rate=0.1), config).fit(source)
    params = multihost_utils.process_allgather(result.state.params, tiled=True)
    if PROCESS_ID == 0:
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        np.savez(model_dir / "final.npz", **{"/".join(str(k.key) for k in p): np.asarray(v) for p, v in leaves})


if __name__ == "__main__":
    try:
        main(sys.argv[4], sys.argv[5])
    except Exception as e:   # as `doa train` does: a lost host is named in one line, and the process exits at once
        hosts.exit_if_hosts_lost(e, "multihost_child")
        raise
