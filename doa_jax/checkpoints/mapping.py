"""HuggingFace T5 tensor names <-> T5X param paths, as a table of rows with a transform each.

HF stores PyTorch `nn.Linear` weights `[out, in]`; T5X stores 2-D kernels `[in, out]`, so every
kernel is transposed. HF keeps each stack's relative position table `[buckets, heads]` on block 0's
self-attention; T5X has one `relpos_bias/rel_embedding [heads, buckets]` per stack: transposed too.
The transforms are their own inverses, so one table serves both directions. `{i}` is a layer index.

What the table cannot say (it depends on the config: original T5's tied embedding and missing
`lm_head`) is handled by `hf.py`.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import numpy as np

IDENTITY = "identity"
TRANSPOSE = "transpose"
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    IDENTITY: lambda a: a,
    TRANSPOSE: lambda a: np.ascontiguousarray(np.asarray(a).T),
}

_ATTENTION = (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))
_MLP = ("wi", "wi_0", "wi_1", "wo")


def _attention(ours: str, hf: str) -> list[tuple[str, str, str]]:
    return [(f"{ours}/{o}/kernel", f"{hf}.{h}.weight", TRANSPOSE) for o, h in _ATTENTION]


def _mlp(ours: str, hf: str) -> list[tuple[str, str, str]]:
    return [(f"{ours}/{m}/kernel", f"{hf}.{m}.weight", TRANSPOSE) for m in _MLP]


_ENC, _DEC = "encoder/layers_{i}", "decoder/layers_{i}"
_HF_ENC, _HF_DEC = "encoder.block.{i}.layer", "decoder.block.{i}.layer"

# (T5X path, HF name, transform)
HF_TABLE: list[tuple[str, str, str]] = [
    ("token_embedder/embedding", "shared.weight", IDENTITY),
    ("encoder/relpos_bias/rel_embedding",
     "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", TRANSPOSE),
    (f"{_ENC}/pre_attention_layer_norm/scale", f"{_HF_ENC}.0.layer_norm.weight", IDENTITY),
    *_attention(f"{_ENC}/attention", f"{_HF_ENC}.0.SelfAttention"),
    (f"{_ENC}/pre_mlp_layer_norm/scale", f"{_HF_ENC}.1.layer_norm.weight", IDENTITY),
    *_mlp(f"{_ENC}/mlp", f"{_HF_ENC}.1.DenseReluDense"),
    ("encoder/encoder_norm/scale", "encoder.final_layer_norm.weight", IDENTITY),
    ("decoder/relpos_bias/rel_embedding",
     "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", TRANSPOSE),
    (f"{_DEC}/pre_self_attention_layer_norm/scale", f"{_HF_DEC}.0.layer_norm.weight", IDENTITY),
    *_attention(f"{_DEC}/self_attention", f"{_HF_DEC}.0.SelfAttention"),
    (f"{_DEC}/pre_cross_attention_layer_norm/scale", f"{_HF_DEC}.1.layer_norm.weight", IDENTITY),
    *_attention(f"{_DEC}/encoder_decoder_attention", f"{_HF_DEC}.1.EncDecAttention"),
    (f"{_DEC}/pre_mlp_layer_norm/scale", f"{_HF_DEC}.2.layer_norm.weight", IDENTITY),
    *_mlp(f"{_DEC}/mlp", f"{_HF_DEC}.2.DenseReluDense"),
    ("decoder/decoder_norm/scale", "decoder.final_layer_norm.weight", IDENTITY),
    ("decoder/logits_dense/kernel", "lm_head.weight", TRANSPOSE),
]

# HF names that hold no weights of their own: PyTorch-side copies of `shared` (HF ties them), and
# a cross-attention position table some old checkpoints carry and transformers ignores.
HF_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
HF_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def _regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_COMPILED = [(_regex(ours), _regex(hf), ours, hf, transform) for ours, hf, transform in HF_TABLE]


def hf_name(path: str) -> str | None:
    """The HF tensor name of a T5X path (None if the table has no row for it)."""
    for ours_re, _, _, hf, _ in _COMPILED:
        m = ours_re.match(path)
        if m:
            return hf.format(**m.groupdict())
    return None


def _convert(items: Iterable[tuple[str, np.ndarray]], to_hf: bool) -> tuple[dict, list[str]]:
    converted, unmatched = {}, []
    for name, array in items:
        for ours_re, hf_re, ours, hf, transform in _COMPILED:
            m = (ours_re if to_hf else hf_re).match(name)
            if m:
                target = (hf if to_hf else ours).format(**m.groupdict())
                converted[target] = TRANSFORMS[transform](array)
                break
        else:
            unmatched.append(name)
    return converted, unmatched


def hf_to_t5x(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """HF state dict -> (flat T5X params, HF names no row matches).

    Aliases of `shared` stand in for it only when `shared.weight` itself is absent.
    """
    tensors = dict(tensors)
    for alias in HF_ALIASES:
        if alias in tensors:
            tensors.setdefault("shared.weight", tensors[alias])
            del tensors[alias]
    return _convert(((n, a) for n, a in tensors.items() if n not in HF_IGNORED), False)


def t5x_to_hf(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Flat T5X params -> (HF state dict, T5X paths no row matches)."""
    return _convert(flat.items(), True)
