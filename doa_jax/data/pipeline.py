"""Batches for the trainer and the arms: a task split (or an explicit pool) through SeqIO.

`batches(...)` builds the card's SeqIO task, tokenizes, trims/pads (or packs) to the feature
lengths with `seqio.EncDecFeatureConverter`, shards and batches, and yields NumPy dicts with the
converter's keys: `encoder_input_tokens`, `decoder_input_tokens`, `decoder_target_tokens`,
`decoder_loss_weights` (plus `encoder_segment_ids`, `encoder_positions`, `decoder_segment_ids`,
`decoder_positions` when packed). The last batch of a finite pass may be short; `drop_remainder`
drops it, `pad_remainder` fills it with all-zero rows (zero loss weight; an all-zero
`encoder_input_tokens` row is padding, since a real example has at least its EOS), so jitted steps
see one shape.
"""
from __future__ import annotations

import os
from typing import Iterator, Mapping, Sequence

import numpy as np

from doa_jax.data import quiet_tf  # noqa: F401  (before TF loads: silences its start-up lines)
import seqio

from doa_jax.data import cards as cards_lib
from doa_jax.data import seqio_tasks


def batches(
    task_name_or_card,
    split: str,
    feature_lengths: Mapping[str, int] | None = None,
    batch_size: int = 32,
    *,
    vocab,
    shuffle: bool = False,
    seed: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    pack: bool = False,
    num_epochs: int | None = 1,
    examples: Sequence[Mapping[str, str]] | None = None,
    inputs_only: bool | None = None,
    pool_seed: int | None = None,
    data_dir: str | os.PathLike | None = None,
    drop_remainder: bool = False,
    pad_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields batches of `split` of a task (a card name, path or Card, or `doa_<task>[_inputs]`).

    examples: an explicit list of {"source","target"} (e.g. `pools.annotate(n)` or teacher-labeled
      inputs) used as `split` instead of the task's own split.
    inputs_only: blank the targets (default: True for the "unlabeled" split).
    pool_seed / data_dir: which pools (default: the card's seed; the card's data folder).
    num_epochs=None repeats forever. Shards split the examples (shard_id of num_shards).
    """
    if isinstance(task_name_or_card, str) and task_name_or_card.startswith("doa_"):
        # a registered SeqIO task name: doa_<task> or doa_<task>_inputs
        name = task_name_or_card[len("doa_"):]
        if name.endswith("_inputs"):
            name, inputs_only = name[: -len("_inputs")], True
        task_name_or_card = name
    card = cards_lib.load_card(task_name_or_card)
    if vocab is None:
        raise ValueError("batches() needs a vocabulary (a SentencePiece model path or Vocabulary)")
    lengths = dict(feature_lengths or card.feature_lengths)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} is not in [0, {num_shards})")
    if inputs_only is None:
        inputs_only = split == "unlabeled"
    if examples is not None:
        parts = {split: list(examples)}
    else:
        parts = seqio_tasks.pool_splits(card, seed=pool_seed, data_dir=data_dir)
        if split not in parts:
            raise ValueError(f"unknown split {split!r} of task {card.name}; splits are {', '.join(parts)}")
        parts = {split: parts[split]}
    task = seqio_tasks.make_task(card, vocab, parts, inputs_only=inputs_only)
    ds = task.get_dataset(
        sequence_length=lengths,
        split=split,
        shuffle=shuffle,
        seed=seed,
        shard_info=seqio.ShardInfo(shard_id, num_shards) if num_shards > 1 else None,
        num_epochs=num_epochs,
        use_cached=False,
    )
    ds = seqio.EncDecFeatureConverter(pack=pack)(ds, lengths)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    for batch in ds.as_numpy_iterator():
        rows = next(iter(batch.values())).shape[0]
        if pad_remainder and rows < batch_size:
            fill = batch_size - rows
            batch = {k: np.concatenate([v, np.zeros((fill,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
        yield batch
