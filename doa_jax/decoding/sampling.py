"""Greedy decoding and ancestral sampling: one jitted `lax.while_loop` over cached decode steps."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from doa_jax.decoding.cache import (EOS_ID, PAD_ID, Array, _check_inputs, _check_min_length, _config_of,
                                    _constrain_cache, _context_key, DecodeResult, decoding_params, _lengths,
                                    ModelSpec, _prepare)
from doa_jax.model import T5Config, Transformer


@dataclasses.dataclass(frozen=True)
class _SampleSettings:
    temperature: float  # 0 = greedy (argmax)
    top_k: int  # 0 = off
    top_p: float  # 1 = off
    eos_id: int
    min_length: int = 0  # EOS may not be chosen before this many tokens (HF `min_new_tokens`)


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
