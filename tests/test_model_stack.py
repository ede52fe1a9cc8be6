"""`doa_jax.model.stack.apply_stack`: a scanned stack of layers with its own backward loop gives the
gradients JAX's transpose of the same scan gives, and the scanned T5 trained through it (or through
JAX's transposed scan, `T5Config.scan_backward`) the unscanned model's gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doa_jax.model import Transformer, config_for_size
from doa_jax.model.scan import stack_layers
from doa_jax.model.stack import apply_stack, layer_key

LAYERS, ROWS, WIDTH = 3, 4, 5


def toy_layer(p, x, consts, fixed, key):
    """A layer with every kind of input: params, carry, a loop-invariant input with a gradient
    (bf16, summed over the layers in bf16 as a transposed scan sums it), a mask, dropout."""
    (shift,), (mask,) = consts, fixed
    h = jnp.tanh(x @ p["w"] + shift.astype(jnp.float32)) * mask
    if key is not None:
        h = h * jax.random.bernoulli(key, 0.7, h.shape) / 0.7
    return x + h * p["s"]


def plain_stack(stack, x, consts, fixed, key):
    """The same stack as a plain `lax.scan`, differentiated by JAX."""
    def body(carry, xs):
        p, i = xs
        return toy_layer(p, carry, consts, fixed, layer_key(key, i)), None

    return jax.lax.scan(body, x, (stack, jnp.arange(LAYERS)))[0]


@pytest.mark.parametrize("dropout", [False, True])
def test_the_stack_gives_the_gradients_of_the_plain_scan(dropout):
    r = np.random.RandomState(0)
    stack = {"w": jnp.asarray(r.randn(LAYERS, WIDTH, WIDTH) / 3, jnp.float32),
             "s": jnp.asarray(r.randn(LAYERS, WIDTH), jnp.float32)}
    x = jnp.asarray(r.randn(ROWS, WIDTH), jnp.float32)
    consts = (jnp.asarray(r.randn(WIDTH), jnp.bfloat16),)
    fixed = (jnp.asarray(r.rand(ROWS, WIDTH) > 0.3, jnp.float32),)
    key = jax.random.PRNGKey(7) if dropout else None
    weights = jnp.asarray(r.randn(ROWS, WIDTH), jnp.float32)

    def loss(run):
        return jax.jit(jax.value_and_grad(
            lambda s, x, c: jnp.sum(run(s, x, c, fixed, key) * weights), argnums=(0, 1, 2)))(stack, x, consts)

    (got_loss, got), (want_loss, want) = loss(lambda *a: apply_stack(toy_layer, *a)), loss(plain_stack)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-6)


CFG = config_for_size("tiny", dtype="float32", vocab_size=64, emb_dim=16, num_heads=4, head_dim=8,
                      mlp_dim=32, num_encoder_layers=3, num_decoder_layers=2)
ENC = np.random.RandomState(0).randint(0, 64, (4, 7)).astype(np.int32)   # some padding (0) in the encoder
DEC = np.random.RandomState(1).randint(2, 64, (4, 5)).astype(np.int32)


@pytest.mark.parametrize("backward", ["stack", "autodiff"])
@pytest.mark.parametrize("policy", ["none", "full"])   # scanned, 'dots' saves what 'none' saves
def test_scanned_t5_gradients_equal_the_unscanned_models(policy, backward):
    params = jax.tree.map(np.asarray, nn.meta.unbox(
        Transformer(CFG).init(jax.random.PRNGKey(0), ENC, DEC)["params"]))
    targets = jnp.asarray(DEC)

    def grads(cfg, p):
        model = Transformer(cfg)

        def loss(p):
            logits = model.apply({"params": p}, ENC, DEC)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

        return jax.jit(jax.grad(loss))(p)

    want = stack_layers(grads(CFG.replace(remat_policy=policy), params))
    got = grads(CFG.replace(remat_policy=policy, scan_layers=True, scan_backward=backward), stack_layers(params))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_both_backward_passes_draw_the_same_dropout_and_give_the_same_gradients():
    # 'auto' picks one per platform when lowered (CPU: the stack's loop), so results must not depend on it.
    cfg = CFG.replace(scan_layers=True, dropout_rate=0.3, remat_policy="full")
    params = stack_layers(jax.tree.map(np.asarray, nn.meta.unbox(
        Transformer(CFG).init(jax.random.PRNGKey(0), ENC, DEC)["params"])))

    def loss_and_grads(backward):
        model = Transformer(cfg.replace(scan_backward=backward))
        loss = lambda p: jnp.sum(model.apply({"params": p}, ENC, DEC, deterministic=False,  # noqa: E731
                                             rngs={"dropout": jax.random.PRNGKey(5)}) ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    (l_stack, g_stack), (l_auto, g_auto), (l_jax, g_jax) = map(loss_and_grads, ("stack", "auto", "autodiff"))
    assert float(l_stack) == float(l_auto)
    np.testing.assert_allclose(l_jax, l_stack, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_jax), jax.tree.leaves(g_stack)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_an_unknown_backward_pass_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="scan_backward must be one of auto, stack, autodiff, got 'manual'"):
        CFG.replace(scan_backward="manual")
