"""What the training loop asks after its steps, as small objects (the loop calls, they answer):

* `Preemption`: on SIGTERM or SIGINT (Ctrl-C) the loop finishes the step in flight, saves a
  checkpoint of it, waits for every save to be committed, prints what it did, and raises
  `TrainingPreempted` (a `SystemExit` with code 128 + the signal number: 143 for SIGTERM, 130 for
  SIGINT, no traceback). On several hosts the hosts agree on the stop step with an all-gather of
  their signal flags after every step, so all save the same step. A second Ctrl-C stops at once
  without saving. SIGKILL cannot be caught: the rerun resumes from the last committed checkpoint.
* `Divergence`: at each fetch of step metrics (the loop never waits on the device between
  steps), a non-finite loss or gradient, a gradient norm over `max_grad_norm`, or the parameter
  norm grown over `max_param_growth` times its initial value stops training before anything is
  saved, so the latest checkpoint is always a good one; `TrainResult.diverged` says why.
* `BestMetric`: after each evaluation, the dev metric's best value and step, and the best
  checkpoint (params only) when it improves.
* `EarlyStopping`: stop after `early_stopping_patience` evaluations without improvement.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from doa_jax import hosts
from doa_jax.checkpoints.steps import TrainCheckpoints
from doa_jax.model import T5Config
from doa_jax.trainer.config import TrainConfig
from doa_jax.trainer.state import Progress


class TrainingPreempted(SystemExit):
    """SIGTERM/SIGINT stopped training after a checkpoint of `step` was saved. Exits the process
    with code 128 + the signal number (143 SIGTERM, 130 SIGINT) unless caught."""

    def __init__(self, signum: int, step: int):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


class Preemption:
    """The stop signal: caught while installed (`with preemption:`), agreed across hosts."""

    def __init__(self, enabled: bool, chief: bool):
        self.enabled, self.chief = enabled, chief
        self.signum: Optional[int] = None     # the signal this host got
        self._previous: dict = {}
        self._told = False

    def __enter__(self) -> "Preemption":
        # Handlers only from the main thread (Python's rule).
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        """The first signal sets the flag the loop acts on after the step in flight; a second
        SIGINT raises KeyboardInterrupt at once."""
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.chief:
            print(f"{signal.Signals(signum).name}: stopping after the current step and saving a "
                  f"checkpoint" + (" (Ctrl-C again to stop at once, without saving)"
                                   if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)

    def agreed(self) -> Optional[int]:
        """This host's stop signal; on several hosts, the first signal any host got (an all-gather
        of the flags after every step), so every host stops and saves at the same step."""
        if jax.process_count() == 1:
            return self.signum
        flags = [int(f) for f in np.asarray(multihost_utils.process_allgather(np.int32(self.signum or 0))).ravel()]
        got = [(i, f) for i, f in enumerate(flags) if f]
        if not got:
            return None
        first, signum = got[0]
        if self.chief and not self._told:
            self._told = True
            print(f"{signal.Signals(signum).name} reached {hosts.describe_host(first)}: every process saves "
                  f"the same step and exits", file=sys.stderr, flush=True)
        return signum

    def stop(self, signum: int, step: int, saves: Sequence[Optional[TrainCheckpoints]]) -> None:
        """Waits for every save to be committed, says so, and raises `TrainingPreempted`."""
        for checkpoints in saves:
            if checkpoints is not None:
                checkpoints.wait()
        code = 128 + signum
        if self.chief:
            print(f"{signal.Signals(signum).name}: saved step {step} in {saves[0].directory}; exiting with "
                  f"code {code}. Rerun the same command to resume.", file=sys.stderr, flush=True)
        raise TrainingPreempted(signum, step)


class Divergence:
    """Why fetched step metrics diverged (or None), naming the last good checkpoint."""

    def __init__(self, config: TrainConfig, checkpoints: TrainCheckpoints):
        self.max_grad_norm, self.max_param_growth = config.max_grad_norm, config.max_param_growth
        self.checkpoints = checkpoints

    def check(self, fetched: Sequence[Mapping[str, Any]], first_step: int, progress: Progress) -> Optional[str]:
        """Why the first diverged step of `fetched` (steps from `first_step`) diverged, or None."""
        growth, initial = self.max_param_growth, progress.initial_param_norm
        limit = growth * initial if growth and initial else None
        for i, m in enumerate(fetched):
            loss, norm, pnorm = float(m["loss"]), float(m["grad_norm"]), float(m["param_norm"])
            if m["nonfinite"]:
                what = "loss became non-finite (NaN/inf in the loss or gradients)"
            elif self.max_grad_norm is not None and norm > self.max_grad_norm:
                what = f"gradient norm exploded past max_grad_norm={self.max_grad_norm:g}"
            elif limit is not None and pnorm > limit:
                what = f"parameter norm grew past {growth:g} x its initial {initial:.6g} (max_param_growth)"
            else:
                continue
            return (f"{what} at step {first_step + i} (loss {loss:.6g}, gradient norm {norm:.6g}, parameter norm "
                    f"{pnorm:.6g}); training stopped without saving; {self._last_good()}. Lower the learning "
                    f"rate or check the data.")
        return None

    def _last_good(self) -> str:
        latest = self.checkpoints.latest_step()
        return (f"the last good checkpoint is step {latest} in {self.checkpoints.directory}"
                if latest is not None else "no checkpoint had been saved yet")


class BestMetric:
    """The dev metric's best value and step in `Progress`; the best checkpoint when it improves."""

    def __init__(self, config: TrainConfig, checkpoints: Optional[TrainCheckpoints], model_config: T5Config):
        self.metric, self.mode = config.eval_metric, config.metric_mode
        self.checkpoints, self.model_config = checkpoints, model_config

    def after_eval(self, result: Mapping[str, float], progress: Progress, params: Any) -> None:
        if self.metric not in result:
            raise ValueError(f"eval_metric {self.metric!r} is not among the dev metrics {sorted(result)}")
        value, best = result[self.metric], progress.best_metric
        if best is not None and not (value < best if self.mode == "min" else value > best):
            progress.evals_without_improvement += 1
            return
        progress.best_metric, progress.best_step, progress.evals_without_improvement = value, progress.step, 0
        if self.checkpoints is not None:
            self.checkpoints.save(progress.step, params=params, model_config=self.model_config,
                                  trainer_state=dict(progress.as_dict(), metrics=dict(result)))


class EarlyStopping:
    """Stop after `patience` evaluations in a row without improvement (None: never)."""

    def __init__(self, patience: Optional[int]):
        self.patience = patience

    def after_eval(self, progress: Progress) -> bool:
        """Whether to stop now; marks the progress stopped early (a rerun does not train on)."""
        if self.patience is None or progress.evals_without_improvement < self.patience:
            return False
        progress.stopped_early = True
        return True

    def message(self, step: int, metric: str) -> str:
        return f"early stopping at step {step}: no {metric} improvement in {self.patience} evaluations"
