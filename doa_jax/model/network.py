"""The T5 encoder-decoder in Flax, with T5X's parameter tree and a KV cache for decoding.

Param tree (unboxed): `token_embedder/embedding`, `encoder/{relpos_bias, layers_i, encoder_norm}`,
`decoder/{relpos_bias, layers_i, decoder_norm, logits_dense}`; see T5X `examples/t5/network.py`.

With `config.scan_layers`, each stack's layers are one `nn.scan` (params `encoder/layers/...`
stacked on a leading `layers` axis, the decode cache `{self_k, self_v, cross_k, cross_v}` stacked
as `[layers, B, L, H, D]`; with `decode_cross_kv='recompute'`, `{self_k, self_v, encoded}`, the encoder
output `[B, S, E]` shared by every layer); `doa_jax.model.scan` converts params to and from T5X's per-layer names.
The teacher-forced forward runs the stacked layers as `config.scan_backward` says: through
`doa_jax.model.stack.apply_stack`, a scan with its own backward loop (GPUs: a transposed scan
allocated the encoder's gradients before the decoder's backward pass, issue 27), or as a plain
`lax.scan` JAX differentiates, the attention biases made outside it (TPUs); 'auto' picks per
platform. `nn.scan` still creates the params and runs decoding.

Masking convention: attention masks keys only (a padded query still attends to the valid keys).
Outputs at padded positions are therefore defined but meaningless; compare valid positions only.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from doa_jax.model.config import T5Config
from doa_jax.model.layers import (NEG_INF, Dense, Embed, MlpBlock, MultiHeadAttention,
                                  RelativePositionBias, RMSNorm, constrain)
from doa_jax.model.stack import apply_stack, by_backward, scan_stack

Array = jax.Array
Cache = dict[str, Any]


def _dtype(cfg: T5Config):
    return jnp.dtype(cfg.dtype)


def attention_bias(mask: Array) -> Array:
    """Boolean mask `[B, 1 or H, Q, K]` -> additive float32 bias (0 or -1e10)."""
    return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


def encoder_mask(tokens: Array, segment_ids: Optional[Array] = None) -> Array:
    """`[B, 1, 1|Q, K]`: keys that are not padding, and (packed) in the query's segment."""
    key_ok = (tokens > 0)[:, None, None, :]
    if segment_ids is None:
        return key_ok
    return key_ok & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])


def decoder_self_mask(length: int, segment_ids: Optional[Array] = None) -> Array:
    """Causal (and same segment when packed): `[1|B, 1, T, T]`.

    Padding sits after the targets, so a causal mask already keeps every real query off it.
    """
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask


def cross_mask(encoder_tokens: Array, decoder_segment_ids: Optional[Array] = None,
               encoder_segment_ids: Optional[Array] = None) -> Array:
    """Decoder queries over encoder keys: `[B, 1, 1|T, S]`."""
    key_ok = (encoder_tokens > 0)[:, None, None, :]
    if decoder_segment_ids is None or encoder_segment_ids is None:
        return key_ok
    return key_ok & (decoder_segment_ids[:, None, :, None] == encoder_segment_ids[:, None, None, :])


def layer_policy(cfg: T5Config):
    """What a layer keeps for its backward pass, as a `jax.checkpoint` policy (None: nothing but its
    inputs, everything recomputed): 'full' -> None; 'dots', and 'none' on scanned layers -> every
    matmul output without batch dimensions (the projections and the MLP's; the attention scores and
    elementwise work are recomputed: under 1% of an XXL step's FLOPs at 512 tokens). Unscanned
    layers under 'none' are not checkpointed at all: XLA keeps what it chooses, and rematerialises
    by itself when a program outgrows the device. A scan leaves it no such choice: it stacks every
    residual of a layer, which unchecked meant each layer's bf16 weight casts, its float32
    elementwise temporaries and float32 attention scores (issue 27: 1.8x the unrolled model's
    memory at XXL)."""
    if cfg.remat_policy == "full":
        return None
    return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims


def _remat(cls, cfg: T5Config, deterministic_argnum: int):
    """Wraps a layer class in `nn.remat` per `layer_policy` (argnums count `self`)."""
    if cfg.remat_policy == "none" and not cfg.scan_layers:
        return cls
    # Inside a scan the loop boundary already keeps XLA from merging the recomputation away.
    return nn.remat(cls, policy=layer_policy(cfg), static_argnums=(deterministic_argnum,),
                    prevent_cse=not cfg.scan_layers)


SELF_CACHE = ("self_k", "self_v")  # the cache entries a decode step writes (cross K/V are read only)
ENCODED = "encoded"  # the cache entry of T5Config.decode_cross_kv='recompute': the encoder output, every layer's


def _scan_layers(body, num_layers: int, in_axes: tuple):
    """`nn.scan` of `body(layer, carry, *args) -> (carry, ys)` over `num_layers` stacked layers.

    Params get a leading axis (logical name `layers`); dropout keys are split per layer.
    """
    return nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=in_axes, length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"})


def _encoder_body(layer, x, bias, deterministic):
    return layer(x, bias, deterministic), None


def _decoder_body(layer, y, encoded, self_bias, cross_bias, deterministic):
    return layer(y, encoded, self_bias, cross_bias, deterministic)[0], None


def _cross_kv_body(layer, carry, encoded):
    return carry, layer.cross_kv(encoded)


def _decoder_step_body(layer, y, self_cache, cross_cache, shared, self_bias, cross_bias, cache_index):
    y, new = layer(y, None, self_bias, cross_bias, True, {**self_cache, **cross_cache, **shared}, cache_index)
    return y, {k: new[k] for k in SELF_CACHE}


class StackLayer:
    """One scanned layer (`cls`: EncoderLayer or DecoderLayer) as `doa_jax.model.stack` and the fused
    update run it: `(p, x, consts, fixed, key) -> x`, checkpointed per `layer_policy`; `key`: the
    layer's dropout key (None: none drawn). With `bias_inside` (the stack's own backward loop), consts
    = (relpos,) or (encoded, relpos) and fixed = the masks, and each attention bias is `relpos + mask`,
    added inside the layer (no `[B, H, S, S]` float32 bias is carried through the loop, nor its
    cotangent); without (JAX's transposed scan), the biases come made: consts = (bias,) or (encoded,
    self_bias), fixed = () or (cross_bias,) (`summed_biases`)."""

    def __init__(self, cls, cfg: T5Config, deterministic: bool, bias_inside: bool = True):
        self.cls, self.cfg, self.deterministic, self.bias_inside = cls, cfg, deterministic, bias_inside
        self.policy = layer_policy(cfg)

    def _run(self, p, x, consts, fixed, key):
        rngs = None if key is None else {"dropout": key}
        module = self.cls(self.cfg, parent=None)   # a detached module: applied to the given params only
        if self.bias_inside:
            consts, fixed = summed_biases(self.cls, consts, fixed)
        if self.cls is EncoderLayer:
            (bias,) = consts
            return module.apply({"params": p}, x, bias, self.deterministic, rngs=rngs)
        (encoded, self_bias), (cross_bias,) = consts, fixed
        return module.apply({"params": p}, x, encoded, self_bias, cross_bias, self.deterministic, rngs=rngs)[0]

    def __call__(self, p, x, consts, fixed, key):
        return jax.checkpoint(self._run, policy=self.policy)(p, x, consts, fixed, key)


def summed_biases(cls, consts: tuple, fixed: tuple) -> tuple[tuple, tuple]:
    """A stack's (consts, fixed) with the position bias and the masks summed: ((relpos + mask,), ())
    for the encoder, ((encoded, relpos + self_mask), (cross_bias,)) for the decoder."""
    if cls is EncoderLayer:
        (relpos,), (mask,) = consts, fixed
        return (relpos + mask,), ()
    (encoded, relpos), (self_mask, cross_bias) = consts, fixed
    return (encoded, relpos + self_mask), (cross_bias,)


def _run_stack(module: nn.Module, cls, x: Array, consts: tuple, fixed: tuple, deterministic: bool) -> Array:
    """The scanned layers of `module` (an Encoder or Decoder) on `x`, differentiated as
    `config.scan_backward` says: `stack.apply_stack`'s own backward loop ('stack'), JAX's transposed
    scan with the biases made outside it ('autodiff'), or per platform when lowered ('auto': TPUs
    autodiff, others stack; see `doa_jax.model.stack`'s doc for why). Same values either way."""
    cfg = module.config
    key = None if deterministic or cfg.dropout_rate == 0.0 else module.make_rng("dropout")

    def own_loop(params, x, consts, fixed, key):
        return apply_stack(StackLayer(cls, cfg, deterministic), params, x, consts, fixed, key)

    def autodiff(params, x, consts, fixed, key):
        return scan_stack(StackLayer(cls, cfg, deterministic, bias_inside=False), params, x,
                          *summed_biases(cls, consts, fixed), key)

    return by_backward(cfg.scan_backward, {"stack": own_loop, "autodiff": autodiff},
                       module.layers.variables["params"], x, consts, fixed, key)


class EncoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
        cfg, dt = self.config, _dtype(self.config)
        h = RMSNorm(cfg.layer_norm_epsilon, dt, name="pre_attention_layer_norm")(x)
        h = MultiHeadAttention(cfg.num_heads, cfg.head_dim, cfg.emb_dim, dt, cfg.dropout_rate,
                               name="attention")(h, h, bias, deterministic)
        x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        h = RMSNorm(cfg.layer_norm_epsilon, dt, name="pre_mlp_layer_norm")(x)
        h = MlpBlock(cfg.mlp_dim, cfg.mlp_activations, dt, cfg.dropout_rate, name="mlp")(h, deterministic)
        x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return constrain(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
    """Self-attention, cross-attention, MLP. With `cache`, runs one step against cached K/V."""

    config: T5Config

    def setup(self):
        cfg, dt = self.config, _dtype(self.config)
        self.pre_self_attention_layer_norm = RMSNorm(cfg.layer_norm_epsilon, dt)
        self.self_attention = MultiHeadAttention(cfg.num_heads, cfg.head_dim, cfg.emb_dim, dt,
                                                 cfg.dropout_rate)
        self.pre_cross_attention_layer_norm = RMSNorm(cfg.layer_norm_epsilon, dt)
        self.encoder_decoder_attention = MultiHeadAttention(cfg.num_heads, cfg.head_dim, cfg.emb_dim,
                                                            dt, cfg.dropout_rate)
        self.pre_mlp_layer_norm = RMSNorm(cfg.layer_norm_epsilon, dt)
        self.mlp = MlpBlock(cfg.mlp_dim, cfg.mlp_activations, dt, cfg.dropout_rate)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def cross_kv(self, encoded: Array) -> tuple[Array, Array]:
        return self.encoder_decoder_attention.project_kv(encoded)

    def __call__(self, y: Array, encoded: Optional[Array], self_bias: Array, cross_bias: Array,
                 deterministic: bool, cache: Optional[Cache] = None,
                 cache_index: Optional[Array] = None) -> tuple[Array, Optional[Cache]]:
        drop = lambda t: self.dropout(t, deterministic=deterministic)  # noqa: E731
        h = self.pre_self_attention_layer_norm(y)
        if cache is None:
            h = self.self_attention(h, h, self_bias, deterministic)
            cross_k, cross_v = self.cross_kv(encoded)
            new_cache = None
        else:
            # One new position: write its K/V at cache_index, attend over the whole cache.
            q = self.self_attention.project_q(h)
            k, v = self.self_attention.project_kv(h)
            keys = jax.lax.dynamic_update_slice_in_dim(cache["self_k"], k.astype(cache["self_k"].dtype),
                                                       cache_index, axis=1)
            values = jax.lax.dynamic_update_slice_in_dim(cache["self_v"], v.astype(cache["self_v"].dtype),
                                                         cache_index, axis=1)
            h = self.self_attention.attend(q, keys, values, self_bias, deterministic)
            cross_k, cross_v = (self.cross_kv(cache[ENCODED]) if ENCODED in cache
                                else (cache["cross_k"], cache["cross_v"]))
            new_cache = dict(self_k=keys, self_v=values)
        y = y + drop(h)
        h = self.pre_cross_attention_layer_norm(y)
        h = self.encoder_decoder_attention.attend(self.encoder_decoder_attention.project_q(h),
                                                  cross_k, cross_v, cross_bias, deterministic)
        y = y + drop(h)
        h = self.mlp(self.pre_mlp_layer_norm(y), deterministic)
        y = y + drop(h)
        return constrain(y, ("batch", "length", "embed")), new_cache


class Encoder(nn.Module):
    """Embedding, relative position bias and mask (`embed`), the layers, final norm (`finish`)."""

    config: T5Config
    embedder: nn.Module

    def setup(self):
        cfg, dt = self.config, _dtype(self.config)
        self.relpos_bias = RelativePositionBias(cfg.relative_attention_num_buckets,
                                                cfg.relative_attention_max_distance, cfg.num_heads, True, dt)
        layer_cls = _remat(EncoderLayer, cfg, 3)
        if cfg.scan_layers:
            self.layers = layer_cls(cfg, name="layers")
        else:
            self.layers = [layer_cls(cfg, name=f"layers_{i}") for i in range(cfg.num_encoder_layers)]
        self.encoder_norm = RMSNorm(cfg.layer_norm_epsilon, dt)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def embed(self, tokens: Array, segment_ids: Optional[Array] = None,
              deterministic: bool = True) -> tuple[Array, Array, Array]:
        """`(x, relpos, mask)`: the first layer's input, the position bias `[1, H, S, S]` and the
        additive mask `[B, 1, 1|S, S]`; every layer's attention bias is `relpos + mask`."""
        x = self.embedder(tokens.astype(jnp.int32))
        x = constrain(self.dropout(x, deterministic=deterministic), ("batch", "length", "embed"))
        length = tokens.shape[1]
        return x, self.relpos_bias(length, length), attention_bias(encoder_mask(tokens, segment_ids))

    def finish(self, x: Array, deterministic: bool = True) -> Array:
        return self.dropout(self.encoder_norm(x), deterministic=deterministic)

    def __call__(self, tokens: Array, segment_ids: Optional[Array] = None,
                 deterministic: bool = True) -> Array:
        x, relpos, mask = self.embed(tokens, segment_ids, deterministic)
        if self.config.scan_layers and not self.is_initializing():
            x = _run_stack(self, EncoderLayer, x, (relpos.astype(jnp.float32),), (mask,), deterministic)
        elif self.config.scan_layers:
            x, _ = _scan_layers(_encoder_body, self.config.num_encoder_layers, (nn.broadcast, nn.broadcast))(
                self.layers, x, relpos + mask, deterministic)
        else:
            bias = relpos + mask
            for layer in self.layers:
                x = layer(x, bias, deterministic)
        return self.finish(x, deterministic)


class Decoder(nn.Module):
    config: T5Config
    embedder: nn.Module

    def setup(self):
        cfg, dt = self.config, _dtype(self.config)
        self.relpos_bias = RelativePositionBias(cfg.relative_attention_num_buckets,
                                                cfg.relative_attention_max_distance, cfg.num_heads,
                                                False, dt)
        layer_cls = _remat(DecoderLayer, cfg, 5)
        if cfg.scan_layers:
            self.layers = layer_cls(cfg, name="layers")
        else:
            self.layers = [layer_cls(cfg, name=f"layers_{i}") for i in range(cfg.num_decoder_layers)]
        self.decoder_norm = RMSNorm(cfg.layer_norm_epsilon, dt)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        if not cfg.logits_via_embedding:
            self.logits_dense = Dense(cfg.vocab_size, ("embed", "vocab"), jnp.float32)

    def _logits(self, y: Array, deterministic: bool) -> Array:
        y = self.decoder_norm(y)
        y = self.dropout(y, deterministic=deterministic)
        if self.config.logits_via_embedding:
            logits = self.embedder.attend(y.astype(jnp.float32)) * self.config.emb_dim ** -0.5
        else:
            logits = self.logits_dense(y.astype(jnp.float32))
        return constrain(logits, ("batch", "length", "vocab"))

    def embed(self, encoder_tokens: Array, decoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
              decoder_segment_ids: Optional[Array] = None,
              deterministic: bool = True) -> tuple[Array, Array, Array, Array]:
        """`(y, relpos, self_mask, cross_bias)`: the first layer's input, the self-attention
        position bias `[1, H, T, T]` and causal mask (self bias = `relpos + self_mask`), and the
        cross-attention bias."""
        y = self.embedder(decoder_input_tokens.astype(jnp.int32))
        y = constrain(self.dropout(y, deterministic=deterministic), ("batch", "length", "embed"))
        t = decoder_input_tokens.shape[1]
        self_mask = attention_bias(decoder_self_mask(t, decoder_segment_ids))
        cross_bias = attention_bias(cross_mask(encoder_tokens, decoder_segment_ids, encoder_segment_ids))
        return y, self.relpos_bias(t, t), self_mask, cross_bias

    def finish(self, y: Array, deterministic: bool = True) -> Array:
        """Float32 logits `[B, T, V]` of the last layer's output."""
        return self._logits(y, deterministic)

    def __call__(self, encoded: Array, encoder_tokens: Array, decoder_input_tokens: Array,
                 encoder_segment_ids: Optional[Array] = None, decoder_segment_ids: Optional[Array] = None,
                 deterministic: bool = True) -> Array:
        y, relpos, self_mask, cross_bias = self.embed(encoder_tokens, decoder_input_tokens, encoder_segment_ids,
                                                      decoder_segment_ids, deterministic)
        if self.config.scan_layers and not self.is_initializing():
            y = _run_stack(self, DecoderLayer, y, (encoded, relpos.astype(jnp.float32)), (self_mask, cross_bias),
                           deterministic)
        elif self.config.scan_layers:
            broadcast = (nn.broadcast,) * 4
            y, _ = _scan_layers(_decoder_body, self.config.num_decoder_layers, broadcast)(
                self.layers, y, encoded, relpos + self_mask, cross_bias, deterministic)
        else:
            self_bias = relpos + self_mask
            for layer in self.layers:
                y, _ = layer(y, encoded, self_bias, cross_bias, deterministic)
        return self._logits(y, deterministic)

    def init_cache(self, encoded: Array, max_length: int) -> Cache:
        """Per-layer cache: empty self-attention K/V `[B, max_length, H, D]`, cross K/V from `encoded`.

        Scanned layers: one dict of the same four arrays stacked as `[layers, B, ..., H, D]`.
        """
        cfg = self.config
        shape = (encoded.shape[0], max_length, cfg.num_heads, cfg.head_dim)
        if cfg.recomputes_cross_kv:
            layers = (cfg.num_decoder_layers,) if cfg.scan_layers else ()
            zeros = jnp.zeros(layers + shape, _dtype(cfg))
            own = dict(self_k=zeros, self_v=zeros) if cfg.scan_layers else {
                f"layers_{i}": dict(self_k=zeros, self_v=zeros) for i in range(cfg.num_decoder_layers)}
            return {**own, ENCODED: encoded}
        if cfg.scan_layers:
            _, (ck, cv) = _scan_layers(_cross_kv_body, cfg.num_decoder_layers, (nn.broadcast,))(
                self.layers, None, encoded)
            zeros = jnp.zeros((cfg.num_decoder_layers,) + shape, ck.dtype)
            return dict(self_k=zeros, self_v=zeros, cross_k=ck, cross_v=cv)
        cache = {}
        for i, layer in enumerate(self.layers):
            ck, cv = layer.cross_kv(encoded)
            cache[f"layers_{i}"] = dict(self_k=jnp.zeros(shape, ck.dtype), self_v=jnp.zeros(shape, ck.dtype),
                                        cross_k=ck, cross_v=cv)
        return cache

    def step(self, token: Array, cache: Cache, cache_index: Array, encoder_tokens: Array) -> tuple[Array, Cache]:
        """Logits `[B, V]` for one decoder input token per row at position `cache_index`."""
        y = self.embedder(token[:, None].astype(jnp.int32))
        scanned = self.config.scan_layers
        max_length = (cache if scanned else cache["layers_0"])["self_k"].shape[-3]
        self_bias = self.relpos_bias(1, max_length, query_offset=cache_index)
        visible = (jnp.arange(max_length) <= cache_index)[None, None, None, :]
        self_bias = self_bias + attention_bias(visible)
        cross_bias = attention_bias(cross_mask(encoder_tokens))
        shared = {ENCODED: cache[ENCODED]} if ENCODED in cache else {}  # one encoder output for every layer
        if scanned:
            # Cross K/V (or the encoder output) are read per layer but not carried out of the scan:
            # they never change.
            cross = {k: v for k, v in cache.items() if k not in SELF_CACHE and k != ENCODED}
            y, new_self = _scan_layers(_decoder_step_body, self.config.num_decoder_layers,
                                       (0, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast))(
                self.layers, y, {k: cache[k] for k in SELF_CACHE}, cross, shared, self_bias, cross_bias, cache_index)
            return self._logits(y, True)[:, 0], {**cache, **new_self}
        new_cache = dict(shared)
        for i, layer in enumerate(self.layers):
            own = cache[f"layers_{i}"]
            y, new = layer(y, None, self_bias, cross_bias, True, cache={**own, **shared}, cache_index=cache_index)
            new_cache[f"layers_{i}"] = {**own, **new}
        return self._logits(y, True)[:, 0], new_cache


class Transformer(nn.Module):
    """T5 encoder-decoder. `__call__` is the teacher-forced forward pass returning float32 logits."""

    config: T5Config

    def setup(self):
        cfg = self.config
        cfg.require_vocab_size()
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, _dtype(cfg))
        self.encoder = Encoder(cfg, self.token_embedder)
        self.decoder = Decoder(cfg, self.token_embedder)

    def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
               deterministic: bool = True) -> Array:
        return self.encoder(encoder_input_tokens, encoder_segment_ids, deterministic)

    def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
               encoder_segment_ids: Optional[Array] = None, decoder_segment_ids: Optional[Array] = None,
               deterministic: bool = True) -> Array:
        return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids,
                            decoder_segment_ids, deterministic)

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 encoder_segment_ids: Optional[Array] = None, decoder_segment_ids: Optional[Array] = None,
                 deterministic: bool = True) -> Array:
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, deterministic)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids,
                           decoder_segment_ids, deterministic)

    def init_cache(self, encoded: Array, max_length: int) -> Cache:
        return self.decoder.init_cache(encoded, max_length)

    def decode_step(self, token: Array, cache: Cache, cache_index: Array,
                    encoder_input_tokens: Array) -> tuple[Array, Cache]:
        return self.decoder.step(token, cache, cache_index, encoder_input_tokens)
