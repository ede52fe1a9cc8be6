"""`entity_f1` (WLP): span F1 over (text, type) pairs, and the released code's parse and scores (`paper_f1`)."""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from doa_jax.metrics.common import ExampleStatistics, _check_lengths, _f1, check_protocol


def parse_entities(text: str, entity_types: Sequence[str]) -> list[tuple[str, str]]:
    """(entity text, type) pairs of `span [Type] span [Type] ...`; words after the last tag are dropped."""
    lookup = {t.casefold(): t for t in entity_types}
    words, out, start = text.split(), [], 0
    for i, word in enumerate(words):
        if len(word) > 2 and word[0] == "[" and word[-1] == "]" and word[1:-1].casefold() in lookup:
            if i > start:
                out.append((" ".join(words[start:i]), lookup[word[1:-1].casefold()]))
            start = i + 1
    return out


# The entity types of the paper's released parser (two more than WLP has: MISC, UNIT).
PAPER_WLP_TYPES = frozenset(
    "AMOUNT REAGENT DEVICE TIME SPEED ACTION MENTION LOCATION NUMERICAL METHOD TEMPERATURE MODIFIER "
    "CONCENTRATION SIZE GENERIC-MEASURE SEAL MEASURE-TYPE MISC PH UNIT".split()
)


def paper_parse_entities(text: str) -> dict[str, str]:
    """The released code's parse: key = words between tags minus the last one; later keys overwrite."""
    words, out, prev = text.split(), {}, -1
    for i, word in enumerate(words):
        if "[" in word and "]" in word and word[1:-1].upper() in PAPER_WLP_TYPES:
            out[" ".join(words[prev + 1 : i - 1])] = word[1:-1].upper()
            prev = i
    return out


def paper_entity_pairs(predictions, references) -> tuple[list[str], list[str]]:
    """(predicted, gold) labels, one pair per gold key, as the released code builds them."""
    pred_labels, gold_labels = [], []
    for p, r in zip(predictions, references):
        pred, gold = paper_parse_entities(p.strip()), paper_parse_entities(r.strip())
        for key, label in gold.items():
            pred_labels.append(pred.get(key, "AMOUNT"))
            gold_labels.append(label)
    return pred_labels, gold_labels


def _entity_counts(prediction: str, reference: str, entity_types: Sequence[str]) -> tuple[int, int, int]:
    """(matched, predicted, gold) (entity text, type) pairs of one sentence."""
    pred = collections.Counter(parse_entities(prediction, entity_types))
    gold = collections.Counter(parse_entities(reference, entity_types))
    return sum((pred & gold).values()), sum(pred.values()), sum(gold.values())


def _span_scores(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
    """Micro span F1, precision and recall (percent) from summed counts."""
    if n_pred == 0 and n_gold == 0:
        f1 = 1.0  # nothing to find and nothing found
    else:
        f1 = _f1(tp, n_pred - tp, n_gold - tp)
    return {"f1": 100.0 * f1, "precision": 100.0 * (tp / n_pred) if n_pred else 0.0,
            "recall": 100.0 * (tp / n_gold) if n_gold else 0.0}


def _paper_protocol_keys(result: dict, paper_f1: float) -> dict:
    """`protocol='paper'`: one label per gold key on both sides, so micro precision = recall = F1 =
    the share that agree; the standard span scores move to span_*."""
    result.update(span_f1=result["f1"], span_precision=result["precision"], span_recall=result["recall"],
                  f1=paper_f1, precision=paper_f1, recall=paper_f1)
    return result


def entity_f1(predictions, references, *, entity_types, protocol="efficient", **_):
    _check_lengths(predictions, references)
    tp, n_pred, n_gold = (sum(c) for c in zip(*(_entity_counts(p, r, entity_types)
                                                for p, r in zip(predictions, references))))
    pp, pg = paper_entity_pairs(predictions, references)
    labels = sorted(set(pp) | set(pg))
    per_label = [
        _f1(
            sum(a == lab and b == lab for a, b in zip(pp, pg)),
            sum(a == lab and b != lab for a, b in zip(pp, pg)),
            sum(a != lab and b == lab for a, b in zip(pp, pg)),
        )
        for lab in labels
    ]
    paper_f1 = 100.0 * sum(a == b for a, b in zip(pp, pg)) / len(pg) if pg else 0.0
    result = {
        **_span_scores(tp, n_pred, n_gold),
        "paper_f1": paper_f1,
        "paper_macro_f1": 100.0 * sum(per_label) / len(per_label) if per_label else 0.0,
        "predicted_entities": n_pred,
        "gold_entities": n_gold,
    }
    return _paper_protocol_keys(result, paper_f1) if check_protocol(protocol) == "paper" else result


def _entity_statistics(predictions, references, *, entity_types, protocol="efficient", **_):
    """Per sentence: matched, predicted and gold spans (micro span F1), and the released code's gold
    keys and how many of them the prediction labels alike (its micro F1, `paper_f1`)."""
    rows = []
    for p, r in zip(predictions, references):
        pp, pg = paper_entity_pairs([p], [r])
        rows.append((*_entity_counts(p, r, entity_types), sum(a == b for a, b in zip(pp, pg)), len(pg)))
    paper = check_protocol(protocol) == "paper"

    def finish(c: np.ndarray) -> dict[str, float]:
        tp, n_pred, n_gold, agree, keys = (int(v) for v in c)
        paper_f1 = 100.0 * agree / keys if keys else 0.0
        result = {**_span_scores(tp, n_pred, n_gold), "paper_f1": paper_f1}
        return _paper_protocol_keys(result, paper_f1) if paper else result

    return ExampleStatistics(np.array(rows, np.int64).reshape(len(rows), 5), finish)
