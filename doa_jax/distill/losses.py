"""Distillation losses: the student matches the teacher's (temperature-softened) distribution.

The paper (Kang et al. 2023) trains the student with T^2 * KL(teacher || student) at T = 2 on the
teacher's greedy output sequence. Its released code feeds the output of HF `generate` (the start
token, then the tokens, padded after EOS to the batch's longest) as decoder input, flattens the
[B, L, V] logits to [B*L, V] and uses `KLDivLoss(reduction="batchmean")`: every position of the
batch padded to its own longest teacher sequence (+1 for the start token) counts, padding included,
and the sum is divided by B*L (`paper_exact=True`, `paper_positions`). By default padded positions
are masked out and the sum is divided by the number of real target tokens (an approximation: the
'efficient' protocol).

Soft targets come either from full teacher logits `[B, T, V]` or from stored top-k logits
(`values`, `ids` of shape `[B, T, k]`), renormalised over those k entries; with k = V the two
are identical.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def _kl_per_position(teacher_logp: Array, student_logp_at: Array) -> Array:
    """KL(p_t || p_s) summed over the (top-k or full) support: [B, T]."""
    p = jnp.exp(teacher_logp)
    return jnp.sum(jnp.where(p > 0, p * (teacher_logp - student_logp_at), 0.0), axis=-1)


def paper_positions(target_tokens: Array, padded_length: Optional[Array] = None) -> tuple[Array, Array]:
    """`(weights [B, T], divisor)` of the released reduction for teacher tokens `[B, T]` (0 after EOS).

    The released batch has L = 1 + its longest teacher sequence columns (HF `generate` returns the
    start token first), at most T; every position < L of every real row counts (after EOS the
    decoder input is the pad id, as there), and the divisor is rows x L. All-zero rows are the
    padding of a last, short batch, which the released code does not have. `padded_length` [B]
    (`student_data.ReleasedPadding`: from the second epoch the released code pads a batch to the
    lengths its rows were first generated at) gives L as its largest value instead.
    """
    t = target_tokens.shape[-1]
    row_len = jnp.max(jnp.where(target_tokens > 0, jnp.arange(1, t + 1), 0), axis=-1)   # EOS included
    real = row_len > 0
    length = jnp.max(row_len) + 1 if padded_length is None else jnp.max(padded_length)
    length = jnp.minimum(length, t)
    weights = ((jnp.arange(t)[None, :] < length) & real[:, None]).astype(jnp.float32)
    return weights, (jnp.sum(real) * length).astype(jnp.float32)


def _reduce(per_position: Array, weights: Optional[Array], paper_exact: bool,
            target_tokens: Optional[Array]) -> Array:
    if paper_exact:
        if target_tokens is None:
            raise ValueError("paper_exact needs the teacher's target tokens (the batch's padded length)")
        weights, divisor = paper_positions(target_tokens)
        return jnp.sum(per_position * weights) / jnp.maximum(divisor, 1.0)
    if weights is None:
        return jnp.mean(per_position)
    weights = weights.astype(per_position.dtype)
    return jnp.sum(per_position * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def kd_loss(student_logits: Array, teacher_logits: Array, weights: Optional[Array] = None, *,
            temperature: float = 2.0, paper_exact: bool = False, target_tokens: Optional[Array] = None) -> Array:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), from full teacher logits `[B, T, V]`;
    `paper_exact` reduces as the released code (`paper_positions` of `target_tokens`)."""
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    return temperature ** 2 * _reduce(_kl_per_position(t, s), weights, paper_exact, target_tokens)


STORED_PAPER_EXACT = ("the released reduction counts every position of the padded batch, and stored top-k "
                      "soft targets have none after EOS: use full-vocabulary teacher logits (SOFT_TARGETS='online')")


def check_paper_exact_targets(student_logits: Array, topk_values: Array) -> None:
    """The released reduction needs the teacher's full distribution at every position (k = V)."""
    if topk_values.shape[-1] != student_logits.shape[-1]:
        raise ValueError(f"kd_paper_exact with top-{topk_values.shape[-1]} soft targets: {STORED_PAPER_EXACT}")


def topk_kd_per_token(student_logits: Array, topk_values: Array, topk_ids: Optional[Array],
                      temperature: float = 2.0) -> Array:
    """T^2 * KL per target position `[B, T]`, the teacher given by its top-k logits there
    (`topk_ids` None: the values are the full vocabulary's, in id order: the online soft targets)."""
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    s_at = s if topk_ids is None else jnp.take_along_axis(s, topk_ids.astype(jnp.int32), axis=-1)
    t = jax.nn.log_softmax(topk_values.astype(jnp.float32) / temperature, axis=-1)
    return temperature ** 2 * _kl_per_position(t, s_at)


def topk_kd_loss(student_logits: Array, topk_values: Array, topk_ids: Array,
                 weights: Optional[Array] = None, *, temperature: float = 2.0,
                 paper_exact: bool = False, target_tokens: Optional[Array] = None) -> Array:
    """`kd_loss` with the teacher given by its top-k logits per position (stored once, reused).
    `paper_exact` needs k = V (the full distribution: see `check_paper_exact_targets`)."""
    if paper_exact:
        check_paper_exact_targets(student_logits, topk_values)
    per_token = topk_kd_per_token(student_logits, topk_values, topk_ids, temperature)
    return _reduce(per_token, weights, paper_exact, target_tokens)


def sequence_kd_loss(student_logits: Array, teacher_tokens: Array, weights: Array) -> Array:
    """Sequence-level KD: token cross-entropy on the teacher's output sequence (mean over tokens)."""
    logp = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, teacher_tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return _reduce(nll, weights, False, None)


def mix(kd: Array, gold_ce: Array, alpha: float) -> Array:
    """alpha * distillation + (1 - alpha) * gold cross-entropy (alpha = 1: the paper, no gold term)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * kd + (1.0 - alpha) * gold_ce
