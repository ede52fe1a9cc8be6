"""Beam search, as HF `generate` (default) or T5X defines it: conventions are a table."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from doa_jax.decoding.cache import (EOS_ID, PAD_ID, Array, _check_inputs, _config_of, _constrain_cache,
                                    _context_key, DecodeResult, decoding_params, _lengths, ModelSpec, _prepare)
from doa_jax.model import T5Config, Transformer
from doa_jax.model.network import ENCODED


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
class _BeamSettings:
    """What a compiled beam search is specialised on. The length penalty's value is not: its divisor
    table is an argument, so another penalty reuses the program; only its sign changes control flow."""
    num_beams: int
    penalty_positive: bool
    early_stopping: Union[bool, str]
    num_return_sequences: int
    convention: str
    eos_id: int


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
    and beams never move between rows, so they need no reordering (nor does the encoder output that a
    `decode_cross_kv='recompute'` cache keeps instead).
    """
    def reorder(x):
        rows = x.reshape(parent.shape + x.shape[1:])
        return _gather(rows, parent).reshape(x.shape)

    if config.scan_layers:  # one dict of [layers, B*K, ...] arrays
        return dict(cache, self_k=jax.vmap(reorder)(cache["self_k"]), self_v=jax.vmap(reorder)(cache["self_v"]))
    return {name: dict(layer, self_k=reorder(layer["self_k"]), self_v=reorder(layer["self_v"])) if name != ENCODED
            else layer for name, layer in cache.items()}


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
