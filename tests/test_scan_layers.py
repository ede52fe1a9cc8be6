"""Scanned layers (`T5Config.scan_layers`): the same function as the unscanned model, params
stacked on a `layers` axis, checkpoints in T5X's per-layer names, decoding and training unchanged."""
import flax.linen as nn
import jax
from jax.ad_checkpoint import print_saved_residuals
import jax.numpy as jnp
import numpy as np
import pytest

from doa_jax import decoding
from doa_jax.checkpoints import load_checkpoint, save_checkpoint
from doa_jax.checkpoints.tensorstore_io import read_orbax_item
from doa_jax.model import Transformer, config_for_size
from doa_jax.model.scan import stack_layers, unstack_layers
from doa_jax.optimizers import OptimizerConfig
from doa_jax.trainer import Trainer
from train_helpers import flat, metric_rows, run_config, tiny_config, train_source

CFG = config_for_size("tiny", dtype="float32", vocab_size=64, emb_dim=16, num_heads=4, head_dim=8,
                      mlp_dim=32, num_encoder_layers=3, num_decoder_layers=2)
SCANNED = CFG.replace(scan_layers=True)
ENC = np.random.RandomState(0).randint(2, 64, (4, 7)).astype(np.int32)
DEC = np.random.RandomState(1).randint(2, 64, (4, 5)).astype(np.int32)


def unscanned_params(cfg=CFG, seed=0):
    model = Transformer(cfg)
    return jax.tree.map(np.asarray, nn.meta.unbox(model.init(jax.random.PRNGKey(seed), ENC, DEC)["params"]))


def logits(cfg, params):
    model = Transformer(cfg)
    return np.asarray(jax.jit(lambda p: model.apply({"params": p}, ENC, DEC))(params))


def test_params_are_stacked_on_a_leading_layers_axis_with_its_logical_name():
    boxed = jax.eval_shape(lambda: Transformer(SCANNED).init(jax.random.PRNGKey(0), ENC, DEC))
    shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(boxed)["params"])
    specs = nn.get_partition_spec(boxed)["params"]
    assert shapes["encoder"]["layers"]["attention"]["query"]["kernel"] == (3, 16, 32)
    assert shapes["decoder"]["layers"]["encoder_decoder_attention"]["key"]["kernel"] == (2, 16, 32)
    assert tuple(specs["decoder"]["layers"]["mlp"]["wo"]["kernel"]) == ("layers", "mlp", "embed")
    assert "layers_0" not in shapes["encoder"]
    # The shared pieces stay unstacked.
    assert shapes["encoder"]["relpos_bias"]["rel_embedding"] == (4, 32)


def test_stack_and_unstack_are_exact_inverses():
    params = unscanned_params()
    stacked = stack_layers(params)
    np.testing.assert_array_equal(stacked["encoder"]["layers"]["mlp"]["wi_0"]["kernel"][2],
                                  params["encoder"]["layers_2"]["mlp"]["wi_0"]["kernel"])
    back = unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_stacking_refuses_missing_layers_and_already_stacked_trees():
    params = unscanned_params()
    del params["encoder"]["layers_1"]
    with pytest.raises(ValueError, match=r"/encoder: layer indices \[0, 2\]"):
        stack_layers(params)
    with pytest.raises(ValueError, match="already has a stacked 'layers'"):
        stack_layers(stack_layers(unscanned_params()))


def test_scanned_logits_equal_unscanned_logits():
    params = unscanned_params()
    want = logits(CFG, params)
    got = logits(SCANNED, stack_layers(params))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_init_gives_the_same_function_in_either_layout():
    # Scanned init draws its own random params; unstacked, they drive the unscanned model identically.
    stacked = jax.tree.map(np.asarray, nn.meta.unbox(
        Transformer(SCANNED).init(jax.random.PRNGKey(3), ENC, DEC)["params"]))
    np.testing.assert_allclose(logits(CFG, unstack_layers(stacked)), logits(SCANNED, stacked), atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_inside_the_scan_keeps_loss_and_gradients(policy):
    params = stack_layers(unscanned_params())
    targets = jnp.asarray(DEC)

    def loss_fn(cfg):
        model = Transformer(cfg)

        def loss(p):
            out = model.apply({"params": p}, ENC, DEC)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), targets[..., None], -1))

        return jax.jit(jax.value_and_grad(loss))(params)

    (l0, g0), (l1, g1) = loss_fn(SCANNED), loss_fn(SCANNED.replace(remat_policy=policy))
    np.testing.assert_allclose(l1, l0, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_scanned_layers_without_remat_keep_matmul_outputs_and_no_stacked_weight_casts(capsys):
    """A scan stacks every residual of a layer; it must not stack each layer's bf16 weights (half
    the float32 params again) nor its float32 attention scores, but keep the projections' and the
    MLP's outputs (none of those matmuls is recomputed)."""
    cfg = SCANNED.replace(dtype="bfloat16")
    params = stack_layers(unscanned_params())
    model = Transformer(cfg)
    print_saved_residuals(lambda p: jnp.sum(model.apply({"params": p}, ENC, DEC)), params)
    saved = {line.split(" ")[0] for line in capsys.readouterr().out.splitlines()}
    short = lambda shape, dtype=jnp.bfloat16: jax.core.ShapedArray(shape, dtype).str_short(short_dtypes=True)  # noqa: E731
    stacked_weights = {short(x.shape) for x in jax.tree.leaves(params["encoder"]["layers"])
                       + jax.tree.leaves(params["decoder"]["layers"])}
    assert not saved & stacked_weights
    layers, (rows, length) = CFG.num_encoder_layers, ENC.shape
    assert short((layers, rows, CFG.num_heads, length, length), jnp.float32) not in saved   # encoder attention scores
    assert short((layers, rows, length, CFG.mlp_dim)) in saved                              # wi's output


def test_scanned_greedy_and_beam_decoding_equal_unscanned():
    params = unscanned_params()
    stacked = stack_layers(params)
    want, got = decoding.greedy(CFG, params, ENC, 6), decoding.greedy(SCANNED, stacked, ENC, 6)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.log_probs), np.asarray(want.log_probs), atol=1e-5)
    want = decoding.beam_search(CFG, params, ENC, 6, num_beams=3, num_return_sequences=3)
    got = decoding.beam_search(SCANNED, stacked, ENC, 6, num_beams=3, num_return_sequences=3)
    np.testing.assert_array_equal(np.asarray(got.all_tokens), np.asarray(want.all_tokens))
    np.testing.assert_allclose(np.asarray(got.all_scores), np.asarray(want.all_scores), atol=1e-5)


def test_scanned_cache_is_stacked_over_layers():
    model = Transformer(SCANNED)
    params = stack_layers(unscanned_params())
    encoded = model.apply({"params": params}, ENC, method=model.encode)
    cache = model.apply({"params": params}, encoded, 6, method=model.init_cache)
    assert {k: v.shape for k, v in cache.items()} == {
        "self_k": (2, 4, 6, 4, 8), "self_v": (2, 4, 6, 4, 8), "cross_k": (2, 4, 7, 4, 8), "cross_v": (2, 4, 7, 4, 8)}


def test_a_scanned_model_loads_an_unscanned_checkpoint_and_saves_it_back_bit_identical(tmp_path):
    params = unscanned_params()
    save_checkpoint(tmp_path / "unscanned", CFG, params)
    config, loaded = load_checkpoint(tmp_path / "unscanned", config=SCANNED)
    assert config == SCANNED and "layers" in loaded["encoder"]
    np.testing.assert_array_equal(loaded["decoder"]["layers"]["self_attention"]["out"]["kernel"][1],
                                  params["decoder"]["layers_1"]["self_attention"]["out"]["kernel"])
    save_checkpoint(tmp_path / "back", SCANNED, loaded)
    before = read_orbax_item(tmp_path / "unscanned" / "params")
    after = read_orbax_item(tmp_path / "back" / "params")
    assert sorted(after) == sorted(before)          # per-layer names on disk: encoder/layers_0/...
    for path, array in before.items():
        assert after[path].dtype == array.dtype
        np.testing.assert_array_equal(after[path], array, err_msg="/".join(path))
    # The saved config remembers the layout the model runs in; the params on disk do not change.
    config, again = load_checkpoint(tmp_path / "back")
    assert config.scan_layers and "layers" in again["decoder"]


def test_hf_export_of_a_scanned_model_uses_per_layer_names(tmp_path):
    pytest.importorskip("safetensors")
    params = unscanned_params()
    save_checkpoint(tmp_path / "hf", SCANNED, stack_layers(params), format="hf")
    config, loaded = load_checkpoint(tmp_path / "hf")
    assert not config.scan_layers
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_training_with_scanned_layers_matches_unscanned_and_its_checkpoint_loads(tmp_path):
    adamw = OptimizerConfig(name="adamw", learning_rate=3e-3)
    start = tmp_path / "start"     # both runs start from the same (per-layer) checkpoint
    save_checkpoint(start, tiny_config(), unscanned_params(tiny_config()))
    results = {}
    for scan in (False, True):
        cfg = tiny_config(scan_layers=scan)
        run = run_config(tmp_path / str(scan), train_steps=3, optimizer=adamw, checkpoint_every=3,
                         initial_checkpoint=str(start))
        state = Trainer(cfg, run).fit(train_source(16)).state
        params = jax.device_get(state.params)
        results[scan] = ([r["loss"] for r in metric_rows(tmp_path / str(scan))],
                         unstack_layers(params) if scan else params)
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5)
    unscanned, scanned = flat(results[False][1]), flat(results[True][1])
    assert sorted(scanned) == sorted(unscanned)
    for name, value in unscanned.items():
        np.testing.assert_allclose(scanned[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    # The trainer's step checkpoint of the scanned run loads, in either layout.
    config, stacked = load_checkpoint(tmp_path / "True" / "checkpoints")
    assert config.scan_layers
    np.testing.assert_array_equal(unstack_layers(stacked)["encoder"]["layers_1"]["mlp"]["wo"]["kernel"],
                                  results[True][1]["encoder"]["layers_1"]["mlp"]["wo"]["kernel"])
    _, per_layer = load_checkpoint(tmp_path / "True" / "checkpoints", config=config.replace(scan_layers=False))
    assert "layers_0" in per_layer["decoder"]
