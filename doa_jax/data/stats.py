"""Data statistics of a task: split sizes, label counts, token-length percentiles, truncation rates, and
the score ceiling they leave.

Lengths are in vocabulary tokens plus the EOS that SeqIO appends (what must fit the feature
length). The truncation rate at the card's lengths is the share of examples whose inputs or targets
would be cut; `doa data stats` prints it, and the cards' lengths are chosen to keep it at or under
1%. The ceiling is what a perfect model scores when its outputs are written in the vocabulary and cut
at the targets length (`score_ceiling`). Imports no TensorFlow.
"""
from __future__ import annotations

import collections
import os
from typing import Mapping

import numpy as np

from doa_jax import metrics
from doa_jax.data import cards as cards_lib
from doa_jax.data import pools as pools_lib
from doa_jax.data import vocab as vocab_lib

PERCENTILES = (50, 90, 95, 99, 99.9, 100)


def token_lengths(card, examples, vocab) -> dict[str, np.ndarray]:
    """Token counts (with EOS) of the prefixed inputs and of the targets."""
    return {
        "inputs": np.array([len(vocab.encode(card.input_prefix + ex["source"])) + 1 for ex in examples]),
        "targets": np.array([len(vocab.encode(ex["target"])) + 1 for ex in examples]),
    }


def label_counts(card, examples) -> dict[str, int]:
    """Class counts (classification), entity-type counts (entities), or {} (free text)."""
    counts: collections.Counter = collections.Counter()
    if card.labels:
        for ex in examples:
            counts[metrics.canonical_label(ex["target"], card.labels) or f"<not a label: {ex['target']}>"] += 1
    elif card.entity_types:
        for ex in examples:
            counts.update(t for _, t in metrics.parse_entities(ex["target"], card.entity_types))
    return dict(counts.most_common())


def task_stats(
    card,
    vocab,
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int | None = None,
    feature_lengths: Mapping[str, int] | None = None,
) -> dict:
    """Sizes, label counts, length percentiles and truncation rates of one task (all splits)."""
    card = cards_lib.load_card(card)
    lengths_at = dict(feature_lengths or card.feature_lengths)
    pools = pools_lib.make_pools(card, seed=seed, data_dir=data_dir)
    labeled = pools.train + pools.validation + pools.test
    every = labeled + pools.unlabeled
    inputs = token_lengths(card, every, vocab)["inputs"]
    targets = token_lengths(card, labeled, vocab)["targets"]
    labeled_inputs = inputs[: len(labeled)]
    cut_in, cut_tgt = labeled_inputs > lengths_at["inputs"], targets > lengths_at["targets"]
    return {
        "task": card.name,
        "vocabulary": {"path": str(vocab.path), "vocab_size": vocab.vocab_size},
        "sizes": pools.sizes(),
        "skipped_lines": pools.skipped,
        "skipped_why": pools.skip_reasons,
        "label_counts": {s: label_counts(card, pools.split(s)) for s in ("train", "validation", "test")},
        "length_percentiles": {
            "inputs": {str(p): int(np.percentile(inputs, p, method="higher")) for p in PERCENTILES},
            "targets": {str(p): int(np.percentile(targets, p, method="higher")) for p in PERCENTILES},
        },
        "feature_lengths": lengths_at,
        "truncation_rate": {
            "inputs": float((inputs > lengths_at["inputs"]).mean()),
            "targets": float(cut_tgt.mean()),
            "either": float((cut_in | cut_tgt).mean()),
        },
        "ceiling": score_ceiling(card, vocab, pools.test, lengths_at["targets"]),
    }


UNSCORED_METRICS = {"bert_ibleu": "BERT-iBLEU needs its BERTScore model"}   # ceilings not computed, and why


def score_ceiling(card, vocab, examples, targets_length: int) -> dict:
    """What a perfect model scores on `examples` (the card's primary metric against the data's targets) when
    its outputs are written in `vocab`: whole, and cut at `targets_length` (EOS included), as a decode of
    that length cuts them; how many targets the vocabulary cannot write (an unknown piece, ⁇), and the
    characters those lose most; how many it only normalises (NFKC: º to o, ™ to TM). The truncation rate is a
    proxy; this is what the lengths and the vocabulary cost the score."""
    if card.metric in UNSCORED_METRICS or not examples:
        return {"metric": card.primary_metric, "skipped": UNSCORED_METRICS.get(card.metric, "no test examples")}
    targets = [ex["target"] for ex in examples]
    ids = [vocab.encode(t) for t in targets]
    whole = [vocab.decode(i) for i in ids]
    unwritable = [vocab.unk_id in i for i in ids]
    lost: collections.Counter = collections.Counter()
    for t, w, u in zip(targets, whole, unwritable):
        if u:
            lost.update(set(t) - set(w))

    def perfect(outputs):
        return float(card.score(outputs, targets, sources=[ex["source"] for ex in examples])[card.primary_metric])
    return {"metric": card.primary_metric, "examples": len(targets), "unwritable_targets": sum(unwritable),
            "normalised_targets": sum(t != w and not u for t, w, u in zip(targets, whole, unwritable)),
            "lost_characters": dict(lost.most_common(8)), "whole": perfect(whole),
            "at_targets_length": perfect([vocab.decode(vocab_lib.within_length(i, targets_length)) for i in ids])}
