"""Jitted decoding for the Flax T5 with a KV cache: greedy, sampling and beam search.

Every method is one `jax.jit`-compiled function: encode once, build the cache (self-attention
K/V, plus cross-attention K/V computed once from the encoder output), then a `lax.while_loop`
over `Transformer.decode_step` that stops early once every row is done. The compiled function is
cached per (config, shapes, settings, logical-axis rules and mesh), so repeated calls do not
retrace.

Conventions: the decoder starts from token 0 (pad), EOS is 1, outputs are `[B, max_decode_len]`
without the start token and padded with 0 after EOS. Beam search follows HF `generate` by default
(`convention='hf'`: `length_penalty` is the exponent in `sum_logprob / len**length_penalty`, and
`early_stopping` is True / False / "never" as HF defines them); `convention='t5x'` follows T5X's
`beam_search` instead (`length_penalty` is alpha in `((5 + len) / 6)**alpha`; hitting the length
limit does not finish a beam; a row with no finished beam returns its live beams, raw log-probs).

Decoding with params sharded under a mesh works as is: run inside
`doa_jax.partitioning.mesh_context(mesh, rules)`; the cache follows the `batch`/`heads` rules.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from doa_jax.model import T5Config, Transformer

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


@dataclasses.dataclass(frozen=True)
class BeamConvention:
    """How a beam search scores and finishes hypotheses; see `CONVENTIONS`."""

    length_penalty: Callable[[Any, float], Any]  # (generated length incl. EOS, penalty) -> divisor
    max_length_finishes: bool  # a beam that reaches max_decode_len counts as finished
    only_top_beams_finish: bool  # only the top num_beams of the 2*num_beams candidates may finish
    neg_inf: float  # the "impossible" score added to masked candidates


CONVENTIONS: dict[str, BeamConvention] = {
    # transformers `GenerationMixin._beam_search` (v5): score = logp / len**lp.
    "hf": BeamConvention(lambda n, lp: np.maximum(np.asarray(n, np.float64), 1.0) ** lp, True, True, -1.0e9),
    # T5X `decoding.beam_search`: score = logp / ((5 + len) / 6)**alpha, computed in float32.
    "t5x": BeamConvention(lambda n, a: jnp.power((5.0 + jnp.asarray(n, jnp.float32)) / 6.0, a),
                          False, False, -1.0e7),
}


@dataclasses.dataclass(frozen=True)
class _SampleSettings:
    temperature: float  # 0 = greedy (argmax)
    top_k: int  # 0 = off
    top_p: float  # 1 = off
    eos_id: int
    min_length: int = 0  # EOS may not be chosen before this many tokens (HF `min_new_tokens`)


@dataclasses.dataclass(frozen=True)
class _BeamSettings:
    """What a compiled beam search is specialised on. The length penalty's value is not: its divisor
    table is an argument, so another penalty reuses the program; only its sign changes control flow."""
    num_beams: int
    penalty_positive: bool
    early_stopping: Union[bool, str]
    num_return_sequences: int
    convention: str
    eos_id: int


# --------------------------------------------------------------------------------------- public API


def greedy(model: ModelSpec, params: Any, encoder_input_tokens: Any, max_decode_len: int, *,
           eos_id: int = EOS_ID, min_length: int = 0) -> DecodeResult:
    """Argmax decoding (HF `generate(do_sample=False, num_beams=1)`, T5X temperature 0).

    `min_length`: EOS is not chosen before that many tokens (HF's `min_new_tokens`: its logit is
    masked for the choice; `log_probs` stay the model's). `min_length=max_decode_len` decodes
    exactly `max_decode_len` tokens per row, e.g. for throughput benchmarks.
    """
    return _run_sampling(model, params, encoder_input_tokens, max_decode_len,
                         _SampleSettings(0.0, 0, 1.0, eos_id, _check_min_length(min_length)), None)


def sample(model: ModelSpec, params: Any, encoder_input_tokens: Any, max_decode_len: int, *,
           rng: Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           eos_id: int = EOS_ID, min_length: int = 0) -> DecodeResult:
    """Ancestral sampling from softmax(logits / temperature), optionally restricted to the top-k
    tokens and/or the smallest top-p nucleus (applied in that order, as HF does).

    `log_probs` are under the model's own distribution (temperature 1, no filtering, no
    `min_length` mask; see `greedy` for `min_length`).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if rng is None:
        raise ValueError("sampling needs rng (a jax.random key)")
    return _run_sampling(model, params, encoder_input_tokens, max_decode_len,
                         _SampleSettings(float(temperature), int(top_k), float(top_p), eos_id,
                                         _check_min_length(min_length)), rng)


def beam_search(model: ModelSpec, params: Any, encoder_input_tokens: Any, max_decode_len: int, *,
                num_beams: int = 4, length_penalty: float = 1.0,
                early_stopping: Union[bool, str] = False, num_return_sequences: int = 1,
                convention: str = "hf", eos_id: int = EOS_ID) -> DecodeResult:
    """Beam search with a length penalty, as HF `generate` (default) or T5X defines it.

    `convention='hf'`: finished score = sum logprob / len**length_penalty (len counts EOS; a beam
    that reaches max_decode_len also finishes); `early_stopping=True` stops a row once it has
    num_beams finished hypotheses, False stops when the best live beam (at its current length)
    cannot beat the worst finished one, "never" uses the most favourable length for that bound.
    `convention='t5x'`: length_penalty is T5X's alpha (0.6 there), early_stopping is ignored.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown beam convention {convention!r}; known: {sorted(CONVENTIONS)}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be in [1, num_beams={num_beams}], "
                         f"got {num_return_sequences}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    settings = _BeamSettings(int(num_beams), float(length_penalty) > 0.0, early_stopping,
                             int(num_return_sequences), convention, eos_id)
    config = _config_of(model)
    tokens = _check_inputs(encoder_input_tokens, max_decode_len)
    fn = _compiled_beam(config, int(max_decode_len), settings, _context_key())
    # Divisor for a hypothesis of n generated tokens, n = 0..max_len+1 (float32, as the reference does).
    divisors = CONVENTIONS[convention].length_penalty(np.arange(int(max_decode_len) + 2), float(length_penalty))
    return fn(decoding_params(params, config), tokens, jnp.asarray(divisors, jnp.float32))


def generate(model: ModelSpec, params: Any, encoder_input_tokens: Any, max_decode_len: int, *,
             num_beams: int = 1, do_sample: bool = False, rng: Optional[Array] = None,
             **kwargs: Any) -> DecodeResult:
    """Dispatches like HF `generate`: beam search if num_beams > 1, sampling if do_sample, else greedy."""
    if num_beams > 1:
        return beam_search(model, params, encoder_input_tokens, max_decode_len, num_beams=num_beams,
                           **kwargs)
    if do_sample:
        return sample(model, params, encoder_input_tokens, max_decode_len, rng=rng, **kwargs)
    return greedy(model, params, encoder_input_tokens, max_decode_len, **kwargs)


# Params that stay float32 while decoding: the logits projection runs in float32.
_FLOAT32_PARAMS = ("decoder/logits_dense/kernel",)


def clear_compiled() -> None:
    """Forget this process's compiled decoders, so the next call compiles afresh (what a fresh
    process pays once; `doa calibrate` times it)."""
    _compiled_sampling.cache_clear()
    _compiled_beam.cache_clear()


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


# ------------------------------------------------------------------------------------ internals


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


def _cache_axes(config: T5Config) -> tuple[str, ...]:
    """Logical axes of every cache array: scanned layers stack them on a leading `layers` axis."""
    return ("layers",) + CACHE_AXES if config.scan_layers else CACHE_AXES


def _constrain_cache(cache: Any, config: T5Config) -> Any:
    axes = _cache_axes(config)
    return jax.tree.map(lambda x: nn.with_logical_constraint(x, axes), cache)


def _prepare(model: Transformer, params: Any, enc: Array, max_len: int, copies: int):
    """Encoder pass and the cache (for `copies` beams per row); returns (cache, encoder tokens)."""
    encoded = model.apply({"params": params}, enc, method=model.encode)
    cache = model.apply({"params": params}, encoded, max_len, method=model.init_cache)
    if copies > 1:
        batch_axis = _cache_axes(model.config).index("batch")
        cache = jax.tree.map(lambda x: jnp.repeat(x, copies, axis=batch_axis), cache)
        enc = jnp.repeat(enc, copies, axis=0)
    return _constrain_cache(cache, model.config), enc


def _lengths(tokens: Array, eos_id: int) -> Array:
    """Tokens up to and including the first EOS (the full length when there is none)."""
    is_eos = tokens == eos_id
    first = jnp.argmax(is_eos, axis=-1)
    return jnp.where(is_eos.any(axis=-1), first + 1, tokens.shape[-1]).astype(jnp.int32)


def _filter_logits(logits: Array, top_k: int, top_p: float) -> Array:
    """Sets logits outside the top-k / top-p nucleus to -inf (keeps at least one token)."""
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
        logits = jnp.where(logits < kept.min(axis=-1, keepdims=True), -jnp.inf, logits)
    return logits


def greedy_program(model: ModelSpec, max_decode_len: int, *, eos_id: int = EOS_ID, min_length: int = 0):
    """The jitted function `greedy` calls, `(params, encoder_input_tokens, None) -> DecodeResult`, for the
    logical-axis rules and mesh active now (what `doa aot` lowers with abstract inputs)."""
    settings = _SampleSettings(0.0, 0, 1.0, eos_id, _check_min_length(min_length))
    return _compiled_sampling(_config_of(model), int(max_decode_len), settings, _context_key())


def _run_sampling(model, params, encoder_input_tokens, max_decode_len, settings, rng):
    config = _config_of(model)
    tokens = _check_inputs(encoder_input_tokens, max_decode_len)
    fn = _compiled_sampling(config, int(max_decode_len), settings, _context_key())
    return fn(decoding_params(params, config), tokens, rng)


@functools.lru_cache(maxsize=64)
def _compiled_sampling(config: T5Config, max_len: int, s: _SampleSettings, context: tuple):
    del context  # only a cache key: tracing reads the rules and mesh active at the time
    model = Transformer(config)

    @jax.jit
    def run(params, enc, rng):
        batch = enc.shape[0]
        cache, enc = _prepare(model, params, enc, max_len, 1)

        def cond(state):
            t, _, _, done, _, _ = state
            return (t < max_len) & ~done.all()

        def body(state):
            t, tokens, last, done, logp, cache = state
            logits, cache = model.apply({"params": params}, last, cache, t, enc, method=model.decode_step)
            log_probs = jax.nn.log_softmax(logits, axis=-1)
            if s.min_length:
                early_eos = (t < s.min_length) & (jnp.arange(logits.shape[-1]) == s.eos_id)
                logits = jnp.where(early_eos, -jnp.inf, logits)
            if s.temperature == 0.0:
                tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            else:
                scaled = _filter_logits(logits / s.temperature, s.top_k, s.top_p)
                tok = jax.random.categorical(jax.random.fold_in(rng, t), scaled).astype(jnp.int32)
            tok = jnp.where(done, PAD_ID, tok)
            logp = logp + jnp.where(done, 0.0, jnp.take_along_axis(log_probs, tok[:, None], -1)[:, 0])
            tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], t, axis=1)
            return t + 1, tokens, tok, done | (tok == s.eos_id), logp, _constrain_cache(cache, config)

        init = (jnp.int32(0), jnp.zeros((batch, max_len), jnp.int32), jnp.full((batch,), PAD_ID, jnp.int32),
                jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.float32), cache)
        steps, tokens, _, _, logp, _ = jax.lax.while_loop(cond, body, init)
        return DecodeResult(tokens=tokens, log_probs=logp, scores=logp,
                            lengths=_lengths(tokens, s.eos_id), steps=steps)

    return run


def _top_k(x: Array, k: int) -> tuple[Array, Array]:
    """`lax.top_k` over the last axis, run shard by shard when the batch is split over a mesh.

    XLA's partitioner replicates TopK (all-gathering the batch on every step); rows are
    independent, so under a mesh each `batch` shard takes its own top-k instead.
    """
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    axes = nn.logical_to_mesh_axes(("batch",), rules)[0] if rules and not mesh.empty else None
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    shards = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    if shards == 1 or x.shape[0] % shards:
        return jax.lax.top_k(x, k)
    spec = jax.sharding.PartitionSpec(axes)
    return jax.shard_map(lambda v: jax.lax.top_k(v, k), mesh=mesh, in_specs=spec, out_specs=spec)(x)


def _gather(x: Array, idx: Array) -> Array:
    """`x[b, idx[b, j], ...]` for `x` [B, N, ...] and `idx` [B, M]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_init(cache: Any, batch: int, k: int, max_len: int, neg: float) -> dict[str, Any]:
    """The beam loop's state before the first step: one live beam per row, nothing finished."""
    first_beam_only = jnp.where(jnp.arange(k) == 0, 0.0, neg).astype(jnp.float32)
    return dict(
        t=jnp.int32(0), cache=cache,
        live_tokens=jnp.zeros((batch, k, max_len), jnp.int32),
        live_logp=jnp.tile(first_beam_only, (batch, 1)),
        last=jnp.full((batch, k), PAD_ID, jnp.int32),
        fin_tokens=jnp.zeros((batch, k, max_len), jnp.int32),
        fin_scores=jnp.full((batch, k), neg, jnp.float32),
        fin_logp=jnp.full((batch, k), neg, jnp.float32),
        fin_flags=jnp.zeros((batch, k), bool),
        open=jnp.ones((batch,), bool), go_on=jnp.array(True))


def _beam_result(final: dict[str, Any], s: "_BeamSettings") -> "DecodeResult":
    """Finished hypotheses first (best first); slots with none (T5X convention only: rows where
    fewer than R beams finished) take the best live beams, scored by raw log-prob, as T5X does for a
    row with nothing finished."""
    flags = jnp.concatenate([final["fin_flags"], jnp.zeros_like(final["fin_flags"])], axis=1)
    both = lambda fin, live: jnp.concatenate([fin, live], axis=1)  # noqa: E731
    all_scores = both(final["fin_scores"], final["live_logp"])
    order = jnp.lexsort((-all_scores, ~flags), axis=1)[:, :s.num_return_sequences]
    seqs = _gather(both(final["fin_tokens"], final["live_tokens"]), order)
    scores = _gather(all_scores, order)
    logp = _gather(both(final["fin_logp"], final["live_logp"]), order)
    return DecodeResult(tokens=seqs[:, 0], log_probs=logp[:, 0], scores=scores[:, 0],
                        lengths=_lengths(seqs[:, 0], s.eos_id), steps=final["t"],
                        all_tokens=seqs, all_log_probs=logp, all_scores=scores)


@functools.lru_cache(maxsize=64)
def _compiled_beam(config: T5Config, max_len: int, s: _BeamSettings, context: tuple):
    del context  # only a cache key
    model = Transformer(config)
    conv = CONVENTIONS[s.convention]
    k, neg = s.num_beams, conv.neg_inf
    hf = s.convention == "hf"

    @jax.jit
    def run(params, enc, penalty):
        batch = enc.shape[0]
        cache, enc = _prepare(model, params, enc, max_len, k)
        position = jnp.arange(max_len)

        def cond(state):
            if hf:
                return (state["t"] < max_len) & state["go_on"]
            # T5X: stop once no live beam, even at the most favourable length, beats the worst
            # finished one in any row (every slot of every row must hold a finished hypothesis).
            best_live = state["live_logp"][:, :1] / penalty[max_len + 1]
            worst = jnp.where(state["fin_flags"], state["fin_scores"].min(axis=1, keepdims=True), neg)
            return (state["t"] < max_len) & ~jnp.all(worst > best_live)

        def body(state):
            t = state["t"]
            logits, cache = model.apply({"params": params}, state["last"].reshape(-1), state["cache"], t,
                                        enc, method=model.decode_step)
            vocab = logits.shape[-1]
            log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, k, vocab)
            flat = (log_probs + state["live_logp"][:, :, None]).reshape(batch, k * vocab)
            cand_logp, cand_idx = _top_k(flat, 2 * k)  # sorted, best first
            cand_beam, cand_tok = cand_idx // vocab, (cand_idx % vocab).astype(jnp.int32)
            cand_tokens = jnp.where(position == t, cand_tok[..., None], _gather(state["live_tokens"], cand_beam))
            is_eos = cand_tok == s.eos_id
            stops = is_eos | (conv.max_length_finishes & (t + 1 >= max_len))

            # Live beams: the best k candidates that did not stop; reorder the cache to match.
            _, live_idx = _top_k(cand_logp + jnp.where(stops, neg, 0.0), k)
            live_logp = _gather(cand_logp + jnp.where(stops, neg, 0.0), live_idx)
            cache = _reorder_self_attention(cache, _gather(cand_beam, live_idx), config)

            # Finished hypotheses: merge the candidates that just finished into the kept set.
            can_finish = (is_eos | stops) if conv.max_length_finishes else is_eos
            if conv.only_top_beams_finish:
                can_finish = can_finish & (jnp.arange(2 * k) < k)
            if hf:
                full = state["fin_flags"].all(axis=1) & (s.early_stopping is True)
                can_finish = can_finish & (state["open"] & ~full)[:, None]
            new_scores = cand_logp / penalty[t + 1] + jnp.where(can_finish, 0.0, neg)
            merged = lambda a, b: jnp.concatenate([a, b], axis=1)  # noqa: E731
            _, keep = _top_k(merged(state["fin_scores"], new_scores), k)
            out = dict(
                t=t + 1, cache=_constrain_cache(cache, config),
                live_tokens=_gather(cand_tokens, live_idx), live_logp=live_logp,
                last=_gather(cand_tok, live_idx),
                fin_tokens=_gather(merged(state["fin_tokens"], cand_tokens), keep),
                fin_scores=_gather(merged(state["fin_scores"], new_scores), keep),
                fin_logp=_gather(merged(state["fin_logp"], cand_logp), keep),
                fin_flags=_gather(merged(state["fin_flags"], can_finish), keep))
            if hf:
                out["open"], out["go_on"] = _hf_keep_going(state["open"], out, stops, t + 1, s, penalty,
                                                           max_len)
            else:
                out["open"], out["go_on"] = state["open"], state["go_on"]
            return out

        init = _beam_init(cache, batch, k, max_len, neg)
        final = jax.lax.while_loop(cond, body, init)

        return _beam_result(final, s)

    return run


def _reorder_self_attention(cache: Any, parent: Array, config: T5Config) -> Any:
    """Gathers the self-attention K/V of the surviving beams; `parent` [B, K] is the beam each came from.

    The gather runs within each row (batch stays a batch dimension), so a batch sharded over
    `data` needs no communication. Cross-attention K/V are identical for every beam of a row,
    and beams never move between rows, so they need no reordering.
    """
    def reorder(x):
        rows = x.reshape(parent.shape + x.shape[1:])
        return _gather(rows, parent).reshape(x.shape)

    if config.scan_layers:  # one dict of [layers, B*K, ...] arrays
        return dict(cache, self_k=jax.vmap(reorder)(cache["self_k"]), self_v=jax.vmap(reorder)(cache["self_v"]))
    return {name: dict(layer, self_k=reorder(layer["self_k"]), self_v=reorder(layer["self_v"]))
            for name, layer in cache.items()}


def _hf_keep_going(was_open: Array, state: dict, stops: Array, generated: Array, s: _BeamSettings,
                   penalty: Array, max_len: int) -> tuple[Array, Array]:
    """HF's per-row early-stop heuristic (sticky) and the whole-batch loop condition.

    A row stays open while its best live beam, scored at the most favourable length it could
    reach, beats the worst of its num_beams finished hypotheses (an empty slot counts as -1e9).
    """
    if s.early_stopping == "never" and s.penalty_positive:
        best_len = max_len
    else:
        best_len = generated
    best_live = state["live_logp"][:, :1] / penalty[best_len]
    worst = jnp.where(state["fin_flags"], state["fin_scores"].min(axis=1, keepdims=True), -1.0e9)
    is_open = was_open & jnp.any(best_live > worst, axis=1)
    all_full = state["fin_flags"].all() & (s.early_stopping is True)
    return is_open, is_open.any() & ~all_full & ~stops.all()
