"""`doa calibrate`: time the real programs of a run on this machine, for the `calibrated` cost profile.

At the task's lengths and the run's batch size, on every device JAX sees (the trainer's mesh), it
times: the teacher's train step, greedy teacher decoding and the top-k scoring pass (the
pseudo-labels), the student's step on labels, on stored top-k soft targets and on online soft
targets (a teacher forward every step, as `distill.student_data.OnlineTeacherBatches` runs it), and the
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
import tempfile
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from doa_jax import decoding, flops, partitioning, progress, storage
from doa_jax.data import demo as demo_task
from doa_jax.data import pools
from doa_jax.data.batches import ArrayBatches
from doa_jax.data.cards import load_card
from doa_jax.data.encode import shift_right
from doa_jax.distill import outputs as teacher_outputs
from doa_jax.distill.student_data import OnlineTeacherBatches
from doa_jax.experiment import cost_profiles, costs
from doa_jax.losses import LossConfig
from doa_jax.model import Transformer, config_for_size
from doa_jax.model.config import T5Config
from doa_jax.optimizers import OptimizerConfig
from doa_jax.partitioning import MeshConfig
from doa_jax.trainer import TrainConfig, Trainer, step_program

TIMING_NOTE = ("per-call rates exclude compile and warm-up; what a run pays once is recorded apart (startup_s: "
               "the compiling run's or call's extra seconds; run_overhead_s: a training run's set-up and final "
               "checkpoint) and charged once per run. Training programs: a real Trainer.fit run after a compiling "
               "one; seconds per step = the trainer's own step_time_s (first step left out). Decoding: mean wall "
               "time of at least `reps` calls (and 0.5 s of them) after the compiling call and `warmup` more, "
               "ended by jax.block_until_ready, forced to the full target length. Random weights.")


def task_card(name: str):
    """A task card by name or path; 'demo' is the built-in demo task."""
    if name == "demo":

        return demo_task.card()

    return load_card(name)


def task_pools(card, data_dir: Optional[str | os.PathLike] = None):
    """The task's pools (the demo's built-in ones for the demo task)."""

    if card.name == demo_task.NAME:
        return demo_task.pools()

    return pools.make_pools(card, data_dir=data_dir)


def model_configs(card, teacher: str, student: str, vocab_size: Optional[int] = None,
                  dtype: Optional[str] = None, cross_kv: str = "cache") -> tuple[T5Config, T5Config]:
    """(teacher, student) configs of named sizes (activations in `dtype`, default the sizes'; decoding
    with `cross_kv`, T5Config.decode_cross_kv); the demo task's models use its small vocabulary."""

    if vocab_size is None and card.name == demo_task.NAME:
        vocab_size = demo_task.MODEL_VOCAB_SIZE
    overrides = {"vocab_size": vocab_size} if vocab_size else {}
    overrides["decode_cross_kv"] = cross_kv
    if dtype:
        overrides["dtype"] = dtype
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
    run_steps: int = 20                   # steps of each timed training run
    inputs_length: Optional[int] = None   # default: the card's
    targets_length: Optional[int] = None
    vocab_size: Optional[int] = None      # default: the demo's for the demo task, else the size's
    dtype: Optional[str] = None           # activations (ACTIVATION_DTYPE); default: the size's
    teacher_mesh: tuple[int, int] = (-1, 1)   # the teacher's (data, model) axes, as TEACHER_MESH_* lay it out
    cross_kv: str = "cache"               # decodes' cross-attention K/V (TEACHER_/STUDENT_DECODE_CROSS_KV)

    def __post_init__(self):
        for f in ("batch_size", "topk", "reps"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.run_steps < 2:
            raise ValueError(f"run_steps must be >= 2, got {self.run_steps}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


def _fresh_programs() -> None:
    """Forget the compiled programs calibrate times (train steps, decoders, the scoring pass), so
    the next run compiles them afresh, as a cell's process does once. The rest of JAX's caches
    stay warm (the small programs every run shares: casts, random keys, optimizer helpers), as
    they are by the time a cell's phase starts: set-up before its first phase has run them.
    (Clearing every JAX cache, as the previous version did, charged every phase of a cell 9-26% more
    than the cell then measured: notes/costs.md.)"""
    step_program.cache_clear()
    teacher_outputs.clear_compiled()


def _timed(fn: Callable[[], Any], reps: int, warmup: int, min_seconds: float = 0.5) -> dict[str, float]:
    """Mean seconds per call of `fn`, after one compiling call and `warmup` more (not timed), and the
    compiling call's extra seconds (`startup_s`).

    At least `reps` calls are timed, and more (up to 1000) until `min_seconds` have passed, so a
    millisecond-scale program is not timed on a handful of calls.
    """

    _fresh_programs()
    first = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - first
    for _ in range(warmup):
        jax.block_until_ready(fn())
    start, calls = time.perf_counter(), 0
    while calls < reps or (time.perf_counter() - start < min_seconds and calls < 1000):
        jax.block_until_ready(fn())
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    return {"seconds_per_call": per_call, "startup_s": max(first - per_call, 0.0)}


def _batch(vocab_size: int, batch: int, in_len: int, out_len: int, seed: int) -> dict[str, np.ndarray]:
    """Full-length random examples (no padding): every position is work, as in a padded batch."""

    rng = np.random.default_rng(seed)
    high = min(vocab_size, 32000)
    targets = rng.integers(2, high, (batch, out_len), dtype=np.int32)
    return dict(encoder_input_tokens=rng.integers(2, high, (batch, in_len), dtype=np.int32),
                decoder_input_tokens=shift_right(targets), decoder_target_tokens=targets,
                decoder_loss_weights=np.ones((batch, out_len), np.float32))


def _fit_seconds(cfg: T5Config, s: Settings, arrays: dict, steps: int, directory: pathlib.Path, kd: bool,
                 wrapper: Optional[Callable] = None, mesh: MeshConfig = MeshConfig()) -> float:
    """Wall seconds of one real `Trainer.fit` of `steps` steps, set up as an experiment's run is."""

    loss = LossConfig(z_loss=0.0, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS", kd_weight=1.0 if kd else 0.0)
    config = TrainConfig(model_dir=str(directory), batch_size=s.batch_size, train_steps=steps,
                         optimizer=OptimizerConfig(name=s.optimizer, learning_rate=3e-5), loss=loss,
                         log_every=10 ** 6, checkpoint_every=10 ** 6, keep_checkpoints=1, async_checkpointing=False,
                         tensorboard=False, verbose=False, mesh=mesh)
    source = ArrayBatches(arrays, s.batch_size, shuffle=True, seed=0, pad_remainder=True)
    if wrapper is not None:
        source = wrapper(source)
    start = time.perf_counter()
    Trainer(cfg, config).fit(source)
    return time.perf_counter() - start


def _time_runs(cfg: T5Config, s: Settings, arrays: dict, directory: pathlib.Path, *, kd: bool = False,
               wrapper: Optional[Callable] = None, mesh: MeshConfig = MeshConfig()) -> dict[str, float]:
    """Seconds per step of a real training run, and what a run pays once: compilation (`startup_s`)
    and set-up plus final checkpoint (`run_overhead_s`).

    A first run compiles afresh (its extra seconds are `startup_s`). A second run of the same
    programs gives the step time the trainer itself measures (`step_time_s` in its metrics.jsonl,
    its first step left out) and, as the rest of its wall time, the run's fixed cost.
    """
    _fresh_programs()
    cold = _fit_seconds(cfg, s, arrays, s.run_steps, directory / "cold", kd, wrapper, mesh)
    for i in range(s.warmup - 1):
        _fit_seconds(cfg, s, arrays, s.run_steps, directory / f"warm{i}", kd, wrapper, mesh)
    warm = _fit_seconds(cfg, s, arrays, s.run_steps, directory / "timed", kd, wrapper, mesh)
    rows = [json.loads(line) for line in (directory / "timed" / "metrics.jsonl").read_text().splitlines() if line]
    per_step = [r["step_time_s"] for r in rows if "step_time_s" in r][-1]
    return {"seconds_per_call": per_step, "run_overhead_s": max(warm - s.run_steps * per_step, 0.0),
            "startup_s": max(cold - warm, 0.0), "timed_run_steps": s.run_steps}


def _measure(teacher: T5Config, student: T5Config, s: Settings, lengths: dict[str, int],
             directory: pathlib.Path, say: Callable[[str], None]) -> dict[str, dict]:
    """Per program: seconds per call (a train step, or a batch of `s.batch_size` decodes), and for
    training the fixed seconds of a run."""
    mesh, _ = partitioning.MeshConfig().build()
    partitioning.check_batch_size(s.batch_size, mesh)
    in_len, out_len, b = lengths["inputs"], lengths["targets"], s.batch_size
    rows = s.run_steps * b
    data = _batch(student.vocab_size, rows, in_len, out_len, seed=0)
    rng = np.random.default_rng(1)
    kd_data = dict(data, teacher_topk_values=rng.standard_normal((rows, out_len, s.topk)).astype(np.float32),
                   teacher_topk_ids=rng.integers(0, student.vocab_size, (rows, out_len, s.topk), dtype=np.int32))
    t_module, s_module = Transformer(teacher), Transformer(student)
    tokens = jnp.zeros((1, 1), jnp.int32)
    # The teacher on its own mesh (TEACHER_MESH_*), initialised there shard by shard, as a cell holds it.
    t_mesh_cfg = MeshConfig(data=s.teacher_mesh[0], model=s.teacher_mesh[1])
    t_mesh, t_rules = t_mesh_cfg.build()
    in_teacher_mesh = lambda: partitioning.mesh_context(t_mesh, t_rules)  # noqa: E731
    t_params = jax.jit(lambda r: nn.meta.unbox(t_module.init(r, tokens, tokens))["params"],
                       out_shardings=partitioning.model_shardings(t_module, t_mesh, t_rules))(jax.random.PRNGKey(3))
    s_params = jax.jit(lambda r: nn.meta.unbox(s_module.init(r, tokens, tokens))["params"])(jax.random.PRNGKey(4))
    enc = jnp.asarray(data["encoder_input_tokens"][:b])
    t_enc = partitioning.rows_like(np.asarray(enc), jax.tree_util.tree_leaves(t_params)[0])
    with in_teacher_mesh():
        decoded = decoding.greedy(t_module, t_params, t_enc, out_len, min_length=out_len).tokens
    t_infer = decoding.decoding_params(t_params, t_module)   # how the store's scoring pass holds the teacher
    online = lambda src: OnlineTeacherBatches(src, t_module, t_params, in_teacher_mesh)  # noqa: E731

    def in_mesh(fn):
        def run():
            with in_teacher_mesh():
                return fn()
        return run

    jobs = {"teacher_train": lambda: _time_runs(teacher, s, data, directory / "teacher_train", mesh=t_mesh_cfg),
            "student_train": lambda: _time_runs(student, s, data, directory / "student_train"),
            "student_distill_stored": lambda: _time_runs(student, s, kd_data, directory / "stored", kd=True),
            "student_distill_online": lambda: _time_runs(student, s, data, directory / "online", kd=True,
                                                         wrapper=online),
            "teacher_decode": lambda: _timed(in_mesh(lambda: decoding.greedy(t_module, t_params, t_enc, out_len,
                                                                             min_length=out_len)), s.reps, s.warmup),
            "teacher_score": lambda: _timed(in_mesh(lambda: teacher_outputs.score_topk(t_module, t_infer, t_enc,
                                                                                       decoded, s.topk)),
                                            s.reps, s.warmup),
            "eval_decode": lambda: _timed(lambda: decoding.greedy(s_module, s_params, enc, out_len,
                                                                  min_length=out_len), s.reps, s.warmup)}
    measured, started = {}, time.perf_counter()
    for i, (program, job) in enumerate(jobs.items(), 1):
        say(f"[{i}/{len(jobs)}] {program}: compiling afresh, then timing ({time.perf_counter() - started:.0f} s so far)")
        measured[program] = job()
    return measured


def _program_flops(program: str, teacher: T5Config, student: T5Config, b: int, i: int, o: int) -> float:
    return {"teacher_train": flops.train_flops(teacher, b, i, o),
            "teacher_decode": flops.forward_flops(teacher, b, i, o),
            "teacher_score": flops.forward_flops(teacher, b, i, o),
            "student_train": flops.train_flops(student, b, i, o),
            "student_distill_stored": flops.train_flops(student, b, i, o),
            "student_distill_online": flops.train_flops(student, b, i, o) + flops.forward_flops(teacher, b, i, o),
            "eval_decode": flops.forward_flops(student, b, i, o)}[program]


def _peak_memory() -> Optional[int]:
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    return max(peaks) if peaks and all(isinstance(p, int) for p in peaks) else None


def _model_record(name: str, cfg: T5Config) -> dict[str, Any]:
    return {"size": cost_profiles.size_name(name), "params": cfg.num_params(), "vocab_size": cfg.vocab_size,
            "dtype": cfg.dtype, "decode_cross_kv": cfg.decode_cross_kv}


def calibrate(s: Settings, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every program on this machine; the calibration record (see `cost_profiles.read_calibration`).
    `say` gets a progress line as each program's timing starts."""

    acc = costs.get_accelerator(s.accelerator)
    card = task_card(s.task)
    lengths = {"inputs": int(s.inputs_length or card.feature_lengths["inputs"]),
               "targets": int(s.targets_length or card.feature_lengths["targets"])}
    teacher, student = model_configs(card, s.teacher, s.student, s.vocab_size, s.dtype, s.cross_kv)
    with tempfile.TemporaryDirectory(prefix="doa_calibrate_") as directory:
        measured = _measure(teacher, student, s, lengths, pathlib.Path(directory), say)
    devices = jax.devices()
    # MFU (`progress.mfu`, as `doa train` reports it); none where the peak is only nominal (a CPU's)
    # or unknown: the note says why.
    peak, mfu_note = progress.peak_flops_per_device(devices[0].device_kind)
    programs = {}
    for program, row in measured.items():
        f = _program_flops(program, teacher, student, s.batch_size, lengths["inputs"], lengths["targets"])
        sec = row["seconds_per_call"]
        programs[program] = {"examples_per_s": s.batch_size / sec, "examples_per_call": s.batch_size, **row,
                             "flops_per_call": f, "mfu": progress.mfu(f / sec, peak, len(devices))}
    return {"format": cost_profiles.CALIBRATION_FORMAT, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "jax_version": jax.__version__, "device_kind": devices[0].device_kind,
        "device_count": len(devices), "accelerator": acc.key, "accelerator_peak_flops": acc.peak_flops,
        "mfu_note": mfu_note,
        "teacher": _model_record(s.teacher, teacher), "student": _model_record(s.student, student), "task": card.name,
        "lengths": lengths, "batch_size": s.batch_size, "topk": s.topk, "optimizer": s.optimizer,
        "teacher_mesh": {"data": s.teacher_mesh[0], "model": s.teacher_mesh[1]},
        "timing": TIMING_NOTE, "warmup_calls_excluded": 1 + s.warmup, "reps": s.reps, "run_steps": s.run_steps,
        "peak_memory_bytes": _peak_memory(), "programs": programs}


def write_calibration(record: dict[str, Any], path: str | os.PathLike) -> storage.AnyPath:
    """Writes the record (a local path or a URL such as gs://...); returns its path."""
    path = storage.path(path)
    storage.makedirs(path.parent)
    storage.write_atomic(path, json.dumps(record, indent=1) + "\n")
    return path
