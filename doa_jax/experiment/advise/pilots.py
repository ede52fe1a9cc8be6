"""Pilots: the measured points the curves are fitted to, from a JSON-lines file (every field
checked, errors naming file, line and field), from a run directory's finished cells, or from the
paper's own Pareto points; and the check that they all are of one task and metric."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterable, Optional, Sequence

from doa_jax import storage
from doa_jax.data import jsonl
from doa_jax.experiment import cost_profiles, results

PARETO_CSV = cost_profiles.PAPER_PARETO
FITTED = ("annotate", "distill")          # strategies whose pilots the curves are fitted to
PILOT_FIELDS = {"strategy": str, "labels": int, "unlabeled": int, "value": float}
OPTIONAL_FIELDS = {"task": str, "metric": str, "seed": int, "cost_usd": float}


@dataclasses.dataclass(frozen=True)
class Pilot:
    """One measured point: a strategy trained on `labels` labels and `unlabeled` inputs scored `value`."""

    strategy: str
    labels: int
    unlabeled: int
    value: float
    task: Optional[str] = None
    metric: Optional[str] = None
    seed: Optional[int] = None
    cost_usd: Optional[float] = None
    source: str = ""


def _field(raw: dict, name: str, kind: type, where: str) -> Any:
    value = raw[name]
    if kind is str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: field '{name}' must be a non-empty string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: field '{name}' must be a finite number, got {value!r}")
    if kind is int:
        if value != int(value) or value < 0:
            raise ValueError(f"{where}: field '{name}' must be a whole number >= 0, got {value!r}")
        return int(value)
    return float(value)


def pilot_from_json(raw: Any, where: str) -> Pilot:
    """One pilot from a parsed JSON object, every field checked; errors name `where` and the field."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a pilot must be a JSON object, got {type(raw).__name__}")
    missing = [k for k in PILOT_FIELDS if k not in raw]
    if missing:
        raise ValueError(f"{where}: field '{missing[0]}' is missing (a pilot needs {', '.join(PILOT_FIELDS)})")
    unknown = sorted(set(raw) - set(PILOT_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ValueError(f"{where}: field '{unknown[0]}' is not a pilot field "
                         f"(known: {', '.join(list(PILOT_FIELDS) + list(OPTIONAL_FIELDS))})")
    fields = {k: _field(raw, k, kind, where) for k, kind in PILOT_FIELDS.items()}
    fields.update({k: _field(raw, k, kind, where) for k, kind in OPTIONAL_FIELDS.items()
                   if raw.get(k) is not None})
    if fields["strategy"] not in FITTED:
        raise ValueError(f"{where}: field 'strategy' must be one of {', '.join(FITTED)} (the curves fitted), "
                         f"got {fields['strategy']!r}")
    if fields["strategy"] == "annotate" and fields["unlabeled"] != 0:
        raise ValueError(f"{where}: field 'unlabeled' must be 0 for an annotate pilot, got {fields['unlabeled']}")
    if fields["strategy"] == "distill" and fields["unlabeled"] == 0:
        raise ValueError(f"{where}: field 'unlabeled' must be >= 1 for a distill pilot (U = 0 is annotation)")
    if fields["labels"] == 0:
        raise ValueError(f"{where}: field 'labels' must be >= 1 (nothing trains on no labels)")
    return Pilot(**fields, source=where)


def read_pilots(path: str | os.PathLike) -> list[Pilot]:
    """Pilots from a JSON-lines file (local or a URL), validated line by line (errors name file:line:field)."""
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"pilots file {path} does not exist") from None
    pilots = []
    for lineno, raw in jsonl.parse_lines(text.splitlines(), str(path)):
        pilots.append(pilot_from_json(raw, f"{path}:{lineno}"))
    if not pilots:
        raise ValueError(f"{path}: no pilots in the file")
    return pilots


def pilots_from_rows(rows: Iterable[dict], source: str) -> tuple[list[Pilot], list[str]]:
    """Pilots from results.jsonl rows (finished annotate and distill cells), and notes on rows left out."""
    pilots, skipped = [], {}
    for i, r in enumerate(rows, 1):
        why = ("not finished" if r.get("status") != "ok" or r.get("value") is None
               else "mixed cells are not fitted" if r.get("strategy") not in FITTED
               else "PROTOCOL='paper' rows scored against the data's text, not the released code's references "
                    "(their cells ran again)" if results.is_superseded_paper_row(r) else "")
        if why:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        unlabeled = 0 if r["strategy"] == "annotate" else int(r.get("unlabeled_used") or 0)
        pilots.append(Pilot(r["strategy"], int(r["labels_used"]), unlabeled, float(r["value"]), task=r.get("task"),
                            metric=r.get("metric"), seed=r.get("seed"),
                            cost_usd=_compute_spent(r), source=f"{source} row {i}"))
    return pilots, [f"{n} row(s) of {source} left out: {why}" for why, n in skipped.items()]


def _compute_spent(row: dict) -> Optional[float]:
    spent = row.get("spent_usd") or {}
    return sum(v for k, v in spent.items() if k != "labels") if spent else None


def check_pilots(pilots: Sequence[Pilot], task_names: Iterable[str], metric: Optional[str]) -> str:
    """The one metric all pilots share; a pilot of another task or metric is an error naming it."""
    names = set(task_names)
    for p in pilots:
        if p.task is not None and p.task not in names:
            raise ValueError(f"{p.source}: field 'task' is {p.task!r}, but the advice is for "
                             f"{' / '.join(sorted(names))}: pilots of another task do not predict this one")
    metrics = {p.metric for p in pilots if p.metric is not None}
    if metric is None and len(metrics) > 1:
        raise ValueError(f"pilots mix metrics ({', '.join(sorted(metrics))}): one curve needs one metric")
    metric = metric or (metrics.pop() if metrics else None)
    for p in pilots:
        if p.metric is not None and p.metric != metric:
            raise ValueError(f"{p.source}: field 'metric' is {p.metric!r}, but the task's metric is {metric!r}")
    return metric or "value"


def read_pareto(path: str | os.PathLike = PARETO_CSV) -> list[dict]:
    """The paper's Pareto points (section 7.2 of the reference): one dict per (task, labels, unlabeled)."""
    return cost_profiles.paper_pareto_points(path)


def paper_pilots(task: str, path: str | os.PathLike = PARETO_CSV) -> list[Pilot]:
    """The paper's Pareto points of `task` as pilots: U = 0 points are annotate, the others distill."""
    rows = [r for r in read_pareto(path) if r["task"] == task]
    return [Pilot("annotate" if r["unlabeled"] == 0 else "distill", r["labels"], r["unlabeled"], r["value"],
                  task=task, metric=r["metric"], cost_usd=r["compute_usd"], source=f"{path} {task} L={r['labels']} "
                  f"U={r['unlabeled']}") for r in rows]

