"""A built-in, seeded task in WLP's format, for `doa demo` and offline tests.

Protocol-like sentences ("Add 25 ul of Tris buffer to the PCR tube.") map to typed spans
("Add [Action] 25 ul [Amount] Tris buffer [Reagent] PCR tube [Location]"), the paper's WLP
target format, so WLP's metric and post-processing apply unchanged. Everything is generated from
word tables and sentence templates with a seeded RNG: no files, no network.
"""
from __future__ import annotations

import pathlib
import random

from doa_jax.data import vocab as vocab_lib
from doa_jax.data.cards import Card
from doa_jax.data.pools import Pools

NAME = "demo"   # the name users type (`--task demo`, TASK = 'demo'), in reports and plots too
# Priced like WLP, whose format it copies.
ANNOTATION_COST_USD = 0.26

WORDS: dict[str, tuple[str, ...]] = {
    "Action": ("Add", "Mix", "Incubate", "Centrifuge", "Transfer", "Wash", "Resuspend", "Vortex",
               "Pipette", "Discard", "Store", "Heat", "Cool", "Dilute", "Spin"),
    "Reagent": ("Tris buffer", "ethanol", "PBS", "lysis buffer", "water", "agarose gel", "DNA",
                "primer mix", "master mix", "cells", "supernatant", "pellet", "sodium chloride",
                "glycerol", "proteinase K", "RNase A", "elution buffer", "sample"),
    "Amount": ("5 ul", "10 ul", "25 ul", "50 ul", "100 ul", "200 ul", "1 ml", "1.5 ml", "2 ml",
               "10 ml", "0.5 ml"),
    "Location": ("PCR tube", "microcentrifuge tube", "plate", "column", "flask", "beaker", "well",
                 "new tube", "ice", "rack"),
    "Device": ("centrifuge", "thermocycler", "vortexer", "water bath", "incubator", "heat block",
               "shaker", "spectrophotometer"),
    "Temperature": ("4 C", "25 C", "37 C", "55 C", "65 C", "95 C", "room temperature"),
    "Time": ("30 s", "1 min", "2 min", "5 min", "10 min", "15 min", "30 min", "1 h", "overnight"),
    "Speed": ("500 rpm", "1,000 rpm", "5,000 rpm", "13,000 rpm", "12,000 x g", "max speed"),
}

# Templates: literal words and {Type} slots; the target lists the slot fillers with their types.
TEMPLATES: tuple[str, ...] = (
    "{Action} {Amount} of {Reagent} to the {Location} .",
    "{Action} the {Reagent} at {Temperature} for {Time} .",
    "{Action} at {Speed} for {Time} in a {Device} .",
    "{Action} the {Reagent} with {Amount} of {Reagent} .",
    "{Action} the {Location} on the {Device} for {Time} .",
    "{Action} {Amount} {Reagent} and {Action} gently .",
    "{Action} the {Reagent} in the {Location} at {Temperature} .",
    "Then {Action} the {Reagent} into a {Location} .",
    "{Action} for {Time} at {Speed} .",
    "{Action} the {Reagent} at {Temperature} overnight in the {Device} .",
)

LABELS = tuple(sorted(WORDS))


def make_example(rng: random.Random) -> dict[str, str]:
    """One {"source", "target"} pair."""
    template = rng.choice(TEMPLATES)
    source, spans = [], []
    for token in template.split():
        if token.startswith("{") and token.endswith("}"):
            kind = token[1:-1]
            text = rng.choice(WORDS[kind])
            source.append(text)
            spans.append(f"{text} [{kind}]")
        else:
            source.append(token)
    return {"source": " ".join(source).replace(" .", "."), "target": " ".join(spans)}


def make_split(num_examples: int, seed: int) -> list[dict[str, str]]:
    """`num_examples` examples from a seeded generator (same seed, same list)."""
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    rng = random.Random(f"{NAME}:{seed}")
    return [make_example(rng) for _ in range(num_examples)]


def make_task(seed: int = 0, labeled: int = 512, unlabeled: int = 1024, test: int = 256) -> dict[str, list]:
    """The demo's pools: labeled (to annotate from), unlabeled (inputs only), and test."""
    unlabeled_pool = [{"source": ex["source"], "target": ""} for ex in make_split(unlabeled, seed + 1)]
    return {"labeled": make_split(labeled, seed), "unlabeled": unlabeled_pool,
            "test": make_split(test, seed + 2)}


# ----------------------------------------------------------------------------- as a task

FEATURE_LENGTHS = {"inputs": 40, "targets": 48}
VOCAB_PIECES = 400
# Embedding rows of the demo's models: `model_vocab_size(build_vocab(...))` (the build is
# deterministic; a test checks this constant, which `doa calibrate --task demo` uses without building it).
MODEL_VOCAB_SIZE = 384


def card():
    """The demo's task card: WLP's metric (entity F1) over the demo's entity types."""
    return Card(name=NAME, path=pathlib.Path("<built-in demo task>"),
                description="procedurally generated protocol sentences -> typed spans (WLP's format)",
                input_prefix="protocol: ", feature_lengths=dict(FEATURE_LENGTHS), coverage={},
                metric="entity_f1", primary_metric="f1", annotation_cost_usd=ANNOTATION_COST_USD, labels=(),
                entity_types=LABELS, files={}, urls={}, subdir=NAME, empty_targets="error", carve_from=None,
                pool_fractions={}, pool_seed=0)


def pools(seed: int = 0, labeled: int = 512, unlabeled: int = 1024, test: int = 256, validation: int = 64):
    """The demo's pools, in the same shape as a real task's (`doa_jax.data.pools.Pools`)."""
    task = make_task(seed, labeled, unlabeled, test)
    return Pools(task=NAME, seed=seed, train=task["labeled"], unlabeled=task["unlabeled"],
                 validation=make_split(validation, seed + 3), test=task["test"])


def build_vocab(directory, task_pools=None):
    """A SentencePiece vocabulary (T5 ids) trained on the demo's text; built once per directory."""
    path = pathlib.Path(directory) / f"{NAME}_vocab.model"
    if not path.exists():
        task_pools = task_pools or pools()
        texts = [card().input_prefix + ex["source"] for ex in task_pools.train + task_pools.unlabeled]
        texts += [ex["target"] for ex in task_pools.train]
        vocab_lib.build_vocab(texts, path, vocab_size=VOCAB_PIECES)
    return vocab_lib.load_vocab(path)


def model_vocab_size(vocab) -> int:
    """The embedding rows a model needs for `vocab`: its ids padded to a multiple of 128."""
    return vocab_lib.padded_vocab_size(vocab)
