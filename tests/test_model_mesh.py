"""The forward pass is the same on one device and on partitioned meshes; every axis has a rule."""
import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from doa_jax import partitioning
from doa_jax.model import Transformer, config_for_size

CFG = config_for_size("tiny", dtype="float32", vocab_size=128, emb_dim=16, num_heads=4, head_dim=8,
                      mlp_dim=32, num_encoder_layers=2, num_decoder_layers=3)
ENC = np.array([[5, 17, 42, 9, 77, 3, 1, 0], [8, 64, 23, 1, 0, 0, 0, 0]] * 4, np.int32)
DEC = np.array([[0, 12, 33, 7, 90, 1], [0, 45, 2, 1, 0, 0]] * 4, np.int32)


@pytest.fixture(scope="module")
def single_device():
    model = Transformer(CFG)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), ENC, DEC)["params"])
    return model, params, np.asarray(jax.jit(model.apply)({"params": params}, ENC, DEC))


@pytest.mark.parametrize("data,model_axis,fsdp", [(2, 4, False), (8, 1, False), (2, 4, True)])
def test_partitioned_forward_equals_single_device(single_device, data, model_axis, fsdp):
    model, params, expected = single_device
    mesh = partitioning.make_mesh(data, model_axis)
    rules = partitioning.logical_axis_rules(fsdp=fsdp)
    shardings = partitioning.param_shardings(mesh, rules, partitioning.logical_param_specs(model, ENC, DEC))
    with partitioning.mesh_context(mesh, rules):
        sharded = jax.device_put(params, shardings)
        batch = [jax.device_put(x, partitioning.data_sharding(mesh)) for x in (ENC, DEC)]
        logits = jax.jit(lambda p, e, d: model.apply({"params": p}, e, d))(sharded, *batch)
    kernel = sharded["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert kernel.sharding.spec == (PartitionSpec("data", "model") if fsdp else PartitionSpec(None, "model"))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", ["tiny", "xxl", "t5_base"])
def test_every_parameter_axis_resolves_under_the_rules(size):
    model = Transformer(config_for_size(size))
    specs = partitioning.logical_param_specs(model, ENC[:1], DEC[:1])
    for fsdp in (False, True):
        partitioning.validate_logical_axes(specs, partitioning.logical_axis_rules(fsdp=fsdp))
    assert all(isinstance(s, PartitionSpec) and len(s) > 0 for s in jax.tree_util.tree_leaves(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec)))


def test_an_unmapped_logical_axis_is_an_error():
    specs = {"encoder": {"w": PartitionSpec("embed", "experts")}}
    with pytest.raises(ValueError, match=r"\['encoder'\]\['w'\]: 'experts'"):
        partitioning.validate_logical_axes(specs, partitioning.logical_axis_rules())


def test_mesh_shape_must_fit_the_devices():
    with pytest.raises(ValueError, match="needs 16 devices; 8 are available"):
        partitioning.make_mesh(4, 4)
    assert dict(partitioning.make_mesh(-1, 2).shape) == {"data": 4, "model": 2}
