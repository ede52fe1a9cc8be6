#!/usr/bin/env python3
"""Memory of the optimizer update alone on scanned (stacked) params, from XLA's AOT analysis.

`python3 scripts/optimizer_memory.py [--sizes xxl] [--optimizers adafactor adamw] [--json OUT]`

For each size, optimizer and param dtype it compiles `update + write-back` for abstract inputs
(nothing is allocated, so XXL compiles on a laptop) twice: optax applied to the whole stacked
arrays (then `apply_updates`), and `optimizers.per_layer`'s fused `apply` (the trainer's Adafactor
update: a loop over the `layers` axis writing each layer back in place). Params and optimizer state are
donated, as in the train step; the gradients are an input. It prints `memory_analysis()`: the arguments and the temporaries XLA allocates on
top of them. On the CPU backend this is XLA CPU's buffer assignment; the GPU's differs in fusion,
but the whole-stack temporaries come from the algorithm (full-size float32 intermediates of every
stacked leaf at once), not from the backend.
"""
import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from doa_jax import optimizers
from doa_jax.bench.aot import memory_fields  # noqa: E402
from doa_jax.model import Transformer, config_for_size  # noqa: E402
from doa_jax.optimizers import OptimizerConfig  # noqa: E402

GIB = 2.0 ** 30


def abstract_params(size: str, param_dtype: str):
    """ShapeDtypeStructs of the scanned model's params in `param_dtype`."""
    cfg = config_for_size(size, scan_layers=True)
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), tokens, tokens))["params"])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(param_dtype)), shapes)


def measure(size: str, optimizer: str, param_dtype: str, per_layer: bool) -> dict:
    """One compiled update: its compile time and XLA's memory analysis (GiB)."""
    config = OptimizerConfig(name=optimizer)
    inner = optimizers.OPTIMIZERS[optimizer](config, config.make_schedule(1))
    tx = optimizers.per_layer(inner) if per_layer else inner   # the loop, for AdamW too (the trainer's
    # AdamW updates whole arrays: `optimizers.ELEMENTWISE`)
    params = abstract_params(size, param_dtype)
    state = jax.eval_shape(tx.init, params)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)

    def step(p, s, g, k):
        p, s, _ = optimizers.apply_gradients(tx, g, s, p, k)
        return p, s

    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params, key).compile()
    row = dict(size=size, optimizer=optimizer, param_dtype=param_dtype,
               update="per-layer loop" if per_layer else "whole stacked arrays",
               compile_s=time.perf_counter() - t, backend=jax.default_backend(),
               params_gib=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / GIB,
               state_gib=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / GIB)
    row.update(memory_fields(compiled))
    return row


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="scripts/optimizer_memory.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["xxl"])
    parser.add_argument("--optimizers", nargs="+", choices=sorted(optimizers.OPTIMIZERS), default=["adafactor"])
    parser.add_argument("--param-dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    print("| size | optimizer | params | update | params GiB | state GiB | temp GiB | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for opt in args.optimizers:
            for dtype in args.param_dtypes:
                for per_layer in (False, True):
                    r = measure(size, opt, dtype, per_layer)
                    rows.append(r)
                    print(f"| {size} | {opt} | {dtype} | {r['update']} | {r['params_gib']:.2f} | "
                          f"{r['state_gib']:.2f} | {r.get('temp_gib', float('nan')):.2f} | {r['compile_s']:.1f} |",
                          flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
