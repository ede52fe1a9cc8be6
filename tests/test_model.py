"""Model behaviours beyond PyTorch parity: packing, dropout, dtypes, relative position buckets."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doa_jax.model import Transformer, config_for_size
from doa_jax.model.layers import relative_position_bucket

CFG = config_for_size("tiny", dtype="float32", vocab_size=64, emb_dim=16, num_heads=4, head_dim=8, mlp_dim=32)


def init(cfg, enc, dec):
    model = Transformer(cfg)
    return model, nn.meta.unbox(model.init(jax.random.PRNGKey(1), enc, dec)["params"])


def test_packed_row_gives_each_example_its_own_logits():
    a_enc, a_dec = [5, 9, 13, 1], [0, 7, 8]
    b_enc, b_dec = [22, 31, 1], [0, 40, 41, 42]
    packed_enc = np.array([a_enc + b_enc + [0]])
    packed_dec = np.array([a_dec + b_dec + [0]])
    enc_seg = np.array([[1] * 4 + [2] * 3 + [0]])
    dec_seg = np.array([[1] * 3 + [2] * 4 + [0]])
    model, params = init(CFG, packed_enc, packed_dec)
    packed = model.apply({"params": params}, packed_enc, packed_dec, enc_seg, dec_seg)
    alone_a = model.apply({"params": params}, np.array([a_enc]), np.array([a_dec]))
    alone_b = model.apply({"params": params}, np.array([b_enc]), np.array([b_dec]))
    np.testing.assert_allclose(packed[0, :3], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 3:7], alone_b[0], atol=1e-5)


def test_padding_does_not_change_real_positions():
    enc, dec = np.array([[5, 9, 13, 1]]), np.array([[0, 7, 8]])
    model, params = init(CFG, enc, dec)
    short = model.apply({"params": params}, enc, dec)
    padded = model.apply({"params": params}, np.pad(enc, ((0, 0), (0, 5))), np.pad(dec, ((0, 0), (0, 4))))
    np.testing.assert_allclose(padded[:, :3], short, atol=1e-5)


def test_dropout_is_active_only_when_not_deterministic():
    cfg = CFG.replace(dropout_rate=0.3)
    enc, dec = np.array([[5, 9, 13, 1]]), np.array([[0, 7, 8]])
    model, params = init(cfg, enc, dec)
    eval_a = model.apply({"params": params}, enc, dec)
    eval_b = model.apply({"params": params}, enc, dec)
    train = [model.apply({"params": params}, enc, dec, deterministic=False,
                         rngs={"dropout": jax.random.PRNGKey(s)}) for s in (0, 1)]
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train[0], eval_a, atol=1e-3)
    assert not np.allclose(train[0], train[1], atol=1e-3)


def test_bfloat16_activations_keep_float32_params_and_logits():
    cfg = CFG.replace(dtype="bfloat16")
    enc, dec = np.array([[5, 9, 13, 1]]), np.array([[0, 7, 8]])
    model, params = init(cfg, enc, dec)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype("float32")}
    low = model.apply({"params": params}, enc, dec)
    high = Transformer(CFG).apply({"params": params}, enc, dec)
    assert low.dtype == jnp.float32
    # bf16 has 8 mantissa bits: agreement to a few percent of the logit scale, not to 1e-5.
    assert np.abs(low - high).max() < 0.05 * np.abs(high).max()


def test_original_t5_ties_logits_to_the_embedding_scaled_by_inverse_sqrt_d():
    cfg = config_for_size("t5_small", dtype="float32", vocab_size=64, emb_dim=16, num_heads=4,
                          head_dim=8, mlp_dim=32, num_encoder_layers=1, num_decoder_layers=2)
    enc, dec = np.array([[5, 9, 13, 1]]), np.array([[0, 7, 8]])
    model, params = init(cfg, enc, dec)
    assert "logits_dense" not in params["decoder"] and "wi" in params["encoder"]["layers_0"]["mlp"]
    logits, state = model.apply({"params": params}, enc, dec, mutable=["intermediates"],
                                capture_intermediates=lambda mdl, _: mdl.name == "decoder_norm")
    hidden = state["intermediates"]["decoder"]["decoder_norm"]["__call__"][0]
    np.testing.assert_allclose(logits, hidden @ params["token_embedder"]["embedding"].T / 4.0, atol=1e-5)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_equal_pytorch_t5(bidirectional):
    torch = pytest.importorskip("torch")
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 301, dtype=np.int32)[None, :]
    ours = relative_position_bucket(rel, bidirectional, 32, 128)
    theirs = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=bidirectional,
                                                   num_buckets=32, max_distance=128).numpy()
    np.testing.assert_array_equal(ours, theirs)
