"""Training losses: token cross-entropy with z-loss, and T5X's loss-normalisation options.

Layout (so distillation losses can join without touching the trainer):

* per-token losses: `token_cross_entropy` (hard targets, optional label smoothing, z-loss), a
  `jax.custom_vjp` whose backward pass is `softmax - targets` (no `[B, T, V]` log-softmax kept);
* normalisation: `normalizing_factor_and_weights` turns `decoder_loss_weights` into the weights
  and the divisor T5X would use (`None` = plain sum, a number, or one of `NORMALIZERS`);
* a `LossConfig` that names the choices, and `sequence_loss`, the reduction the trainer calls;
* distillation (`kd_weight > 0`): the batch also carries the teacher's top-k logits per target
  position (`teacher_topk_values`, `teacher_topk_ids`), and the per-token loss becomes
  `kd_weight * T^2 KL(teacher || student) + (1 - kd_weight) * cross-entropy(targets)`
  (`doa_jax.distill.losses`). With teacher tokens as targets, `kd_weight=1` is the paper's loss
  and `kd_weight=0` is sequence-level KD; gold rows mix the two.

The divisor is computed on the whole global batch *before* it is split into microbatches, so
accumulated microbatch gradients equal the full-batch gradient.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp

from doa_jax.distill import losses as distill_losses

Array = jax.Array
Batch = Mapping[str, Array]


# ----------------------------------------------------------------------------- per-token losses

def _smoothed_targets(targets: Array, vocab_size: int, label_smoothing: float) -> tuple[Array, float]:
    """One-hot targets with label smoothing, and the loss of a perfect prediction (subtracted)."""
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab_size - 1)
    soft = jax.nn.one_hot(targets, vocab_size, dtype=jnp.float32) * (confidence - low) + low
    # Entropy of the smoothed target, so the minimum achievable loss is 0 (as T5X reports it).
    min_loss = -(confidence * jnp.log(confidence) + (vocab_size - 1) * low * jnp.log(low + 1e-20)) \
        if label_smoothing > 0 else 0.0
    return soft, min_loss


@jax.custom_vjp
def _xent_with_z_loss(logits: Array, soft_targets: Array, z_loss: Array) -> tuple[Array, Array]:
    """Per-token `(cross_entropy + z_loss * log(Z)^2, z_loss * log(Z)^2)` from float32 logits."""
    out, _ = _xent_fwd(logits, soft_targets, z_loss)
    return out


def _xent_fwd(logits, soft_targets, z_loss):
    logits = logits.astype(jnp.float32)
    max_logit = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    shifted = logits - max_logit
    sum_exp = jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True)
    log_z = jnp.log(sum_exp) + max_logit
    ce = jnp.sum(soft_targets * (log_z - logits), axis=-1)
    log_z = log_z[..., 0]
    z_term = z_loss * jnp.square(log_z)
    residuals = (shifted, sum_exp, log_z, soft_targets, z_loss)
    return (ce + z_term, z_term), residuals


def _xent_bwd(residuals, cotangents):
    shifted, sum_exp, log_z, soft_targets, z_loss = residuals
    g_loss, g_z = cotangents
    softmax = jnp.exp(shifted) / sum_exp
    # d(ce)/dlogits = softmax * sum(targets) - targets; d(z log Z^2)/dlogits = 2 z log Z softmax.
    dlogits = (g_loss[..., None] * (softmax * jnp.sum(soft_targets, -1, keepdims=True) - soft_targets)
               + (g_loss + g_z)[..., None] * 2.0 * z_loss * log_z[..., None] * softmax)
    return dlogits, None, None


_xent_with_z_loss.defvjp(_xent_fwd, _xent_bwd)


def token_cross_entropy(logits: Array, targets: Array, *, z_loss: float = 0.0,
                        label_smoothing: float = 0.0) -> tuple[Array, Array]:
    """Per-token loss `[B, T]` (cross-entropy + z-loss) and its z-loss part, unweighted."""
    soft, min_loss = _smoothed_targets(targets, logits.shape[-1], label_smoothing)
    loss, z_term = _xent_with_z_loss(logits, soft, jnp.asarray(z_loss, jnp.float32))
    return loss - min_loss, z_term


# ----------------------------------------------------------------------------- normalisation

def _per_sequence_weights(weights: Array, segment_ids: Optional[Array]) -> tuple[Array, Array]:
    """Reweight tokens by 1/(tokens in their sequence); divisor = number of sequences."""
    if segment_ids is None:
        per_row = jnp.sum(weights, axis=-1, keepdims=True)
        new = jnp.where(per_row > 0, weights / jnp.maximum(per_row, 1e-9), 0.0)
        return new, jnp.sum(per_row > 0).astype(jnp.float32)
    # Packed rows: count tokens per (row, segment id) with a one-hot over segment ids.
    max_segments = segment_ids.shape[-1] + 1
    onehot = jax.nn.one_hot(segment_ids, max_segments, dtype=jnp.float32) * weights[..., None]
    counts = jnp.sum(onehot, axis=1)                              # [B, S]
    per_token = jnp.take_along_axis(counts, segment_ids.astype(jnp.int32), axis=1)
    new = jnp.where(per_token > 0, weights / jnp.maximum(per_token, 1e-9), 0.0)
    return new, jnp.sum(counts > 0).astype(jnp.float32)


# Name -> function(weights, batch) -> (weights, divisor). Mirrors T5X's SpecialLossNormalizingFactor.
NORMALIZERS: dict[str, Callable[[Array, Batch], tuple[Array, Array]]] = {
    "NUM_REAL_TARGET_TOKENS": lambda w, b: (w, jnp.sum(w)),
    "NUM_TOTAL_TARGET_TOKENS": lambda w, b: (w, jnp.asarray(w.size, jnp.float32)),
    "AVERAGE_PER_SEQUENCE": lambda w, b: _per_sequence_weights(w, b.get("decoder_segment_ids")),
}

LossNormalizingFactor = Union[None, float, int, str]


def check_normalizing_factor(factor: LossNormalizingFactor) -> None:
    if factor is None or isinstance(factor, (int, float)) and not isinstance(factor, bool):
        if factor is not None and factor <= 0:
            raise ValueError(f"loss_normalizing_factor must be positive, got {factor}")
        return
    if factor not in NORMALIZERS:
        raise ValueError(f"loss_normalizing_factor {factor!r}: use None (sum), a positive number, or one "
                         f"of {sorted(NORMALIZERS)}")


def normalizing_factor_and_weights(factor: LossNormalizingFactor, batch: Batch) -> tuple[Array, Array]:
    """`(loss weights [B, T], divisor)` for the global batch; `None` sums (divisor 1), as T5X does."""
    check_normalizing_factor(factor)
    weights = batch.get("decoder_loss_weights")
    if weights is None:
        weights = (batch["decoder_target_tokens"] > 0)
    weights = weights.astype(jnp.float32)
    if factor is None:
        return weights, jnp.float32(1.0)
    if isinstance(factor, str):
        return NORMALIZERS[factor](weights, batch)
    return weights, jnp.float32(factor)


# ----------------------------------------------------------------------------- config + reduction

@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How the training loss is formed. T5X defaults: z_loss 1e-4, no smoothing, plain sum.

    `loss_normalizing_factor`: None (sum over tokens, T5X's default; Adafactor is scale
    invariant), a number (T5X uses 233472 = 2048 x 114 to fine-tune the public T5 checkpoints),
    'NUM_REAL_TARGET_TOKENS' (per-token mean, what PyTorch/HF fine-tuning does),
    'NUM_TOTAL_TARGET_TOKENS' or 'AVERAGE_PER_SEQUENCE'.
    """

    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    loss_normalizing_factor: LossNormalizingFactor = None
    # Distillation: weight of the soft-target term, its temperature, and the released code's
    # reduction (every position of the batch padded to its longest teacher sequence counts, padding
    # included, divided by rows x that length; needs full-vocabulary teacher logits).
    kd_weight: float = 0.0
    kd_temperature: float = 2.0
    kd_paper_exact: bool = False

    def __post_init__(self):
        if self.z_loss < 0:
            raise ValueError(f"LossConfig.z_loss must be >= 0, got {self.z_loss}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"LossConfig.kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.kd_temperature <= 0:
            raise ValueError(f"LossConfig.kd_temperature must be > 0, got {self.kd_temperature}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"LossConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        check_normalizing_factor(self.loss_normalizing_factor)


def loss_unit(cfg: LossConfig) -> str:
    """What the training loss's number is (the console labels it): its normalisation, in words.
    z-loss and any distillation term are included in it."""
    if cfg.kd_weight > 0 and cfg.kd_paper_exact:
        return "per padded target position"
    factor = cfg.loss_normalizing_factor
    if factor is None:
        return "sum over the batch's target tokens"
    if isinstance(factor, str):
        return {"NUM_REAL_TARGET_TOKENS": "per target token",
                "NUM_TOTAL_TARGET_TOKENS": "per target position, padding included",
                "AVERAGE_PER_SEQUENCE": "per sequence"}[factor]
    return f"sum over the batch's target tokens / {factor:g}"


def loss_weights(cfg: LossConfig, batch: Batch) -> tuple[Array, Array]:
    """`(weights, divisor)` for the global batch: `kd_paper_exact` counts every position of the batch
    padded as the released code pads it (to its longest teacher sequence, or with online soft targets
    to `teacher_padded_length`), divided by rows x that length."""
    if cfg.kd_weight > 0 and cfg.kd_paper_exact:
        return distill_losses.paper_positions(batch["decoder_target_tokens"], batch.get("teacher_padded_length"))
    return normalizing_factor_and_weights(cfg.loss_normalizing_factor, batch)


def sequence_loss(cfg: LossConfig, logits: Array, batch: Batch, weights: Array,
                  divisor: Array) -> tuple[Array, dict[str, Array]]:
    """Scalar loss `sum(token_loss * weights) / divisor` and summed metrics for logging.

    `weights` and `divisor` come from `normalizing_factor_and_weights` on the global batch.
    Metrics are sums (`loss_sum`, `z_loss_sum` weighted by the loss weights; `correct`,
    `num_tokens` over real target tokens), so they add across microbatches, steps and hosts.
    """
    targets = batch["decoder_target_tokens"]
    token_loss, z_term = token_cross_entropy(logits, targets, z_loss=cfg.z_loss,
                                             label_smoothing=cfg.label_smoothing)
    train_loss = token_loss
    kd_sum = jnp.float32(0.0)
    if cfg.kd_weight > 0:
        if "teacher_topk_values" not in batch:
            raise ValueError("kd_weight > 0 needs teacher_topk_values / teacher_topk_ids in the batch")
        if cfg.kd_paper_exact:
            distill_losses.check_paper_exact_targets(logits, batch["teacher_topk_values"])
        kd = distill_losses.topk_kd_per_token(logits, batch["teacher_topk_values"], batch.get("teacher_topk_ids"),
                                              cfg.kd_temperature)
        train_loss = cfg.kd_weight * kd + (1.0 - cfg.kd_weight) * token_loss
        kd_sum = jnp.sum(kd * weights) / divisor
    loss = jnp.sum(train_loss * weights) / divisor
    real = (batch.get("decoder_loss_weights", targets > 0) > 0).astype(jnp.float32)
    metrics = dict(
        loss=loss,
        z_loss=jnp.sum(z_term * weights) / divisor,
        correct=jnp.sum((jnp.argmax(logits, -1) == targets) * real),
        num_tokens=jnp.sum(real),
        # Per-token cross-entropy without z-loss: comparable across normalisation choices.
        nll_sum=jnp.sum((token_loss - z_term) * real),
        kd_loss=kd_sum,
    )
    return loss, metrics


__all__ = ["LossConfig", "NORMALIZERS", "loss_weights", "normalizing_factor_and_weights", "sequence_loss",
           "token_cross_entropy"]
