"""Meshes from config, shardings of the train state, batch checks, multi-host helpers, and the
partitioned train step agreeing with one device."""
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from doa_jax import partitioning
from doa_jax.model import Transformer
from doa_jax.partitioning import MeshConfig
from doa_jax.trainer import Trainer
from train_helpers import metric_rows, run_config, tiny_config, train_source


@pytest.mark.slow
def test_partitioned_training_matches_one_device_for_five_steps(tmp_path):
    """2x4, 8x1 and FSDP (2-D parameter sharding) give one device's losses, dropout included."""
    cfg = tiny_config(dropout_rate=0.1)
    losses = {}
    for name, mesh, devices in [("one", dict(data=1, model=1), jax.devices()[:1]),
                                ("2x4", dict(data=2, model=4), None),
                                ("8x1", dict(data=8, model=1), None),
                                ("fsdp_2x4", dict(data=2, model=4, fsdp=True), None)]:
        trainer = Trainer(cfg, run_config(tmp_path / name, **mesh), devices=devices)
        trainer.fit(train_source(16))
        losses[name] = np.array([r["loss"] for r in metric_rows(tmp_path / name)])
    assert len(losses["one"]) == 5 and np.all(np.isfinite(losses["one"]))
    for name in ("2x4", "8x1", "fsdp_2x4"):
        rel = np.max(np.abs(losses[name] - losses["one"]) / np.abs(losses["one"]))
        assert rel <= 1e-5, (name, rel, losses[name], losses["one"])


def test_mesh_from_config_fills_the_data_axis():
    mesh, rules = MeshConfig(data="auto", model=2).build()
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    assert ("embed", "data") not in rules
    mesh, rules = MeshConfig(data=-1, model=1, fsdp=True).build()
    assert dict(mesh.shape) == {"data": 8, "model": 1} and ("embed", "data") in rules
    with pytest.raises(ValueError, match="model axis 3 must be a positive divisor of the 8 devices"):
        MeshConfig(model=3).build()


@pytest.mark.parametrize("model,devices,want", [(8, 4, 4), (4, 8, 4), (6, 4, 2), (1, 4, 1)])
def test_a_layout_cut_to_one_hosts_devices_keeps_the_widest_model_axis_dividing_both(model, devices, want):
    # A teacher laid out over a pod's model axis runs its inference on one host's chips (multi-host cells).
    local = MeshConfig(data=2, model=model, fsdp=True).within(devices)
    assert (local.data, local.model, local.fsdp) == (-1, want, True)
    mesh, _ = local.build(jax.devices()[:devices])
    assert dict(mesh.shape) == {"data": devices // want, "model": want}


def test_fsdp_shards_parameters_over_both_axes():
    cfg = tiny_config()
    specs = partitioning.logical_param_specs(Transformer(cfg), np.zeros((1, 4), np.int32), np.zeros((1, 4), np.int32))
    mesh, rules = MeshConfig(data=2, model=4, fsdp=True).build()
    sh = partitioning.param_shardings(mesh, rules, specs)
    assert sh["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"].spec == P("data", "model")
    assert sh["token_embedder"]["embedding"].spec == P("model", "data")
    mesh, rules = MeshConfig(data=2, model=4).build()
    sh = partitioning.param_shardings(mesh, rules, specs)
    assert sh["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"].spec == P(None, "model")


def test_optimizer_slots_inherit_their_parameters_sharding():
    mesh, rules = MeshConfig(data=2, model=4).build()
    params = {"dense": {"kernel": jax.ShapeDtypeStruct((16, 32), np.float32)}}
    shardings = {"dense": {"kernel": jax.sharding.NamedSharding(mesh, P(None, "model"))}}
    state = jax.eval_shape(optax.adamw(1e-3).init, params)
    out = partitioning.opt_state_shardings(mesh, params, shardings, state)
    assert out[0].mu["dense"]["kernel"].spec == P(None, "model")
    assert out[0].nu["dense"]["kernel"].spec == P(None, "model")
    assert out[0].count.spec == P()
    # Adafactor's factored row/column vectors are small and replicated.
    big = {"w": jax.ShapeDtypeStruct((256, 128), np.float32)}
    big_sh = {"w": jax.sharding.NamedSharding(mesh, P(None, "model"))}
    out = partitioning.opt_state_shardings(mesh, big, big_sh, jax.eval_shape(optax.adafactor(1e-3).init, big))
    assert out[0].v_row["w"].spec == P() and out[0].v_col["w"].spec == P()


def test_batch_checks_name_the_mesh_axis_and_microbatches():
    mesh, _ = MeshConfig(data=8, model=1).build()
    with pytest.raises(ValueError, match=r"batch size 12 is not divisible by the mesh's data axis \(8\)"):
        partitioning.check_batch_size(12, mesh)
    with pytest.raises(ValueError, match="does not split into 4 microbatches .* multiple of 32"):
        partitioning.check_batch_size(16, mesh, num_microbatches=4)
    with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
        partitioning.check_batch_size(16, mesh, num_hosts=3)
    partitioning.check_batch_size(32, mesh, num_microbatches=4)


def test_single_process_is_shard_zero_of_one_and_global_batch_is_sharded():
    assert partitioning.host_shard_info() == partitioning.ShardInfo(0, 1)
    partitioning.initialize_distributed()  # no options: a no-op
    with pytest.raises(ValueError, match="coordinator_address, num_processes and process_id together"):
        partitioning.initialize_distributed(coordinator_address="10.0.0.1:1234")
    mesh, _ = MeshConfig(data=4, model=2).build()
    batch = partitioning.global_batch({"x": np.arange(8 * 3).reshape(8, 3)}, mesh)
    assert batch["x"].sharding.spec == P("data") and batch["x"].shape == (8, 3)
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(24).reshape(8, 3))
