"""`doa calibrate`: time the real programs of a run on this machine, for the `calibrated` cost profile.

At the task's lengths and the run's batch size, on every device JAX sees (the trainer's mesh), it
times: the teacher's train step, greedy teacher decoding and the top-k scoring pass (the
pseudo-labels), the student's step on labels, on stored top-k soft targets and on online soft
targets (a teacher forward every step, as `experiment.OnlineTeacherBatches` runs it), and the
student's evaluation decode. Weights are random (speed does not depend on their values); decoding
is forced to the full target length (`min_length`), an upper bound on a run's decode time.
Compilation and `warmup` calls are run first and excluded from the timing; the file says so.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import time
from typing import Any, Callable, Optional

import numpy as np

from doa_jax import cost_profiles, costs, flops
from doa_jax.model.config import T5Config

TIMING_NOTE = ("compile and warm-up calls excluded; mean wall time of at least `reps` further calls (and at least "
               "0.5 s of them), each ended by jax.block_until_ready; random weights; decoding forced to the full "
               "target length")


def task_card(name: str):
    """A task card by name or path; 'demo' is the built-in demo task."""
    if name == "demo":
        from doa_jax import demo_task

        return demo_task.card()
    from doa_jax.data.cards import load_card

    return load_card(name)


def task_pools(card, data_dir: Optional[str | os.PathLike] = None):
    """The task's pools (the demo's built-in ones for the demo task)."""
    from doa_jax import demo_task

    if card.name == demo_task.NAME:
        return demo_task.pools()
    from doa_jax.data import pools

    return pools.make_pools(card, data_dir=data_dir)


def model_configs(card, teacher: str, student: str, vocab_size: Optional[int] = None) -> tuple[T5Config, T5Config]:
    """(teacher, student) configs of named sizes; the demo task's models use its small vocabulary."""
    from doa_jax import demo_task
    from doa_jax.model import config_for_size

    if vocab_size is None and card.name == demo_task.NAME:
        vocab_size = demo_task.MODEL_VOCAB_SIZE
    overrides = {"vocab_size": vocab_size} if vocab_size else {}
    return config_for_size(teacher, **overrides), config_for_size(student, **overrides)


@dataclasses.dataclass(frozen=True)
class Settings:
    accelerator: str
    teacher: str
    student: str
    task: str
    batch_size: int = 32
    topk: int = 8
    optimizer: str = "adamw"
    reps: int = 3
    warmup: int = 1
    inputs_length: Optional[int] = None   # default: the card's
    targets_length: Optional[int] = None
    vocab_size: Optional[int] = None      # default: the demo's for the demo task, else the size's

    def __post_init__(self):
        for f in ("batch_size", "topk", "reps"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


def _timed(fn: Callable[[], Any], reps: int, warmup: int, min_seconds: float = 0.5) -> float:
    """Mean seconds per call of `fn`, after one compiling call and `warmup` more (not timed).

    At least `reps` calls are timed, and more (up to 1000) until `min_seconds` have passed, so a
    millisecond-scale program is not timed on a handful of calls.
    """
    import jax

    for _ in range(1 + warmup):
        jax.block_until_ready(fn())
    start, calls = time.perf_counter(), 0
    while calls < reps or (time.perf_counter() - start < min_seconds and calls < 1000):
        jax.block_until_ready(fn())
        calls += 1
    return (time.perf_counter() - start) / calls


def _batch(vocab_size: int, batch: int, in_len: int, out_len: int, seed: int) -> dict[str, np.ndarray]:
    """Full-length random examples (no padding): every position is work, as in a padded batch."""
    from doa_jax.data.encode import shift_right

    rng = np.random.default_rng(seed)
    high = min(vocab_size, 32000)
    targets = rng.integers(2, high, (batch, out_len), dtype=np.int32)
    return dict(encoder_input_tokens=rng.integers(2, high, (batch, in_len), dtype=np.int32),
                decoder_input_tokens=shift_right(targets), decoder_target_tokens=targets,
                decoder_loss_weights=np.ones((batch, out_len), np.float32))


def _train_runner(cfg: T5Config, s: Settings, mesh, rules, kd: bool, seed: int):
    """(init state, step(state, host batch) -> state) of the trainer's real jitted step program."""
    import jax

    from doa_jax import losses, partitioning, trainer
    from doa_jax.optimizers import OptimizerConfig

    loss = losses.LossConfig(z_loss=0.0, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS", kd_weight=1.0 if kd else 0.0)
    prog = trainer.step_program(cfg, loss, OptimizerConfig(name=s.optimizer, learning_rate=3e-5), 1, 1, mesh,
                                tuple(tuple(r) for r in rules))
    with partitioning.mesh_context(mesh, rules):
        state = prog.init(jax.random.PRNGKey(seed))
    rng = jax.random.PRNGKey(seed)

    def step(state, host):
        with partitioning.mesh_context(mesh, rules):
            new, _ = prog.train_step(state, partitioning.global_batch(host, mesh), rng)
        return new

    return state, step


def _time_train(cfg: T5Config, s: Settings, mesh, rules, batch: dict, *, kd: bool = False,
                teacher_logits: Optional[Callable] = None, seed: int = 0) -> float:
    """Seconds per train step; `teacher_logits(batch)` adds the online teacher forward to every step."""
    state, step = _train_runner(cfg, s, mesh, rules, kd, seed)
    holder = {"state": state}

    def one():
        host = batch
        if teacher_logits is not None:
            logits = np.asarray(teacher_logits(batch))
            ids = np.broadcast_to(np.arange(logits.shape[-1], dtype=np.int32), logits.shape)
            host = dict(batch, teacher_topk_values=logits, teacher_topk_ids=ids)
        holder["state"] = step(holder["state"], host)
        return holder["state"].step

    return _timed(one, s.reps, s.warmup)


def _measure(teacher: T5Config, student: T5Config, s: Settings, lengths: dict[str, int]) -> dict[str, float]:
    """Seconds per call of every program, each on a batch of `s.batch_size` examples."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from doa_jax import decoding, partitioning, teacher_outputs
    from doa_jax.model import Transformer

    mesh, rules = partitioning.MeshConfig().build()
    partitioning.check_batch_size(s.batch_size, mesh)
    in_len, out_len, b = lengths["inputs"], lengths["targets"], s.batch_size
    batch = _batch(student.vocab_size, b, in_len, out_len, seed=0)
    kd_batch = dict(batch, teacher_topk_values=np.random.default_rng(1).standard_normal((b, out_len, s.topk)).astype(
        np.float32), teacher_topk_ids=np.random.default_rng(2).integers(0, student.vocab_size, (b, out_len, s.topk),
                                                                        dtype=np.int32))
    seconds = {"teacher_train": _time_train(teacher, s, mesh, rules, batch),
               "student_train": _time_train(student, s, mesh, rules, batch),
               "student_distill_stored": _time_train(student, s, mesh, rules, kd_batch, kd=True)}
    t_module, s_module = Transformer(teacher), Transformer(student)
    tokens = jnp.zeros((1, 1), jnp.int32)
    t_params = jax.jit(lambda r: nn.meta.unbox(t_module.init(r, tokens, tokens))["params"])(jax.random.PRNGKey(3))
    s_params = jax.jit(lambda r: nn.meta.unbox(s_module.init(r, tokens, tokens))["params"])(jax.random.PRNGKey(4))
    forward = jax.jit(lambda p, e, d: t_module.apply({"params": p}, e, d))
    seconds["student_distill_online"] = _time_train(
        student, s, mesh, rules, batch, kd=True,
        teacher_logits=lambda bt: forward(t_params, bt["encoder_input_tokens"], bt["decoder_input_tokens"]))
    enc = jnp.asarray(batch["encoder_input_tokens"])
    decoded = decoding.greedy(t_module, t_params, enc, out_len, min_length=out_len).tokens
    seconds["teacher_decode"] = _timed(lambda: decoding.greedy(t_module, t_params, enc, out_len, min_length=out_len),
                                       s.reps, s.warmup)
    seconds["teacher_score"] = _timed(lambda: teacher_outputs._score(t_module, t_params, enc, decoded, s.topk),
                                      s.reps, s.warmup)
    seconds["eval_decode"] = _timed(lambda: decoding.greedy(s_module, s_params, enc, out_len, min_length=out_len),
                                    s.reps, s.warmup)
    return seconds


def _program_flops(program: str, teacher: T5Config, student: T5Config, b: int, i: int, o: int) -> float:
    return {"teacher_train": flops.train_flops(teacher, b, i, o),
            "teacher_decode": flops.forward_flops(teacher, b, i, o),
            "teacher_score": flops.forward_flops(teacher, b, i, o),
            "student_train": flops.train_flops(student, b, i, o),
            "student_distill_stored": flops.train_flops(student, b, i, o),
            "student_distill_online": flops.train_flops(student, b, i, o) + flops.forward_flops(teacher, b, i, o),
            "eval_decode": flops.forward_flops(student, b, i, o)}[program]


def _peak_memory() -> Optional[int]:
    import jax

    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    return max(peaks) if peaks and all(isinstance(p, int) for p in peaks) else None


def _model_record(name: str, cfg: T5Config) -> dict[str, Any]:
    return {"size": cost_profiles.size_name(name), "params": cfg.num_params(), "vocab_size": cfg.vocab_size,
            "dtype": cfg.dtype}


def calibrate(s: Settings) -> dict[str, Any]:
    """Measure every program on this machine; the calibration record (see `cost_profiles.read_calibration`)."""
    import jax

    acc = costs.get_accelerator(s.accelerator)
    card = task_card(s.task)
    lengths = {"inputs": int(s.inputs_length or card.feature_lengths["inputs"]),
               "targets": int(s.targets_length or card.feature_lengths["targets"])}
    teacher, student = model_configs(card, s.teacher, s.student, s.vocab_size)
    seconds = _measure(teacher, student, s, lengths)
    devices = jax.devices()
    peak = acc.peak_flops * len(devices)
    programs = {}
    for program, sec in seconds.items():
        f = _program_flops(program, teacher, student, s.batch_size, lengths["inputs"], lengths["targets"])
        programs[program] = {"examples_per_s": s.batch_size / sec, "seconds_per_call": sec,
                             "examples_per_call": s.batch_size, "flops_per_call": f, "mfu": f / sec / peak}
    return {"format": cost_profiles.CALIBRATION_FORMAT, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "jax_version": jax.__version__, "device_kind": devices[0].device_kind,
        "device_count": len(devices), "accelerator": acc.key, "accelerator_peak_flops": acc.peak_flops,
        "teacher": _model_record(s.teacher, teacher), "student": _model_record(s.student, student), "task": card.name,
        "lengths": lengths, "batch_size": s.batch_size, "topk": s.topk, "optimizer": s.optimizer,
        "timing": TIMING_NOTE, "warmup_calls_excluded": 1 + s.warmup, "reps": s.reps,
        "peak_memory_bytes": _peak_memory(), "programs": programs}


def write_calibration(record: dict[str, Any], path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path
