"""Label metrics: `accuracy` (FEVER, MultiPIT_Id) and `classification_f1` (Stanceosaurus), with the
post-processing of an output into a label under each protocol."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from doa_jax.metrics.common import ExampleStatistics, _check_lengths, _f1, check_protocol


def canonical_label(prediction: str, labels: Sequence[str]) -> str | None:
    """The label a prediction names (stripped, case-insensitive), or None when it names none."""
    lookup = {label.casefold(): label for label in labels}
    return lookup.get(prediction.strip().casefold())


def paper_label(prediction: str, labels: Sequence[str], invalid_label: str | None) -> str:
    """The released code's mapping: `pred.strip().upper()` if it names a label, else its id-0 label."""
    lookup = {label.upper(): label for label in labels}
    label = lookup.get(prediction.strip().upper())
    if label is not None:
        return label
    if invalid_label is None or invalid_label.upper() not in lookup:
        raise ValueError(f"protocol 'paper' needs the label the released code gives out-of-label outputs "
                         f"(the card's paper_invalid_label, one of {list(labels)}), got {invalid_label!r}")
    return lookup[invalid_label.upper()]


def _predicted_labels(predictions, labels, protocol: str, invalid_label: str | None) -> list[str | None]:
    if check_protocol(protocol) == "paper":
        return [paper_label(p, labels, invalid_label) for p in predictions]
    return [canonical_label(p, labels) for p in predictions]


def _invalid(predictions, labels) -> int:
    return sum(canonical_label(p, labels) is None for p in predictions)


def _gold_labels(references: Sequence[str], labels: Sequence[str]) -> list[str]:
    out = []
    for i, ref in enumerate(references):
        gold = canonical_label(ref, labels)
        if gold is None:
            raise ValueError(f"reference {i + 1}: {ref!r} is not in the label set {list(labels)}")
        out.append(gold)
    return out


def accuracy(predictions, references, *, labels, protocol="efficient", invalid_label=None, **_):
    _check_lengths(predictions, references)
    gold = _gold_labels(references, labels)
    pred = _predicted_labels(predictions, labels, protocol, invalid_label)
    correct = sum(p == g for p, g in zip(pred, gold))
    return {
        "accuracy": 100.0 * correct / len(gold),
        "invalid_predictions": _invalid(predictions, labels),
        "count": len(gold),
    }


def _label_counts(pred: Sequence[str | None], gold: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Per example, [tp, fp, fn] of every label (label-major, 3 x len(labels) columns): an invalid
    prediction (None) is a miss for its gold label and a false positive for none."""
    index = {lab: i for i, lab in enumerate(labels)}
    counts = np.zeros((len(gold), len(labels), 3), np.int64)
    for row, (p, g) in enumerate(zip(pred, gold)):
        if p == g:
            counts[row, index[g], 0] = 1
        else:
            counts[row, index[g], 2] = 1
            if p is not None:
                counts[row, index[p], 1] = 1
    return counts.reshape(len(gold), 3 * len(labels))


def _classification_scores(per_label: np.ndarray, correct: int, n: int) -> dict[str, float]:
    """macro/micro F1 over the labels present (in the references or valid predictions: any tp, fp or
    fn) and accuracy, from summed [tp, fp, fn] per label."""
    per_label = per_label.reshape(-1, 3)
    present = [tuple(int(v) for v in x) for x in per_label if x.sum() > 0]
    tp, fp, fn = (sum(x[k] for x in present) for k in range(3))
    return {"macro_f1": 100.0 * sum(_f1(*x) for x in present) / len(present), "micro_f1": 100.0 * _f1(tp, fp, fn),
            "accuracy": 100.0 * correct / n}


def classification_f1(predictions, references, *, labels, protocol="efficient", invalid_label=None, **_):
    _check_lengths(predictions, references)
    gold = _gold_labels(references, labels)
    pred = _predicted_labels(predictions, labels, protocol, invalid_label)
    scores = _classification_scores(_label_counts(pred, gold, labels).sum(axis=0),
                                    sum(p == g for p, g in zip(pred, gold)), len(gold))
    return {**scores, "invalid_predictions": _invalid(predictions, labels), "count": len(gold)}


def _accuracy_statistics(predictions, references, *, labels, protocol="efficient", invalid_label=None, **_):
    gold = _gold_labels(references, labels)
    pred = _predicted_labels(predictions, labels, protocol, invalid_label)
    counts = np.array([[p == g, 1] for p, g in zip(pred, gold)], np.int64)
    return ExampleStatistics(counts, lambda c: {"accuracy": 100.0 * int(c[0]) / int(c[1])})


def _classification_statistics(predictions, references, *, labels, protocol="efficient", invalid_label=None, **_):
    gold = _gold_labels(references, labels)
    pred = _predicted_labels(predictions, labels, protocol, invalid_label)
    correct = np.array([[p == g, 1] for p, g in zip(pred, gold)], np.int64)
    counts = np.concatenate([_label_counts(pred, gold, labels), correct], axis=1)
    return ExampleStatistics(counts, lambda c: _classification_scores(c[:-2], int(c[-2]), int(c[-1])))
