"""Pools: a task's examples as labeled pool (`train`), unlabeled pool, `validation` and `test`.

Splits with a file of their own are read from it; the others are carved, by the card's fractions,
out of one file (`[pools] carve_from`), after a seeded permutation. The labeled pool is then put in a
second fixed permutation: buying N labels takes its first N examples (`Pools.annotate(N)`), so a
larger budget's labels always contain a smaller budget's. Unlabeled-pool targets are blanked (an
arm must not see them).

Permutations come from hashing (seed, index) with BLAKE2b rather than from a NumPy generator, so a
seed gives the same pools on every machine and NumPy version. Imports no TensorFlow.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from typing import Mapping, Sequence

from doa_jax.data import cards as cards_lib
from doa_jax.data import jsonl

# Carving order: earlier splits take floor(fraction * n); the last carved split takes the rest.
_CARVE_ORDER = ("test", "validation", "unlabeled", "train")


def permutation(n: int, seed: int, salt: str = "") -> list[int]:
    """A seeded permutation of range(n) that is the same on every platform and library version."""

    def key(i: int) -> bytes:
        return hashlib.blake2b(f"{salt}|{seed}|{i}".encode(), digest_size=16).digest()

    return sorted(range(n), key=key)


def carve(examples: Sequence, fractions: Mapping[str, float], seed: int) -> dict[str, list]:
    """Splits `examples` into disjoint parts of the given fractions after a seeded permutation."""
    order = permutation(len(examples), seed, salt="carve")
    names = [s for s in _CARVE_ORDER if s in fractions] + sorted(set(fractions) - set(_CARVE_ORDER))
    out, start = {}, 0
    for i, name in enumerate(names):
        count = len(order) - start if i == len(names) - 1 else int(fractions[name] * len(order))
        out[name] = [examples[j] for j in order[start : start + count]]
        start += count
    return out


@dataclasses.dataclass
class Pools:
    """The four splits of one task for one seed; `train` is in annotation order."""

    task: str
    seed: int
    train: list[dict[str, str]]
    unlabeled: list[dict[str, str]]
    validation: list[dict[str, str]]
    test: list[dict[str, str]]
    # file key -> why its lines were skipped while reading -> how many (e.g. {"train": {"empty 'target'": 12}})
    skip_reasons: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    @property
    def skipped(self) -> dict[str, int]:
        """File key -> lines skipped while reading (bad lines, empty targets)."""
        return {key: sum(why.values()) for key, why in self.skip_reasons.items()}

    def split(self, name: str) -> list[dict[str, str]]:
        if name not in cards_lib.SPLITS:
            raise ValueError(f"unknown split {name!r}; splits are {', '.join(cards_lib.SPLITS)}")
        return getattr(self, name)

    def annotate(self, n: int) -> list[dict[str, str]]:
        """The first n labels of the labeled pool: the labels a budget of n buys (nested in n)."""
        if not 0 <= n <= len(self.train):
            raise ValueError(
                f"task {self.task}: cannot annotate {n} examples; the labeled pool has {len(self.train)}"
            )
        return self.train[:n]

    def sizes(self) -> dict[str, int]:
        return {s: len(self.split(s)) for s in cards_lib.SPLITS}


def make_pools(
    card: "cards_lib.Card | str",
    *,
    seed: int | None = None,
    data_dir: str | os.PathLike | None = None,
    paths: Mapping[str, str | os.PathLike] | None = None,
    skip_bad: bool = False,
) -> Pools:
    """Reads a task's files and builds its pools (seed defaults to the card's `[pools] seed`).

    paths: explicit file paths per `[data] files` key (e.g. downloads), instead of the data folder.
    """
    card = cards_lib.load_card(card)
    seed = card.pool_seed if seed is None else seed
    parts: dict[str, list] = {}
    reasons: dict[str, dict[str, int]] = {}
    for key in card.files:
        if key not in cards_lib.SPLITS and key != card.carve_from:
            continue
        unlabeled = key == "unlabeled" and key != card.carve_from
        path = paths[key] if paths and key in paths else card.file_path(key, data_dir)
        loaded = jsonl.load_examples(
            path,
            require_target=not unlabeled,
            empty_targets=card.empty_targets,
            skip_bad=skip_bad,
        )
        reasons[key] = dict(collections.Counter(why for _, why in loaded.skipped).most_common())
        if key == card.carve_from:
            parts.update(carve(loaded.examples, card.pool_fractions, seed))
        else:
            parts[key] = loaded.examples
    labeled = parts["train"]
    train = [labeled[i] for i in permutation(len(labeled), seed, salt="annotate")]
    unlabeled_pool = [{"source": ex["source"], "target": ""} for ex in parts["unlabeled"]]
    return Pools(
        task=card.name,
        seed=seed,
        train=train,
        unlabeled=unlabeled_pool,
        validation=parts["validation"],
        test=parts["test"],
        skip_reasons=reasons,
    )
