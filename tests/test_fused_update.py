"""The fused per-layer update (`TrainConfig.fused_update`, doa_jax/fused_update.py): the optimizer runs
inside the backward pass, layer by layer. It gives the plain step's parameters, optimizer state and
metrics (Adafactor and AdamW, float32 and bfloat16 parameters, each REMAT policy, two-pass clipping),
resumes bit-identically, and refuses what it cannot run with a message naming the alternative."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doa_jax import fused_update, optimizers, partitioning
from doa_jax.losses import LossConfig
from doa_jax.model import Transformer
from doa_jax.optimizers import OptimizerConfig
from doa_jax.trainer import StepProgram, TrainConfig
from train_helpers import assert_same_params, run_config, stopped_and_resumed, tiny_config

STEPS = 2


def _batch(seed=0, rows=4, inputs=8, targets=6, vocab=64):
    rng = np.random.default_rng(seed)
    tokens = lambda n: rng.integers(1, vocab, (rows, n)).astype(np.int32)  # noqa: E731
    weights = np.ones((rows, targets), np.float32)
    weights[0, -2:] = 0.0                                   # a padded target row: masked positions
    return dict(encoder_input_tokens=tokens(inputs), decoder_input_tokens=tokens(targets),
                decoder_target_tokens=tokens(targets), decoder_loss_weights=weights)


def _run(fused, cfg, optimizer, param_dtype, mesh):
    """STEPS steps of the plain or the fused program on a `(data, model)` mesh: (state, metrics per step)."""
    mesh, rules = partitioning.MeshConfig(data=mesh[0], model=mesh[1]).build(jax.devices()[:mesh[0] * mesh[1]])
    rules = tuple(tuple(r) for r in rules)
    prog = StepProgram(cfg, LossConfig(), optimizer, 1, 1, mesh, rules, param_dtype, fused)
    with partitioning.mesh_context(mesh, rules):
        state, out = prog.init(jax.random.PRNGKey(0)), []
        for step in range(STEPS):
            state, metrics = prog.train_step(state, _batch(step), jax.random.PRNGKey(7))
            out.append(jax.device_get(metrics))
    return jax.device_get(state), out


def _assert_trees_close(a, b, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol, rtol=0)


@pytest.mark.parametrize("name, param_dtype, remat, clip, mesh", [
    ("adafactor", "float32", "full", None, (2, 2)),     # partitioned: params over `model`, the batch over `data`
    ("adamw", "float32", "none", None, (1, 1)),
    ("adafactor", "bfloat16", "dots", None, (1, 1)),
    ("adamw", "bfloat16", "full", 1.0, (1, 1)),         # the paper's clipping: two backward passes
])
def test_the_fused_step_gives_the_plain_steps_params_optimizer_state_and_metrics(name, param_dtype, remat, clip, mesh):
    cfg = tiny_config(scan_layers=True, remat_policy=remat, num_decoder_layers=3)
    optimizer = OptimizerConfig(name=name, learning_rate=1e-2, grad_clip_norm=clip)
    (plain, plain_metrics), (fused, fused_metrics) = (_run(f, cfg, optimizer, param_dtype, mesh) for f in (False, True))
    # bf16 params round stochastically with the same keys from float32 values equal to float tolerance.
    _assert_trees_close(fused.params, plain.params, atol=1e-6)
    _assert_trees_close(fused.opt_state, plain.opt_state, atol=1e-5)
    assert int(fused.step) == int(plain.step) == STEPS
    for p, f in zip(plain_metrics, fused_metrics):
        assert set(f) == set(p)
        for key in ("loss", "nll_sum", "correct", "num_tokens", "learning_rate", "param_norm", "nonfinite"):
            np.testing.assert_allclose(f[key], p[key], rtol=1e-5, err_msg=key)
        # The fused norm is summed in float32; the plain one in the gradients' dtype (bf16 for bf16 params).
        np.testing.assert_allclose(f["grad_norm"], p["grad_norm"], rtol=1e-5 if param_dtype == "float32" else 1e-2)
    if clip is not None:
        assert min(m["grad_norm"] for m in plain_metrics) > 10 * clip      # so clipping changed every update


def test_a_fused_run_with_dropout_and_bf16_params_stopped_and_resumed_ends_bit_identical(tmp_path):
    cfg = tiny_config(scan_layers=True, remat_policy="full", dropout_rate=0.1)
    common = dict(optimizer=OptimizerConfig(name="adafactor", learning_rate=1e-2), param_dtype="bfloat16",
                  checkpoint_every=2, fused_update=True)
    whole, resumed = stopped_and_resumed(cfg, tmp_path, **common)
    assert_same_params(whole.state.params, resumed.state.params)
    assert resumed.last_metrics["loss"] == whole.last_metrics["loss"]


def test_the_fused_update_refuses_unscanned_layers_and_microbatches_naming_the_alternative():
    mesh, rules = partitioning.MeshConfig(data=1, model=1).build(jax.devices()[:1])
    with pytest.raises(ValueError, match=r"FUSED_UPDATE needs scanned layers \(T5Config.scan_layers = True\).*"
                                         r"FUSED_UPDATE = False"):
        StepProgram(tiny_config(), LossConfig(), OptimizerConfig(), 1, 1, mesh, rules, fused=True)
    with pytest.raises(ValueError, match=r"FUSED_UPDATE runs the stack's own backward loop .*leave "
                                         r"T5Config.scan_backward 'auto' or 'stack'"):
        StepProgram(tiny_config(scan_layers=True, scan_backward="autodiff"), LossConfig(), OptimizerConfig(), 1, 1,
                    mesh, rules, fused=True)
    with pytest.raises(ValueError, match=r"FUSED_UPDATE does not take microbatches \(NUM_MICROBATCHES = 2\).*"
                                         r"use REMAT .* or a smaller BATCH_SIZE"):
        run_config("unused", num_microbatches=2, fused_update=True)
    with pytest.raises(TypeError, match="fused_update must be bool, got 'yes'"):
        TrainConfig(model_dir="unused", batch_size=8, train_steps=1, fused_update="yes")


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_the_state_view_regroups_the_optimizer_state_by_stack_and_back(name):
    params = jax.tree.map(np.asarray, _params(tiny_config(scan_layers=True)))
    tx, _ = OptimizerConfig(name=name).build(1)
    state = jax.tree.map(lambda x: x + 1 if x.dtype != np.int32 else x, tx.init(params))   # not all zeros
    view = fused_update.view_state(state, params)
    assert len(view.stacks) == 2      # decoder, encoder (optimizers.stack_paths order)
    for stack, path in zip(view.stacks, optimizers.stack_paths(params)):
        layered = [x for x in jax.tree.leaves(stack) if x.ndim]
        assert layered and all(x.shape[0] == 2 for x in layered)   # every per-layer entry on the layers axis
    back = fused_update.unview_state(view, state, params)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        assert a is b                  # the same arrays, regrouped: nothing copied


def _params(cfg):
    tokens = jnp.ones((1, 1), jnp.int32)
    return nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), tokens, tokens)["params"])
