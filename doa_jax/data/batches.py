"""Batches for the trainer, resumable at any step.

A *batch source* has `iterate(start)`, yielding this host's numpy batches (SeqIO keys:
`encoder_input_tokens`, `decoder_input_tokens`, `decoder_target_tokens`,
`decoder_loss_weights`, optional segment ids / positions) from global batch index `start` on, and
`steps_per_epoch` (None when unknown). The trainer saves the number of batches consumed in its
checkpoints and resumes with `iterate(consumed)`, so a resumed run sees the batches an
uninterrupted run would.

* `ArrayBatches`: in-memory arrays, epoch/offset indexed (a seeded permutation per epoch), so
  resuming costs nothing; `pad_remainder=True` keeps the last partial batch (eval) by padding
  it with zero-weight rows, so every batch has the same shape (no recompiles).
* `IterableBatches`: any deterministic iterable factory (e.g. the SeqIO pipeline with a fixed
  seed); resuming re-creates it and skips the consumed batches.
* `copy_task`: a synthetic copy / tagging task in numpy, for smoke runs and tests.
* `TaskData`: the gin-facing spec of a SeqIO task split, wired to `doa_jax.data.pipeline`.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Protocol

import jax
import numpy as np

from doa_jax.data import cards, vocab as vocab_lib
from doa_jax.data.encode import shift_right

Batch = dict[str, np.ndarray]
FEATURE_KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                "decoder_loss_weights")
# Soft targets of distillation ride along in the batch (see `doa_jax.losses`), with the length the
# released code pads an online-distillation batch to (`distill.student_data.ReleasedPadding`).
TEACHER_KEYS = ("teacher_topk_values", "teacher_topk_ids", "teacher_padded_length")


class BatchSource(Protocol):
    batch_size: int                      # global batch size
    steps_per_epoch: Optional[int]

    def iterate(self, start: int = 0) -> Iterator[Batch]: ...


def _host_rows(batch_size: int, shard_index: int, num_shards: int) -> slice:
    if batch_size % num_shards:
        raise ValueError(f"batch size {batch_size} is not divisible by the {num_shards} data shards (hosts)")
    per = batch_size // num_shards
    return slice(shard_index * per, (shard_index + 1) * per)


class ArrayBatches:
    """Global batches over in-memory arrays (all hosts hold the arrays; each yields its rows)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, pad_remainder: bool = False, shard_index: int = 0, num_shards: int = 1,
                 num_epochs: Optional[int] = None):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        lengths = {k: len(v) for k, v in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays have different numbers of rows: {lengths}")
        self.num_examples = next(iter(lengths.values()))
        if self.num_examples == 0:
            raise ValueError("no examples")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.pad_remainder, self.num_epochs = pad_remainder, num_epochs
        self._rows = _host_rows(batch_size, shard_index, num_shards)
        full, rest = divmod(self.num_examples, batch_size)
        self.steps_per_epoch = full + (1 if pad_remainder and rest else 0)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.num_examples} examples make no full batch of {batch_size}; "
                             f"lower the batch size")

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def _batch(self, epoch: int, offset: int) -> Batch:
        idx = self._order(epoch)[offset * self.batch_size:(offset + 1) * self.batch_size]
        batch = {k: v[idx] for k, v in self.arrays.items()}
        if len(idx) < self.batch_size:   # padded rows: all zeros, so zero loss weight
            pad = self.batch_size - len(idx)
            batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
        return {k: v[self._rows] for k, v in batch.items()}

    def iterate(self, start: int = 0) -> Iterator[Batch]:
        for i in itertools.count(start):
            epoch, offset = divmod(i, self.steps_per_epoch)
            if self.num_epochs is not None and epoch >= self.num_epochs:
                return
            yield self._batch(epoch, offset)


class IterableBatches:
    """Batches from `factory()` (a fresh, deterministic iterable of this host's batches)."""

    def __init__(self, factory: Callable[[], Iterable[Batch]], batch_size: int,
                 steps_per_epoch: Optional[int] = None):
        self.factory, self.batch_size, self.steps_per_epoch = factory, batch_size, steps_per_epoch

    def iterate(self, start: int = 0) -> Iterator[Batch]:
        return itertools.islice(iter(self.factory()), start, None)


def copy_task(num_examples: int, length: int, vocab_size: int, *, seed: int = 0,
              kind: str = "copy") -> Batch:
    """A synthetic seq2seq task in SeqIO's feature layout (ids >= 2; 0 = pad, 1 = EOS).

    `copy`: the target repeats the input. `tag`: each target token is a fixed function of the
    input token at the same position (a tagging task). Inputs have random lengths in
    [length // 2, length - 1] plus EOS; targets have the same length.
    """
    if kind not in ("copy", "tag"):
        raise ValueError(f"copy_task kind must be 'copy' or 'tag', got {kind!r}")
    if vocab_size < 4 or length < 3:
        raise ValueError("copy_task needs vocab_size >= 4 and length >= 3")
    rng = np.random.default_rng(seed)
    enc = np.zeros((num_examples, length), np.int32)
    tgt = np.zeros((num_examples, length), np.int32)
    tag_table = rng.permutation(np.arange(2, vocab_size))
    for i in range(num_examples):
        n = int(rng.integers(length // 2, length))
        words = rng.integers(2, vocab_size, size=n)
        out = words if kind == "copy" else tag_table[words - 2]
        enc[i, :n], enc[i, n] = words, 1
        tgt[i, :n], tgt[i, n] = out, 1
    return dict(encoder_input_tokens=enc, decoder_target_tokens=tgt,
                decoder_input_tokens=shift_right(tgt),
                decoder_loss_weights=(tgt > 0).astype(np.float32))


@dataclasses.dataclass(frozen=True)
class CopyTaskData:
    """Gin-facing spec of the synthetic task (smoke runs: `gin/runs/smoke.gin`)."""

    num_examples: int = 64
    length: int = 8
    vocab_size: int = 32
    kind: str = "copy"
    seed: int = 0
    shuffle: bool = True

    def source(self, batch_size: int, *, train: bool, shard_index: int = 0, num_shards: int = 1,
               num_epochs: Optional[int] = None) -> ArrayBatches:
        arrays = copy_task(self.num_examples, self.length, self.vocab_size, seed=self.seed, kind=self.kind)
        return ArrayBatches(arrays, batch_size, shuffle=self.shuffle and train, seed=self.seed,
                            pad_remainder=not train, shard_index=shard_index, num_shards=num_shards,
                            num_epochs=None if train else 1)

    def feature_lengths(self) -> dict[str, int]:
        return {"inputs": self.length, "targets": self.length}

    def vocab_ids(self) -> tuple[int, str]:
        """(ids the model must embed, what they are): the vocab size of a model follows it."""
        return self.vocab_size, f"CopyTaskData has {self.vocab_size} ids"


@dataclasses.dataclass(frozen=True)
class TaskData:
    """Gin-facing spec of one split of a task card's SeqIO task (`doa_jax.data`), read per host.

    Training reads the split repeated (`num_epochs=None`) in a seeded order, full batches only;
    evaluation reads it once, in order, padding the last batch with zero-weight rows.
    `vocab` is the SentencePiece model path (T5's `spiece.model`).
    """

    task: str
    split: str = "train"
    feature_lengths: Optional[Mapping[str, int]] = None
    vocab: Optional[str] = None
    shuffle: bool = True
    seed: int = 0
    pack: bool = False

    def _batches(self, local_batch: int, shard_index: int, num_shards: int, *, train: bool,
                 num_epochs: Optional[int]):
        from doa_jax.data import pipeline  # imports TF/SeqIO: only when a task is named

        return pipeline.batches(self.task, self.split, self.feature_lengths, local_batch, vocab=self.vocab,
                                shuffle=self.shuffle and train, seed=self.seed, shard_id=shard_index,
                                num_shards=num_shards, pack=self.pack and train, num_epochs=num_epochs,
                                drop_remainder=train, pad_remainder=not train)

    def source(self, batch_size: int, *, train: bool, shard_index: int = 0, num_shards: int = 1,
               num_epochs: Optional[int] = None) -> IterableBatches:
        if self.vocab is None:
            raise ValueError(f"task {self.task!r} needs a vocabulary: set VOCABULARY to a SentencePiece model")
        local = _host_rows(batch_size, shard_index, num_shards)
        local_batch = local.stop - local.start
        steps = None
        if train:   # one pass to learn the epoch size (full batches of this host's shard)
            steps = sum(1 for _ in self._batches(local_batch, shard_index, num_shards, train=True, num_epochs=1))
            if steps == 0:
                raise ValueError(f"task {self.task!r} split {self.split!r} has fewer examples per host than "
                                 f"one batch of {local_batch}")
        return IterableBatches(
            lambda: self._batches(local_batch, shard_index, num_shards, train=train,
                                  num_epochs=None if train else 1),
            batch_size, steps)

    def vocab_ids(self) -> tuple[int, str]:
        """(ids the model must embed, what they are): the vocabulary's, pieces + extra ids."""
        if self.vocab is None:
            raise ValueError(f"task {self.task!r} needs a vocabulary: set VOCABULARY to a SentencePiece model")
        vocab = vocab_lib.load_vocab(self.vocab)
        return vocab.vocab_size, vocab_lib.describe(vocab)

    def decode_metrics(self) -> Callable[[np.ndarray, Any], dict[str, float]]:
        """The card's task metrics (`doa_jax.metrics`, percent) on detokenized greedy decodes."""
        card = cards.load_card(self.task)
        vocab = vocab_lib.load_vocab(self.vocab)

        def compute(predictions: np.ndarray, batches) -> dict[str, float]:
            targets = np.concatenate([b["decoder_target_tokens"] for b in batches])
            inputs = np.concatenate([b["encoder_input_tokens"] for b in batches])
            keep = targets.max(axis=1) > 0                       # padding rows have no target
            refs = [vocab.decode(t) for t in targets[keep]]
            hyps = [vocab.decode(p) for p in predictions[: len(targets)][keep]]
            sources = [_strip_prefix(vocab.decode(x), card.input_prefix) for x in inputs[keep]]
            result = card.score(hyps, refs, sources=sources)
            return {k: float(v) for k, v in result.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}

        return compute


def _strip_prefix(text: str, prefix: str) -> str:
    head = prefix.strip()
    return text[len(head):].lstrip() if head and text.startswith(head) else text


def pad_batches(batches: Iterable[Batch], batch_size: int) -> Iterator[Batch]:
    """Pads short batches with all-zero rows (zero loss weight) so shapes never change."""
    for b in batches:
        n = len(b["encoder_input_tokens"])
        if n < batch_size:
            b = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
                 for k, v in b.items()}
        yield b


def take_features(batch: Mapping[str, Any]) -> Batch:
    """The model-facing numeric features of a batch (drops e.g. `*_pretokenized` strings); arrays
    already on devices (the online teacher's logits) stay there."""
    return {k: v if isinstance(v, jax.Array) else np.asarray(v) for k, v in batch.items()
            if k in FEATURE_KEYS or k in TEACHER_KEYS or k.endswith("_segment_ids") or k.endswith("_positions")}


__all__ = ["ArrayBatches", "BatchSource", "CopyTaskData", "IterableBatches", "TaskData", "copy_task",
           "pad_batches", "shift_right", "take_features"]
