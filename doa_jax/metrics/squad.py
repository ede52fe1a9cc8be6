"""`squad` (NQ): SQuAD v1.1 exact match and token F1 after the official answer normalisation."""
from __future__ import annotations

import collections
import re
import string

import numpy as np

from doa_jax.metrics.common import ExampleStatistics, _check_lengths


_ARTICLES = re.compile(r"\b(a|an|the)\b")


_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lower, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_f1(prediction: str, reference: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad(predictions, references, **_):
    _check_lengths(predictions, references)
    em = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    f1 = sum(squad_f1(p, r) for p, r in zip(predictions, references))
    n = len(references)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "count": n}


def _squad_statistics(predictions, references, **_):
    counts = np.array([[normalize_answer(p) == normalize_answer(r), squad_f1(p, r), 1.0]
                       for p, r in zip(predictions, references)], np.float64)
    return ExampleStatistics(counts, lambda c: {"exact_match": 100.0 * c[0] / c[2], "f1": 100.0 * c[1] / c[2]})
