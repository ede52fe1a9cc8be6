#!/usr/bin/env python3
"""The paper's WLP cell compiled for the slices users rent (`doa aot`), as rows and a markdown table.

For each target and recipe it runs `doa aot --json` on the cell `runs/experiment.gin` +
`experiments/wlp_1k_plus100_distill.gin` (T5 v1.1 XXL teacher, Small student, WLP's lengths
96/128, batch 32) in a fresh process, with the teacher laid out to fit: every device of the target
on the model axis, scanned layers, full remat; the student on every device's `data` axis. Recipes:

* paper: `protocols/paper.gin` (AdamW, float32 parameters and activations, online soft targets:
  the teacher's forward runs at every student step);
* efficient: the default protocol with Adafactor and bfloat16 parameters (stored top-k targets).

    python3 scripts/aot_grid.py --out bench_out/aot_grid.json          # compile (an hour or more)
    python3 scripts/aot_grid.py --show bench_out/aot_grid.json         # the table of notes/aot.md
    python3 scripts/aot_grid.py --phase train --redo                    # recompile the train steps only,
                                                                        # keeping the other programs' rows

Requires the `aot` extra. Cases run one at a time; rows are written after each.
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
sys.path.insert(0, str(ROOT))

TARGETS = ("v4-8", "v5e-8", "v5p-8", "v6e-8", "h100", "h100x8", "h200")
RECIPES = {
    "paper": ["--gin_file", "protocols/paper.gin"],
    "efficient": ["--gin.OPTIMIZER='adafactor'", "--gin_bindings", "cell/TrainConfig.param_dtype = 'bfloat16'"],
}
CELL = ["--gin_file", "runs/experiment.gin", "--gin_file", "experiments/wlp_1k_plus100_distill.gin",
        "--gin.OUTPUT_DIR=/tmp/doa_aot_grid", "--gin.VOCABULARY=None", "--gin.MODEL_VOCAB_SIZE=32128"]


def layout(devices: int) -> list[str]:
    """The teacher on every device's model axis, scanned, full remat; the student scanned, on the
    default layout (every device on `data`)."""
    return [f"--gin.TEACHER_MESH_MODEL={devices}", "--gin.TEACHER_REMAT='full'", "--gin.TEACHER_SCAN_LAYERS=True",
            "--gin.STUDENT_SCAN_LAYERS=True"]


def run_case(target: str, recipe: str, phase: str = "all") -> dict:
    from doa_jax.bench import targets

    devices = targets.get(target).devices_count
    cmd = [sys.executable, "-m", "doa_jax", "aot", "--target", target, "--json", "--phase", phase, *CELL,
           *RECIPES[recipe], *layout(devices)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ,
                          "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    if done.returncode != 0:
        return {"target": target, "recipe": recipe, "error": done.stderr.strip().splitlines()[-1:]}
    report = json.loads(done.stdout)
    return {"target": target, "recipe": recipe, "seconds": time.perf_counter() - start, **report}


def table(cases: list[dict]) -> str:
    out = ["| target | recipe | program | mesh | peak GiB/device | + co-resident | usable GiB | fits | bound s/step |",
           "|" + "---|" * 9]
    for case in cases:
        for r in case.get("programs", []):
            if r.get("error"):
                out.append(f"| {case['target']} | {case['recipe']} | {r['program']} | - | error: {r['error'][:90]} "
                           "| | | | |")
                continue
            peak = f"{r['peak_gib']:.1f}" + (" (temps; refused)" if r.get("refusal") else "")
            fits = "REFUSED" if r.get("refusal") else ("yes" if r["fits"] else "**no**")
            bound = f"{r['bound_s']:.3g}" if r.get("bound_s") else "-"
            out.append(f"| {case['target']} | {case['recipe']} | {r['program']} | {r['mesh'][0]}x{r['mesh'][1]} | "
                       f"{peak} | {r['co_resident_gib']:.1f} | {r['capacity_gib']:.2f} | {fits} | {bound} |")
        if case.get("error"):
            out.append(f"| {case['target']} | {case['recipe']} | - | - | error: {case['error']} | | | | |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/aot_grid.json")
    p.add_argument("--show", default=None, help="print the table of stored rows; compile nothing")
    p.add_argument("--targets", nargs="+", default=list(TARGETS))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--phase", default="all", choices=("all", "train", "decode", "score", "distill"),
                   help="compile this phase's programs only; a case's rows of other phases are kept")
    p.add_argument("--redo", action="store_true", help="compile cases already in --out again")
    args = p.parse_args(argv)
    if args.show:
        print(table(json.loads(pathlib.Path(args.show).read_text())))
        return 0
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cases = json.loads(out.read_text()) if out.exists() else []
    done = set() if args.redo else {(c["target"], c["recipe"]) for c in cases if "programs" in c}
    for target in args.targets:
        for recipe in args.recipes:
            if (target, recipe) in done:
                continue
            case = run_case(target, recipe, args.phase)
            old = next((c for c in cases if (c["target"], c["recipe"]) == (target, recipe)), None)
            if args.phase != "all" and old is not None and "programs" in case:   # keep the other phases' rows
                fresh = {r["program"]: r for r in case["programs"]}
                case = dict(old, programs=[fresh.pop(r["program"], r) for r in old.get("programs", [])]
                            + list(fresh.values()), seconds=case["seconds"])
            cases = [c for c in cases if (c["target"], c["recipe"]) != (target, recipe)] + [case]
            out.write_text(json.dumps(cases, indent=1))
            print(f"{target} {recipe}: {len(case.get('programs', []))} programs, {case.get('seconds', 0):.0f} s"
                  + (f", error {case['error']}" if case.get("error") else ""), flush=True)
    print(table(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
