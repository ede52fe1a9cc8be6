"""The fine-tuning loop: `Trainer.fit` runs the step program (`program.py`) over a training source,
calling the hooks (`hooks.py`: preemption, divergence, best metric, early stopping) after its steps,
evaluating (`evaluation.py`), checkpointing, and reporting (`reporting.py`).

Each pass of the loop is a short sequence of named steps: the next batch (or why there is none),
the train step, what is due at this step (`Cadence`), the metrics row with its divergence check and
evaluation when logging is due, the checkpoint, the stop signal. The loop never waits on the device
between steps: metrics stay there until a logged step fetches them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np
import optax

from doa_jax import partitioning, storage
from doa_jax.checkpoints.steps import TrainCheckpoints
from doa_jax.data.batches import BatchSource, take_features
from doa_jax.model import T5Config
from doa_jax.trainer import evaluation
from doa_jax.trainer.config import Cadence, TrainConfig, TrainResult
from doa_jax.trainer.evaluation import DecodeMetricsFn
from doa_jax.trainer.hooks import BestMetric, Divergence, EarlyStopping, Preemption
from doa_jax.trainer.program import StepProgram, TrainState, step_program
from doa_jax.trainer.reporting import Reporter
from doa_jax.trainer.state import Progress, restore_or_init


@dataclasses.dataclass
class _Run:
    """One `fit`: what it runs on, its hooks, its outputs, and how it ended (`stop`)."""

    cadence: Cadence
    checkpoints: TrainCheckpoints
    best_checkpoints: Optional[TrainCheckpoints]
    reporter: Reporter
    preemption: Preemption
    divergence: Divergence
    best: BestMetric
    early_stopping: EarlyStopping
    eval_source: Optional[BatchSource]
    decode_metrics: Optional[DecodeMetricsFn]
    progress: Progress = dataclasses.field(default_factory=Progress)
    stop: Optional[str] = None        # 'budget', 'data', 'early' or 'diverged' (None: ran to the end)
    diverged: Optional[str] = None    # why, when it diverged
    last: dict = dataclasses.field(default_factory=dict)   # the last metrics row
    rng: Any = None                   # the base dropout key (`seed`); each step folds its step in
    first_step: int = 1               # the first step this fit runs (its line waits for the compile)
    lost_seconds: float = 0.0         # steps a kill undid before this resume, as logged

    def close(self) -> None:
        self.reporter.close()
        for checkpoints in (self.checkpoints, self.best_checkpoints):
            if checkpoints is not None:
                checkpoints.wait()
                checkpoints.close()


class Trainer:
    """Fine-tunes `Transformer(model_config)` on a device mesh from `config.mesh`."""

    def __init__(self, model_config: T5Config, config: TrainConfig, *, devices: Optional[Sequence[Any]] = None):
        self.model_config, self.config = model_config, config
        self.mesh, self.rules = config.mesh.build(devices)
        self.model_dir = storage.absolute(config.model_dir)   # a local folder or a URL (gs://)
        self._is_chief = partitioning.is_chief()
        self.program: Optional[StepProgram] = None            # built by `fit` (or on first use)
        self.checkpoints: Optional[TrainCheckpoints] = None   # the last `fit`'s step checkpoints

    def _program(self, total_steps: int = 1) -> StepProgram:
        cfg = self.config
        if self.program is None:
            total_steps = total_steps if cfg.optimizer.uses_total_steps else 1
            self.program = step_program(self.model_config, cfg.loss, cfg.optimizer, total_steps,
                                        cfg.num_microbatches, self.mesh, tuple(tuple(r) for r in self.rules),
                                        cfg.param_dtype, cfg.fused_update)
        return self.program

    def evaluate(self, params, source: BatchSource, *, decode_metrics: Optional[DecodeMetricsFn] = None,
                 max_decode_len: Optional[int] = None) -> dict[str, float]:
        """`evaluation.evaluate` with this trainer's program and progress lines."""
        return evaluation.evaluate(self._program(), params, source, decode_metrics=decode_metrics,
                                   max_decode_len=max_decode_len, log_seconds=self._decode_log_seconds())

    def greedy_decode(self, params, batches, max_decode_len: Optional[int] = None) -> np.ndarray:
        """`evaluation.greedy_decode` with this trainer's program and progress lines."""
        return evaluation.greedy_decode(self._program(), params, batches, max_decode_len, self._decode_log_seconds())

    def _decode_log_seconds(self) -> Optional[float]:
        return self.config.log_seconds if self.config.verbose and self._is_chief else None

    # ------------------------------------------------------------------ the loop
    def fit(self, train: BatchSource, eval_source: Optional[BatchSource] = None, *,
            decode_metrics: Optional[DecodeMetricsFn] = None,
            step_allowed: Optional[Callable[[int], bool]] = None) -> TrainResult:
        """Trains to `train_steps` (or `epochs`), evaluating, checkpointing and logging on the way.

        `step_allowed(step)` (e.g. a budget cap) is asked before each step; when it says no, the
        run stops cleanly at that step boundary, saves a checkpoint and reports `stopped_by_budget`.
        """
        cfg = self.config
        cadence = Cadence.of(cfg, train.steps_per_epoch, eval_source is not None)
        if train.batch_size != cfg.batch_size:
            raise ValueError(f"the training source's batch size ({train.batch_size}) differs from "
                             f"BATCH_SIZE ({cfg.batch_size})")
        partitioning.check_batch_size(cfg.batch_size, self.mesh, jax.process_count(), cfg.num_microbatches)
        reporter = Reporter(cfg, self.model_config, self.mesh, self.model_dir, self._is_chief, cadence.total_steps)
        reporter.say("starting: first batch, parameters, then compiling the training step (the first step's line "
                     "waits for the compile)")
        example = take_features(next(iter(train.iterate(0))))
        self.program = None
        self._program(cadence.total_steps)
        storage.makedirs(self.model_dir)
        run = self._open_run(cadence, reporter, eval_source, decode_metrics)
        try:
            with run.preemption:
                return self._loop(run, train, example, step_allowed)
        finally:
            run.close()

    def _open_run(self, cadence: Cadence, reporter: Reporter, eval_source, decode_metrics) -> _Run:
        cfg, chief = self.config, self._is_chief
        self.checkpoints = TrainCheckpoints(self.model_dir / "checkpoints", keep=cfg.keep_checkpoints,
                                            async_save=cfg.async_checkpointing)
        best = (TrainCheckpoints(self.model_dir / "best", keep=1, async_save=cfg.async_checkpointing,
                                 with_optimizer=False) if cfg.keep_best and eval_source is not None else None)
        return _Run(cadence, self.checkpoints, best, reporter, Preemption(cfg.handle_signals, chief),
                    Divergence(cfg, self.checkpoints), BestMetric(cfg, best, self.model_config),
                    EarlyStopping(cfg.early_stopping_patience), eval_source, decode_metrics)

    def _loop(self, run: _Run, train: BatchSource, example, step_allowed) -> TrainResult:
        state = self._start(run, example)
        data = train.iterate(run.progress.batches)
        with partitioning.mesh_context(self.mesh, self.rules):
            while run.stop is None and run.progress.step < run.cadence.total_steps:
                batch = self._next_batch(run, data, step_allowed)
                if batch is None:
                    break
                state = self._train_step(run, state, batch)
                self._after_step(run, state)
            self._finish(run, state)
        p = run.progress
        return TrainResult(state, p.step, p.best_metric, p.best_step, p.stopped_early, run.last,
                           stopped_by_budget=run.stop == "budget", diverged=run.diverged,
                           lost_seconds=run.lost_seconds)

    def _start(self, run: _Run, example) -> TrainState:
        """The starting state (said where from); the progress it carries; the outputs opened."""
        cfg = self.config
        state, run.progress, origin = restore_or_init(cfg, self.program, self.model_config, self.checkpoints)
        run.reporter.say(origin)
        p = run.progress
        run.rng, run.first_step = jax.random.PRNGKey(cfg.seed), p.step + 1
        p.seed, p.rng_key = cfg.seed, [int(x) for x in np.asarray(run.rng).ravel()]
        if p.initial_param_norm is None:
            with partitioning.mesh_context(self.mesh, self.rules):
                p.initial_param_norm = float(partitioning.to_host(jax.jit(optax.tree.norm)(state.params)))
        run.lost_seconds = run.reporter.start(example, p.step)
        if p.stopped_early:
            run.reporter.say(f"this run already stopped early at step {p.step}; nothing to do")
            run.stop = "early"
        return state

    def _next_batch(self, run: _Run, data: Iterator, step_allowed) -> Optional[dict]:
        """The next global batch, or None (and why, in `run.stop`): the budget or the data ended."""
        step = run.progress.step
        if step_allowed is not None and not step_allowed(step):
            run.reporter.say(f"budget reached: stopping at step {step} of {run.cadence.total_steps}")
            run.stop = "budget"
            return None
        try:
            return partitioning.global_batch(take_features(next(data)), self.mesh)
        except StopIteration:
            run.reporter.say(f"training data ended at step {step}")
            run.stop = "data"
            return None

    def _train_step(self, run: _Run, state: TrainState, batch) -> TrainState:
        state, metrics = self.program.train_step(state, batch, run.rng)
        run.reporter.pending.append(metrics)
        run.progress.step += 1
        run.progress.batches += 1
        if run.progress.step == run.first_step:
            run.reporter.first_step_done(metrics, run.progress.step)
        return state

    def _after_step(self, run: _Run, state: TrainState) -> None:
        """What is due after a step: the metrics row (divergence checked, evaluation), a console
        line, the checkpoint, the stop signal."""
        step = run.progress.step
        signum = run.preemption.agreed()
        due = run.cadence.due(step, signum is not None)
        if due.log:
            row = self._row(run)
            if row is None:
                return                       # diverged: nothing more is saved
            if due.eval:
                row.update(self._evaluate(run, state))
            run.reporter.emit(row, step)
            run.last = row
        run.reporter.heartbeat(step)         # a console line when one is due
        if due.checkpoint or run.stop == "early":
            self._save(run, state)
        if signum is not None:
            run.preemption.stop(signum, step, (run.checkpoints, run.best_checkpoints))
        if due.log:
            run.reporter.meter.start(step)   # evaluation and checkpoint time stay out of throughput
        if run.stop == "early":
            run.reporter.say(run.early_stopping.message(step, self.config.eval_metric))

    def _row(self, run: _Run) -> Optional[dict]:
        """The metrics row of the pending steps, or None when one diverged (`run.stop` says so)."""
        got, step = run.reporter.fetch(), run.progress.step
        run.diverged = run.divergence.check(got, step - len(got) + 1, run.progress)
        if run.diverged:
            run.reporter.say(run.diverged)
            run.stop = "diverged"
            return None
        return run.reporter.row(got, step)

    def _evaluate(self, run: _Run, state: TrainState) -> dict[str, float]:
        result = self.evaluate(state.params, run.eval_source, decode_metrics=run.decode_metrics,
                               max_decode_len=self.config.max_decode_len)
        run.best.after_eval(result, run.progress, state.params)
        if run.early_stopping.after_eval(run.progress):
            run.stop = "early"
        return {f"eval/{k}": v for k, v in result.items()}

    def _finish(self, run: _Run, state: TrainState) -> None:
        """Steps run since the last row (the budget or the data stopped the run between rows) are
        summarised and saved; a budget stop is saved."""
        if run.reporter.pending:
            row = self._row(run)
            if row is not None:
                run.reporter.emit(row, run.progress.step)
                run.last = row
                self._save(run, state)
        elif run.stop == "budget":
            self._save(run, state)

    def _save(self, run: _Run, state: TrainState) -> None:
        step = run.progress.step
        if run.checkpoints.latest_step() == step:
            return
        run.checkpoints.save(step, params=state.params, opt_state=state.opt_state, model_config=self.model_config,
                             trainer_state=run.progress.as_dict())
