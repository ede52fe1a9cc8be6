"""Task metrics of "Distill or Annotate?", in percent, as a table: metric name -> function.

A card names its metric (`metric = "..."`); `compute(metric, predictions, references, labels=...,
sources=...)` post-processes and scores (`Card.score` passes the card's label set and types). What each metric is:

- `accuracy` (FEVER, MultiPIT_Id): a prediction is stripped and matched to the label set ignoring
  case; one outside the set is counted wrong and reported as `invalid_predictions`.
- `classification_f1` (Stanceosaurus): `macro_f1` and `micro_f1` over the labels that occur in the
  references or the valid predictions (scikit-learn's `f1_score(labels=...)`); an invalid prediction
  is a miss for its gold label and a false positive for none. Also `accuracy`, `invalid_predictions`.
- `squad` (NQ): SQuAD v1.1 `exact_match` and token `f1` after the official answer normalisation
  (lower case, drop punctuation and the articles a/an/the, squeeze spaces).
- `entity_f1` (WLP): targets are `span [Type] span [Type] ...`. `f1` (with `precision`, `recall`) is
  the standard micro F1 over (entity text, type) pairs per sentence: a spurious predicted entity
  costs precision, a missed one recall. `paper_f1` / `paper_macro_f1` reproduce the paper's released
  code: it keys entities by their text with the word before each tag dropped (so every one-word
  entity becomes the empty string and entities sharing a key overwrite each other), scores once per
  gold key (a gold entity the prediction lacks gets the label AMOUNT), and takes scikit-learn's micro
  and macro F1 over those label pairs; spurious predictions cost nothing.
- `bert_ibleu` (MultiPIT_Gen): Niu et al. (2021), "Unsupervised Paraphrasing with Pretrained Language
  Models", per example, with beta = 4:
      BERT-iBLEU = ((beta * BERTScore^-1 + 1 * (1 - selfBLEU)^-1) / (beta + 1))^-1,
  a weighted harmonic mean of BERTScore(output, source) (F1, idf weights from the sources) and
  1 - BLEU(output, source); averaged over examples. As in the paper's code, an empty output is scored
  as "no prediction" and 1e-5 is added to both parts. selfBLEU is sentence BLEU (13a tokens, up to
  4-grams, no smoothing). BERTScore needs a scorer model at a local path (deberta-xlarge-mnli,
  layer 40, in the paper): without one, `self_bleu` is reported, `bert_ibleu` is null and `note`
  says why. Nothing is substituted.

Protocols (`protocol=`): `efficient` (default) scores as above. `paper` scores as the released code
(run_t5.py of jm-kang/Distill-or-Annotate) does: a classification output outside the label set is
mapped to the label the released code gives id 0 (the card's `paper_invalid_label`: FEVER REFUTES,
MultiPIT_Id NO, Stanceosaurus IRRELEVANT), so it is correct whenever gold is that label; WLP's `f1`
(`precision`, `recall`) are the released parse's micro scores (`paper_f1`), the standard span F1
moving to `span_f1` (`span_precision`, `span_recall`); MultiPIT_Gen's outputs are compared with the
references, not the sources. The other keys are the same under both. The released code also decoded
its outputs and references through its tokenizer: that is the caller's part, before these functions
(`doa_jax.data.vocab.released_decode`, `released_references`; a cell does it, and `doa score --vocab`).

Per-example statistics (`compute_statistics`, `ExampleStatistics`): for the metrics that are sums over
examples (counts of correct labels, of matched entities, ...), each example's counts, so a bootstrap
resample is scored by summing rows instead of re-parsing every prediction (same numbers).

Pure Python and numpy; BERTScore imports torch/transformers only when a scorer model is given.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from doa_jax.metrics.common import PROTOCOLS, ExampleStatistics, _check_lengths, check_protocol
from doa_jax.metrics.entities import (PAPER_WLP_TYPES, _entity_statistics, entity_f1, paper_entity_pairs,
                                      paper_parse_entities, parse_entities)
from doa_jax.metrics.labels import (_accuracy_statistics, _classification_statistics, accuracy, canonical_label,
                                    classification_f1, paper_label)
from doa_jax.metrics.paraphrase import (BERT_IBLEU_NEEDS_SCORER, BERTSCORE_LAYERS, BertScorer, bert_ibleu, ibleu,
                                        sentence_bleu, tokenize_13a)
from doa_jax.metrics.squad import _squad_statistics, normalize_answer, squad, squad_f1


@dataclasses.dataclass(frozen=True)
class Metric:
    fn: Callable[..., dict]
    needs: str | None  # what the card must give: "labels" | "entity_types" | None
    # Per-example statistics (`compute_statistics`), for metrics that are functions of sums over examples.
    statistics: Callable[..., ExampleStatistics] | None = None


METRICS: dict[str, Metric] = {
    "accuracy": Metric(accuracy, "labels", _accuracy_statistics),
    "classification_f1": Metric(classification_f1, "labels", _classification_statistics),
    "squad": Metric(squad, None, _squad_statistics),
    "entity_f1": Metric(entity_f1, "entity_types", _entity_statistics),
    "bert_ibleu": Metric(bert_ibleu, None),   # a per-example BERTScore model: re-scored, no statistics
}


def compute(metric: str, predictions: Sequence[str], references: Sequence[str], *, labels: Sequence[str] = (),
            entity_types: Sequence[str] = (), sources=None, protocol: str = "efficient",
            invalid_label: str | None = None, **options) -> dict:
    """`metric` (a name in METRICS) on predictions vs reference targets, in percent.

    `labels` are the label set of classification metrics, `entity_types` WLP's types, `sources` the
    inputs (MultiPIT_Gen's self-BLEU), `protocol` 'efficient' or 'paper' (see the module docstring),
    `invalid_label` the label 'paper' gives an out-of-label output. `Card.score` passes the card's.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; metrics: {', '.join(sorted(METRICS))}")
    check_protocol(protocol)
    return METRICS[metric].fn(
        list(predictions),
        list(references),
        labels=list(labels),
        entity_types=list(entity_types),
        sources=None if sources is None else list(sources),
        protocol=protocol,
        invalid_label=invalid_label,
        **options,
    )


def compute_statistics(metric: str, predictions: Sequence[str], references: Sequence[str], *,
                       labels: Sequence[str] = (), entity_types: Sequence[str] = (), protocol: str = "efficient",
                       invalid_label: str | None = None) -> ExampleStatistics | None:
    """`metric`'s per-example statistics (see `ExampleStatistics`), or None for a metric without
    them (BERT-iBLEU: score resamples with `compute`). Same arguments and errors as `compute`."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; metrics: {', '.join(sorted(METRICS))}")
    check_protocol(protocol)
    statistics = METRICS[metric].statistics
    if statistics is None:
        return None
    _check_lengths(predictions, references)
    return statistics(list(predictions), list(references), labels=list(labels), entity_types=list(entity_types),
                      protocol=protocol, invalid_label=invalid_label)


__all__ = ["METRICS", "PROTOCOLS", "BERT_IBLEU_NEEDS_SCORER", "BERTSCORE_LAYERS", "BertScorer", "ExampleStatistics",
           "Metric", "PAPER_WLP_TYPES", "accuracy", "bert_ibleu", "canonical_label", "check_protocol",
           "classification_f1", "compute", "compute_statistics", "entity_f1", "ibleu", "normalize_answer",
           "paper_entity_pairs", "paper_label", "paper_parse_entities", "parse_entities", "sentence_bleu", "squad",
           "squad_f1", "tokenize_13a"]
