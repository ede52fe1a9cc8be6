"""The trainer's step checkpoints (`checkpoints.steps`): how replicated arrays are written."""
import os
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from doa_jax.checkpoints import steps
from doa_jax.checkpoints.steps import TrainCheckpoints
from train_helpers import tiny_config


def _replicated(shape):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    return jax.device_put(np.arange(np.prod(shape), dtype=np.float32).reshape(shape), NamedSharding(mesh, PartitionSpec()))


def _slices_while_saving(tmp_path, monkeypatch, params):
    """Eager slices Orbax cuts while saving `params` replicated over the 8-device mesh (one per
    replica of each array it writes replica-parallel), and the params read back."""
    calls = []
    real = jax.lax.slice_in_dim
    monkeypatch.setattr(jax.lax, "slice_in_dim", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    ckpts = TrainCheckpoints(tmp_path / "checkpoints", async_save=False, with_optimizer=False)
    ckpts.save(1, params=params, model_config=tiny_config(), trainer_state={"step": 1})
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params)
    restored = ckpts.restore(1, abstract_params=abstract)[0]
    return calls, restored


def test_small_replicated_arrays_are_written_whole_not_cut_per_replica(tmp_path, monkeypatch):
    params = {"norm": _replicated((16,)), "kernel": _replicated((16, 32))}
    calls, restored = _slices_while_saving(tmp_path, monkeypatch, params)
    assert calls == []
    for k in params:
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(params[k]))


def test_large_replicated_arrays_are_still_written_by_all_replicas(tmp_path, monkeypatch):
    rows = 8 * steps.MIN_REPLICA_SLICE_BYTES // (4 * 256)       # each of 8 replicas writes exactly the minimum
    params = {"big": _replicated((rows, 256))}
    calls, restored = _slices_while_saving(tmp_path, monkeypatch, params)
    assert calls == [(rows, 256)] * 8
    np.testing.assert_array_equal(np.asarray(restored["big"]), np.asarray(params["big"]))


def test_importing_step_checkpoints_prints_nothing():
    # Registering the handler overrides Orbax's default, which Orbax would announce on stderr.
    done = subprocess.run([sys.executable, "-c", "import doa_jax.checkpoints.steps"], capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr


def test_a_step_directory_given_as_a_relative_path_is_read(tmp_path, monkeypatch):
    # `doa demo` writes under ./demo_out: the teacher's params are read back from a relative path,
    # which Orbax refuses unless it is made absolute first.
    params = {"norm": _replicated((16,))}
    TrainCheckpoints(tmp_path / "run" / "checkpoints", async_save=False, with_optimizer=False).save(
        3, params=params, model_config=tiny_config(), trainer_state={"step": 3})
    monkeypatch.chdir(tmp_path)
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params)
    restored = steps.restore_step_directory("run/checkpoints", abstract_params=abstract)[0]
    np.testing.assert_array_equal(np.asarray(restored["norm"]), np.asarray(params["norm"]))
