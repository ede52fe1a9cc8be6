#!/usr/bin/env python3
"""Issue 27's table: T5 v1.1 XXL fine-tuning (batch 8, lengths 512/128, bf16 activations) compiled with
`doa aot` for one H100, one H200 and a v5e-8, per recipe: unrolled or scanned layers, each REMAT
policy, float32 or bfloat16 parameters, the plain step or the fused per-layer update (the optimizer
inside the backward pass, doa_jax/fused_update.py), with or without the paper's gradient clipping.

    python3 scripts/aot_fused.py --out bench_out/aot_fused.json             # compile (an hour or more)
    python3 scripts/aot_fused.py --show bench_out/aot_fused.json            # the table of notes/aot.md
    python3 scripts/aot_fused.py --size base --targets h100 --recipes unrolled scan scan_fused

Every case is `doa aot --json` with what-if flags in a fresh process, one at a time; rows are
written after each. One GPU holds the whole model (mesh 1,1); on a v5e-8 (16 GB per chip) float32
XXL needs the model axis (mesh 1,8). Requires the `aot` extra.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

MESH = {"h100": "1,1", "h200": "1,1", "v5e-8": "1,8"}
RECIPES = {   # name -> (row label, doa aot flags)
    "unrolled": ("unscanned, no remat", ["--remat", "none"]),
    "scan": ("scanned, no remat", ["--scan", "--remat", "none"]),
    "scan_dots": ("scanned, remat dots", ["--scan", "--remat", "dots"]),
    "scan_full": ("scanned, full remat", ["--scan", "--remat", "full"]),
    "scan_full_bf16": ("scanned, full remat, bf16 params + stochastic rounding",
                       ["--scan", "--remat", "full", "--param-dtype", "bfloat16"]),
    "scan_fused": ("scanned, no remat, **fused update**", ["--scan", "--remat", "none", "--fused-update"]),
    "scan_dots_fused": ("scanned, remat dots, **fused update**", ["--scan", "--remat", "dots", "--fused-update"]),
    "scan_full_fused": ("scanned, full remat, **fused update**", ["--scan", "--remat", "full", "--fused-update"]),
    "scan_full_fused_clip": ("scanned, full remat, **fused update**, clipping 1.0 (two backward passes)",
                             ["--scan", "--remat", "full", "--fused-update", "--clip", "1.0"]),
    "scan_full_fused_adamw_clip": ("scanned, full remat, **fused update**, AdamW, clipping 1.0 (the paper's optimizer)",
                                   ["--scan", "--remat", "full", "--fused-update", "--clip", "1.0",
                                    "--optimizer", "adamw"]),
}


def run_case(size: str, target: str, recipe: str) -> dict:
    label, flags = RECIPES[recipe]
    cmd = [sys.executable, "-m", "doa_jax", "aot", "--target", target, "--json", "--size", size, "--phase", "train",
           "--batch", "8", "--lengths", "512,128", "--optimizer", "adafactor", "--param-dtype", "float32",
           "--mesh", MESH.get(target, "-1,1"), *flags]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ,
                          "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    case = dict(size=size, target=target, recipe=recipe, label=label, command="doa " + " ".join(cmd[3:]),
                seconds=time.perf_counter() - start)
    if done.returncode != 0:
        return dict(case, error=(done.stderr.strip().splitlines() or ["?"])[-1])
    (row,) = json.loads(done.stdout)["programs"]
    return dict(case, row=row)


def _cell(case: dict | None) -> str:
    if case is None:
        return "-"
    if case.get("error"):
        return f"error: {case['error'][:80]}"
    r = case["row"]
    if r.get("refusal"):
        need = f"needs {r['peak_gib']:.1f}" + (" (temporaries)" if r.get("peak_counts") == "temporaries" else "") \
            if r.get("peak_gib") else "out of memory"
        return f"refused: {need}"
    return f"{r['peak_gib']:.1f}" + ("" if r["fits"] else " (does not fit)")


def table(cases: list[dict]) -> str:
    """Rows: recipes; columns: targets; cells: peak GiB per device (the TPU compiler's refusal as it said it)."""
    sizes = sorted({c["size"] for c in cases})
    out = []
    for size in sizes:
        mine = [c for c in cases if c["size"] == size]
        tgts = [t for t in MESH if any(c["target"] == t for c in mine)]
        caps = {c["target"]: c["row"]["capacity_gib"] for c in mine if "row" in c}
        out += [f"T5 v1.1 {size}: peak GiB per device (usable: " + ", ".join(
                    f"{t} {caps[t]:.2f}" for t in tgts if t in caps) + ")", "",
                "| recipe | " + " | ".join(f"{t} (mesh {MESH[t]})" for t in tgts) + " |", "|---" * (len(tgts) + 1) + "|"]
        for recipe, (label, _) in RECIPES.items():
            row = {c["target"]: c for c in mine if c["recipe"] == recipe}
            if row:
                out.append(f"| {label} | " + " | ".join(_cell(row.get(t)) for t in tgts) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/aot_fused.json")
    p.add_argument("--show", default=None, help="print the table of stored rows; compile nothing")
    p.add_argument("--size", default="xxl")
    p.add_argument("--targets", nargs="+", default=list(MESH), choices=list(MESH))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = p.parse_args(argv)
    if args.show:
        print(table(json.loads(pathlib.Path(args.show).read_text())))
        return 0
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cases = json.loads(out.read_text()) if out.exists() else []
    done = {(c["size"], c["target"], c["recipe"]) for c in cases if "row" in c}
    for recipe in args.recipes:
        for target in args.targets:
            if (args.size, target, recipe) in done:
                continue
            case = run_case(args.size, target, recipe)
            cases = [c for c in cases if (c["size"], c["target"], c["recipe"]) != (args.size, target, recipe)] + [case]
            out.write_text(json.dumps(cases, indent=1))
            print(f"{args.size} {target} {recipe}: {_cell(case)} ({case['seconds']:.0f} s)", flush=True)
    print(table(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
