"""Dev evaluation of a run: teacher-forced loss and token accuracy, and greedy-decode metrics."""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from doa_jax import decoding, partitioning, progress
from doa_jax.data.batches import BatchSource, take_features
from doa_jax.trainer.program import StepProgram

DecodeMetricsFn = Callable[[np.ndarray, Sequence[Mapping[str, np.ndarray]]], Mapping[str, float]]


def evaluate(program: StepProgram, params, source: BatchSource, *, decode_metrics: Optional[DecodeMetricsFn] = None,
             max_decode_len: Optional[int] = None, log_seconds: Optional[float] = None) -> dict[str, float]:
    """Teacher-forced `loss` (per token, no z-loss) and `token_accuracy` over one pass of `source`,
    plus `decode_metrics(predictions, batches)` of greedy decodes when given (all hosts' rows,
    padding rows included: a padding row has an all-zero target). `log_seconds`: a decoding
    progress line at most that often (None: silent)."""
    sums, kept = None, []
    with partitioning.mesh_context(program.mesh, program.rules):
        for local in source.iterate(0):
            batch = partitioning.global_batch(take_features(local), program.mesh)
            out = program.eval_step(params, batch)
            sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
            if decode_metrics is not None:
                kept.append(batch)
    if sums is None:
        raise ValueError("the evaluation source yielded no batches")
    sums = jax.device_get(sums)
    n = max(float(sums["num_tokens"]), 1.0)
    result = {"loss": float(sums["nll_sum"]) / n, "token_accuracy": float(sums["correct"]) / n}
    if decode_metrics is not None:
        preds = greedy_decode(program, params, kept, max_decode_len, log_seconds)
        host = [{k: partitioning.to_host(v) for k, v in b.items()} for b in kept]
        result.update({k: float(v) for k, v in decode_metrics(preds, host).items()})
    return result


def greedy_decode(program: StepProgram, params, batches: Sequence[Mapping[str, Any]],
                  max_decode_len: Optional[int] = None, log_seconds: Optional[float] = None) -> np.ndarray:
    """Greedy decodes `[N, L]` (no start token, 0 after EOS) of the batches' encoder inputs
    (global arrays from `partitioning.global_batch`, or host numpy on one host)."""
    outs, counter = [], DecodeCounter(batches, log_seconds)
    with partitioning.mesh_context(program.mesh, program.rules):
        for b in batches:
            length = max_decode_len or b["decoder_target_tokens"].shape[1]
            outs.append(partitioning.to_host(decoding.greedy(program.model_config, params, b["encoder_input_tokens"],
                                                             length).tokens))
            counter.add()
    counter.done()
    return np.concatenate(outs)


class DecodeCounter:
    """Validation decoding's progress: `decoding validation: 128/835 examples (12.3 ex/s)` at most
    every `log_seconds`, and one closing line; counts real rows (a padding row has no target).
    `log_seconds=None`: silent."""

    def __init__(self, batches: Sequence[Mapping[str, Any]], log_seconds: Optional[float]):
        self.on = log_seconds is not None
        self.beat = progress.Heartbeat(log_seconds)
        self.start, self.done_rows = time.perf_counter(), 0
        real = ([int((partitioning.to_host(b["decoder_target_tokens"]).max(axis=1) > 0).sum()) for b in batches]
                if self.on else [])
        self.total, self.rows = sum(real), iter(real)

    def add(self) -> None:
        self.done_rows += next(self.rows, 0)
        if self.on and self.beat.due():
            print(f"decoding validation: {self.done_rows}/{self.total} examples ({self._rate():.1f} ex/s)", flush=True)
            self.beat.reset()

    def done(self) -> None:
        if self.on:
            print(f"decoded {self.total} validation examples in {time.perf_counter() - self.start:.1f} s "
                  f"({self._rate():.1f} ex/s)", flush=True)

    def _rate(self) -> float:
        return self.done_rows / max(time.perf_counter() - self.start, 1e-9)


def token_sequence_accuracy(predictions: np.ndarray, batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Decode metric on token ids: % of examples whose decode equals the target up to EOS."""
    targets = np.concatenate([b["decoder_target_tokens"] for b in batches])
    keep = targets.max(axis=1) > 0                                   # drop padding rows
    length = targets.shape[1]
    preds = np.zeros_like(targets)
    n = min(length, predictions.shape[1])
    preds[:, :n] = predictions[: len(targets), :n]
    same = np.all(np.where(targets > 0, preds == targets, True), axis=1)
    return {"sequence_accuracy": 100.0 * float(np.mean(same[keep]))}
