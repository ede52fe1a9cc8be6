"""T5 building blocks in Flax: dense, embedding, RMSNorm, relative position bias, attention, MLP.

Parameters are float32 and carry T5X logical axis names; matmuls run in the activation dtype.
Pure math: nothing here knows about meshes, training or data.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
NEG_INF = -1e10  # additive mask bias, as in T5X

_ACT_FNS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "linear": lambda x: x,
}


def constrain(x: Array, axes: tuple[Optional[str], ...]) -> Array:
    """Logical sharding constraint on a hot activation (a no-op outside a mesh + rules context)."""
    return nn.with_logical_constraint(x, axes)


def kernel_init(scale: float = 1.0, mode: str = "fan_in", distribution: str = "truncated_normal"):
    return nn.initializers.variance_scaling(scale, mode, distribution)


class Dense(nn.Module):
    """Bias-free dense layer with a 2-D kernel `[in, out]`, as T5X stores it."""

    features: int
    axes: tuple[str, str]
    dtype: Any = jnp.float32
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(kernel_init(self.init_scale), self.axes),
                            (x.shape[-1], self.features), jnp.float32)
        return jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))


class Embed(nn.Module):
    """Token embedding `[vocab, embed]`; `attend` gives logits through the transposed table."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
            (self.num_embeddings, self.features), jnp.float32)

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding.astype(self.dtype), ids, axis=0)

    def attend(self, x: Array) -> Array:
        return jnp.einsum("...d,vd->...v", x, self.embedding.astype(x.dtype))


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, variance in float32."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return y.astype(self.dtype) * scale.astype(self.dtype)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int,
                             xp=np):
    """T5's bucketing of `key_pos - query_pos`: exact for small distances, log-spaced beyond.

    `xp` is `numpy` (static shapes, computed once at trace time) or `jax.numpy` (a decode step's
    traced position). Follows T5X, which adds float32 eps inside the log.
    """
    ret = xp.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(xp.int32) * num_buckets
        n = xp.abs(n)
    else:
        n = xp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (
        xp.log(n.astype(xp.float32) / max_exact + np.finfo(np.float32).eps)
        / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(xp.int32)
    val_if_large = xp.minimum(val_if_large, num_buckets - 1)
    return ret + xp.where(is_small, n, val_if_large)


class RelativePositionBias(nn.Module):
    """One `rel_embedding [heads, buckets]` table per stack, added to every layer's attention logits."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, qlen: int, klen: int, query_offset: Optional[Array] = None) -> Array:
        """Bias `[1, heads, qlen, klen]`. `query_offset` (traced) shifts query positions (decoding)."""
        table = self.param("rel_embedding",
                           nn.with_logical_partitioning(kernel_init(1.0, "fan_avg", "uniform"),
                                                        ("heads", "relpos_buckets")),
                           (self.num_heads, self.num_buckets), jnp.float32)
        if query_offset is None:
            rel = np.arange(klen)[None, :] - np.arange(qlen)[:, None]
            buckets = jnp.asarray(relative_position_bucket(
                rel.astype(np.int32), self.bidirectional, self.num_buckets, self.max_distance))
        else:
            rel = jnp.arange(klen)[None, :] - (jnp.arange(qlen)[:, None] + query_offset)
            buckets = relative_position_bucket(rel.astype(jnp.int32), self.bidirectional,
                                               self.num_buckets, self.max_distance, xp=jnp)
        bias = jnp.take(table, buckets, axis=1)  # [heads, q, k]
        return bias[None].astype(self.dtype)


class MultiHeadAttention(nn.Module):
    """T5 attention: no biases, no 1/sqrt(d) at run time (it lives in the query's init)."""

    num_heads: int
    head_dim: int
    emb_dim: int
    dtype: Any = jnp.float32
    dropout_rate: float = 0.0

    def setup(self):
        inner = self.num_heads * self.head_dim
        self.query = Dense(inner, ("embed", "joined_kv"), self.dtype, init_scale=1.0 / self.head_dim)
        self.key = Dense(inner, ("embed", "joined_kv"), self.dtype)
        self.value = Dense(inner, ("embed", "joined_kv"), self.dtype)
        self.out = Dense(self.emb_dim, ("joined_kv", "embed"), self.dtype)
        self.dropout = nn.Dropout(self.dropout_rate)

    def split_heads(self, x: Array) -> Array:
        x = x.reshape(x.shape[:-1] + (self.num_heads, self.head_dim))
        return constrain(x, ("batch", "length", "heads", "kv"))

    def project_q(self, inputs_q: Array) -> Array:
        return self.split_heads(self.query(inputs_q))

    def project_kv(self, inputs_kv: Array) -> tuple[Array, Array]:
        """Keys and values `[B, K, heads, kv]` (computed once per sequence for cross-attention)."""
        return self.split_heads(self.key(inputs_kv)), self.split_heads(self.value(inputs_kv))

    def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Optional[Array],
                 deterministic: bool = True) -> Array:
        k, v = self.project_kv(inputs_kv)
        return self.attend(self.project_q(inputs_q), k, v, bias, deterministic)

    def attend(self, q: Array, k: Array, v: Array, bias: Optional[Array], deterministic: bool) -> Array:
        """Softmax attention in float32 over `[B, Q, H, D]` x `[B, K, H, D]`, then the out projection."""
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1)
        weights = self.dropout(weights, deterministic=deterministic or self.dropout_rate == 0)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)
        y = constrain(y, ("batch", "length", "heads", "kv"))
        return self.out(y.reshape(y.shape[:-2] + (self.num_heads * self.head_dim,)))


class MlpBlock(nn.Module):
    """`wo(act_0(x wi_0) * act_1(x wi_1) ...)`; a single activation names its kernel `wi`."""

    mlp_dim: int
    activations: tuple[str, ...]
    dtype: Any = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        h = None
        for i, act in enumerate(self.activations):
            name = "wi" if len(self.activations) == 1 else f"wi_{i}"
            y = _ACT_FNS[act](Dense(self.mlp_dim, ("embed", "mlp"), self.dtype, name=name)(x))
            h = y if h is None else h * y
        h = constrain(h, ("batch", "length", "mlp"))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return Dense(x.shape[-1], ("mlp", "embed"), self.dtype, name="wo")(h)
