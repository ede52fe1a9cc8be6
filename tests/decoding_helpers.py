"""Test helpers for decoding: random params, and models nudged toward EOS so rows end early."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from doa_jax import decoding
from doa_jax.model import Transformer


def init_params(cfg, seed=0):
    model = Transformer(cfg)
    dummy = jnp.ones((1, 1), jnp.int32)
    return jax.tree.map(np.asarray, nn.meta.unbox(model.init(jax.random.PRNGKey(seed), dummy, dummy)["params"]))


def teacher_forced(cfg, params, enc, tokens):
    """(log p(tokens[t] | tokens[<t]) [B, T], logits [B, T, V], decoder_norm output [B, T, d])."""
    dec_in = np.concatenate([np.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
    logits, state = Transformer(cfg).apply({"params": params}, enc, dec_in, mutable=["intermediates"],
                                           capture_intermediates=lambda mdl, _: mdl.name == "decoder_norm")
    hidden = state["intermediates"]["decoder"]["decoder_norm"]["__call__"][0]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_logp = jnp.take_along_axis(log_probs, jnp.asarray(tokens)[..., None], axis=-1)[..., 0]
    return np.asarray(token_logp), np.asarray(logits), np.asarray(hidden, np.float32)


def valid(tokens):
    """Positions up to and including the first EOS."""
    is_eos = tokens == decoding.EOS_ID
    return (np.cumsum(is_eos, axis=1) - is_eos) == 0


def eos_biased(cfg, params, enc, max_len, margin=1.0):
    """Params whose EOS output vector is refitted so that row i of `enc` ends near its own step.

    Untrained models almost never emit EOS, and when they do it is at the first step. This
    adds to EOS's output vector (the logits column, or the tied embedding row) the least-squares
    `delta` for which EOS's logit sits `margin` below the winner before step s_i and above it from
    s_i on, s_i spread over 1..max_len+2 (the last rows never end). Only the EOS logit changes, so
    the path up to the first EOS is the unbiased greedy one. With tied embeddings keep EOS out of
    `enc`: its input embedding changes too.
    """
    tokens = np.asarray(decoding.greedy(cfg, params, enc, max_len).tokens)
    _, logits, hidden = teacher_forced(cfg, params, enc, tokens)
    rows, steps, dim = hidden.shape
    end = np.round(np.linspace(1, max_len + 2, rows))[:, None]
    want = logits.max(-1) + np.where(np.arange(1, steps + 1)[None] >= end, margin, -margin)
    delta = np.linalg.lstsq(hidden.reshape(-1, dim), (want - logits[..., decoding.EOS_ID]).reshape(-1),
                            rcond=None)[0]
    params = jax.tree.map(np.array, params)
    if cfg.logits_via_embedding:  # logits = h @ embedding.T * emb_dim**-0.5
        params["token_embedder"]["embedding"][decoding.EOS_ID] += delta * cfg.emb_dim ** 0.5
    else:
        params["decoder"]["logits_dense"]["kernel"][:, decoding.EOS_ID] += delta
    return params
