"""Analytic T5 FLOPs agree with XLA's own count of the compiled forward and train step."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from doa_jax import flops
from doa_jax.model import Transformer, config_for_size

CONFIGS = [
    # v1.1 (gated GELU, untied logits), unequal depths and lengths.
    (dict(vocab_size=512, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=256, num_encoder_layers=2,
          num_decoder_layers=3), 4, 32, 16),
    # original T5 (ReLU, tied logits).
    (dict(vocab_size=128, emb_dim=128, num_heads=8, head_dim=16, mlp_dim=512, num_encoder_layers=2,
          num_decoder_layers=2, mlp_activations=("relu",), logits_via_embedding=True), 2, 64, 64),
]


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


@pytest.mark.parametrize("fields,batch,in_len,out_len", CONFIGS)
def test_forward_and_train_flops_match_xla_cost_analysis(fields, batch, in_len, out_len):
    cfg = config_for_size("tiny", dtype="float32", **fields)
    model = Transformer(cfg)
    enc, dec = jnp.ones((batch, in_len), jnp.int32), jnp.ones((batch, out_len), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), enc, dec)))["params"]
    forward = _xla_flops(lambda p, e, d: model.apply({"params": p}, e, d), params, enc, dec)
    train = _xla_flops(jax.grad(lambda p, e, d: model.apply({"params": p}, e, d).sum()), params, enc, dec)
    # XLA also counts element-wise work (norms, softmax, GELU), which the matmul count leaves out.
    assert 1.0 <= forward / flops.forward_flops(cfg, batch, in_len, out_len) <= 1.05
    assert 1.0 <= train / flops.train_flops(cfg, batch, in_len, out_len) <= 1.05


def test_six_n_tokens_is_the_dense_train_count():
    cfg = config_for_size("base")
    dense = flops.train_flops(cfg, 32, 128, 128, attention=False)
    # Equal lengths: charging cross-attention K/V to decoder tokens changes nothing.
    assert flops.six_n_tokens(cfg, 32, 128, 128) == pytest.approx(dense, rel=1e-12)
    assert flops.train_flops(cfg, 32, 128, 128) > dense
    # The decoder-only habit charges every token for all parameters: an overcount for T5.
    assert flops.six_n_tokens(cfg, 32, 128, 128, per_stack=False) > 1.5 * dense


def test_decoder_flops_are_the_work_on_target_tokens_only():
    cfg = config_for_size("base")   # v1.1 Base: 768 wide, 12 + 12 layers, 12 x 64 heads, gated 2048 MLP, 32128 logits
    per_token = 12 * (4 * 768 * 768 + 2 * 768 * 768 + 3 * 768 * 2048) + 768 * 32128   # self, cross q/out, MLP, logits
    assert flops.decoder_token_flops(cfg, 2, 100, 10, attention=False) == 2 * 2 * 10 * per_token
    assert flops.decoder_token_flops(cfg, 2, 100, 0) == 0.0     # inputs alone: all encoder work (cross K/V included)
    assert flops.decoder_token_flops(cfg, 2, 100, 10) + flops.forward_flops(cfg, 2, 100, 0) == \
        pytest.approx(flops.forward_flops(cfg, 2, 100, 10), rel=1e-12)
