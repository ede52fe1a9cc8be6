"""What the metric modules share: the scoring protocols, input checks, F1 from counts, and the
per-example statistics a bootstrap resample sums."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np


PROTOCOLS = ("efficient", "paper")


def check_protocol(protocol: str) -> str:
    """`protocol` if known, else one error naming the known ones."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; protocols: {', '.join(PROTOCOLS)}")
    return protocol


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no references to score")


def _f1(tp: int, fp: int, fn: int) -> float:
    return 0.0 if tp == 0 else 2.0 * tp / (2 * tp + fp + fn)


@dataclasses.dataclass(frozen=True)
class ExampleStatistics:
    """Each example's counts (one row per example) and how summed counts become the metric's keys: a
    resample of examples (indices, repeats allowed) is scored as the sum of its rows, with the same
    numbers as scoring its predictions again, without re-parsing them. `finish` gives the keys that
    are functions of the sums (not every key of the metric: e.g. not WLP's paper_macro_f1)."""

    counts: np.ndarray                                   # [examples, statistics]
    finish: Callable[[np.ndarray], dict[str, float]]     # summed counts -> {key: percent}

    def score(self, indices: Sequence[int]) -> dict[str, float]:
        return self.finish(self.counts[np.asarray(indices, np.int64)].sum(axis=0))
