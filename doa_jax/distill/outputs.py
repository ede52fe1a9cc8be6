"""Teacher outputs for distillation: decode, then score the decoded sequence once for soft targets.

`make_predict_fn` turns a teacher (module + params) into the `PredictFn` a `TeacherStore` fills
itself with: greedy (or beam) output tokens, their summed log-probability, and the teacher's
top-k logits at every output position (from one teacher-forced forward pass over the decoded
sequence, the positions the student is trained on). Rows are processed in fixed-size, padded
sub-batches so each shape compiles once. The teacher's params are cast once to the decoding dtypes
(`decoding.decoding_params`: the activation dtype, the logits kernel float32) and both passes read
that copy: the model computes in that dtype anyway, so the outputs are the same and a bf16 teacher
holds half the memory.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from doa_jax import decoding, partitioning
from doa_jax.model import Transformer


@functools.partial(jax.jit, static_argnums=(0, 4))
def score_topk(module: Transformer, params: Any, enc: jax.Array, tokens: jax.Array, topk: int):
    """One teacher-forced pass over `tokens`: their summed log-probability (up to EOS) and the top-k
    logits (values, ids) at every valid position, zeros elsewhere."""
    dec_in = jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
    logits = module.apply({"params": params}, enc, dec_in)
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_logp = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    valid = _valid_positions(tokens)
    values, ids = jax.lax.top_k(logits, topk)
    return (jnp.sum(token_logp * valid, axis=1), values * valid[..., None],
            jnp.where(valid[..., None] > 0, ids, 0))


def clear_compiled() -> None:
    """Forget the compiled scoring pass and decoders, so the next call compiles afresh."""
    score_topk.clear_cache()
    decoding.clear_compiled()


def _valid_positions(tokens: jax.Array) -> jax.Array:
    """1.0 up to and including the first EOS (1); 0 after it and on padding."""
    is_eos = (tokens == decoding.EOS_ID).astype(jnp.int32)
    before_or_at_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) == 0
    return (before_or_at_eos & (tokens != decoding.PAD_ID)).astype(jnp.float32)


def make_predict_fn(module: Transformer, params: Any, max_decode_len: int, *, num_beams: int = 1,
                    topk: int = 8, batch_size: int = 64, **decode_options: Any):
    """A `TeacherStore` predict function: encoder tokens `[n, S]` -> the store's arrays for n rows."""
    vocab = module.config.vocab_size
    if not 1 <= topk <= vocab:
        raise ValueError(f"topk must be in [1, vocab_size={vocab}], got {topk}")

    params = decoding.decoding_params(params, module)
    leaf = jax.tree_util.tree_leaves(params)[0]     # rows go where the params are (`partitioning.rows_like`)

    def predict(encoder_input_tokens: np.ndarray) -> Mapping[str, np.ndarray]:
        enc_all = np.asarray(encoder_input_tokens, np.int32)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in
                                              ("tokens", "lengths", "sequence_logprob", "topk_values", "topk_ids")}
        for lo in range(0, len(enc_all), batch_size):
            enc = enc_all[lo:lo + batch_size]
            n = len(enc)
            if n < batch_size:  # pad rows (all-pad inputs) so every sub-batch has one shape
                enc = np.concatenate([enc, np.zeros((batch_size - n, enc.shape[1]), np.int32)])
            enc = partitioning.rows_like(enc, leaf)
            result = decoding.generate(module, params, enc, max_decode_len, num_beams=num_beams, **decode_options)
            tokens = partitioning.to_host(result.tokens)
            seq_logp, values, ids = score_topk(module, params, enc, partitioning.rows_like(tokens, leaf), topk)
            parts["tokens"].append(tokens[:n])
            parts["lengths"].append(partitioning.to_host(result.lengths)[:n])
            parts["sequence_logprob"].append(partitioning.to_host(seq_logp)[:n])
            parts["topk_values"].append(partitioning.to_host(values).astype(np.float32)[:n])
            parts["topk_ids"].append(partitioning.to_host(ids).astype(np.int32)[:n])
        return {k: np.concatenate(v) for k, v in parts.items()}

    return predict


def score_targets(module: Transformer, params: Any, encoder_input_tokens: np.ndarray, targets: np.ndarray,
                  topk: int, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k logits `[n, T, k]` (values, ids) at every position of given targets
    (teacher-forced), e.g. gold labels that join pseudo-labels in the student's data."""
    values, ids = [], []
    params = decoding.decoding_params(params, module)
    leaf = jax.tree_util.tree_leaves(params)[0]
    for lo in range(0, len(targets), batch_size):
        enc, tgt = encoder_input_tokens[lo:lo + batch_size], targets[lo:lo + batch_size]
        n = len(enc)
        if n < batch_size:
            enc = np.concatenate([enc, np.zeros((batch_size - n, enc.shape[1]), np.int32)])
            tgt = np.concatenate([tgt, np.zeros((batch_size - n, tgt.shape[1]), np.int32)])
        _, v, i = score_topk(module, params, partitioning.rows_like(enc, leaf), partitioning.rows_like(tgt, leaf), topk)
        values.append(partitioning.to_host(v).astype(np.float32)[:n])
        ids.append(partitioning.to_host(i).astype(np.int32)[:n])
    return np.concatenate(values), np.concatenate(ids)
