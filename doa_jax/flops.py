"""Analytic FLOP counts of a T5 forward pass and train step (for MFU and the cost ledger).

Counts matmul FLOPs (2 per multiply-add) of what the model computes for a batch of `batch`
examples with `in_len` encoder and `out_len` decoder tokens; element-wise work is ignored.
A train step is 3x the forward pass (the backward pass costs two forwards). Rematerialisation
adds recomputation that this *model* FLOP count deliberately leaves out (MFU, not HFU).
Attention score/value FLOPs are optional (`attention=False` gives the dense-only count); the
decoder's causal self-attention is counted in full, as the model computes the full square.
"""
from __future__ import annotations

from doa_jax.model.config import T5Config


def _dense_params_per_token(cfg: T5Config) -> dict[str, int]:
    """Weights touched per token, by where the token flows (multiply-adds per token)."""
    cfg.require_vocab_size()
    d, inner, f = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim
    attn = 4 * d * inner                      # q, k, v, out
    mlp = (len(cfg.mlp_activations) + 1) * d * f
    logits = d * cfg.vocab_size
    return dict(
        encoder=cfg.num_encoder_layers * (attn + mlp),
        # decoder token: self-attention, cross q/out, mlp; cross k/v run on encoder tokens.
        decoder=cfg.num_decoder_layers * (attn + 2 * d * inner + mlp) + logits,
        cross_kv=cfg.num_decoder_layers * 2 * d * inner,
    )


def forward_flops(cfg: T5Config, batch: int, in_len: int, out_len: int, *, attention: bool = True) -> float:
    """FLOPs of one teacher-forced forward pass over `batch` examples."""
    p = _dense_params_per_token(cfg)
    dense = 2 * (p["encoder"] * in_len + p["decoder"] * out_len + p["cross_kv"] * in_len)
    attn = 0
    if attention:
        inner = cfg.num_heads * cfg.head_dim
        # scores (q.k) and weighted values (w.v): 2 matmuls x 2 FLOPs x keys x inner, per query.
        attn = 4 * inner * (cfg.num_encoder_layers * in_len * in_len
                            + cfg.num_decoder_layers * (out_len * out_len + out_len * in_len))
    return float(batch * (dense + attn))


def decoder_token_flops(cfg: T5Config, batch: int, in_len: int, out_len: int, *, attention: bool = True) -> float:
    """The part of `forward_flops` computed on decoder tokens: their self-attention, cross-attention
    (queries, scores, values, output; the keys and values of encoder tokens count as encoder work), MLP
    and logits."""
    return (forward_flops(cfg, batch, in_len, out_len, attention=attention)
            - forward_flops(cfg, batch, in_len, 0, attention=attention))


def train_flops(cfg: T5Config, batch: int, in_len: int, out_len: int, *, attention: bool = True) -> float:
    """FLOPs of one train step (forward + backward = 3 forwards) over a global batch."""
    return 3.0 * forward_flops(cfg, batch, in_len, out_len, attention=attention)


def six_n_tokens(cfg: T5Config, batch: int, in_len: int, out_len: int, *, per_stack: bool = True) -> float:
    """The `6 * N * tokens` rule of thumb for a train step.

    `per_stack=True` (encoder-decoder form): `6 * (N_enc * in_tokens + N_dec * out_tokens)`,
    each token meeting only its own stack's matmul weights (the decoder's include the
    cross-attention projections and the logits layer); it differs from
    `train_flops(..., attention=False)` only in charging cross-attention K/V to decoder tokens.
    `per_stack=False`: the decoder-only habit `6 * cfg.num_params() * (in + out) tokens`, which
    overcounts an encoder-decoder (every token is charged for both stacks and the embeddings).
    """
    if not per_stack:
        return 6.0 * cfg.num_params() * batch * (in_len + out_len)
    p = _dense_params_per_token(cfg)
    return 6.0 * batch * (p["encoder"] * in_len + (p["decoder"] + p["cross_kv"]) * out_len)


def decode_step_flops(cfg: T5Config, batch: int, in_len: int, new_tokens: int) -> float:
    """FLOPs of one cached greedy decode step: one token through the decoder and the logits layer,
    attention over the whole cache (the cross K/V and `new_tokens` self positions, read in full);
    with `decode_cross_kv='recompute'`, also the projection of the encoder output to every layer's
    cross K/V, which the step computes again."""
    p = _dense_params_per_token(cfg)
    inner = cfg.num_heads * cfg.head_dim
    cross_kv = 2 * batch * in_len * p["cross_kv"] if cfg.recomputes_cross_kv else 0
    return float(2 * batch * p["decoder"] + 4 * inner * batch * cfg.num_decoder_layers * (new_tokens + in_len)
                 + cross_kv)


def decode_flops(cfg: T5Config, batch: int, in_len: int, new_tokens: int) -> float:
    """FLOPs a greedy decode of `new_tokens` tokens computes: the encoder (and the cross K/V, once, unless
    `decode_cross_kv='recompute'` computes them at every step), then every step."""
    p = _dense_params_per_token(cfg)
    inner = cfg.num_heads * cfg.head_dim
    once = p["encoder"] + (0 if cfg.recomputes_cross_kv else p["cross_kv"])
    encode = 2 * batch * in_len * once + 4 * inner * batch * in_len * in_len * cfg.num_encoder_layers
    return float(encode + new_tokens * decode_step_flops(cfg, batch, in_len, new_tokens))


def _itemsize(cfg: T5Config) -> int:
    return 2 if cfg.dtype in ("bfloat16", "float16") else 4


def encoder_output_bytes(cfg: T5Config, batch: int, in_len: int) -> float:
    """Bytes of the encoder output `[B, S, E]` a `decode_cross_kv='recompute'` cache keeps (every layer
    reads it; tensor parallelism does not split it)."""
    return float(_itemsize(cfg) * batch * in_len * cfg.emb_dim)


def decode_cache_bytes(cfg: T5Config, batch: int, in_len: int, new_tokens: int) -> float:
    """Bytes of a decode's cache in the activation dtype: every decoder layer's self-attention K/V, and
    its cross K/V (`decode_cross_kv='cache'`) or the one encoder output they are projected from ('recompute')."""
    per_position = 2 * _itemsize(cfg) * batch * cfg.num_decoder_layers * cfg.num_heads * cfg.head_dim
    if cfg.recomputes_cross_kv:
        return float(per_position * new_tokens + encoder_output_bytes(cfg, batch, in_len))
    return float(per_position * (in_len + new_tokens))


__all__ = ["decode_cache_bytes", "decode_flops", "encoder_output_bytes", "decode_step_flops",
           "decoder_token_flops", "forward_flops", "six_n_tokens", "train_flops"]
