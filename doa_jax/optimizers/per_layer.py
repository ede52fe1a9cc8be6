"""The optimizer run once per layer of scanned (stacked) parameters.

Scanned layers (`T5Config.scan_layers`) hold each stack's params on a leading `layers` axis.
`per_layer` runs the optimizer once per layer over that axis (a `fori_loop` that slices a layer,
updates it and writes it back in place), so every layer keeps its own statistics (Adafactor's
parameter-scale and update clipping are per layer, exactly as T5X's per-layer names give them)
and the float32 temporaries are one layer's, not the whole stack's. `OptimizerConfig.build`
always wraps the optimizer in it; on per-layer (unscanned) params, and for element-wise AdamW
(whose whole-array update is the per-layer one), it is the plain optimizer with the same state.
The update is computed in float32 whatever the params' dtype; `rounding.apply_updates` writes it
back, stochastically rounded when params are bfloat16.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from doa_jax.model.scan import STACKED
from doa_jax.optimizers.rounding import apply_updates


class PerLayerState(NamedTuple):
    """State of `per_layer`: the inner state of the unstacked params, and one per stack."""

    rest: Any     # inner state over the params outside any `layers` stack
    stacks: tuple  # per stack (in `stack_paths` order): each layer's inner state, stacked on axis 0


def stack_paths(tree: Any, path: tuple = ()) -> list[tuple]:
    """Paths (dict keys) of every stacked `layers` entry, in sorted order."""
    if not isinstance(tree, Mapping):
        return []
    found = []
    for key in sorted(tree):
        if key == STACKED:
            found.append(path + (key,))
        else:
            found.extend(stack_paths(tree[key], path + (key,)))
    return found


def split_stacks(tree: Any, paths: list[tuple]) -> tuple[Any, list[Any]]:
    """`(tree without the stacks, [each stack as a one-branch tree keeping its full path])`."""
    if tree is None:
        return None, [None] * len(paths)

    def without(node, path):
        out = dict(node)
        if len(path) == 1:
            del out[path[0]]
        else:
            out[path[0]] = without(node[path[0]], path[1:])
        return out

    def branch(node, path):
        return {path[0]: node[path[0]] if len(path) == 1 else branch(node[path[0]], path[1:])}

    rest = tree
    for path in paths:
        rest = without(rest, path)
    return rest, [branch(tree, path) for path in paths]


def merge_stacks(rest: Any, branches: list[Any]) -> Any:
    """The inverse of `split_stacks`."""
    def put(node, branch):
        out = dict(node)
        for key, value in branch.items():
            out[key] = put(node.get(key, {}), value) if isinstance(value, Mapping) and key != STACKED else value
        return out

    for branch in branches:
        rest = put(rest, branch)
    return rest


def _f32(tree):
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                  tree)


def _layer(tree, i):
    return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False), tree)


def _put_layer(buffers, values, i):
    return jax.tree_util.tree_map(
        lambda b, v: jax.lax.dynamic_update_index_in_dim(b, v.astype(b.dtype), i, 0), buffers, values)


def sq_norm(tree) -> jax.Array:
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)),
               jnp.float32(0.0))


def _stack_update(inner, grads, state, params, scale):
    """One stack: update layer i from its own slices, writing updates over the gradient buffer."""
    def body(i, carry):
        buffer, st = carry     # buffer[j] holds the gradient for j >= i and the update for j < i
        p = None if params is None else _f32(_layer(params, i))
        u, s = inner.update(_scaled(_layer(buffer, i), scale), _layer(st, i), p)
        return _put_layer(buffer, u, i), _put_layer(st, s, i)

    return jax.lax.fori_loop(0, _num_layers(grads), body, (grads, state))


def apply_layer(inner, grads, state, params, scale, key):
    """One layer (or any subtree) updated from its own gradient and state: `(new params, new
    state, squared norm of the update)`, written back in the params' dtype (`apply_updates`)."""
    u, s = inner.update(_scaled(grads, scale), state, _f32(params))
    return apply_updates(params, u, key), s, sq_norm(u)


def _stack_apply(inner, grads, state, params, scale, key):
    """One stack: update layer i and write it into the (donated) params and state in place."""
    def body(i, carry):
        p_buf, st, sq = carry
        new, s, q = apply_layer(inner, _layer(grads, i), _layer(st, i), _layer(p_buf, i), scale,
                                None if key is None else jax.random.fold_in(key, i))
        return _put_layer(p_buf, new, i), _put_layer(st, s, i), sq + q

    return jax.lax.fori_loop(0, _num_layers(grads), body, (params, state, jnp.float32(0.0)))


def _num_layers(tree) -> int:
    return jax.tree_util.tree_leaves(tree)[0].shape[0]


def _scaled(grads, scale):
    return _f32(grads) if scale is None else jax.tree_util.tree_map(lambda g: g.astype(jnp.float32) * scale, grads)


class PerLayerTransformation(NamedTuple):
    """An optax `GradientTransformation` (`init`, `update`) with a fused `apply`:
    `apply(grads, state, params, key=None) -> (new params, new state, update norm)` updates and
    writes back each layer in place (no full-size update tree; what the trainer uses). `inner`
    and `clip_norm` are what `per_layer` was built from (the fused update, `doa_jax.fused_update`,
    applies `inner` itself, layer by layer, inside the backward pass)."""

    init: Callable
    update: Callable
    apply: Callable
    inner: optax.GradientTransformation
    clip_norm: Optional[float]


def per_layer(inner: optax.GradientTransformation, clip_norm: Optional[float] = None,
              loop: bool = True) -> PerLayerTransformation:
    """`inner` applied to each layer of every stacked `layers` entry separately (see module doc),
    after clipping the gradients' global norm to `clip_norm` (optax's `clip_by_global_norm`).

    Params without stacks (or `loop=False`: an element-wise `inner`, whose update of a whole
    stacked array is the per-layer one) get `inner`'s own state and update (in float32).
    """

    def init(params):
        paths = stack_paths(params) if loop else []
        if not paths:
            return inner.init(_f32(params))
        rest, branches = split_stacks(params, paths)
        return PerLayerState(inner.init(_f32(rest)),
                             tuple(jax.vmap(lambda b: inner.init(_f32(b)))(b) for b in branches))

    def clip_scale(grads):
        return None if clip_norm is None else clip_factor(jnp.sqrt(sq_norm(grads)), clip_norm)

    def update(grads, state, params=None):
        scale = clip_scale(grads)
        if not isinstance(state, PerLayerState):
            updates, state = inner.update(_scaled(grads, scale), state, None if params is None else _f32(params))
            return jax.tree_util.tree_map(lambda u, g: u.astype(g.dtype), updates, grads), state
        paths = stack_paths(grads)
        (g_rest, g_stacks), (p_rest, p_stacks) = split_stacks(grads, paths), split_stacks(params, paths)
        u_rest, s_rest = inner.update(_scaled(g_rest, scale), state.rest, None if p_rest is None else _f32(p_rest))
        u_rest = jax.tree_util.tree_map(lambda u, g: u.astype(g.dtype), u_rest, g_rest)
        done = [_stack_update(inner, g, s, p, scale) for g, s, p in zip(g_stacks, state.stacks, p_stacks)]
        return merge_stacks(u_rest, [u for u, _ in done]), PerLayerState(s_rest, tuple(s for _, s in done))

    def apply(grads, state, params, key=None):
        scale = clip_scale(grads)
        if not isinstance(state, PerLayerState):
            updates, state = inner.update(_scaled(grads, scale), state, _f32(params))
            return _apply_by_layer(params, updates, key), state, jnp.sqrt(sq_norm(updates))
        paths = stack_paths(grads)
        (g_rest, g_stacks), (p_rest, p_stacks) = split_stacks(grads, paths), split_stacks(params, paths)
        keys = update_keys(key, len(paths))
        new_rest, s_rest, sq = apply_layer(inner, g_rest, state.rest, p_rest, scale, keys[0])
        done = [_stack_apply(inner, g, s, p, scale, k)
                for g, s, p, k in zip(g_stacks, state.stacks, p_stacks, keys[1:])]
        new_params = merge_stacks(new_rest, [p for p, _, _ in done])
        sq = sq + sum(q for _, _, q in done)
        return new_params, PerLayerState(s_rest, tuple(s for _, s, _ in done)), jnp.sqrt(sq)

    return PerLayerTransformation(init, update, apply, inner, clip_norm)


def _apply_by_layer(params, updates, key):
    """`apply_updates` with the rounding keys a per-layer update would use (`update_keys`: layer i
    of stack j folds i into the stack's key), so a whole-tree update of stacked params (AdamW's)
    rounds as the fused update (`doa_jax.fused_update`), which updates one layer at a time."""
    paths = stack_paths(params)
    if key is None or not paths:
        return apply_updates(params, updates, key)
    keys = update_keys(key, len(paths))
    (p_rest, p_stacks), (u_rest, u_stacks) = split_stacks(params, paths), split_stacks(updates, paths)
    layer_keys = lambda k, p: jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(_num_layers(p)))  # noqa: E731
    stacks = [jax.vmap(apply_updates)(p, u, layer_keys(k, p)) for p, u, k in zip(p_stacks, u_stacks, keys[1:])]
    return merge_stacks(apply_updates(p_rest, u_rest, keys[0]), stacks)


def clip_factor(norm, clip_norm: float):
    """What gradients with global norm `norm` are multiplied by to clip them to `clip_norm`."""
    return jnp.where(norm < clip_norm, 1.0, clip_norm / norm)


def update_keys(key, num_stacks: int) -> list:
    """The rounding keys of one update: the unstacked params' first, then one per stack (its layer
    i folds in i); all None without a key."""
    return [None] * (num_stacks + 1) if key is None else list(jax.random.split(key, num_stacks + 1))


def apply_gradients(tx, grads, state, params, key=None):
    """`(new params, new state, update norm)`: `tx.apply` when `tx` has one (`per_layer`), else
    optax's `update` followed by `apply_updates`."""
    if isinstance(tx, PerLayerTransformation):
        return tx.apply(grads, state, params, key)
    updates, state = tx.update(grads, state, params)
    return apply_updates(params, updates, key), state, jnp.sqrt(sq_norm(updates))
