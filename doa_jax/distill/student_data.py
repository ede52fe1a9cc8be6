"""The student's training data in a distillation cell: pseudo-labels from the teacher's outputs.

    stored outputs ──► confident rows ──► arrays (teacher tokens as targets, their top-k logits as
    soft targets) ──► [mixed: + gold rows, with the teacher's logits on the gold targets]
    online: every batch is run through the teacher for its full-vocabulary logits (the paper's code)
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from doa_jax import decoding, partitioning
from doa_jax.data.encode import shift_right
from doa_jax.distill import outputs as teacher_outputs
from doa_jax.distill.store import TeacherOutputs
from doa_jax.model import Transformer


def teacher_confidence(outputs: TeacherOutputs) -> np.ndarray:
    """Per example, the teacher's mean token probability on its own output: exp(log p(y) / |y|)."""
    return np.exp(outputs.sequence_logprob / np.maximum(outputs.lengths, 1))


def confident_rows(outputs: TeacherOutputs, min_confidence: float) -> np.ndarray:
    """Indices of pseudo-labels whose teacher confidence is at least `min_confidence` (0 keeps all)."""
    if not 0.0 <= min_confidence < 1.0:
        raise ValueError(f"MIN_TEACHER_CONFIDENCE must be in [0, 1), got {min_confidence}")
    return np.flatnonzero(teacher_confidence(outputs) >= min_confidence)


def from_store(outputs: TeacherOutputs, enc: np.ndarray, targets_length: int,
               keep: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Student arrays: teacher tokens as targets, their top-k logits as soft targets (rows `keep`)."""
    if keep is not None:
        outputs = dataclasses.replace(outputs, tokens=outputs.tokens[keep], topk_values=outputs.topk_values[keep],
                                      topk_ids=outputs.topk_ids[keep])
        enc = enc[keep]

    t = min(targets_length, outputs.tokens.shape[1])
    tokens = np.zeros((len(enc), targets_length), np.int32)
    tokens[:, :t] = outputs.tokens[:, :t]
    k = outputs.topk_values.shape[-1]
    values = np.zeros((len(enc), targets_length, k), np.float32)
    ids = np.zeros((len(enc), targets_length, k), np.int32)
    values[:, :t], ids[:, :t] = outputs.topk_values[:, :t], outputs.topk_ids[:, :t]
    return {"encoder_input_tokens": enc, "decoder_target_tokens": tokens, "decoder_input_tokens": shift_right(tokens),
            "decoder_loss_weights": (tokens > 0).astype(np.float32), "teacher_topk_values": values,
            "teacher_topk_ids": ids}


def with_gold_rows(arrays: Mapping[str, np.ndarray], gold: dict[str, np.ndarray], teacher: Transformer, params: Any,
                   topk: Optional[int]) -> dict[str, np.ndarray]:
    """Mixed strategy: gold rows join the pseudo-labeled rows, with the teacher's top-k logits on the
    gold targets (teacher-forced), so `kd_weight` mixes KD and gold cross-entropy. `topk=None`
    (online soft targets, which replace these per batch) stores only the top-1."""
    values, ids = teacher_outputs.score_targets(teacher, params, gold["encoder_input_tokens"],
                                                gold["decoder_target_tokens"], topk or 1)
    gold = dict(gold, teacher_topk_values=values, teacher_topk_ids=ids)
    return {k: np.concatenate([arrays[k], gold[k]]) for k in arrays}


@functools.partial(jax.jit, static_argnums=0)
def teacher_logits(module: Transformer, params: Any, encoder_input_tokens: jax.Array,
                   decoder_input_tokens: jax.Array) -> jax.Array:
    """The teacher's full-vocabulary logits `[B, T, V]` (float32) on a batch: the online soft targets."""
    return module.apply({"params": params}, encoder_input_tokens, decoder_input_tokens)


class ReleasedPadding:
    """The length the released code pads each distillation batch to (its `teacher_padded_length`).

    The released `DistillationTrainer` runs `generate` on a batch and caches each row's padded
    output by input; a later batch whose rows are all cached is padded to the longest of those
    cached rows, not to its own longest. So a batch is padded to 1 + its longest teacher sequence
    (the start token) unless every row was seen before, and then to the longest length its rows
    were padded to when last generated; the rows of a generated batch remember its length. Keyed by
    a hash of the encoder tokens (the released key is the decoded input). Per row: the length, 0
    for padding rows; the loss takes the batch's largest (on several hosts each host remembers its
    own share of a batch, so from the second epoch a row may remember a shorter length than on
    one). A resumed run starts with nothing remembered, as the released trainer does."""

    def __init__(self):
        self.seen: dict[bytes, int] = {}

    def __call__(self, encoder_tokens: np.ndarray, target_tokens: np.ndarray) -> np.ndarray:
        t = target_tokens.shape[1]
        lengths = np.max(np.where(target_tokens > 0, np.arange(1, t + 1), 0), axis=1)
        real = lengths > 0
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row, r in zip(encoder_tokens, real) if r]
        if keys and all(k in self.seen for k in keys):
            padded = max(self.seen[k] for k in keys)
        else:
            padded = min(int(lengths.max()) + 1, t)
            self.seen.update((k, padded) for k in keys)
        return np.where(real, padded, 0).astype(np.int32)


class OnlineTeacherBatches:
    """A batch source that runs the teacher on every batch for its full soft targets (the paper's code),
    and says the length the released code would pad the batch to (`ReleasedPadding`).
    The teacher's params are cast once to the decoding dtypes (`decoding.decoding_params`): the model
    computes in them anyway, so the logits are the same from half the memory in bf16. The logits stay
    on the devices (the rows over the teacher's mesh's `data` axis) and go to the student's step from
    there; the full vocabulary in id order needs no ids (`teacher_topk_ids` is dropped)."""

    def __init__(self, source, module: Transformer, params: Any, context: Callable[[], Any] = contextlib.nullcontext):
        self.source, self.batch_size, self.steps_per_epoch = source, source.batch_size, source.steps_per_epoch
        self.context = context      # the teacher's mesh and rules (`partitioning.mesh_context`)
        self._logits = functools.partial(teacher_logits, module)
        self.params = decoding.decoding_params(params, module)
        self._leaf = jax.tree_util.tree_leaves(self.params)[0]
        if isinstance(self._leaf, jax.Array) and not self._leaf.is_fully_addressable:
            # each host feeds its own rows, which `rows_like` may only spread over this host's devices
            raise ValueError("the online teacher's params span several processes; place them on this host's "
                             "devices (CellRun.inference_mesh)")
        self.padding = ReleasedPadding()

    def iterate(self, start: int = 0):
        for batch in self.source.iterate(start):
            enc, dec = (partitioning.rows_like(np.asarray(batch[k]), self._leaf)
                        for k in ("encoder_input_tokens", "decoder_input_tokens"))
            with self.context():
                logits = self._logits(self.params, enc, dec)
            rest = {k: v for k, v in batch.items() if k != "teacher_topk_ids"}
            yield dict(rest, teacher_topk_values=logits,
                       teacher_padded_length=self.padding(batch["encoder_input_tokens"], batch["decoder_target_tokens"]))
