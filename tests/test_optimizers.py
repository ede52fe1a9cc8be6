"""Adafactor with T5X's fine-tuning rule, AdamW against PyTorch, T5X's schedule factors, and the
per-layer update of scanned (stacked) layers against the unrolled model's per-layer optimizer."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from optax._src.factorized import FactoredState

from doa_jax import optimizers
from doa_jax.checkpoints.tree import flatten, unflatten
from doa_jax.model.scan import stack_layers, unstack_layers
from doa_jax.optimizers import OptimizerConfig, PerLayerState, learning_rate_schedule


def adafactor_reference(params, grads_per_step, lr, state=None, step0=0):
    """T5X's Adafactor (beta1=None, decay 0.8, factored if both dims >= 128, clip 1.0,
    param-scale with epsilon2 1e-3, epsilon1 1e-30), written out in float64 numpy, one param
    (T5X: one per-layer name) at a time. `state`/`step0` continue from saved slots."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    state = dict(state or {})
    for t, grads in enumerate(grads_per_step, step0):
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


# ----------------------------------------------------------------------------- per-layer update

def _stacked_tree(rng, layers=3):
    """A scanned-layout tree: a factored [L,130,160] kernel whose layers differ in scale, a [L,16]
    vector, and unstacked leaves beside them."""
    scale = np.array([0.01, 1.0, 30.0][:layers], np.float32)
    return {"encoder": {"layers": {"mlp": {"kernel": rng.normal(0, 1, (layers, 130, 160)).astype(np.float32)
                                           * scale[:, None, None]},
                                   "norm": {"scale": rng.normal(1, 0.1, (layers, 16)).astype(np.float32)}},
                        "encoder_norm": {"scale": np.ones(16, np.float32)}},
            "token_embedder": {"embedding": rng.normal(0, 1, (40, 16)).astype(np.float32)}}


def _run(tx, params, grads_per_step):
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for grads in grads_per_step:
        updates, state = step(jax.tree.map(jnp.asarray, grads), state, params)
        params = optax.apply_updates(params, updates)
    return jax.tree.map(np.asarray, params), state


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_per_layer_adamw_equals_the_whole_tree_update():
    rng = np.random.default_rng(2)
    params = _stacked_tree(rng)
    grads = [jax.tree.map(lambda x: rng.normal(0, 1, x.shape).astype(np.float32), params) for _ in range(3)]
    config = OptimizerConfig(name="adamw", learning_rate=1e-2, weight_decay=0.01)
    adamw = optimizers.OPTIMIZERS["adamw"](config, config.make_schedule(10))
    got, state = _run(optimizers.per_layer(adamw), params, grads)
    want, _ = _run(adamw, params, grads)
    assert isinstance(state, PerLayerState) and len(state.stacks) == 1
    assert _max_diff(got, want) < 1e-6
    # So the trainer's AdamW updates whole arrays (in place, no loop): the same numbers.
    built, state = _run(config.build(10)[0], params, grads)
    assert not isinstance(state, PerLayerState) and _max_diff(built, want) < 1e-6


def test_per_layer_adafactor_equals_the_unrolled_per_layer_update():
    rng = np.random.default_rng(3)
    params = _stacked_tree(rng)
    grads = [jax.tree.map(lambda x: rng.normal(0, 1, x.shape).astype(np.float32), params) for _ in range(3)]
    config = OptimizerConfig(name="adafactor", learning_rate=1e-2)
    got, state = _run(config.build(10)[0], params, grads)
    raw = optimizers.OPTIMIZERS["adafactor"](config, config.make_schedule(10))
    unrolled, _ = _run(raw, unstack_layers(params), [unstack_layers(g) for g in grads])
    flat_ref, _ = adafactor_reference(flatten(unstack_layers(params)), [flatten(unstack_layers(g)) for g in grads], 1e-2)
    for name, value in flatten(unstack_layers(got)).items():   # float32 rounding of each layer's scale
        ulp = 2 ** -23 * float(np.abs(value).max())
        np.testing.assert_allclose(value, flatten(unrolled)[name], rtol=1e-6, atol=4 * ulp, err_msg=name)
        np.testing.assert_allclose(value, flat_ref[name], rtol=2e-5, atol=4 * ulp, err_msg=name)
    # The trainer's fused path (update and write back layer by layer, in place) gives the same params.
    tx = config.build(10)[0]
    fused, apply = jax.tree.map(jnp.asarray, params), jax.jit(tx.apply)
    fused_state = tx.init(fused)
    for g in grads:
        fused, fused_state, _ = apply(jax.tree.map(jnp.asarray, g), fused_state, fused)
    for name, value in flatten(jax.tree.map(np.asarray, fused)).items():   # XLA may fuse differently
        np.testing.assert_allclose(value, flatten(got)[name], rtol=1e-6,
                                   atol=4 * 2 ** -23 * float(np.abs(value).max()), err_msg=name)
    # Each layer is factored on its own [130, 160] matrix, as the unrolled model's kernels are.
    assert state.stacks[0][0].v_row["encoder"]["layers"]["mlp"]["kernel"].shape == (3, 130)
    # optax on the whole stack (the bug this fixes) scales and clips over all layers at once.
    whole, _ = _run(raw, params, grads)
    assert _max_diff(whole, got) > 1e-3


def _t5x_state(tx, params, v, step):
    """`tx.init(params)` with T5X's saved second moments `v` (same layout as `params`) and step."""
    def fill(inner, v_tree):
        out = []
        for s in inner:
            if isinstance(s, FactoredState):
                s = s._replace(v=v_tree, count=np.full(s.count.shape, step, np.int32))
            elif isinstance(s, optax.ScaleByScheduleState):
                s = s._replace(count=np.full(s.count.shape, step, np.int32))
            out.append(s)
        return tuple(out)

    state = jax.jit(tx.init)(params)
    if not isinstance(state, PerLayerState):
        return fill(state, v)
    paths = optimizers.stack_paths(v)
    v_rest, v_stacks = optimizers.split_stacks(v, paths)
    return PerLayerState(fill(state.rest, v_rest),
                         tuple(fill(s, vs) for s, vs in zip(state.stacks, v_stacks)))


def test_scanned_adafactor_continues_t5x_fixture_run_as_t5x_per_layer_adafactor(t5x_fixtures):
    """From T5X's own train state after 3 Adafactor steps (params, per-layer second moments,
    step), the scanned model's per-layer update gives T5X's per-layer rule exactly."""
    npz = np.load(t5x_fixtures / "train_run" / "expected_state.npz")
    params = unflatten({k[len("target/"):]: npz[k] for k in npz.files if k.startswith("target/")})
    v = unflatten({k[len("state/param_states/"):-len("/v")]: npz[k] for k in npz.files
                   if k.startswith("state/param_states/") and k.endswith("/v")})
    step = int(npz["state/step"])
    rng = np.random.default_rng(4)    # gradients of the size T5X's step-3 second moments imply
    grads = {k: (rng.normal(0, 1, x.shape) * np.sqrt(flatten(v)[k])).astype(np.float32)
             for k, x in flatten(params).items()}
    grads = unflatten(grads)
    # T5X's fixture run: Adafactor, lr 'constant * rsqrt_decay', base 1.0, 1000 warmup steps.
    config = OptimizerConfig(name="adafactor", learning_rate=1.0, schedule="constant * rsqrt_decay",
                             warmup_steps=1000)
    tx = config.build(10)[0]
    stacked = jax.tree.map(jnp.asarray, stack_layers(params))
    state = _t5x_state(tx, stack_layers(params), stack_layers(v), step)

    @jax.jit
    def train_step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    got = stacked
    for _ in range(2):
        got, state = train_step(got, state, stack_layers(grads))
    lr = float(learning_rate_schedule("constant * rsqrt_decay", base_learning_rate=1.0, warmup_steps=1000)(step))
    want, want_v = adafactor_reference(flatten(params), [flatten(grads)] * 2, lr, state=flatten(v), step0=step)
    got_flat = flatten(unstack_layers(jax.tree.map(np.asarray, got)))
    assert sorted(got_flat) == sorted(want) and any("layers_1" in k for k in want)
    for name, value in want.items():
        np.testing.assert_allclose(got_flat[name], value, rtol=2e-5, atol=1e-7, err_msg=name)
    got_v = flatten(unstack_layers(jax.tree.map(np.asarray, state.stacks[0][0].v)))
    np.testing.assert_allclose(got_v["decoder/layers_1/mlp/wo/kernel"], want_v["decoder/layers_1/mlp/wo/kernel"],
                               rtol=2e-5)
