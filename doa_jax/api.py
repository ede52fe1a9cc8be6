"""The small public API: `load_model(path_or_size_name)` -> `T5Model` (config, params, logits, generate).

Numpy in, numpy out, so users comparing with PyTorch need no JAX knowledge. Functions are jitted
once per input shape and reused.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from doa_jax.model import T5Config, Transformer, config_for_size
from doa_jax.model.config import SIZES


def _as_tokens(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a [batch, length] array of int token ids, "
                         f"got shape {arr.shape} dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} has negative token ids (min {arr.min()})")
    return arr.astype(np.int32)


class T5Model:
    """A T5 with its parameters: `.config`, `.params`, `.logits(...)`, `.generate(...)`, `.save(...)`."""

    def __init__(self, config: T5Config, params: Any):
        self.config = config
        self.params = params
        self.module = Transformer(config)

    def __repr__(self) -> str:
        return (f"T5Model({self.config.num_params() / 1e6:.1f}M params, d={self.config.emb_dim}, "
                f"layers={self.config.num_encoder_layers}+{self.config.num_decoder_layers}, "
                f"dtype={self.config.dtype})")

    @functools.cached_property
    def _logits_fn(self):
        return jax.jit(lambda p, e, d: self.module.apply({"params": p}, e, d))

    def logits(self, encoder_input_tokens: Any, decoder_input_tokens: Any) -> np.ndarray:
        """Teacher-forced logits, float32 `[B, T, V]`. Token id 0 is padding and is masked.

        `decoder_input_tokens` start with the decoder start token 0 (targets shifted right).
        """
        enc = _as_tokens(encoder_input_tokens, "encoder_input_tokens")
        dec = _as_tokens(decoder_input_tokens, "decoder_input_tokens")
        if enc.shape[0] != dec.shape[0]:
            raise ValueError(f"batch sizes differ: encoder {enc.shape[0]}, decoder {dec.shape[0]}")
        self._check_vocab(enc, "encoder_input_tokens")
        self._check_vocab(dec, "decoder_input_tokens")
        return np.asarray(self._logits_fn(self.params, enc, dec), dtype=np.float32)

    def generate(self, encoder_input_tokens: Any, max_decode_len: int, num_beams: int = 1,
                 **decode_options: Any) -> np.ndarray:
        """Decoded token ids `[B, max_decode_len]`, without the leading decoder start token.

        Rows end with EOS (1) and are padded with 0 after it. `num_beams=1` is greedy;
        `decode_options` go to `doa_jax.decoding.generate` (length_penalty, early_stopping,
        temperature, top_k, top_p, rng, ...).
        """
        from doa_jax import decoding

        enc = _as_tokens(encoder_input_tokens, "encoder_input_tokens")
        self._check_vocab(enc, "encoder_input_tokens")
        if int(max_decode_len) < 1:
            raise ValueError(f"max_decode_len must be >= 1, got {max_decode_len}")
        result = decoding.generate(self.module, self.params, enc, int(max_decode_len),
                                   num_beams=num_beams, **decode_options)
        return np.asarray(result.tokens)

    def save(self, path: str | os.PathLike, format: str = "native", **options: Any) -> str:
        """Writes the model as a checkpoint; returns the directory written.

        `format`: 'native' (doa-jax Orbax), 'hf' (transformers), 't5x' (T5X's Orbax train state,
        what `t5x.infer` and T5X's INITIAL_CHECKPOINT_PATH take) or 't5x_legacy' (msgpack +
        TensorStore). T5X checkpoints go to `path` when it is named `checkpoint_N`, else to
        `path/checkpoint_<step>` (`step=0` unless given in `options`).
        """
        from doa_jax import checkpoints

        return os.fspath(checkpoints.save_checkpoint(path, self.config, self.params, format=format, **options))

    def _check_vocab(self, tokens: np.ndarray, name: str) -> None:
        if tokens.size and tokens.max() >= self.config.vocab_size:
            raise ValueError(f"{name} has token id {tokens.max()} >= vocab_size {self.config.vocab_size}")


@functools.lru_cache(maxsize=16)
def _jitted_init(config: T5Config):
    module = Transformer(config)
    dummy = jnp.ones((1, 1), jnp.int32)
    return jax.jit(lambda rng: nn.meta.unbox(module.init(rng, dummy, dummy)["params"]))


def init_params(config: T5Config, seed: int = 0) -> Any:
    """Random float32 parameters for `config` (T5X's initialisers), built under jit (compiled once per config)."""
    return _jitted_init(config)(jax.random.PRNGKey(seed))


# Size names that mean "random init": the SIZES keys and the T5 v1.1 short names ('small', ...).
# Hub-style names ('t5-base', 'google/t5-v1_1-small') are not: they name pretrained checkpoints.
SIZE_NAMES = tuple(sorted(set(SIZES) | {k.removeprefix("t5_1_1_") for k in SIZES if k.startswith("t5_1_1_")}))


def size_config(name: str, **overrides: Any) -> T5Config:
    """The config of an explicit size name; anything else (a Hub id, a missing path) is an error
    that says doa-jax reads local files only and how to fetch the checkpoint."""
    if name in SIZE_NAMES:
        return config_for_size(name, **overrides)
    message = (f"{name!r} is neither an existing checkpoint path nor a model size name. doa-jax loads "
               "only local files and never downloads")
    if not (os.path.isabs(name) or name.startswith((".", "~"))):
        message += (f"; for the Hugging Face checkpoint run `huggingface-cli download {name} --local-dir DIR` "
                    "and pass DIR")
    raise FileNotFoundError(f"{message}. Random weights need an explicit size name: {', '.join(SIZE_NAMES)}")


def load_model(path_or_size_name: str | os.PathLike, *, dtype: Optional[str] = "float32",
               seed: int = 0, **config_overrides: Any) -> T5Model:
    """Loads a T5 from a local checkpoint, or builds one with RANDOM weights from a size name.

    Checkpoints: HuggingFace (`config.json` + safetensors), T5X legacy (msgpack + TensorStore) or
    Orbax, and doa-jax native; the format is detected from the path. Nothing is downloaded: a Hub
    id such as 'google/t5-v1_1-small' is an error saying how to fetch it. Size names (`SIZE_NAMES`:
    'small', 't5_1_1_base', 't5_small', ...) give a random init from `seed`, announced on stderr.
    `dtype` sets the activation dtype ('float32' matches PyTorch; 'bfloat16' is faster on
    accelerators; None keeps the checkpoint's).
    """
    overrides = dict(config_overrides)
    if dtype is not None:
        overrides["dtype"] = dtype
    path = os.fspath(path_or_size_name)
    if os.path.exists(path):
        from doa_jax import checkpoints

        config, params = checkpoints.load_checkpoint(path)
        config = config.replace(**overrides)
        return T5Model(config, jax.tree_util.tree_map(jnp.asarray, params))
    config = size_config(path, **overrides)
    print(f"doa-jax: {path!r} is a size name: RANDOM weights (seed {seed}), not a pretrained checkpoint",
          file=sys.stderr)
    return T5Model(config, init_params(config, seed))
