"""One frozen config for the T5 family (T5 v1.1 and the original T5), and the named sizes.

The field names follow T5X's `network.T5Config` so gin files read the same way.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional


DECODE_CROSS_KV = ("cache", "recompute")  # T5Config.decode_cross_kv
SCAN_BACKWARD = ("auto", "stack", "autodiff")  # T5Config.scan_backward
# How a model is run (decoded, differentiated), not what it is: left out of checkpoints' config and of
# cache and cell keys (`to_dict(execution=False)`), so such a choice never makes another model or cell.
EXECUTION_FIELDS = ("decode_cross_kv", "scan_backward")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Shape and numerics of an encoder-decoder T5.

    T5 v1.1 (the paper's models): gated GELU MLP (`mlp_activations=('gelu', 'linear')`), untied
    `decoder/logits_dense`, no embedding scaling. Original T5: `mlp_activations=('relu',)`,
    `logits_via_embedding=True` (logits from the shared embedding, scaled by emb_dim**-0.5).

    `vocab_size=None` means "follows the run's vocabulary": the commands fix it with
    `resolve_vocab_size` before any model is built (gin: `MODEL_VOCAB_SIZE = None`).
    """

    vocab_size: Optional[int] = 32128
    emb_dim: int = 512
    num_heads: int = 6
    head_dim: int = 64
    mlp_dim: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    mlp_activations: tuple[str, ...] = ("gelu", "linear")
    logits_via_embedding: bool = False
    dropout_rate: float = 0.0
    # Activation dtype; parameters are always float32.
    dtype: str = "bfloat16"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    # Rematerialise each layer in the backward pass: 'none' | 'full' | 'dots' (save matmul outputs).
    remat_policy: str = "none"
    # Run each stack's layers as one `nn.scan` over params stacked on a leading `layers` axis:
    # one layer is traced and compiled instead of num_layers copies (start-up time). Checkpoints
    # keep T5X's per-layer names (`doa_jax.model.scan` converts). Numerics equal the unscanned
    # model; dropout masks differ (each layer folds its index into the stack's dropout key).
    scan_layers: bool = False
    # Where a decode step gets the cross-attention keys and values: 'cache' projects the encoder
    # output once per sequence and keeps every layer's K/V in the decode cache (fewest FLOPs; 2 x
    # layers x [B, S, heads, kv]); 'recompute' keeps only the encoder output [B, S, emb] and projects
    # it again at every step, as T5X does (a cache about 2 x layers x heads x kv / emb times smaller,
    # the projection's FLOPs paid per decoded token). Results are the same either way.
    decode_cross_kv: str = "cache"
    # How scanned layers are differentiated (the same gradients; what differs is the memory each
    # compiler's schedule needs, measured in notes/aot.md): 'stack' runs `doa_jax.model.stack`'s own
    # backward loop (GPUs need least with it), 'autodiff' lets JAX transpose the scan with the attention
    # biases made outside it (TPUs need least with it), 'auto' picks per platform when the program is
    # lowered (`jax.lax.platform_dependent`), so a program compiled ahead of time for a TPU gets the
    # TPU's choice. The fused update always runs the stack's loop.
    scan_backward: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
        for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                     "num_encoder_layers", "num_decoder_layers"):
            value = getattr(self, name)
            if name == "vocab_size" and value is None:
                continue
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"T5Config.{name} must be a positive int, got {value!r}")
        unknown = [a for a in self.mlp_activations if a not in ACTIVATIONS]
        if unknown or not self.mlp_activations:
            raise ValueError(f"T5Config.mlp_activations {self.mlp_activations!r}: each must be one of "
                             f"{sorted(ACTIVATIONS)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"T5Config.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.remat_policy not in ("none", "full", "dots"):
            raise ValueError(f"T5Config.remat_policy must be none, full or dots, got {self.remat_policy!r}")
        if self.decode_cross_kv not in DECODE_CROSS_KV:
            raise ValueError(f"T5Config.decode_cross_kv must be one of {', '.join(DECODE_CROSS_KV)}, "
                             f"got {self.decode_cross_kv!r}")
        if self.scan_backward not in SCAN_BACKWARD:
            raise ValueError(f"T5Config.scan_backward must be one of {', '.join(SCAN_BACKWARD)}, "
                             f"got {self.scan_backward!r}")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"T5Config.scan_layers must be True or False, got {self.scan_layers!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")

    def replace(self, **changes: Any) -> "T5Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self, execution: bool = True) -> dict[str, Any]:
        """The fields as JSON-able values; `execution=False` leaves out `EXECUTION_FIELDS`."""
        d = dataclasses.asdict(self)
        d["mlp_activations"] = list(self.mlp_activations)
        for name in () if execution else EXECUTION_FIELDS:
            d.pop(name)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "T5Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown T5Config fields {unknown}; known: {sorted(known)}")
        return cls(**dict(d))

    def require_vocab_size(self) -> None:
        """Raises when the vocab size was left to follow a vocabulary and never resolved."""
        if self.vocab_size is None:
            raise ValueError("T5Config.vocab_size is None (follow the vocabulary) and was not resolved: call "
                             "doa_jax.model.config.resolve_vocab_size with the run's vocabulary, or set "
                             "MODEL_VOCAB_SIZE")

    @property
    def recomputes_cross_kv(self) -> bool:
        """Whether a decode step projects the encoder output again (`decode_cross_kv='recompute'`)."""
        return self.decode_cross_kv == "recompute"

    @property
    def gated(self) -> bool:
        return len(self.mlp_activations) > 1

    def num_params(self) -> int:
        """Parameter count (all arrays), from shapes alone."""
        self.require_vocab_size()
        d, h, k, f, v = self.emb_dim, self.num_heads, self.head_dim, self.mlp_dim, self.vocab_size
        attn = 4 * d * h * k
        mlp = (len(self.mlp_activations) + 1) * d * f
        enc_layer = attn + mlp + 2 * d
        dec_layer = 2 * attn + mlp + 3 * d
        relpos = 2 * h * self.relative_attention_num_buckets
        logits = 0 if self.logits_via_embedding else d * v
        return (v * d + self.num_encoder_layers * enc_layer + self.num_decoder_layers * dec_layer
                + 2 * d + relpos + logits)


# Activation table: name -> jax function name (resolved in layers.py). 'gelu' is tanh-approximate.
ACTIVATIONS = ("gelu", "gelu_new", "relu", "linear", "silu")

_V11 = dict(vocab_size=32128, mlp_activations=("gelu", "linear"), logits_via_embedding=False)
_ORIG = dict(vocab_size=32128, mlp_activations=("relu",), logits_via_embedding=True)

# Named sizes (T5X's t5_1_1/*.gin and the original T5 paper). `tiny` is for tests.
SIZES: dict[str, dict[str, Any]] = {
    "t5_1_1_tiny": dict(_V11, emb_dim=8, num_heads=4, head_dim=3, mlp_dim=16,
                        num_encoder_layers=2, num_decoder_layers=2),
    "t5_1_1_small": dict(_V11, emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024,
                         num_encoder_layers=8, num_decoder_layers=8),
    "t5_1_1_base": dict(_V11, emb_dim=768, num_heads=12, head_dim=64, mlp_dim=2048,
                        num_encoder_layers=12, num_decoder_layers=12),
    "t5_1_1_large": dict(_V11, emb_dim=1024, num_heads=16, head_dim=64, mlp_dim=2816,
                         num_encoder_layers=24, num_decoder_layers=24),
    "t5_1_1_xl": dict(_V11, emb_dim=2048, num_heads=32, head_dim=64, mlp_dim=5120,
                      num_encoder_layers=24, num_decoder_layers=24),
    "t5_1_1_xxl": dict(_V11, emb_dim=4096, num_heads=64, head_dim=64, mlp_dim=10240,
                       num_encoder_layers=24, num_decoder_layers=24),
    "t5_small": dict(_ORIG, emb_dim=512, num_heads=8, head_dim=64, mlp_dim=2048,
                     num_encoder_layers=6, num_decoder_layers=6),
    "t5_base": dict(_ORIG, emb_dim=768, num_heads=12, head_dim=64, mlp_dim=3072,
                    num_encoder_layers=12, num_decoder_layers=12),
}


def size_key(name: str) -> str:
    """The canonical size key (`t5_1_1_small`) for 'small', 't5_1_1_small', 't5-v1_1-small', 'google/...'."""
    key = name.strip().lower().replace("-", "_").replace("v1_1", "1_1")
    for candidate in (key, f"t5_1_1_{key}", key.replace("google/", "")):
        if candidate in SIZES:
            return candidate
    raise ValueError(f"unknown model size {name!r}; known sizes: {sorted(SIZES)}")


def config_for_size(name: str, **overrides: Any) -> T5Config:
    """`T5Config` for a named size: 'small', 't5_1_1_small', 't5-v1_1-small' or 't5_small'."""
    return T5Config(**{**SIZES[size_key(name)], **overrides})


_SHAPE_FIELDS = ("emb_dim", "num_heads", "head_dim", "mlp_dim", "num_encoder_layers", "num_decoder_layers",
                 "mlp_activations", "logits_via_embedding")


def size_of(config: T5Config) -> str:
    """The size key (of `SIZES`) whose architecture `config` has, else a short description."""
    for name, fields in SIZES.items():
        if all(getattr(config, k) == fields[k] for k in _SHAPE_FIELDS):
            return name
    return f"custom(d={config.emb_dim},L={config.num_encoder_layers}+{config.num_decoder_layers})"


T5_EXTRA_IDS = 100        # T5's sentinel ids (<extra_id_N>) on top of the SentencePiece pieces
VOCAB_PAD_MULTIPLE = 128  # embedding rows are padded to a multiple of this (T5: 32100 ids -> 32128 rows)


def padded_vocab_size(num_ids: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Embedding rows a model needs for a vocabulary of `num_ids` ids: rounded up to `multiple`."""
    return -(-num_ids // multiple) * multiple


def check_vocab_size(num_ids: int, model_vocab_size: int, what: str, multiple: int = VOCAB_PAD_MULTIPLE) -> None:
    """Raises unless the model's embedding rows hold exactly `num_ids` ids, padded to `multiple`.

    A model smaller than the vocabulary would index past its embedding; one padded beyond the next
    multiple belongs to another vocabulary. `what` names the vocabulary in the message.
    """
    padded = padded_vocab_size(num_ids, multiple)
    if not num_ids <= model_vocab_size <= padded:
        raise ValueError(f"{what} but the model's vocab_size is {model_vocab_size}; expected {num_ids}..{padded}")


def resolve_vocab_size(config: T5Config, num_ids: int, what: str, *, checkpoint_rows: Optional[int] = None,
                       checkpoint: Any = None, multiple: int = VOCAB_PAD_MULTIPLE) -> T5Config:
    """`config` with its vocab size fixed for a vocabulary of `num_ids` ids (`what` describes it).

    A checkpoint being loaded fixes it (`checkpoint_rows`, its embedding rows; a different explicit
    size, or rows that do not fit the vocabulary, is an error naming both); else `vocab_size=None`
    follows the vocabulary (its ids padded to `multiple`); else the explicit size must fit. The one
    knob, in every command's gin, is `MODEL_VOCAB_SIZE`.
    """
    padded = padded_vocab_size(num_ids, multiple)
    if checkpoint_rows is not None:
        if config.vocab_size is not None and config.vocab_size != checkpoint_rows:
            raise ValueError(f"MODEL_VOCAB_SIZE is {config.vocab_size} but checkpoint {checkpoint} has "
                             f"{checkpoint_rows} embedding rows; set MODEL_VOCAB_SIZE = None (the checkpoint fixes it)")
        if not num_ids <= checkpoint_rows <= padded:
            raise ValueError(f"{what} but checkpoint {checkpoint} has {checkpoint_rows} embedding rows (expected "
                             f"{num_ids}..{padded}): use the vocabulary that checkpoint was trained with")
        return config.replace(vocab_size=checkpoint_rows)
    if config.vocab_size is None:
        return config.replace(vocab_size=padded)
    if not num_ids <= config.vocab_size <= padded:
        raise ValueError(f"{what} but MODEL_VOCAB_SIZE (the model's vocab_size) is {config.vocab_size}; expected "
                         f"{num_ids}..{padded}: set MODEL_VOCAB_SIZE = {padded}, or None to follow the vocabulary")
    return config
