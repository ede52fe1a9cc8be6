"""The param tree every checkpoint reader returns, and the check that a loaded tree fits a config.

Trees are T5X's (`encoder/layers_0/attention/query/kernel`, ...), flattened with '/' while being
converted. `check_params` compares a flat tree with the shapes `Transformer(config).init` would give
(from `jax.eval_shape`, so nothing is allocated) and names every missing, unexpected and
mis-shaped parameter in one error.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from doa_jax.model import T5Config


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit its config; the message names file and parameter."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': leaf} -> nested dict."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


@functools.lru_cache(maxsize=16)
def expected_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
    """{path: shape} of the params `Transformer(config).init` creates (abstractly, no memory), in the
    checkpoint layout: T5X's per-layer names, also for a config with `scan_layers=True`."""
    if config.scan_layers:
        return expected_shapes(config.replace(scan_layers=False))
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from doa_jax.model import Transformer

    tokens = jnp.ones((1, 1), jnp.int32)
    abstract = jax.eval_shape(lambda: Transformer(config).init(jax.random.PRNGKey(0), tokens, tokens))
    return {path: tuple(leaf.shape) for path, leaf in flatten(nn.meta.unbox(abstract["params"])).items()}


def _names(paths: Iterable[str], describe: Callable[[str], str]) -> str:
    return ", ".join(describe(p) for p in sorted(paths))


def check_params(config: T5Config, flat: Mapping[str, Any], source: str,
                 describe: Optional[Callable[[str], str]] = None) -> None:
    """Raises `CheckpointError` unless `flat` has exactly the paths and shapes `config` needs.

    `describe(path)` renders a path in the message (e.g. adds the HF tensor name it came from).
    """
    describe = describe or (lambda p: p)
    expected = expected_shapes(config)
    missing = set(expected) - set(flat)
    unexpected = set(flat) - set(expected)
    misshaped = {p for p in set(expected) & set(flat) if tuple(np.shape(flat[p])) != expected[p]}
    if not (missing or unexpected or misshaped):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_names(missing, describe)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_names(unexpected, describe)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped: " + ", ".join(
            f"{describe(p)} expected {expected[p]} found {tuple(np.shape(flat[p]))}"
            for p in sorted(misshaped)))
    raise CheckpointError(f"{source}: parameters do not fit the config (emb_dim={config.emb_dim}, "
                          f"num_heads={config.num_heads}, head_dim={config.head_dim}, "
                          f"mlp_dim={config.mlp_dim}, layers={config.num_encoder_layers}+"
                          f"{config.num_decoder_layers}, vocab={config.vocab_size}, "
                          f"mlp_activations={list(config.mlp_activations)}, "
                          f"logits_via_embedding={config.logits_via_embedding}): " + "; ".join(problems))


def float32_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Flat tree of arrays -> nested dict of float32 numpy arrays."""
    return unflatten({p: np.asarray(a, dtype=np.float32) for p, a in flat.items()})
