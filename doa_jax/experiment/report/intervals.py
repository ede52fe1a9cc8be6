"""Intervals: a cell's 95% bootstrap interval (seeds and, where predictions keep their references,
test examples resampled), whether two cells can be told apart, and what the report's intervals resampled."""
from __future__ import annotations

import random
from typing import Callable, Iterable, Optional

from doa_jax import storage
from doa_jax.data import cards, demo as demo_task, jsonl
from doa_jax.experiment.report.summary import Cell

BOOTSTRAP_RESAMPLES = 500


def _example_scores(cell: Cell) -> Optional[list[tuple[Callable[[list[int]], float], int]]]:
    """Per seed, (a function scoring a resample (example indices) of its test predictions, the number
    of examples), or None when a row's `predictions.jsonl` lacks references (cells written before
    they kept them). A resample sums the metric's per-example statistics where it has them
    (`Card.example_statistics`), else re-scores the picked predictions."""
    try:
        card = demo_task.card() if cell.task == demo_task.NAME else cards.load_card(cell.task)
    except (FileNotFoundError, ValueError):
        return None
    scorers = []
    for out in cell.outputs:
        path = storage.path(out) / "predictions.jsonl"
        if not out or not path.exists():
            return None
        rows = [row for _, row in jsonl.parse_lines(path.read_text().splitlines(), str(path))]
        if not rows or any("target" not in r for r in rows):
            return None
        scorers.append((_resample_scorer(card, rows, cell.protocol), len(rows)))
    return scorers


def _resample_scorer(card: cards.Card, rows: list[dict], protocol: str) -> Callable[[list[int]], float]:
    """`indices -> the card's primary metric` over those prediction rows (see `_example_scores`)."""
    predictions, targets = [r["prediction"] for r in rows], [r["target"] for r in rows]
    stats = card.example_statistics(predictions, targets, protocol=protocol)
    if stats is not None and card.primary_metric in stats.score([0]):
        return lambda idx: float(stats.score(idx)[card.primary_metric] or 0.0)

    def score(idx):
        picked = [rows[i] for i in idx]
        result = card.score([r["prediction"] for r in picked], [r["target"] for r in picked],
                            sources=[r.get("source", "") for r in picked], protocol=protocol)
        return float(result[card.primary_metric] or 0.0)
    return score


def bootstrap(cell: Cell, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Optional[tuple[float, float]]:
    """95% percentile interval of the cell's mean metric: seeds resampled when there are several, and
    each seed's test examples resampled when its predictions keep their references; None with one
    seed and no per-example predictions (nothing to resample)."""
    return _bootstrap(cell, _example_scores(cell) if cell.values else None, resamples, seed)


def attach_intervals(cells: Iterable[Cell]) -> None:
    """Sets each cell's `interval` (see `bootstrap`) and `examples_resampled`, which the report's
    header counts to say what its intervals resampled."""
    for c in cells:
        scorers = _example_scores(c) if c.values else None
        c.examples_resampled = bool(scorers)
        c.interval = _bootstrap(c, scorers)


def _bootstrap(cell: Cell, scorers: Optional[list], resamples: int = BOOTSTRAP_RESAMPLES,
               seed: int = 0) -> Optional[tuple[float, float]]:
    rng = random.Random(seed)
    if not cell.values or (len(cell.values) < 2 and not scorers):
        return None
    means = []
    for _ in range(resamples):
        seeds = [rng.randrange(len(cell.values)) for _ in cell.values]
        if scorers:
            vals = [scorers[i][0]([rng.randrange(scorers[i][1]) for _ in range(scorers[i][1])]) for i in seeds]
        else:
            vals = [cell.values[i] for i in seeds]
        means.append(sum(vals) / len(vals))
    means.sort()
    return means[int(0.025 * (resamples - 1))], means[int(0.975 * (resamples - 1))]


def distinguishable(a: Cell, b: Cell) -> Optional[bool]:
    """Whether two cells' 95% bootstrap intervals are disjoint (None when either has none)."""
    if a.interval is None or b.interval is None:
        return None
    return a.interval[1] < b.interval[0] or b.interval[1] < a.interval[0]


def interval_text(cells: list[Cell]) -> str:
    """What the report's 95% intervals resampled, counted from its cells (not a fixed claim)."""
    done = [c for c in cells if c.values]
    if not done:
        return "[a 95% bootstrap interval] of the mean: no cell has a result, so there is none."
    examples = [c for c in done if c.interval is not None and c.examples_resampled]
    seeds_only = [c for c in done if c.interval is not None and not c.examples_resampled]
    none = [c for c in done if c.interval is None]
    its = lambda group: "its" if len(group) == 1 else "their"   # noqa: E731
    parts = []
    if examples:
        several = sum(len(c.values) > 1 for c in examples)
        parts.append(f"{len(examples)} resampled the test examples of {its(examples)} seeds' predictions.jsonl "
                     "(they keep references)" + (f", {several} of them the seeds too" if several else ""))
    if seeds_only:
        parts.append(f"{len(seeds_only)} resampled {its(seeds_only)} seeds only (no per-example predictions)")
    if none:
        parts.append(f"{len(none)} {'has' if len(none) == 1 else 'have'} no interval (one seed and no "
                     "per-example predictions)")
    seeds = sorted({len(c.values) for c in done})
    return (f"[a 95% bootstrap interval] of the mean ({BOOTSTRAP_RESAMPLES} resamples). Of the {len(done)} "
            f"cell(s) with a result, " + "; ".join(parts)
            + f". Seeds per cell: {seeds[0]}" + (f" to {seeds[-1]}." if len(seeds) > 1 else "."))

