"""Parameters stored in bfloat16: the cast, and writing float32 updates back with stochastic rounding."""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp


def stochastic_round(x: jax.Array, dtype: Any, key: jax.Array) -> jax.Array:
    """float32 `x` rounded to bfloat16 `dtype`, up or down with probability by distance: unbiased.

    Adds 16 random low bits to the float32 bit pattern and truncates them; sign-magnitude bits make
    this round the magnitude, so it is unbiased for either sign.
    """
    if jnp.dtype(dtype) != jnp.bfloat16:
        raise ValueError(f"stochastic rounding is to bfloat16, not {jnp.dtype(dtype).name}")
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


PARAM_DTYPES = ("float32", "bfloat16")


def cast_params(tree: Any, dtype: str) -> Any:
    """Floating leaves of `tree` (arrays or ShapeDtypeStructs) in `dtype` ('float32' or 'bfloat16')."""
    if dtype not in PARAM_DTYPES:
        raise ValueError(f"param_dtype must be one of {PARAM_DTYPES}, got {dtype!r}")
    target = jnp.dtype(dtype)

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == target:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, target, sharding=x.sharding)
        return x.astype(target)

    return jax.tree_util.tree_map(cast, tree)


def apply_updates(params: Any, updates: Any, key: Optional[jax.Array] = None) -> Any:
    """`params + updates`, added in float32 and written back in each param's dtype.

    bfloat16 params are stochastically rounded with `key` (a fresh key per step): an update
    smaller than half a bf16 ulp of its weight then still moves it on average, where rounding to
    nearest would drop it. Without a key (or for float32 params) rounding is to nearest.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    upd = treedef.flatten_up_to(updates)
    out = []
    for n, (p, u) in enumerate(zip(leaves, upd)):
        total = p.astype(jnp.float32) + u.astype(jnp.float32)
        if p.dtype == jnp.bfloat16 and key is not None:
            out.append(stochastic_round(total, p.dtype, jax.random.fold_in(key, n)))
        else:
            out.append(total.astype(p.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
