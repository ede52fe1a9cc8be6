"""SeqIO tasks from task cards: `doa_<task>` (train/validation/test) and `doa_<task>_inputs`.

`doa_<task>` reads a task's pools (`pools.make_pools`: the labeled pool is `train`), prefixes the
inputs, tokenizes with the given vocabulary, appends EOS after trimming to the feature lengths, and
scores predictions with the card's metric (`doa_jax.metrics`) under the `efficient` protocol,
against the data's text. Figures meant for the paper come from a `PROTOCOL='paper'` cell, or from
`doa score --protocol paper --vocab V` on the T5X predictions (the released code's decoding). `doa_<task>_inputs` is the
unlabeled-inputs variant: the same inputs with empty targets, for splits train, unlabeled,
validation and test (what a teacher labels before distillation). Examples keep their
`inputs_pretokenized`, `targets_pretokenized` and `source` strings.

`doa_<task>_L<n>` is `doa_<task>` with the labels a cell of n start labels fine-tunes its teacher on
as its `train` split: the first n of the labeled pool (`Pools.annotate`, what `doa run` uses), so a
T5X teacher is trained on the cell's labels, not the whole pool; validation and test are unchanged.

`register(card, vocab)` adds them to `seqio.TaskRegistry` (replacing earlier registrations of the
same names); `make_task` builds an unregistered task from an explicit list of examples (a pool).
With `DOA_VOCAB=/path/spiece.model` set, importing this module registers all six tasks, which is what
T5X's gin files need (`import doa_jax.data.seqio_tasks`), and with `DOA_START_LABELS=1000,10000` their
start-label variants too.
"""
from __future__ import annotations

import functools
import os
from typing import Mapping, Sequence

from doa_jax.data import quiet_tf  # noqa: F401  (before TF loads: silences its start-up lines)
import seqio
import tensorflow as tf

from doa_jax.data import cards as cards_lib
from doa_jax.data import pools as pools_lib
from doa_jax.data import vocab as vocab_lib

LABELED_SPLITS = ("train", "validation", "test")
INPUT_SPLITS = ("train", "unlabeled", "validation", "test")
SHUFFLE_BUFFER = 1 << 17  # the pools live in memory: shuffle them whole


def task_name(card_name: str, inputs_only: bool = False, start_labels: int | None = None) -> str:
    return f"doa_{card_name}" + ("_inputs" if inputs_only else "") + (f"_L{start_labels}" if start_labels else "")


def seqio_vocabulary(vocab) -> seqio.SentencePieceVocabulary:
    """The seqio twin of a `doa_jax.data.vocab.Vocabulary` (same file, same extra ids)."""
    vocab = vocab_lib.load_vocab(vocab)
    return seqio.SentencePieceVocabulary(str(vocab.path), extra_ids=vocab.extra_ids)


def output_features(vocab) -> dict[str, seqio.Feature]:
    v = seqio_vocabulary(vocab)
    return {"inputs": seqio.Feature(v, add_eos=True), "targets": seqio.Feature(v, add_eos=True)}


def _source(examples_by_split: "Mapping[str, Sequence[dict]] | callable", splits, inputs_only: bool):
    def dataset_fn(split: str, shuffle_files: bool, seed=None):
        del shuffle_files, seed  # one in-memory "file" per split; shuffling happens in the Task
        parts = examples_by_split() if callable(examples_by_split) else examples_by_split
        examples = parts[split]
        return tf.data.Dataset.from_tensor_slices(
            {
                "source": tf.constant([ex["source"] for ex in examples], dtype=tf.string),
                "target": tf.constant(["" if inputs_only else ex["target"] for ex in examples], tf.string),
            }
        )

    return seqio.FunctionDataSource(dataset_fn, splits=list(splits))


def _formatter(prefix: str):
    @seqio.map_over_dataset
    def fmt(ex):
        return {
            "inputs": tf.strings.join([prefix, ex["source"]]),
            "targets": ex["target"],
            "source": ex["source"],
        }

    return fmt


def _postprocess(output, example=None, is_target=False):
    """Targets carry their source along (MultiPIT_Gen is scored against it)."""
    if is_target:
        return {"target": output, "source": example["source"].decode("utf-8") if example else None}
    return output


def _metric_fn(card):
    def metric(targets, predictions):
        refs = [t["target"] if isinstance(t, dict) else t for t in targets]
        sources = [t.get("source") if isinstance(t, dict) else None for t in targets]
        result = card.score(predictions, refs, sources=None if None in sources else sources)
        return {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    metric.__name__ = f"{card.name}_{card.metric}"
    return metric


def make_task(
    card,
    vocab,
    examples_by_split,
    *,
    name: str | None = None,
    inputs_only: bool = False,
) -> seqio.Task:
    """An (unregistered) seqio.Task over {split: [{"source","target"}, ...]} (or a callable giving it)."""
    card = cards_lib.load_card(card)
    splits = list(examples_by_split) if isinstance(examples_by_split, Mapping) else (
        INPUT_SPLITS if inputs_only else LABELED_SPLITS
    )
    return seqio.Task(
        name or task_name(card.name, inputs_only),
        source=_source(examples_by_split, splits, inputs_only),
        output_features=output_features(vocab),
        preprocessors=[
            _formatter(card.input_prefix),
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos_after_trim,
        ],
        postprocess_fn=None if inputs_only else _postprocess,
        metric_fns=[] if inputs_only else [_metric_fn(card)],
        shuffle_buffer_size=SHUFFLE_BUFFER,
    )


@functools.lru_cache(maxsize=32)
def _pools(card_path: str, seed: int | None, data_dir: str | None) -> pools_lib.Pools:
    return pools_lib.make_pools(card_path, seed=seed, data_dir=data_dir)


def pool_splits(card, *, seed: int | None = None, data_dir=None, start_labels: int | None = None
                ) -> dict[str, list[dict]]:
    """{split: examples} of a card's pools (read once per card, seed and folder); with `start_labels`,
    `train` is the first that many labels of the labeled pool, as a cell with them fine-tunes on."""
    card = cards_lib.load_card(card)
    p = _pools(str(card.path), seed, None if data_dir is None else os.fspath(data_dir))
    parts = {s: p.split(s) for s in INPUT_SPLITS}
    if start_labels is not None:
        parts["train"] = p.annotate(start_labels)
    return parts


def register(card, vocab, *, seed: int | None = None, data_dir=None, start_labels: Sequence[int] = ()) -> list[str]:
    """Registers `doa_<task>`, `doa_<task>_inputs` and `doa_<task>_L<n>` for each n of `start_labels`;
    files are read on first use. Returns the names."""
    card = cards_lib.load_card(card)
    tasks = []
    for inputs_only, n in [(False, None), (True, None), *((False, n) for n in start_labels)]:
        parts = functools.partial(pool_splits, card, seed=seed, data_dir=data_dir, start_labels=n)
        tasks.append(make_task(card, vocab, parts, inputs_only=inputs_only, name=task_name(card.name, inputs_only, n)))
    for task in tasks:
        if task.name in seqio.TaskRegistry.names():
            seqio.TaskRegistry.remove(task.name)
        seqio.TaskRegistry.add_provider(task.name, task)
    return [t.name for t in tasks]


def register_all(vocab, *, seed: int | None = None, data_dir=None, start_labels: Sequence[int] = ()) -> list[str]:
    """Registers the tasks of every card in `tasks/`."""
    return [n for c in cards_lib.card_names()
            for n in register(c, vocab, seed=seed, data_dir=data_dir, start_labels=start_labels)]


def start_labels_from_env() -> list[int]:
    """The start labels of `DOA_START_LABELS` (comma-separated counts; unset: none)."""
    text = os.environ.get("DOA_START_LABELS", "")
    try:
        counts = [int(part) for part in text.replace("_", "").split(",") if part.strip()]
    except ValueError:
        counts = [0]
    if any(n < 1 for n in counts):
        raise ValueError(f"DOA_START_LABELS must be comma-separated counts >= 1 (e.g. 1000,10000), got {text!r}")
    return counts


if os.environ.get("DOA_VOCAB"):
    register_all(vocab_lib.Vocabulary(os.environ["DOA_VOCAB"]), start_labels=start_labels_from_env())
