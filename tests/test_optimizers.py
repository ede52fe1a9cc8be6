"""Adafactor with T5X's fine-tuning rule, AdamW against PyTorch, and T5X's schedule factors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from doa_jax.optimizers import OptimizerConfig, learning_rate_schedule


def adafactor_reference(params, grads_per_step, lr):
    """T5X's Adafactor (beta1=None, decay 0.8, factored if both dims >= 128, clip 1.0,
    param-scale with epsilon2 1e-3, epsilon1 1e-30), written out in float64 numpy."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    state = {}
    for t, grads in enumerate(grads_per_step):
        decay = 1.0 - (t + 1.0) ** -0.8
        for name, p in params.items():
            g = np.asarray(grads[name], np.float64)
            g2 = g * g + 1e-30
            if p.ndim == 2 and min(p.shape) >= 128:
                vr, vc = state.get(name, (np.zeros(p.shape[0]), np.zeros(p.shape[1])))
                vr = decay * vr + (1 - decay) * g2.mean(axis=1)
                vc = decay * vc + (1 - decay) * g2.mean(axis=0)
                state[name] = (vr, vc)
                y = g / np.sqrt(np.outer(vr / vr.mean(), vc))
            else:
                v = decay * state.get(name, np.zeros_like(p)) + (1 - decay) * g2
                state[name] = v
                y = g / np.sqrt(v)
            y = y / max(1.0, np.sqrt(np.mean(y * y)) / 1.0)
            scale = max(np.sqrt(np.mean(p * p)), 1e-3)
            params[name] = p - lr * scale * y
    return params, state


def test_adafactor_matches_the_t5x_update_rule_for_factored_and_full_moments():
    rng = np.random.default_rng(0)
    params = {"big": rng.normal(0, 0.05, (130, 160)).astype(np.float32),   # factored (both >= 128)
              "tall": rng.normal(0, 2.0, (200, 16)).astype(np.float32),    # second dim < 128: full v
              "scale": np.full((16,), 1e-4, np.float32)}                   # rms below epsilon2
    grads = [{k: rng.normal(0, 1, v.shape).astype(np.float32) for k, v in params.items()} for _ in range(3)]
    tx, _ = OptimizerConfig(name="adafactor", learning_rate=1e-2).build(10)
    p = jax.tree_util.tree_map(jnp.asarray, params)
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(jax.tree_util.tree_map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
    want, ref_state = adafactor_reference(params, grads, 1e-2)
    for k in params:
        np.testing.assert_allclose(p[k], want[k], rtol=2e-5, atol=1e-7, err_msg=k)
    factored = state[0]
    assert factored.v_row["big"].shape in {(130,), (160,)} and factored.v["big"].shape == (1,)
    assert factored.v["tall"].shape == (200, 16)
    # No momentum slot: apart from the second moments, the state holds only step counters.
    others = [s for s in state if not isinstance(s, type(factored))]
    assert all(x.ndim == 0 for s in others for x in jax.tree_util.tree_leaves(s))


def test_adamw_matches_torch_adamw():
    rng = np.random.default_rng(1)
    w0 = rng.normal(0, 1, (4, 3)).astype(np.float32)
    grads = [rng.normal(0, 1, (4, 3)).astype(np.float32) for _ in range(4)]
    tx, _ = OptimizerConfig(name="adamw", learning_rate=3e-2, weight_decay=0.01).build(10)
    p = jnp.asarray(w0)
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(jnp.asarray(g), state, p)
        p = optax.apply_updates(p, updates)
    tw = torch.nn.Parameter(torch.tensor(w0))
    opt = torch.optim.AdamW([tw], lr=3e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for g in grads:
        tw.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(p, tw.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_rsqrt_schedule_gives_t5x_learning_rate_of_the_fixture_run():
    # T5X's tiny train run (../shared/fixtures/t5x_tiny/README.md) logged learning_rate=0.0316 at
    # step 3 with 'constant * rsqrt_decay', base 1.0, warmup 1000.
    lr = learning_rate_schedule("constant * rsqrt_decay", base_learning_rate=1.0, warmup_steps=1000)
    assert round(float(lr(3)), 4) == 0.0316
    assert float(lr(4000)) == pytest.approx(1 / 4000 ** 0.5, rel=1e-6)


def test_warmup_and_linear_decay_to_zero():
    lr = learning_rate_schedule("constant * linear_warmup * linear_to_zero", base_learning_rate=1e-3,
                                warmup_steps=10, total_steps=110)
    assert [round(float(lr(s)), 7) for s in (0, 5, 10, 60, 110)] == [0.0, 5e-4, 1e-3, 5e-4, 0.0]
    assert float(learning_rate_schedule("constant", base_learning_rate=3e-5)(12345)) == pytest.approx(3e-5)


def test_gradient_clipping_bounds_the_global_norm():
    tx, _ = OptimizerConfig(name="adamw", learning_rate=1.0, grad_clip_norm=1.0, b1=0.0).build(1)
    g = {"a": jnp.full((4,), 100.0)}
    state = tx.init({"a": jnp.zeros(4)})
    # After clipping to norm 1 (each entry 0.5), Adam with b1=0 moves every entry by ~lr.
    updates, _ = tx.update(g, state, {"a": jnp.zeros(4)})
    np.testing.assert_allclose(updates["a"], -1.0, rtol=1e-3)


def test_bad_optimizer_settings_name_the_field():
    with pytest.raises(ValueError, match="OptimizerConfig.name 'sgd'"):
        OptimizerConfig(name="sgd")
    with pytest.raises(ValueError, match="unknown factor"):
        OptimizerConfig(schedule="constant * warmup_cosine")
    with pytest.raises(ValueError, match="learning_rate"):
        OptimizerConfig(learning_rate=0.0)
