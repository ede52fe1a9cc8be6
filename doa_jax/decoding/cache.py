"""What every decoder shares: the result type, input checks, the params cast for decoding, and the
KV cache (built after one encoder pass, constrained to the logical axes of the active rules)."""
from __future__ import annotations

from typing import Any, Optional, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from doa_jax.model import T5Config, Transformer
from doa_jax.model.network import ENCODED

Array = jax.Array


ModelSpec = Union[T5Config, Transformer]  # a config, or the module built from it


PAD_ID = 0  # also the decoder start token


EOS_ID = 1


CACHE_AXES = ("batch", "length", "heads", "kv")


@flax.struct.dataclass
class DecodeResult:
    """What a decode returns (jax arrays; `np.asarray` them to read on the host).

    `tokens` [B, L] int32: the best sequence per row, 0 after EOS.
    `log_probs` [B] float32: sum of log p(token) under the model, EOS included.
    `scores` [B] float32: the score the search ranked by (beam search: `log_probs` over the length
      penalty, as the convention defines it; greedy and sampling: `log_probs`).
    `lengths` [B] int32: tokens up to and including the first EOS (L when there is none).
    `steps` int32 scalar: decode steps run (< L when every row finished early).
    `all_tokens` [B, R, L], `all_log_probs` / `all_scores` [B, R]: beam search only, the top
      `num_return_sequences` beams, best first (None otherwise).
    """

    tokens: Array
    log_probs: Array
    scores: Array
    lengths: Array
    steps: Array
    all_tokens: Optional[Array] = None
    all_log_probs: Optional[Array] = None
    all_scores: Optional[Array] = None


# Params that stay float32 while decoding: the logits projection runs in float32.
_FLOAT32_PARAMS = ("decoder/logits_dense/kernel",)


def decoding_params(params: Any, model: ModelSpec) -> Any:
    """Params cast once to the activation dtype, for decoding.

    The model casts each kernel to the activation dtype where it uses it; inside a decode loop
    that would re-read float32 weights every step. Casting once up front gives bit-identical
    results (the same rounding) at half the weight traffic. The logits kernel (and, for tied
    embeddings, the embedding) stays float32 because the logits are computed in float32.
    Idempotent; call it yourself and drop the float32 copy to save device memory on big models.
    """
    config = _config_of(model)
    dtype = jnp.dtype(config.dtype)
    keep = set(_FLOAT32_PARAMS) | ({"token_embedder/embedding"} if config.logits_via_embedding else set())

    def cast(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name in keep or not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        return x.astype(dtype) if hasattr(x, "astype") else np.asarray(x).astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def _context_key() -> tuple:
    """The active logical-axis rules and mesh, hashable: part of the compile cache key, since
    constraints and the per-shard top-k are fixed when the loop is traced."""
    rules = tuple((name, tuple(a) if isinstance(a, list) else a)
                  for name, a in (nn.get_logical_axis_rules() or ()))
    return rules, jax.sharding.get_abstract_mesh()


def _config_of(model: ModelSpec) -> T5Config:
    if isinstance(model, Transformer):
        return model.config
    if isinstance(model, T5Config):
        return model
    raise TypeError(f"expected a T5Config or a Transformer, got {type(model).__name__}")


def _check_inputs(encoder_input_tokens: Any, max_decode_len: int) -> Array:
    tokens = jnp.asarray(encoder_input_tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"encoder_input_tokens must be an int array [batch, length], got "
                         f"{tokens.dtype} {tokens.shape}")
    if not isinstance(max_decode_len, (int, np.integer)) or max_decode_len < 1:
        raise ValueError(f"max_decode_len must be a positive int, got {max_decode_len!r}")
    return tokens.astype(jnp.int32)


def _check_min_length(min_length: int) -> int:
    if not isinstance(min_length, (int, np.integer)) or min_length < 0:
        raise ValueError(f"min_length must be an int >= 0, got {min_length!r}")
    return int(min_length)


ENCODED_AXES = ("batch", "length", "embed")  # the encoder output a 'recompute' cache keeps (T5Config.decode_cross_kv)


def _cache_axes(config: T5Config, entry: str = "self_k") -> tuple[str, ...]:
    """Logical axes of a cache array: K/V of scanned layers are stacked on a leading `layers` axis;
    the encoder output of a `decode_cross_kv='recompute'` cache is one array for every layer."""
    if entry == ENCODED:
        return ENCODED_AXES
    return ("layers",) + CACHE_AXES if config.scan_layers else CACHE_AXES


def _map_cache(fn, cache: Any, config: T5Config) -> Any:
    """`fn(array, its logical axes)` over every cache array."""
    return jax.tree_util.tree_map_with_path(lambda path, x: fn(x, _cache_axes(config, path[-1].key)), cache)


def _constrain_cache(cache: Any, config: T5Config) -> Any:
    return _map_cache(nn.with_logical_constraint, cache, config)


def _prepare(model: Transformer, params: Any, enc: Array, max_len: int, copies: int):
    """Encoder pass and the cache (for `copies` beams per row); returns (cache, encoder tokens)."""
    encoded = model.apply({"params": params}, enc, method=model.encode)
    cache = model.apply({"params": params}, encoded, max_len, method=model.init_cache)
    if copies > 1:
        cache = _map_cache(lambda x, axes: jnp.repeat(x, copies, axis=axes.index("batch")), cache, model.config)
        enc = jnp.repeat(enc, copies, axis=0)
    return _constrain_cache(cache, model.config), enc


def _lengths(tokens: Array, eos_id: int) -> Array:
    """Tokens up to and including the first EOS (the full length when there is none)."""
    is_eos = tokens == eos_id
    first = jnp.argmax(is_eos, axis=-1)
    return jnp.where(is_eos.any(axis=-1), first + 1, tokens.shape[-1]).astype(jnp.int32)
