"""bfloat16 params (`TrainConfig.param_dtype`): updates computed in float32 and written back with
stochastic rounding, which is unbiased; a bf16 run trains, checkpoints in bf16 and resumes exactly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doa_jax.checkpoints import load_checkpoint
from doa_jax.checkpoints.native import latest_step_dir
from doa_jax.checkpoints.tensorstore_io import read_orbax_item
from doa_jax.optimizers import OptimizerConfig, apply_updates, stochastic_round
from doa_jax.trainer import TrainConfig, Trainer
from train_helpers import assert_same_params, flat, metric_rows, run_config, stopped_and_resumed, tiny_config, train_source

N = 200_000


@pytest.mark.parametrize("weight, update", [(1.0, 1e-3), (-3.3, 2.5e-3), (0.02, -7e-6)])
def test_stochastic_rounding_of_an_update_is_unbiased(weight, update):
    """Each update is below half a bf16 ulp of its weight: rounding to nearest drops all of it,
    stochastic rounding keeps it on average. Tolerance: 5 standard errors of the mean of N
    roundings (each lands on one of the two neighbours: sd = ulp * sqrt(f (1 - f)))."""
    w = jnp.full((N,), weight, jnp.bfloat16)
    exact = float(np.float32(w[0])) + update
    nearest = apply_updates(w, jnp.full((N,), update, jnp.float32))
    assert float(nearest[0]) == float(w[0])                     # the update is lost
    rounded = np.asarray(apply_updates(w, jnp.full((N,), update, jnp.float32), jax.random.PRNGKey(0)), np.float64)
    low, high = np.unique(rounded)                               # the two bf16 neighbours of `exact`
    assert low < exact < high
    f = (exact - low) / (high - low)
    standard_error = (high - low) * np.sqrt(f * (1 - f) / N)
    assert abs(rounded.mean() - exact) < 5 * standard_error
    assert abs(rounded.mean() - exact) < 0.05 * abs(update)     # the mean update within 5% of the f32 one


def test_stochastic_rounding_keeps_representable_values_and_special_values():
    x = jnp.asarray([1.0, -2.5, 0.0, 3.0e38, jnp.inf, -jnp.inf], jnp.float32)
    got = stochastic_round(x, jnp.bfloat16, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(np.asarray(got[:3], np.float32), [1.0, -2.5, 0.0])
    assert np.isposinf(np.float32(got[4])) and np.isneginf(np.float32(got[5]))
    assert bool(jnp.isnan(stochastic_round(jnp.asarray([jnp.nan]), jnp.bfloat16, jax.random.PRNGKey(1)))[0])
    with pytest.raises(ValueError, match="bfloat16"):
        stochastic_round(x, jnp.float16, jax.random.PRNGKey(1))


def test_param_dtype_is_set_from_gin(tmp_path):
    from doa_jax import gin_utils

    gin_utils.parse([], [f"TrainConfig.model_dir = '{tmp_path}'", "TrainConfig.batch_size = 2",
                         "TrainConfig.train_steps = 1", "TrainConfig.param_dtype = 'bfloat16'",
                         "TRAIN_CONFIG = @TrainConfig()"], check=False, known_macros=("TRAIN_CONFIG",))
    assert gin_utils.macro("TRAIN_CONFIG").param_dtype == "bfloat16"


def test_bad_param_dtype_is_refused_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="param_dtype must be one of .*'float16'"):
        TrainConfig(model_dir=str(tmp_path), batch_size=2, train_steps=1, param_dtype="float16")


ADAFACTOR = OptimizerConfig(name="adafactor", learning_rate=1e-2)


@pytest.mark.slow
def test_bf16_params_train_and_checkpoint_in_bf16(tmp_path):
    cfg = tiny_config(scan_layers=True)
    run = run_config(tmp_path, train_steps=3, optimizer=ADAFACTOR, param_dtype="bfloat16", checkpoint_every=3)
    result = Trainer(cfg, run).fit(train_source(16))
    params = flat(result.state.params)
    assert {v.dtype for v in params.values()} == {np.dtype(jnp.bfloat16)}
    # Optimizer slots stay float32 (Adafactor's factored moments and full `v` for small leaves).
    assert {x.dtype for x in jax.tree.leaves(result.state.opt_state) if x.ndim > 1} == {np.dtype(np.float32)}
    losses = [r["loss"] for r in metric_rows(tmp_path)]
    assert losses[-1] < losses[0]
    on_disk = read_orbax_item(latest_step_dir(tmp_path / "checkpoints") / "params")
    assert {a.dtype for a in on_disk.values()} == {np.dtype(jnp.bfloat16)}
    _, loaded = load_checkpoint(tmp_path / "checkpoints")    # inference loads as float32
    np.testing.assert_array_equal(loaded["encoder"]["layers"]["mlp"]["wo"]["kernel"],
                                  params["encoder/layers/mlp/wo/kernel"].astype(np.float32))


def test_bf16_run_stopped_and_resumed_ends_bit_identical(tmp_path):
    # Reuses the compiled step of the test above (same settings): a few seconds after it.
    cfg = tiny_config(scan_layers=True)
    common = dict(optimizer=ADAFACTOR, param_dtype="bfloat16", checkpoint_every=2)
    # Interrupted after step 2 and rerun: same params, bit for bit (rounding is keyed by the step).
    whole, resumed = stopped_and_resumed(cfg, tmp_path, **common)
    assert_same_params(whole.state.params, resumed.state.params)
