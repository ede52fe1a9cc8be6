"""`doa aot --search`: for a program that does not fit its target, the settings that would.

Like MaxText's estimator, it walks the knobs that trade memory for time or fidelity: remat policy,
the fused update (the optimizer inside the backward pass, on scanned layers: the same math without
a whole gradient tree), microbatches, batch, parameter dtype and optimizer, for a decode its
cross-attention K/V recomputed at each step instead of cached (`T5Config.decode_cross_kv`: the same
result, more FLOPs), FSDP and the mesh
shape on the same target, then the next larger slice of the same family. Candidates are tried least invasive first (a change
that keeps the recipe's math before one that changes it; the same target before a larger one), and
most are settled without compiling:

* a candidate whose state alone (parameters and optimizer slots per device, with scanned layers
  and no fused update the gradient tree too, plus what other programs keep there) exceeds the
  capacity cannot fit;
* a candidate that uses at least as much memory as one already seen not to fit on every knob (the
  same mesh and target, and no knob that saves memory) cannot fit either.

A candidate that makes every change of one already found to fit, and more (or on a larger slice),
is never the better choice and is skipped too. The rest are compiled (`aot.compile_program`) until
`want` fit or `max_compiles` were compiled. Suggestions list the tried
candidates, fitting ones first, then the cheapest: accelerator-seconds per example at the roofline
bound (with full remat's recomputed forward counted).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable, Optional, Sequence

from doa_jax.bench import aot, targets
from doa_jax.bench.targets import GIB, Target

# How much each knob changes the recipe (lower: tried first); a larger slice adds SLICE_STEP per size up.
# Recomputing a decode's cross K/V keeps its math but multiplies its FLOPs (notes/aot.md): after the batch.
INVASIVE = {"remat": 1, "fused_update": 1, "num_microbatches": 1, "fsdp": 1, "mesh": 1, "batch": 2, "param_dtype": 3,
            "optimizer": 3, "decode_cross_kv": 3}
SLICE_STEP = 10
MAX_SLICE_STEPS = 3
# Memory rank of each knob's values (higher: more memory), for the dominance rule. Microbatches are
# not ranked: their gradient accumulator is a parameter-sized tree, so with little activation memory
# (full remat) more microbatches need more memory, not less (XXL on one H100: 61.0 GiB at 1, 71.3 at 2).
_RANK = {"remat": {"none": 2, "dots": 1, "full": 0}.get, "param_dtype": {"float32": 1, "bfloat16": 0}.get,
         "optimizer": lambda name: 0 if name == "adafactor" else 1, "fsdp": lambda on: 0 if on else 1,
         "batch": lambda b: b, "fused_update": lambda on: 0 if on else 1,
         "decode_cross_kv": {"cache": 1, "recompute": 0}.get}


@dataclasses.dataclass(frozen=True)
class Candidate:
    settings: tuple            # ((knob, value), ...) in a fixed order
    target: str
    slice_steps: int

    @property
    def knobs(self) -> dict[str, Any]:
        return dict(self.settings)


def _settings(program: aot.Program) -> dict[str, Any]:
    m = program.mesh
    out = {"batch": program.batch, "mesh": (m.data, m.model), "fsdp": m.fsdp}
    if program.kind == "train":
        t = program.train
        out.update(remat=program.model.remat_policy, num_microbatches=t.num_microbatches,
                   param_dtype=t.param_dtype, optimizer=t.optimizer.name, fused_update=t.fused_update)
    if program.kind == "decode":
        out["decode_cross_kv"] = program.model.decode_cross_kv
    return out


def apply(program: aot.Program, knobs: dict[str, Any]) -> aot.Program:
    """`program` with the candidate's settings (the fused update scans the layers)."""
    data, model = knobs["mesh"]
    mesh = dataclasses.replace(program.mesh, data=data, model=model, fsdp=knobs["fsdp"])
    changed = dict(batch=knobs["batch"], mesh=mesh)
    if program.kind == "train":
        t = program.train
        changed["model"] = program.model.replace(remat_policy=knobs["remat"],
                                                 scan_layers=program.model.scan_layers or knobs["fused_update"])
        changed["train"] = dataclasses.replace(t, num_microbatches=knobs["num_microbatches"],
                                               fused_update=knobs["fused_update"],
                                               param_dtype=knobs["param_dtype"],
                                               optimizer=dataclasses.replace(t.optimizer, name=knobs["optimizer"]))
    if program.kind == "decode":
        changed["model"] = program.model.replace(decode_cross_kv=knobs["decode_cross_kv"])
    return dataclasses.replace(program, **changed)


def _choices(program: aot.Program, target: Target) -> dict[str, list]:
    base = _settings(program)
    n = target.devices_count
    models = [m for m in (1, 2, 4, 8, 16) if m <= n and n % m == 0]
    out = {"batch": [base["batch"]] + ([base["batch"] // 2] if base["batch"] % 2 == 0 and base["batch"] > 1 else []),
           "mesh": [base["mesh"]] + [(-1, m) for m in models if (-1, m) != base["mesh"] and m != base["mesh"][1]],
           "fsdp": [base["fsdp"]] + ([True] if not base["fsdp"] and n > 1 else [])}
    if program.kind == "train":
        out.update(remat=[base["remat"]] + (["full"] if base["remat"] != "full" else []),
                   num_microbatches=[base["num_microbatches"]] + [m for m in (2, 4, 8) if m > base["num_microbatches"]],
                   param_dtype=[base["param_dtype"]] + (["bfloat16"] if base["param_dtype"] != "bfloat16" else []),
                   optimizer=[base["optimizer"]] + (["adafactor"] if base["optimizer"] != "adafactor" else []),
                   fused_update=[base["fused_update"]] + ([True] if not base["fused_update"] else []))
    if program.kind == "decode":
        kv = base["decode_cross_kv"]
        out["decode_cross_kv"] = [kv] + (["recompute"] if kv == "cache" else [])
    return out


def candidates(program: aot.Program, target: Target) -> list[Candidate]:
    """Every candidate on `target` and up to MAX_SLICE_STEPS larger slices, least invasive first."""
    base = _settings(program)
    out = []
    name, steps = target.name, 0
    while name is not None and steps <= MAX_SLICE_STEPS:
        t = targets.get(name)
        choices = _choices(program, t)
        keys = sorted(choices)
        for values in itertools.product(*(choices[k] for k in keys)):
            knobs = dict(zip(keys, values))
            out.append(Candidate(tuple(sorted(knobs.items())), name, steps))
        name, steps = t.next_larger, steps + 1
    return sorted(out, key=lambda c: (invasiveness(c, base), c.target))


def invasiveness(c: Candidate, base: dict[str, Any]) -> int:
    return SLICE_STEP * c.slice_steps + sum(INVASIVE[k] for k, v in c.knobs.items() if base.get(k) != v)


def changes(c: Candidate, base: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in c.knobs.items() if base.get(k) != v}


def _dominated(c: Candidate, failures: Iterable[Candidate]) -> Optional[Candidate]:
    """A failure that `c` needs at least as much memory as, on every ranked knob (same target, and the
    same value of every unranked knob: mesh, microbatches)."""
    knobs = c.knobs
    for f in failures:
        other = f.knobs
        if f.target != c.target:
            continue
        same_unranked = all(knobs[k] == other[k] for k in knobs if k not in _RANK)
        if same_unranked and all(_RANK[k](knobs[k]) >= _RANK[k](other[k]) for k in knobs if k in _RANK):
            return f
    return None


def per_example_chip_s(row: dict[str, Any], target: Target) -> Optional[float]:
    """Accelerator-seconds per example at the roofline bound (which counts full remat's extra forward)."""
    bound = row.get("bound_s")
    if bound is None:
        return None
    return bound * target.chips / row["batch"]


def search(programs: Sequence[aot.Program], rows: Sequence[dict[str, Any]], target: Target, *,
           max_compiles: int = 24, want: int = 3, say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Suggestions for every program of `rows` that does not fit (see the module doc)."""
    tried, suggestions, budget = [], [], [max_compiles]
    for program, row in zip(programs, rows):
        if row.get("fits") or row.get("error"):
            continue
        say(f"searching for {program.name} (needs {row.get('peak_gib') or 0:.1f} GiB of {target.capacity_gib:.2f})")
        found = _search_one(program, programs, target, budget, want, say)
        tried += found
        suggestions += [t for t in found if t["fits"]]
    order = lambda s: (not s["fits"], s.get("chip_s_per_example") or float("inf"), s["invasiveness"])  # noqa: E731
    return {"tried": sorted(tried, key=order), "suggestions": sorted(suggestions, key=order)}


def _search_one(program: aot.Program, programs: Sequence[aot.Program], target: Target, budget: list,
                want: int, say) -> list[dict[str, Any]]:
    base = _settings(program)
    failures, successes, out = [], [], []
    for c in candidates(program, target):
        if len(successes) >= want or budget[0] <= 0:
            break
        if invasiveness(c, base) == 0 or _outdone(c, successes, base):
            continue      # the program as it is (already compiled), or more changes than a fit already found
        t = targets.get(c.target)
        variant = apply(program, c.knobs)
        record = dict(program=program.name, target=c.target, changes=_jsonable(changes(c, base)),
                      invasiveness=invasiveness(c, base), **_jsonable(c.knobs))
        try:
            variant, where, devices = aot.placed(variant, t)   # the teacher's inference: one host's chips
            layout = aot.Layout(variant, devices)
        except ValueError:
            continue      # a batch, microbatch count or mesh that does not divide this slice
        co = sum(_state_bytes(o, aot.Layout(o, here), c.target) for o, _, here in
                 (aot.placed(apply(p, {**_settings(p), "mesh": c.knobs["mesh"], "fsdp": c.knobs["fsdp"]}), t)
                  for p in programs if p.name in program.co_resident))
        if (_least_bytes(variant, layout, c.target) + co) / GIB > t.capacity_gib:
            failures.append(c)
            continue
        if _dominated(c, failures) is not None:
            continue
        budget[0] -= 1
        row = aot.compile_program(variant, where, devices, co)
        record.update(peak_gib=row.get("peak_gib"), co_resident_gib=row["co_resident_gib"], fits=row["fits"],
                      capacity_gib=t.capacity_gib, chips=t.chips, bound_s=row.get("bound_s"),
                      chip_s_per_example=per_example_chip_s(row, t), compile_s=row["compile_s"])
        say(f"  {c.target} {record['changes']}: {aot.verdict(row)}")
        out.append(record)
        (successes if row["fits"] else failures).append(c)
    return out


def _outdone(c: Candidate, successes: Iterable[Candidate], base: dict[str, Any]) -> bool:
    """`c` makes every change of a fitting candidate, and more or on a larger slice: never the better choice."""
    mine = set(changes(c, base).items())
    return any(set(changes(s, base).items()) <= mine and s.slice_steps <= c.slice_steps for s in successes)


_BYTES: dict[tuple, int] = {}


def _key(program: aot.Program, target: str, what: str) -> tuple:
    """What a program's state depends on: not its batch, microbatches or remat."""
    t = program.train
    return (what, program.kind, program.model.replace(remat_policy="none"),
            t and (t.optimizer, t.param_dtype, t.fused_update), program.mesh, target)


def _state_bytes(program: aot.Program, layout: aot.Layout, target: str) -> int:
    """`aot.state_bytes_per_device`, once per (model, optimizer, parameter dtype, mesh, target)."""
    key = _key(program, target, "state")
    if key not in _BYTES:
        _BYTES[key] = aot.state_bytes_per_device(program, layout)
    return _BYTES[key]


def _least_bytes(program: aot.Program, layout: aot.Layout, target: str) -> int:
    """`aot.least_peak_bytes`, once per (model, optimizer, parameter dtype, mesh, target)."""
    key = _key(program, target, "least")
    if key not in _BYTES:
        _BYTES[key] = aot.least_peak_bytes(program, layout)
    return _BYTES[key]


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
