"""Partitioned fine-tuning of the Flax T5, one role a module:

    config.py      `TrainConfig` (a run's settings), `Cadence` (when it logs, evaluates, saves),
                   `TrainResult`
    program.py     `TrainState` and the jitted, partitioned step program (`StepProgram`,
                   `step_program`, cached by value): what `doa train` runs, `doa bench` times and
                   `doa aot` compiles
    state.py       where a run's state comes from (resume, initial checkpoint, seed) and its host
                   half (`Progress`, saved with each checkpoint)
    hooks.py       what the loop asks after its steps: preemption, divergence, best metric,
                   early stopping
    evaluation.py  dev loss, token accuracy and greedy-decode metrics
    reporting.py   console lines, metrics.jsonl, TensorBoard, throughput and MFU
    loop.py        `Trainer`: the loop that calls them

Divergence found when step metrics are fetched stops training before anything is saved, so the
latest checkpoint is always a good one (`TrainResult.diverged` says why; callers decide whether
that is an error: `doa train` exits with it, a `doa run` cell writes a diverged row).
"""
from doa_jax.trainer.config import TrainConfig, TrainResult
from doa_jax.trainer.evaluation import token_sequence_accuracy
from doa_jax.trainer.hooks import TrainingPreempted
from doa_jax.trainer.loop import Trainer
from doa_jax.trainer.program import StepProgram, TrainState, step_program
from doa_jax.trainer.state import CheckpointMismatchError, check_params_match, load_initial_params

__all__ = ["CheckpointMismatchError", "StepProgram", "TrainConfig", "TrainResult", "TrainState", "Trainer",
           "TrainingPreempted", "check_params_match", "load_initial_params", "step_program",
           "token_sequence_accuracy"]
