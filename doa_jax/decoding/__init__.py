"""Jitted decoding for the Flax T5 with a KV cache: greedy, sampling and beam search.

Every method is one `jax.jit`-compiled function: encode once, build the cache (self-attention
K/V, plus cross-attention K/V computed once from the encoder output, or with
`T5Config.decode_cross_kv='recompute'` the encoder output itself, projected again at each step), then a `lax.while_loop`
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

from typing import Any, Optional

from doa_jax.decoding.beam import CONVENTIONS, BeamConvention, beam_search
from doa_jax.decoding import beam as _beam, sampling as _sampling
from doa_jax.decoding.cache import CACHE_AXES, EOS_ID, PAD_ID, Array, DecodeResult, ModelSpec, decoding_params
from doa_jax.decoding.sampling import greedy, greedy_program, sample


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


def clear_compiled() -> None:
    """Forget this process's compiled decoders, so the next call compiles afresh (what a fresh
    process pays once; `doa calibrate` times it)."""
    _sampling._compiled_sampling.cache_clear()
    _beam._compiled_beam.cache_clear()


__all__ = ["CACHE_AXES", "CONVENTIONS", "EOS_ID", "PAD_ID", "BeamConvention", "DecodeResult", "beam_search",
           "clear_compiled", "decoding_params", "generate", "greedy", "greedy_program", "sample"]
