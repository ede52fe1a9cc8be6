"""A stack of scanned layers with its own backward pass: a forward `lax.scan` that keeps each
layer's `vjp` residuals on a tape, and a backward loop over the layers in reverse.

Why not let JAX transpose the scan (issue 27)? The transposed scan writes each layer's parameter
gradient into a stacked buffer that it initialises with zeros before its loop. Both stacks'
buffers have the same shapes (the encoder's and the decoder's MLP and attention kernels), so the
lowered program holds one zero broadcast per shape, copied for each stack's loop, and XLA fuses
the broadcast with its copies: the encoder's gradient buffers (17 GiB at XXL in float32) are
allocated before the decoder's backward loop starts and stay alive through it, beside the
decoder's gradients and every layer's saved activations. `apply_stack` writes layer i's gradient
into a buffer that starts as a copy of the stack's parameters (every slice is overwritten): a
copy XLA cannot share between the stacks, and (as compiled for one H100, `doa aot`) makes just
before the backward loop that fills it. The copy costs a read and a write of the stack's float32
params per step, where the zero fill cost a write.

The TPU compiler schedules the other way round: JAX's transposed scan, with each attention bias
computed once outside the loop (`scan_stack`), needs less there than this loop (notes/aot.md).
`T5Config.scan_backward` chooses ('auto': per platform).

Pure math: the layer is any function `layer(p, x, consts, fixed, key) -> x` of one layer's
params `p`, its input `x`, loop-invariant inputs with a gradient `consts` (position biases, the
encoder output), inputs without one `fixed` (masks), and a dropout key (None: deterministic).
`doa_jax.fused_update` walks the same tape with the optimizer inside the loop.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

Layer = Callable[[Any, Any, tuple, tuple, Optional[jax.Array]], Any]


class Tape(NamedTuple):
    """What the forward scan of one stack left for its backward pass: each layer's input, the
    stacked residuals, and how to rebuild layer i's `vjp` (`spec`: per residual, where it is)."""

    inputs: Any          # [L, ...] each layer's input
    saved: tuple         # [L, ...] per stacked residual
    spec: dict           # treedef and sources, filled while tracing the forward


def index(tree: Any, i) -> Any:
    """Layer i of every leaf with a layers axis (scalars, e.g. step counts, as they are)."""
    return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False) if x.ndim else x,
                                  tree)


def layer_key(key: Optional[jax.Array], i) -> Optional[jax.Array]:
    return None if key is None else jax.random.fold_in(key, i)


def forward(layer: Layer, stack: Any, x: Any, consts: tuple, fixed: tuple,
            key: Optional[jax.Array]) -> tuple[Any, Tape]:
    """`lax.scan` of `layer(p, x, consts, fixed, key_i)` over the stack (differentiated in `p`, `x`
    and `consts`); the tape. A residual that is the layer's own parameters, its input or a
    loop-invariant input is not stacked: `layer_vjp` takes it from where it already is."""
    spec: dict = {}

    def body(carry, xs):
        p, i = xs
        out, vjp = jax.vjp(lambda p_, x_, c_: layer(p_, x_, c_, fixed, layer_key(key, i)), p, carry, consts)
        leaves, treedef = jax.tree_util.tree_flatten(vjp)
        known = {id(v): ("p", n) for n, v in enumerate(jax.tree_util.tree_leaves(p))}
        known.update({id(v): ("c", n) for n, v in enumerate(jax.tree_util.tree_leaves(consts))})
        known.update({id(v): ("f", n) for n, v in enumerate(jax.tree_util.tree_leaves(fixed))})
        known[id(carry)] = ("x", 0)
        sources, saved = [], []
        for leaf in leaves:
            if id(leaf) in known:
                sources.append(known[id(leaf)])
            elif isinstance(leaf, jax.core.Tracer):
                sources.append(("s", len(saved)))
                saved.append(leaf)
            else:
                sources.append(("k", leaf))      # a constant of the trace
        spec.update(treedef=treedef, sources=sources)
        return out, (carry, tuple(saved))

    out, (inputs, saved) = jax.lax.scan(body, x, (stack, jnp.arange(num_layers(stack))))
    return out, Tape(inputs, saved, spec)


def layer_vjp(tape: Tape, i, p: Any, consts: tuple, fixed: tuple) -> Callable:
    """Layer i's `vjp` from the tape, with its parameters `p`."""
    pools = {"p": jax.tree_util.tree_leaves(p), "c": jax.tree_util.tree_leaves(consts),
             "f": jax.tree_util.tree_leaves(fixed),
             "x": [index(tape.inputs, i)], "s": [index(s, i) for s in tape.saved]}
    leaves = [value if kind == "k" else pools[kind][value] for kind, value in tape.spec["sources"]]
    return jax.tree_util.tree_unflatten(tape.spec["treedef"], leaves)


def num_layers(stack: Any) -> int:
    return jax.tree_util.tree_leaves(stack)[0].shape[0]


# ----------------------------------------------------------------------------- the differentiable stack

def scan_stack(layer: Layer, stack: Any, x: Any, consts: tuple, fixed: tuple, key: Optional[jax.Array]) -> Any:
    """The stack's output: `layer` applied with each layer's params in turn, as one `lax.scan` that JAX
    differentiates itself (a transposed scan: what the TPU compiler schedules best)."""
    def body(carry, xs):
        p, i = xs
        return layer(p, carry, consts, fixed, layer_key(key, i)), None

    return jax.lax.scan(body, x, (stack, jnp.arange(num_layers(stack))))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def apply_stack(layer: Layer, stack: Any, x: Any, consts: tuple, fixed: tuple, key: Optional[jax.Array]) -> Any:
    """`scan_stack`'s output, differentiated by this module's own backward loop (see the module doc)."""
    return scan_stack(layer, stack, x, consts, fixed, key)


def _apply_stack_fwd(layer, stack, x, consts, fixed, key):
    out, tape = forward(layer, stack, x, consts, fixed, key)
    return out, (tape.inputs, tape.saved, _Spec(tape.spec), stack, consts, fixed)


def _apply_stack_bwd(layer, res, dy):
    inputs, saved, spec, stack, consts, fixed = res
    tape = Tape(inputs, saved, spec.value)
    # Loop-invariant cotangents are summed in their own dtype, as a transposed scan sums them.
    dconsts = jax.tree_util.tree_map(jnp.zeros_like, consts)

    def body(k, carry):
        i = num_layers(stack) - 1 - k
        dy, dc, grads = carry
        dp, dx, dcon = layer_vjp(tape, i, index(stack, i), consts, fixed)(dy)
        grads = jax.tree_util.tree_map(
            lambda g, d: jax.lax.dynamic_update_index_in_dim(g, d.astype(g.dtype), i, 0), grads, dp)
        return dx, jax.tree_util.tree_map(jnp.add, dc, dcon), grads

    # The gradient buffer starts as the params: every slice is overwritten (see the module doc).
    dx, dconsts, grads = jax.lax.fori_loop(0, num_layers(stack), body, (dy, dconsts, stack))
    return grads, dx, dconsts, jax.tree_util.tree_map(jnp.zeros_like, fixed), None


# ----------------------------------------------------------------------------- which backward pass

# The backward pass each platform's compiler needs least memory for (notes/aot.md); every other
# platform: 'stack'. `T5Config.scan_backward='auto'` follows this table.
PLATFORM_BACKWARD = {"tpu": "autodiff"}


def by_backward(backward: str, branches: Mapping[str, Callable], *args) -> Any:
    """`branches[backward](*args)` (`T5Config.scan_backward`: 'stack' or 'autodiff'); for 'auto', the
    branch of the platform the program is lowered for (`PLATFORM_BACKWARD`), chosen by
    `jax.lax.platform_dependent`, so a program compiled ahead of time for a TPU gets the TPU's. One
    choice for everything that goes with the backward pass (the stack, the train step's norm)."""
    if backward != "auto":
        return branches[backward](*args)
    per_platform = {platform: branches[name] for platform, name in PLATFORM_BACKWARD.items()}
    return jax.lax.platform_dependent(*args, default=branches["stack"], **per_platform)


class _Spec:
    """The tape's treedef and sources, carried through the residuals as a static (non-array) leaf."""

    def __init__(self, value: dict):
        self.value = value


jax.tree_util.register_pytree_node(_Spec, lambda s: ((), s.value), lambda value, _: _Spec(value))
apply_stack.defvjp(_apply_stack_fwd, _apply_stack_bwd)

__all__ = ["PLATFORM_BACKWARD", "Tape", "apply_stack", "by_backward", "forward", "index", "layer_key",
           "layer_vjp", "num_layers", "scan_stack"]
