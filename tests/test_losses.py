"""Cross-entropy with z-loss (custom VJP) and T5X's loss-normalisation options."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from doa_jax import losses
from doa_jax.losses import LossConfig, normalizing_factor_and_weights, sequence_loss, token_cross_entropy


def _logits_targets(seed=0, shape=(3, 5, 11)):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(0, 3, shape), jnp.float32)
    targets = jnp.asarray(rng.integers(0, shape[-1], shape[:-1]), jnp.int32)
    return logits, targets


def _plain(logits, targets, z_loss, label_smoothing):
    """The same loss with autodiff-only jnp: log-softmax cross-entropy + z * logsumexp^2."""
    v = logits.shape[-1]
    conf, low = 1 - label_smoothing, label_smoothing / (v - 1)
    soft = jax.nn.one_hot(targets, v) * (conf - low) + low
    lse = jax.nn.logsumexp(logits, -1)
    ce = -jnp.sum(soft * jax.nn.log_softmax(logits), -1)
    if label_smoothing:
        ce = ce + conf * jnp.log(conf) + (v - 1) * low * jnp.log(low + 1e-20)
    return ce + z_loss * lse ** 2


def test_token_cross_entropy_equals_torch_cross_entropy_without_z_loss():
    logits, targets = _logits_targets()
    ours, z = token_cross_entropy(logits, targets)
    ref = torch.nn.functional.cross_entropy(torch.tensor(np.asarray(logits)).reshape(-1, 11),
                                            torch.tensor(np.asarray(targets)).reshape(-1).long(),
                                            reduction="none").reshape(3, 5).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(z))) == 0.0


def test_z_loss_term_is_z_times_log_partition_squared():
    logits, targets = _logits_targets(1)
    loss, z = token_cross_entropy(logits, targets, z_loss=1e-4)
    lse = np.log(np.sum(np.exp(np.asarray(logits, np.float64)), -1))
    np.testing.assert_allclose(z, 1e-4 * lse ** 2, rtol=1e-5)
    base, _ = token_cross_entropy(logits, targets)
    np.testing.assert_allclose(loss - base, z, atol=2e-6)  # float32 subtraction of ~10-sized losses


@pytest.mark.parametrize("z_loss,smoothing", [(0.0, 0.0), (1e-4, 0.0), (0.3, 0.1)])
def test_custom_vjp_gradient_equals_autodiff(z_loss, smoothing):
    logits, targets = _logits_targets(2)
    w = jnp.asarray(np.random.default_rng(3).uniform(0, 1, targets.shape), jnp.float32)
    ours = jax.grad(lambda l: jnp.sum(token_cross_entropy(l, targets, z_loss=z_loss,
                                                          label_smoothing=smoothing)[0] * w))(logits)
    ref = jax.grad(lambda l: jnp.sum(_plain(l, targets, z_loss, smoothing) * w))(logits)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    value = token_cross_entropy(logits, targets, z_loss=z_loss, label_smoothing=smoothing)[0]
    np.testing.assert_allclose(value, _plain(logits, targets, z_loss, smoothing), rtol=1e-5, atol=1e-5)


def _batch():
    # Row 0: 2 real target tokens, row 1: 4.
    targets = np.array([[5, 1, 0, 0], [7, 8, 9, 1]], np.int32)
    return {"decoder_target_tokens": jnp.asarray(targets),
            "decoder_loss_weights": jnp.asarray(targets > 0, jnp.float32)}


def test_normalizers_give_t5x_weights_and_divisors():
    b = _batch()
    w, d = normalizing_factor_and_weights(None, b)
    assert float(d) == 1.0 and float(jnp.sum(w)) == 6
    assert float(normalizing_factor_and_weights("NUM_REAL_TARGET_TOKENS", b)[1]) == 6
    assert float(normalizing_factor_and_weights("NUM_TOTAL_TARGET_TOKENS", b)[1]) == 8
    assert float(normalizing_factor_and_weights(233472, b)[1]) == 233472
    w, d = normalizing_factor_and_weights("AVERAGE_PER_SEQUENCE", b)
    np.testing.assert_allclose(w, [[0.5, 0.5, 0, 0], [0.25, 0.25, 0.25, 0.25]])
    assert float(d) == 2


def test_average_per_sequence_counts_packed_segments():
    # One packed row: segment 1 has 3 tokens, segment 2 has 1; the last position is padding.
    targets = np.array([[4, 5, 1, 1, 0]], np.int32)
    b = {"decoder_target_tokens": jnp.asarray(targets),
         "decoder_loss_weights": jnp.asarray(targets > 0, jnp.float32),
         "decoder_segment_ids": jnp.asarray([[1, 1, 1, 2, 0]])}
    w, d = normalizing_factor_and_weights("AVERAGE_PER_SEQUENCE", b)
    np.testing.assert_allclose(w, [[1 / 3, 1 / 3, 1 / 3, 1.0, 0.0]], rtol=1e-6)
    assert float(d) == 2


def test_per_token_normalisation_is_the_mean_over_real_tokens():
    logits, _ = _logits_targets(4, (2, 4, 11))
    b = _batch()
    w, d = normalizing_factor_and_weights("NUM_REAL_TARGET_TOKENS", b)
    loss, metrics = sequence_loss(LossConfig(z_loss=0.0, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS"),
                                  logits, b, w, d)
    per_token, _ = token_cross_entropy(logits, b["decoder_target_tokens"])
    mask = np.asarray(b["decoder_loss_weights"]) > 0
    np.testing.assert_allclose(loss, np.asarray(per_token)[mask].mean(), rtol=1e-6)
    assert float(metrics["num_tokens"]) == 6


def test_bad_loss_settings_are_rejected_by_name():
    with pytest.raises(ValueError, match="loss_normalizing_factor 'TOKENS'"):
        LossConfig(loss_normalizing_factor="TOKENS")
    with pytest.raises(ValueError, match="must be positive"):
        LossConfig(loss_normalizing_factor=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        LossConfig(label_smoothing=1.0)
    assert set(losses.NORMALIZERS) == {"NUM_REAL_TARGET_TOKENS", "NUM_TOTAL_TARGET_TOKENS",
                                       "AVERAGE_PER_SEQUENCE"}
