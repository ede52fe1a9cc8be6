"""T5X checkpoints: the legacy format (msgpack + TensorStore zarr) and the Orbax format (OCDBT).

Both hold T5X's train state `{target: params, state: {step, param_states}}` under paths that are
already ours, so params need no renaming. Legacy `checkpoint_N/checkpoint` is flax-msgpack: small
leaves inline (ext type 1 ndarray / 3 numpy scalar: `[shape, dtype, bytes]`), the rest as
TensorStore spec dicts whose kvstore path is relative to `checkpoint_N/`. A single msgpack file
with every array inline (T5X's testdata `test_t5_tiny.checkpoint_0`) is read too. Orbax `checkpoint_N/state/`
is an Orbax PyTree item. T5X stores no model config; `infer_config` reads it off the shapes.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Iterator, Optional

import numpy as np

from doa_jax import storage
from doa_jax.checkpoints.tensorstore_io import orbax_leaves, read_arrays, read_orbax_item, zarr_dir_spec
from doa_jax.checkpoints.tree import CheckpointError, check_params, flatten, float32_tree, unflatten
from doa_jax.model import T5Config

LEGACY_FILE = "checkpoint"
ORBAX_ITEM = "state"

_MSGPACK_ARRAY_EXT = (1, 3)  # flax.serialization: ndarray, numpy scalar


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _ext_hook(code: int, data: bytes) -> Any:
    import msgpack

    if code not in _MSGPACK_ARRAY_EXT:
        raise ValueError(f"unsupported msgpack ext type {code} (only arrays, types 1 and 3, are read)")
    shape, dtype, buffer = msgpack.unpackb(data, raw=False)
    return np.frombuffer(buffer, dtype=_dtype(dtype)).reshape(shape)


def _is_spec(node: Any) -> bool:
    return isinstance(node, dict) and "driver" in node and "kvstore" in node


def _leaves(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(node, dict) and not _is_spec(node):
        for key, value in node.items():
            yield from _leaves(value, path + (str(key),))
    else:
        yield path, node


def is_legacy_file(file: pathlib.Path) -> bool:
    """A flax-msgpack T5X checkpoint starts with a msgpack map (fixmap, map16 or map32)."""
    try:
        with file.open("rb") as f:      # a local file or an object (gs://)
            first = f.read(1)
    except OSError:
        return False
    return bool(first) and (0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF))


def single_file(directory: pathlib.Path) -> Optional[pathlib.Path]:
    """The one msgpack T5X checkpoint file named `*checkpoint*` directly in `directory` (as T5X's
    testdata `test_t5_tiny.checkpoint_0`, all arrays inline), or None; several are an error."""
    found = sorted(f for f in directory.iterdir()
                   if "checkpoint" in f.name and f.is_file() and is_legacy_file(f))
    if len(found) > 1:
        raise CheckpointError(f"{directory} holds {len(found)} T5X msgpack checkpoint files "
                              f"({', '.join(f.name for f in found)}); pass one of them")
    return found[0] if found else None


def _read_legacy(file: pathlib.Path, wanted: set[str]) -> dict[tuple[str, ...], np.ndarray]:
    """Arrays of a msgpack checkpoint file; TensorStore paths are relative to the file's directory."""
    inline, specs = _legacy_leaves(file, wanted)
    return {**inline, **read_arrays(specs, str(file.parent), ".".join)}


def _legacy_leaves(file: pathlib.Path, wanted: set[str]) -> tuple[dict, dict]:
    """(inline arrays, TensorStore specs) of the `wanted` trees of a msgpack checkpoint file."""
    import msgpack

    ckpt_dir = file.parent
    try:
        raw = msgpack.unpackb(file.read_bytes(), ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise CheckpointError(f"{file} is not a readable T5X msgpack checkpoint ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("optimizer"), dict) \
            or "target" not in raw["optimizer"]:
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{file}: expected T5X's {{'version', 'optimizer': {{'target', 'state'}}}}, "
                              f"found {keys}")
    inline, specs, missing = {}, {}, []
    for path, leaf in _leaves({k: v for k, v in raw["optimizer"].items() if k in wanted}):
        if not _is_spec(leaf):
            inline[path] = np.asarray(leaf)
            continue
        kvstore = leaf["kvstore"]
        relative = kvstore.get("path", "") if isinstance(kvstore, dict) else kvstore.removeprefix("file://")
        directory = pathlib.Path(relative) if os.path.isabs(relative) else ckpt_dir / relative
        if not directory.is_dir():
            missing.append(relative)
        specs[path] = zarr_dir_spec(directory)
    if missing:
        one = len(missing) == 1
        raise CheckpointError(f"T5X checkpoint {ckpt_dir}: array director{'y' if one else 'ies'} "
                              f"{', '.join(missing)} {'is' if one else 'are'} missing")
    return inline, specs


EMBEDDING = ("target", "token_embedder", "embedding")


def embedding_rows(path: str | os.PathLike) -> int:
    """Rows of a T5X checkpoint's token embedding (its vocab size), from array metadata alone."""
    import tensorstore as ts

    ckpt_dir = storage.resolved(path)
    file = legacy_file(ckpt_dir)
    if file is not None:
        inline, specs = _legacy_leaves(file, {"target"})
    else:
        item = ckpt_dir / ORBAX_ITEM if (ckpt_dir / ORBAX_ITEM / "_METADATA").exists() else ckpt_dir
        inline, specs = {}, orbax_leaves(item)
    if EMBEDDING in inline:
        return int(np.shape(inline[EMBEDDING])[0])
    if EMBEDDING not in specs:
        raise CheckpointError(f"T5X checkpoint {ckpt_dir} has no {'/'.join(EMBEDDING)}")
    try:
        return int(ts.open(specs[EMBEDDING], read=True).result().shape[0])
    except ValueError as e:
        raise CheckpointError(f"{ckpt_dir}: cannot open {'/'.join(EMBEDDING)}: {e}") from None


def legacy_file(path: pathlib.Path) -> Optional[pathlib.Path]:
    """The msgpack file of a legacy checkpoint given as the file, its `checkpoint_N/` or the
    directory holding a single-file checkpoint; None when `path` is none of these."""
    if path.is_file():
        return path if is_legacy_file(path) else None
    if (path / LEGACY_FILE).is_file() and is_legacy_file(path / LEGACY_FILE):
        return path / LEGACY_FILE
    return single_file(path) if path.is_dir() else None


def read_t5x(path: str | os.PathLike, include_state: bool = False) -> dict[str, Any]:
    """A T5X checkpoint (legacy `checkpoint_N/` or its msgpack file, or Orbax) as nested numpy arrays.

    Returns `{'target': params}`, plus `'state'` (step and optimizer slots) with `include_state`.
    The path is resolved first (relative, `..`, symlinks): TensorStore rejects `..` in file paths.
    """
    ckpt_dir = storage.resolved(path)
    wanted = {"target", "state"} if include_state else {"target"}
    file = legacy_file(ckpt_dir)
    if file is not None:
        flat = _read_legacy(file, wanted)
    else:
        item = ckpt_dir / ORBAX_ITEM if (ckpt_dir / ORBAX_ITEM / "_METADATA").exists() else ckpt_dir
        flat = read_orbax_item(item, keep=lambda p: p[0] in wanted)
    if not any(p[0] == "target" for p in flat):
        raise CheckpointError(f"T5X checkpoint {ckpt_dir} has no 'target' (params) tree")
    return unflatten({"/".join(p): a for p, a in flat.items()})


def infer_config(flat: dict[str, Any], source: str) -> T5Config:
    """The T5Config a T5X param tree was built with, from its shapes.

    Gated MLPs (`wi_0`, `wi_1`) are taken as T5 v1.1's gated GELU and a single `wi` as original
    T5's ReLU; a tree without `decoder/logits_dense` has tied, scaled logits.
    """
    need = ("token_embedder/embedding", "encoder/relpos_bias/rel_embedding",
            "encoder/layers_0/attention/query/kernel")
    absent = [p for p in need if p not in flat]
    if absent:
        raise CheckpointError(f"{source}: cannot infer the model config, missing {absent} "
                              "(is this an unscanned T5 checkpoint? else pass a config)")
    vocab, emb = np.shape(flat["token_embedder/embedding"])
    heads, buckets = np.shape(flat["encoder/relpos_bias/rel_embedding"])
    gated = "encoder/layers_0/mlp/wi_0/kernel" in flat
    wi = flat.get(f"encoder/layers_0/mlp/{'wi_0' if gated else 'wi'}/kernel")
    if wi is None:
        raise CheckpointError(f"{source}: cannot infer mlp_dim, no encoder/layers_0/mlp/wi or wi_0 kernel")

    def count(stack: str) -> int:
        return len({p.split("/")[1] for p in flat if p.startswith(f"{stack}/layers_")})

    return T5Config(vocab_size=int(vocab), emb_dim=int(emb), num_heads=int(heads),
                    head_dim=int(np.shape(flat["encoder/layers_0/attention/query/kernel"])[1]) // int(heads),
                    mlp_dim=int(np.shape(wi)[1]), num_encoder_layers=count("encoder"),
                    num_decoder_layers=count("decoder"),
                    mlp_activations=("gelu", "linear") if gated else ("relu",),
                    logits_via_embedding="decoder/logits_dense/kernel" not in flat,
                    relative_attention_num_buckets=int(buckets))


def load_t5x(path: str | os.PathLike, config: Optional[T5Config] = None) -> tuple[T5Config, dict]:
    """(config, float32 params) from a T5X checkpoint; the config is inferred when not given."""
    flat = flatten(read_t5x(path)["target"])
    config = config or infer_config(flat, os.fspath(path))
    check_params(config, flat, os.fspath(path))
    return config, float32_tree(flat)
