"""Reading arrays that TensorStore wrote: zarr directories (T5X legacy) and Orbax PyTree items.

An Orbax PyTree item (`_METADATA` + an OCDBT key-value store, or plain zarr directories) keeps one
zarr array per leaf, keyed by the tree path joined with '.'. Reading it here, rather than through
Orbax's restore, returns host numpy arrays whatever mesh wrote them, reads only the leaves asked
for, and lets a missing leaf be reported by name.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Hashable, Mapping, Optional

import numpy as np

from doa_jax import storage
from doa_jax.checkpoints.tree import CheckpointError

Path = tuple[str, ...]


def read_arrays(specs: Mapping[Hashable, dict], source: str,
                describe: Callable[[Any], str] = str) -> dict[Hashable, np.ndarray]:
    """Opens and reads every TensorStore spec concurrently; keys are kept."""
    import tensorstore as ts

    opened = {key: ts.open(spec, read=True) for key, spec in specs.items()}
    reads = {}
    for key, future in opened.items():
        try:
            reads[key] = future.result().read()
        except ValueError as e:
            raise CheckpointError(f"{source}: cannot open array {describe(key)}: {e}") from None
    arrays = {}
    for key, future in reads.items():
        try:
            arrays[key] = np.asarray(future.result())
        except ValueError as e:
            raise CheckpointError(f"{source}: cannot read array {describe(key)}: {e}") from None
    return arrays


def kvstore_url(path: str | os.PathLike) -> str:
    """A TensorStore kvstore URL for a local path (`file://`) or a URL TensorStore reads (gs://)."""
    return os.fspath(path) if storage.is_url(path) else f"file://{os.fspath(path)}"


def zarr_dir_spec(directory: str | os.PathLike) -> dict:
    return {"driver": "zarr", "kvstore": kvstore_url(directory)}


def orbax_leaves(item_dir: str | os.PathLike) -> dict[Path, dict]:
    """{tree path: TensorStore spec} for the array leaves of an Orbax PyTree item directory."""
    item_dir = storage.resolved(item_dir)
    metadata_file = item_dir / "_METADATA"
    try:
        metadata = json.loads(metadata_file.read_text())
        tree = metadata["tree_metadata"]
    except FileNotFoundError:
        raise CheckpointError(f"{item_dir}: no _METADATA (not an Orbax PyTree checkpoint item)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{metadata_file} is corrupt ({e})") from None
    driver = "zarr3" if metadata.get("use_zarr3") else "zarr"
    leaves = {}
    for entry in tree.values():
        value = entry.get("value_metadata", {})
        if value.get("skip_deserialize"):
            continue
        path = tuple(str(k["key"]) for k in entry["key_metadata"])
        name = ".".join(path)
        if metadata.get("use_ocdbt"):
            kvstore = {"driver": "ocdbt", "base": kvstore_url(item_dir), "path": name}
        else:
            kvstore = kvstore_url(item_dir / name)
        leaves[path] = {"driver": driver, "kvstore": kvstore}
    return leaves


def read_orbax_item(item_dir: str | os.PathLike,
                    keep: Optional[Callable[[Path], bool]] = None) -> dict[Path, np.ndarray]:
    """The array leaves of an Orbax PyTree item (those `keep` accepts), as numpy."""
    leaves = {p: s for p, s in orbax_leaves(item_dir).items() if keep is None or keep(p)}
    return read_arrays(leaves, os.fspath(item_dir), ".".join)
