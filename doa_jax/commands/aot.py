"""`doa aot --target T`: compile a run's real programs for a TPU slice or NVIDIA GPUs this host lacks.

Two ways in. A run's own gin (`--gin_file runs/experiment.gin --gin_file experiments/X.gin
[--gin.X=V]`, as `doa run` takes them) compiles that cell's programs with its models, lengths,
batch, protocol and mesh (no data file is read; give MODEL_VOCAB_SIZE and no vocabulary is read
either). Or what-if flags: `--size xxl --phase train --batch 8 --lengths 512,128 --optimizer
adafactor --param-dtype bfloat16 --remat full --scan --fused-update --mesh 1,8 ...` (defaults: the
project's).

Per program it prints XLA's per-device memory (arguments, outputs, aliased, temporaries) and the
peak, the state other programs of the phase keep on the devices meanwhile, the target's usable
memory per device, whether it fits and by how much, compile seconds, analytic FLOPs and a roofline
lower bound on the step time (a bound, not a prediction). The TPU compiler refuses what does not fit
(its message is parsed into "needs X GiB of Y"); the GPU compiler does not, so the comparison with
the device's capacity is this tool's. `--search` tries what would fit (remat, the fused update, microbatches,
batch, parameter dtype and optimizer, FSDP, mesh, then the next larger slice) and lists it, fitting
settings first, cheapest first. `--json` prints one object. Needs the `aot` extra
(`pip install -c constraints.txt -e ".[aot]"`).
"""
from __future__ import annotations

import argparse
import json
import sys

from doa_jax.model.config import DECODE_CROSS_KV, SCAN_BACKWARD

PHASE_CHOICES = ("train", "decode", "score", "distill", "all")


def int_pair(text: str) -> tuple[int, int]:
    """argparse type of `A,B` (two integers): lengths, mesh axes."""
    parts = text.split(",")
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers A,B, got {text!r}") from None
    return a, b


def register(subparsers) -> None:
    from doa_jax.bench.recipes import Recipe
    from doa_jax.gin_flags import add_gin_flags

    d = Recipe()
    p = subparsers.add_parser("aot", help="compile a run's programs for a TPU slice or GPU you do not have: "
                                          "memory per device, fits, what would", description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="v4-8..., v5e-1..256, v5p-8..., v6e-1..256, a100-40, a100-80, "
                                                   "h100, h200, b200 (xN: N GPUs, e.g. h100x8)")
    p.add_argument("--phase", choices=PHASE_CHOICES, default=None,
                   help="which programs (default: all of a gin run's; 'train' for what-if flags)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--search", action="store_true", help="for programs that do not fit: what would")
    p.add_argument("--max-compiles", type=int, default=24, help="--search: compiles at most (default 24)")
    add_gin_flags(p, required=False)
    w = p.add_argument_group("what-if flags (without --gin_file)")
    w.add_argument("--size", default=d.size, help=f"model size (default {d.size})")
    w.add_argument("--student", default=d.student, help=f"distill: the student size (default {d.student})")
    w.add_argument("--batch", type=int, default=d.batch, help=f"global batch (default {d.batch})")
    w.add_argument("--lengths", type=int_pair, default=d.lengths, metavar="IN,OUT",
                   help=f"input and target (or decode) tokens (default {d.lengths[0]},{d.lengths[1]})")
    w.add_argument("--optimizer", default=d.optimizer, help=f"adafactor | adamw (default {d.optimizer})")
    w.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=d.param_dtype,
                   help=f"train-state parameters (default {d.param_dtype})")
    w.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype,
                   help=f"activations (default {d.dtype})")
    w.add_argument("--remat", choices=("none", "full", "dots"), default=d.remat, help=f"(default {d.remat})")
    w.add_argument("--scan", action=argparse.BooleanOptionalAction, default=d.scan,
                   help="scan over layers (default: unrolled, as T5Config)")
    w.add_argument("--cross-kv", choices=DECODE_CROSS_KV, default=d.cross_kv,
                   help="decode: keep every layer's cross-attention K/V in the cache, or recompute them from the "
                        f"encoder output at each step as T5X does (T5Config.decode_cross_kv; default {d.cross_kv})")
    w.add_argument("--scan-backward", choices=SCAN_BACKWARD, default=d.scan_backward,
                   help="scanned layers' backward pass: the stack's own loop, JAX's transposed scan, or per platform "
                        f"(T5Config.scan_backward; default {d.scan_backward}: TPUs autodiff, GPUs stack)")
    w.add_argument("--mesh", type=int_pair, default=d.mesh, metavar="DATA,MODEL",
                   help="mesh axes (default -1,1: every device on data)")
    w.add_argument("--fsdp", action="store_true", help="shard parameters' embed axis over data too")
    w.add_argument("--microbatches", type=int, default=d.microbatches, help="gradient accumulation steps")
    w.add_argument("--fused-update", action="store_true",
                   help="the optimizer inside the backward pass, layer by layer (needs --scan; doa_jax/fused_update.py)")
    w.add_argument("--clip", type=float, default=d.grad_clip_norm, metavar="NORM",
                   help="clip the global gradient norm (the paper's 1.0; with --fused-update: a second backward pass)")
    w.add_argument("--vocab-size", type=int, default=d.vocab_size, help=f"embedding rows (default {d.vocab_size})")
    w.add_argument("--topk", type=int, default=d.topk, help=f"score: logits kept per position (default {d.topk})")
    p.set_defaults(func=run)


def _programs(args):
    """The programs to compile: a gin run's cell (its phases) or the what-if recipe."""
    from doa_jax.bench.recipes import Recipe, recipe_programs

    if not args.gin_file:
        recipe = Recipe(size=args.size, phase=args.phase or "train", batch=args.batch, lengths=tuple(args.lengths),
                        optimizer=args.optimizer, param_dtype=args.param_dtype, remat=args.remat, scan=args.scan,
                        cross_kv=args.cross_kv, scan_backward=args.scan_backward,
                        mesh=tuple(args.mesh), fsdp=args.fsdp, microbatches=args.microbatches, dtype=args.dtype,
                        fused_update=args.fused_update, grad_clip_norm=args.clip,
                        student=args.student, vocab_size=args.vocab_size, topk=args.topk)
        return recipe_programs(recipe), "what-if flags"
    from doa_jax import configurables, gin_utils
    from doa_jax.experiment import programs

    configurables.register()
    gin_utils.parse_flags(args)
    cell = programs.resolved(gin_utils.macro("CELL"))
    chosen = programs.cell_programs(cell, programs.task_lengths(cell))
    if args.phase not in (None, "all"):
        have = sorted({p.phase for p in chosen})
        chosen = [p for p in chosen if p.phase == args.phase]
        if not chosen:
            raise ValueError(f"--phase {args.phase}: the cell ({cell.describe()}, strategy {cell.strategy}) has no "
                             f"such phase; it has {', '.join(have)}")
    return chosen, f"cell {cell.describe()} ({cell.protocol} protocol)"


def run(args) -> int:
    from doa_jax.bench import aot, search, targets
    from doa_jax.bench.table import aot_table, search_table

    target = targets.get(args.target)
    problem = targets.aot_available(target.platform)
    if problem:
        raise ValueError(problem)
    chosen, source = _programs(args)
    devices = target.devices()
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if args.json else \
        (lambda text: print(text, flush=True))
    say(f"compiling {len(chosen)} program(s) of the {source} for {target.name}: {len(devices)} x "
        f"{devices[0].device_kind}, {target.capacity_gib:.2f} GiB usable per device ({target.capacity_note})")
    what_if = not args.gin_file
    if what_if:
        for program in chosen:
            aot.Layout(program, devices)   # the flags' mesh or batch does not divide: one line, before any compile
    rows = aot.compile_all(chosen, target, errors_as_rows=not what_if, on_row=lambda r: say(
        f"  {r['program']}: {aot.verdict(r)}" + (f" ({r['compile_s']:.1f} s)" if "compile_s" in r else "")))
    found = search.search(chosen, rows, target, max_compiles=args.max_compiles, say=say) if args.search else None
    report = {"target": target.name, "devices": len(devices), "device_kind": devices[0].device_kind,
              "capacity_gib": target.capacity_gib, "capacity_note": target.capacity_note, "source": source,
              "programs": rows}
    if found is not None:
        report.update(tried=found["tried"], suggestions=found["suggestions"])
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(aot_table(rows))
    if found is not None:
        print(search_table(found))
    print("bound_s: a roofline lower bound on one call (analytic FLOPs at the datasheet peak, or the bytes each "
          "device must move at its HBM bandwidth), never a prediction")
    return 0


def check_cells(cells, target_name: str, say=print) -> bool:
    """`doa run`/`doa sweep --dry_run --target T`: every phase of each cell compiled for `target_name`
    (each distinct program once), its per-device peak and whether it fits, one line per program and
    a line per cell; True when every phase of every cell fits. Nothing runs, nothing is read but the
    task cards (vocab sizes resolved as `doa run` resolves them)."""
    from doa_jax.bench import aot, targets
    from doa_jax.experiment import programs

    target = targets.get(target_name)
    problem = targets.aot_available(target.platform)
    if problem:
        raise ValueError(problem)
    per_cell = [programs.cell_programs(programs.resolved(c), programs.task_lengths(c)) for c in cells]
    unique = list({repr(p): p for ps in per_cell for p in ps}.values())
    say(f"compiling {len(unique)} distinct program(s) of {len(cells)} cell(s) for {target.name} "
        f"({target.capacity_gib:.2f} GiB usable per device: {target.capacity_note})")
    rows = aot.compile_all(unique, target, errors_as_rows=True, on_row=lambda r: say(
        f"  {r['program']}: {aot.verdict(r)}"))
    by_program = {repr(p): r for p, r in zip(unique, rows)}
    every = True
    for cell, ps in zip(cells, per_cell):
        bad = [f"{p.name} ({aot.verdict(by_program[repr(p)])})" for p in ps if not by_program[repr(p)].get("fits")]
        every = every and not bad
        say(f"cell {cell.key()} {cell.describe()}: " + (f"every phase fits ({len(ps)} programs)" if not bad else
            "does NOT fit: " + "; ".join(bad) + f" -- try `doa aot --target {target.name} --search` on its gin"))
    return every
