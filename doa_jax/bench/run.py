"""Running benchmark cases: each in a fresh Python process by default, so peak memory and start-up
times are per case and an out-of-memory case is recorded and skipped (`doa bench`, scripts/bench.py).

`python -m doa_jax.bench.run CASE_JSON` measures one case and prints its row as one JSON line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from doa_jax.bench import measure

PARTS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "train": measure.bench_train, "decode": measure.bench_decode, "distill": measure.bench_distill,
}

def run_case(case: Mapping[str, Any]) -> dict[str, Any]:
    if case.get("part") not in PARTS:
        raise ValueError(f"unknown benchmark part {case.get('part')!r}; known: {sorted(PARTS)}")
    return PARTS[case["part"]](case)


# ---------------------------------------------------------------------------------- running

def run_cases(cases: Iterable[Mapping[str, Any]], *, isolate: bool = True, timeout_s: Optional[float] = None,
              on_row: Optional[Callable[[dict], None]] = None) -> list[dict[str, Any]]:
    """Measures each case (each in a fresh Python process when `isolate`); a failing case gives a
    row with `error` (e.g. out of memory) and the rest still run."""
    rows = []
    for case in cases:
        if isolate:
            row = _run_isolated(case, timeout_s)
        else:
            try:
                row = run_case(case)
            except Exception as e:  # recorded like the peer does (OOM etc.), then carry on
                row = _error_row(case, e)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def _error_row(case: Mapping[str, Any], error: Any) -> dict[str, Any]:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {**{k: case[k] for k in ("part", "size", "optimizer", "teacher", "student") if k in case},
            "case": dict(case), "error": text[-600:]}


def _run_isolated(case: Mapping[str, Any], timeout_s: Optional[float]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "doa_jax.bench.run", json.dumps(dict(case))]
    env = os.environ.copy()   # the child imports this package from where the parent did
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return _error_row(case, f"timed out after {timeout_s} s")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
    return _error_row(case, f"exit {done.returncode}: " + " | ".join(tail))


def expand(parts: Sequence[str], sizes: Sequence[str], *, optimizers: Sequence[str] = ("adamw",),
           **settings: Any) -> list[dict[str, Any]]:
    """Cases for `parts` x `sizes` (x `optimizers` for train parts). `startup` is one train step and
    one decode with the timed loops cut short (its rows carry init/compile/first-step times)."""
    cases = []
    for part in parts:
        if part == "distill":
            cases.append(dict(settings, part="distill"))
            continue
        for size in sizes:
            if part == "train":
                cases += [dict(settings, part=part, size=size, optimizer=o) for o in optimizers]
            elif part == "decode":
                cases.append(dict(settings, part=part, size=size))
            elif part == "startup":
                cases.append(dict(settings, part="train", size=size, optimizer=optimizers[0], steps=0,
                                  warmup=0, startup=True))
                cases.append(dict(settings, part="decode", size=size, reps=0, startup=True))
            else:
                raise ValueError(f"unknown part {part!r}; known: {sorted(PARTS) + ['startup']}")
    return cases


def _main(argv: Sequence[str]) -> int:
    """`python -m doa_jax.bench.run CASE_JSON`: measures one case, prints its row as one JSON line."""
    case = json.loads(argv[0])
    print(json.dumps(run_case(case)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
