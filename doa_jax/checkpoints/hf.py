"""HuggingFace T5 directories (`config.json` + safetensors, as `save_pretrained` writes them).

Reads `model.safetensors` or a sharded `model.safetensors.index.json`; writes what
`transformers.T5ForConditionalGeneration.from_pretrained` loads. Safetensors only (no pickle): the
reader parses the JSON header itself, so a truncated or inconsistent file gets an error naming it,
and float16/bfloat16 tensors load as float32.

Embedding and logits follow transformers: original T5 ties `lm_head` to `shared` and scales the
decoder output by d_model**-0.5 (our `logits_via_embedding`); v1.1 has its own `lm_head`. A config
that does not scale but whose checkpoint has no `lm_head` is tied in transformers, so its logits
come from `shared` (our `logits_dense` is then `shared.T`).
"""
from __future__ import annotations

import io
import json
import math
import os
import pathlib
import shutil
from typing import Any, Mapping, Optional

import numpy as np

from doa_jax import storage
from doa_jax.checkpoints import mapping
from doa_jax.checkpoints.tree import CheckpointError, check_params, flatten, float32_tree
from doa_jax.model import T5Config
from doa_jax.model.config import T5_EXTRA_IDS, check_vocab_size

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_MODEL_FILE = "spiece.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# (T5Config field, config.json key): copied as they are.
CONFIG_TABLE: tuple[tuple[str, str], ...] = (
    ("vocab_size", "vocab_size"),
    ("emb_dim", "d_model"),
    ("num_heads", "num_heads"),
    ("head_dim", "d_kv"),
    ("mlp_dim", "d_ff"),
    ("num_encoder_layers", "num_layers"),
    ("num_decoder_layers", "num_decoder_layers"),
    ("relative_attention_num_buckets", "relative_attention_num_buckets"),
    ("relative_attention_max_distance", "relative_attention_max_distance"),
    ("layer_norm_epsilon", "layer_norm_epsilon"),
    ("dropout_rate", "dropout_rate"),
)
REQUIRED_KEYS = ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers")
# What transformers' T5Config assumes for keys a config.json leaves out (older files omit some).
HF_DEFAULTS = {"relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
               "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1, "feed_forward_proj": "relu",
               "tie_word_embeddings": True}
# Our activation -> HF `dense_act_fn`. Ours 'gelu' is the tanh approximation, HF's 'gelu_new'.
ACT_TO_HF = {"gelu": "gelu_new", "gelu_new": "gelu_new", "relu": "relu", "silu": "silu"}
ACT_FROM_HF = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu", "silu": "silu",
               "swish": "silu"}

# safetensors dtype -> numpy dtype
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _bfloat16():
    import ml_dtypes

    return ml_dtypes.bfloat16


# ----------------------------------------------------------------------------------- config.json

def config_to_hf(config: T5Config) -> dict[str, Any]:
    """`config.json` contents for `config`, as transformers' `T5Config` reads them."""
    acts = config.mlp_activations
    gated = len(acts) > 1
    if (gated and (len(acts) != 2 or acts[1] != "linear")) or acts[0] not in ACT_TO_HF:
        raise CheckpointError(f"mlp_activations {list(acts)} have no HuggingFace T5 counterpart "
                              f"(supported: one of {sorted(ACT_TO_HF)}, optionally gated with 'linear')")
    act = ACT_TO_HF[acts[0]]
    proj = ("gated-gelu" if act == "gelu_new" else f"gated-{act}") if gated else act
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
            **{hf: getattr(config, ours) for ours, hf in CONFIG_TABLE},
            "feed_forward_proj": proj, "dense_act_fn": act, "is_gated_act": gated,
            "tie_word_embeddings": config.logits_via_embedding,
            "scale_decoder_outputs": config.logits_via_embedding,
            "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
            "decoder_start_token_id": 0, "initializer_factor": 1.0, "use_cache": True, "dtype": "float32"}


def config_from_hf(d: Mapping[str, Any], source: str) -> T5Config:
    """`T5Config` from `config.json` contents (activation dtype left at its default)."""
    if d.get("model_type", "t5") != "t5":
        raise CheckpointError(f"{source}: model_type is {d.get('model_type')!r}, not 't5'")
    missing = [key for key in REQUIRED_KEYS if key not in d]
    if missing:
        raise CheckpointError(f"{source}: missing keys {missing}")
    d = {**HF_DEFAULTS, "num_decoder_layers": d["num_layers"],
         **{k: v for k, v in d.items() if v is not None}}
    values = {ours: d[hf] for ours, hf in CONFIG_TABLE}
    proj = d["feed_forward_proj"]
    parts = proj.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    if len(parts) > 2 or (len(parts) == 2 and not gated):
        raise CheckpointError(f"{source}: feed_forward_proj {proj!r} is not 'ACT' or 'gated-ACT'")
    hf_act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    if hf_act not in ACT_FROM_HF:
        raise CheckpointError(f"{source}: feed_forward_proj {proj!r} (activation {hf_act!r}) has no "
                              f"doa-jax counterpart; supported activations: {sorted(ACT_FROM_HF)} "
                              f"(T5 uses the tanh GELU: 'gated-gelu' or 'gelu_new')")
    act = ACT_FROM_HF[hf_act]
    values["mlp_activations"] = (act, "linear") if gated else (act,)
    # transformers 5 writes tie_word_embeddings=true for every T5 and records the scaling in
    # scale_decoder_outputs; older configs say tie_word_embeddings (default true).
    values["logits_via_embedding"] = bool(d.get("scale_decoder_outputs", d["tie_word_embeddings"]))
    try:
        return T5Config(**values)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------------- safetensors

def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy arrays (float16/bfloat16 widened to float32).
    A local file is memory-mapped; an object (gs://) is read whole."""
    path = storage.path(path)
    blob = path.read_bytes() if storage.is_url(path) else None
    size = len(blob) if blob is not None else path.stat().st_size
    with (io.BytesIO(blob) if blob is not None else open(path, "rb")) as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated or corrupt ({size} bytes, no header)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            raise CheckpointError(f"{path} is truncated or corrupt (header of {header_len} bytes, "
                                  f"file has {size - 8} after the length)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is corrupt (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt (header is not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    found = size - data_start
    try:
        needed = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"{path} is corrupt (a header entry has no data_offsets)") from None
    if found < needed:
        raise CheckpointError(f"{path} is truncated or corrupt (expected {needed} bytes of tensor "
                              f"data, found {found})")
    data = None
    if found:
        data = (np.frombuffer(blob, np.uint8, count=found, offset=data_start) if blob is not None else
                np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(found,)))
    tensors = {}
    for name, info in header.items():
        dtype = _bfloat16() if info.get("dtype") == "BF16" else _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        try:
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} is corrupt (tensor {name}: bad shape or data_offsets)") from None
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{path} is corrupt (tensor {name}: {end - begin} bytes for shape "
                                  f"{list(shape)} {info['dtype']}, expected {nbytes})")
        array = np.frombuffer(data[begin:end], dtype).reshape(shape) if nbytes else np.zeros(shape, dtype)
        narrow = info["dtype"] in ("F16", "BF16")
        tensors[name] = array.astype(np.float32) if narrow else np.array(array)  # copies off the memmap
    return tensors


def _weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is corrupt ({e})") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{index} lists shard files that are missing: {absent}")
        return files
    if (directory / WEIGHTS_FILE).exists():
        return [directory / WEIGHTS_FILE]
    raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors are read; "
                          "re-save PyTorch .bin checkpoints with save_pretrained(safe_serialization=True))")


def read_hf_tensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory (single file or sharded)."""
    tensors: dict[str, np.ndarray] = {}
    for file in _weight_files(storage.path(directory)):
        tensors.update(read_safetensors(file))
    return tensors


# ----------------------------------------------------------------------------------- params

def params_from_hf_tensors(tensors: Mapping[str, np.ndarray], config: T5Config,
                           source: str) -> dict[str, Any]:
    """HF state dict -> our param tree (float32 numpy), checked against `config`."""
    flat, unmatched = mapping.hf_to_t5x(tensors)
    embedding = flat.get("token_embedder/embedding")
    logits = flat.get("decoder/logits_dense/kernel")
    if config.logits_via_embedding and logits is not None:
        if embedding is None or not np.array_equal(logits, embedding.T):
            raise CheckpointError(f"{source}: lm_head.weight differs from shared.weight, but the config "
                                  "ties them (original T5, logits scaled by d_model**-0.5)")
        del flat["decoder/logits_dense/kernel"]
    if not config.logits_via_embedding and logits is None and embedding is not None:
        flat["decoder/logits_dense/kernel"] = np.ascontiguousarray(embedding.T)  # tied, as transformers does
    for name in unmatched:
        flat[name] = tensors[name]  # reported as unexpected, under its HF name
    check_params(config, flat, source, _describe)
    return float32_tree(flat)


def _describe(path: str) -> str:
    name = mapping.hf_name(path)
    return f"{path} ({name})" if name else path


def load_hf(directory: str | os.PathLike, config: Optional[T5Config] = None) -> tuple[T5Config, dict]:
    """(config, params) from an HF T5 directory (local or gs://); `config` overrides `config.json`."""
    directory = storage.path(directory)
    source = f"{directory} (weights vs the given config; shapes in T5X layout)"
    if config is None:
        source = f"{directory} (weights vs {CONFIG_FILE}; shapes in T5X layout)"
        config = read_config(directory)
    return config, params_from_hf_tensors(read_hf_tensors(directory), config, source)


def read_config(directory: str | os.PathLike) -> T5Config:
    """The `T5Config` of an HF directory's `config.json`."""
    config_path = storage.path(directory) / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} (pass a T5Config to read weights alone)")
    try:
        return config_from_hf(json.loads(config_path.read_text()), str(config_path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e})") from None


def tokenizer_config(vocab_path: str | os.PathLike, model_vocab_size: int,
                     extra_ids: int = T5_EXTRA_IDS) -> dict[str, Any]:
    """`tokenizer_config.json` for a SentencePiece vocabulary, after checking that it fits the model."""
    import sentencepiece as spm

    if not pathlib.Path(vocab_path).is_file():
        raise CheckpointError(f"cannot export the tokenizer: no SentencePiece model at {vocab_path}")
    try:
        pieces = spm.SentencePieceProcessor(model_file=os.fspath(vocab_path))
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"cannot export the tokenizer: {vocab_path} is not a SentencePiece model ({e})") from None
    num_ids = pieces.GetPieceSize() + extra_ids
    try:
        check_vocab_size(num_ids, model_vocab_size, f"vocabulary {vocab_path} has {num_ids} ids "
                                                    f"({pieces.GetPieceSize()} pieces + {extra_ids} extra ids)")
    except ValueError as e:
        raise CheckpointError(f"cannot export the tokenizer: {e}") from None
    return {"tokenizer_class": "T5Tokenizer", "extra_ids": extra_ids, "pad_token": pieces.IdToPiece(0),
            "eos_token": pieces.IdToPiece(1), "unk_token": pieces.IdToPiece(2)}


def save_tokenizer(directory: str | os.PathLike, vocab_path: str | os.PathLike,
                   tokenizer: Mapping[str, Any]) -> list[str]:
    """Writes the vocabulary as HF T5 repositories ship it (`spiece.model` + `tokenizer_config.json`
    naming `T5Tokenizer` and its extra ids): `transformers.AutoTokenizer.from_pretrained(directory)`
    loads it with the ids of `doa_jax.data.vocab` (plus the EOS transformers appends)."""
    directory = pathlib.Path(directory)
    shutil.copyfile(vocab_path, directory / TOKENIZER_MODEL_FILE)
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(dict(tokenizer), indent=2) + "\n")
    return [TOKENIZER_MODEL_FILE, TOKENIZER_CONFIG_FILE]


def save_hf(directory: str | os.PathLike, config: T5Config, params: Mapping[str, Any],
            max_shard_bytes: int = 5 * 2**30, vocab: Optional[str | os.PathLike] = None) -> list[str]:
    """Writes `config.json`, `generation_config.json` and float32 safetensors; returns the files.

    Tensors go to `model.safetensors`, or to `model-0000k-of-0000n.safetensors` shards plus
    `model.safetensors.index.json` when they exceed `max_shard_bytes`. With `vocab` (a
    SentencePiece model) the tokenizer is written too (`save_tokenizer`).
    """
    from safetensors.numpy import save_file

    flat = {p: np.asarray(a, dtype=np.float32) for p, a in flatten(params).items()}
    check_params(config, flat, "params to save")
    tokenizer = tokenizer_config(vocab, config.vocab_size) if vocab is not None else None
    tensors, _ = mapping.t5x_to_hf(flat)
    hf_config = config_to_hf(config)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    used = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = tensors[name]
        used += nbytes
    written = [CONFIG_FILE, GENERATION_CONFIG_FILE]
    if len(shards) == 1:
        save_file(shards[0], directory / WEIGHTS_FILE, metadata={"format": "pt"})
        written.append(WEIGHTS_FILE)
    else:
        weight_map = {}
        for k, shard in enumerate(shards, 1):
            name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / name, metadata={"format": "pt"})
            weight_map.update({t: name for t in shard})
            written.append(name)
        total = sum(t.nbytes for t in tensors.values())
        (directory / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        written.append(INDEX_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    generation = {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
    (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        written += save_tokenizer(directory, vocab, tokenizer)
    return written
