"""In-memory pools -> model arrays, without TensorFlow: what the SeqIO task computes, in NumPy.

`encode_examples` applies the card's input prefix, tokenizes with the vocabulary, trims each
feature to its length minus one and appends EOS (seqio's `append_eos_after_trim`), pads with 0, and
lays the result out as `EncDecFeatureConverter(pack=False)` does: encoder inputs, decoder targets,
decoder inputs (targets shifted right with the start id 0) and loss weights. A test checks it
against the SeqIO pipeline token for token.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from doa_jax.data.vocab import EOS_ID, within_length


def _trim_eos(ids: list[int], length: int) -> list[int]:
    return within_length(ids, length) + [EOS_ID]


def encode_texts(vocab, texts: Sequence[str], length: int, prefix: str = "") -> np.ndarray:
    """`[N, length]` int32 token ids of `prefix + text`, EOS-terminated, 0-padded."""
    out = np.zeros((len(texts), length), np.int32)
    for i, text in enumerate(texts):
        ids = _trim_eos(vocab.encode(prefix + text), length)
        out[i, : len(ids)] = ids
    return out


def shift_right(targets: np.ndarray) -> np.ndarray:
    """Decoder inputs: targets shifted right with the start id 0."""
    out = np.zeros_like(targets)
    out[:, 1:] = targets[:, :-1]
    return out


def encode_examples(card, vocab, examples: Sequence[Mapping[str, str]], feature_lengths: Mapping[str, int],
                    *, inputs_only: bool = False) -> dict[str, np.ndarray]:
    """SeqIO EncDec arrays for {"source", "target"} examples (targets blank when `inputs_only`)."""
    enc = encode_texts(vocab, [ex["source"] for ex in examples], feature_lengths["inputs"], card.input_prefix)
    targets = encode_texts(vocab, ["" if inputs_only else ex["target"] for ex in examples],
                           feature_lengths["targets"])
    return {"encoder_input_tokens": enc, "decoder_target_tokens": targets,
            "decoder_input_tokens": shift_right(targets),
            "decoder_loss_weights": (targets > 0).astype(np.float32)}
