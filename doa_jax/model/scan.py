"""Param layout conversion between T5X's per-layer names and the scanned model's stacked layers.

Unscanned (T5X, checkpoints): `encoder/layers_0/attention/query/kernel [d, H*D]`, `layers_1`, ...
Scanned (`T5Config.scan_layers`): `encoder/layers/attention/query/kernel [num_layers, d, H*D]`.
`stack_layers` and `unstack_layers` are exact inverses (no arithmetic, only stacking and
indexing), so checkpoints keep T5X's names whatever the model's layout. Plain tree code: works
on numpy or jax arrays, keeps the array kind it is given.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

LAYER = re.compile(r"^layers_(\d+)$")
STACKED = "layers"


def _stack(leaves: list) -> Any:
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)
    import jax.numpy as jnp

    return jnp.stack(leaves)


def _stack_trees(trees: list[Any], where: str) -> Any:
    first = trees[0]
    if not isinstance(first, Mapping):
        return _stack(trees)
    for i, tree in enumerate(trees[1:], 1):
        if not isinstance(tree, Mapping) or set(tree) != set(first):
            raise ValueError(f"{where}/layers_{i} does not hold the same parameters as {where}/layers_0: "
                             f"{sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__} vs "
                             f"{sorted(first)}")
    return {k: _stack_trees([t[k] for t in trees], where) for k in first}


def stack_layers(params: Mapping[str, Any], _where: str = "") -> dict[str, Any]:
    """Per-layer params (`.../layers_i/...`) -> the scanned layout (`.../layers/...`, leading axis i)."""
    out: dict[str, Any] = {}
    layers: dict[int, Any] = {}
    for key, value in params.items():
        m = LAYER.match(key)
        if m:
            layers[int(m.group(1))] = value
        elif key == STACKED:
            raise ValueError(f"{_where or '/'}: already has a stacked '{STACKED}' entry; params are "
                             "scanned already")
        else:
            out[key] = stack_layers(value, f"{_where}/{key}") if isinstance(value, Mapping) else value
    if layers:
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"{_where or '/'}: layer indices {sorted(layers)} are not 0..{len(layers) - 1}")
        out[STACKED] = _stack_trees([layers[i] for i in range(len(layers))], _where)
    return out


def _index(tree: Any, i: int) -> Any:
    if isinstance(tree, Mapping):
        return {k: _index(v, i) for k, v in tree.items()}
    return tree[i]


def _num_layers(tree: Any, where: str) -> int:
    sizes = set()

    def visit(node):
        if isinstance(node, Mapping):
            for v in node.values():
                visit(v)
        else:
            shape = np.shape(node)
            sizes.add(shape[0] if shape else None)

    visit(tree)
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"{where}/{STACKED}: stacked params must share one leading (layers) dimension, "
                         f"found {sorted(sizes, key=str)}")
    return sizes.pop()


def unstack_layers(params: Mapping[str, Any], _where: str = "") -> dict[str, Any]:
    """The scanned layout (`.../layers/...`) -> per-layer params (`.../layers_0/...`, `layers_1`, ...)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key == STACKED:
            n = _num_layers(value, _where)
            out.update({f"layers_{i}": _index(value, i) for i in range(n)})
        else:
            out[key] = unstack_layers(value, f"{_where}/{key}") if isinstance(value, Mapping) else value
    return out


def is_stacked(params: Mapping[str, Any]) -> bool:
    """True when any stack holds its layers in the scanned layout."""
    return any(k == STACKED or (isinstance(v, Mapping) and is_stacked(v)) for k, v in params.items())


__all__ = ["is_stacked", "stack_layers", "unstack_layers"]
