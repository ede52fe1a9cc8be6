"""Compile a run's real programs for a TPU slice or GPU this host does not have: memory per device, fits.

A `Program` names one jitted function of a run and its inputs: the trainer's train step
(`StepProgram.train_step`, teacher fine-tuning or student training, donation and shardings as
`doa train`/`doa run` build them), the greedy decoder (teacher pseudo-labels, evaluation), the
teacher's top-k scoring pass, and the online teacher's full-vocabulary forward. `compile_program`
lowers the very function the runtime calls with `jax.ShapeDtypeStruct`s carrying the shardings of
the target's mesh (nothing is allocated) and compiles it for the target's compile-only devices
(`targets.py`). Its row holds XLA's per-device memory (arguments, outputs, aliased, temporaries,
generated code) and `peak_gib` = arguments + outputs - aliased + temporaries, the state other
programs of the same phase keep on the devices meanwhile (`co_resident_gib`), the capacity, `fits`
and the margin, compile seconds, analytic FLOPs per step (XLA's cost analysis counts a scanned
layer loop once), and a roofline lower bound on the step time (a bound, not a prediction).

The TPU compiler refuses a program that does not fit its HBM; the refusal is parsed into "needs X
GiB of Y". The GPU compiler does not refuse: the comparison with the device's capacity is ours.
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from doa_jax import decoding, flops, fused_update, partitioning, platforms
from doa_jax.distill import outputs as teacher_outputs
from doa_jax.distill import student_data
from doa_jax.losses import LossConfig
from doa_jax.model import T5Config, Transformer
from doa_jax.optimizers import OptimizerConfig
from doa_jax.partitioning import MeshConfig
from doa_jax.bench import targets
from doa_jax.bench.targets import GIB, NOTICES, Target
from doa_jax import trainer
from doa_jax.trainer import StepProgram, TrainState

# What `--phase` selects, and the kinds of program each phase compiles.
PHASES = ("train", "decode", "score", "distill")
KINDS = ("train", "decode", "score", "forward")


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """What a train step is specialised on beyond the model and the batch."""

    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    param_dtype: str = "float32"
    num_microbatches: int = 1
    soft_targets: Optional[int] = None   # k of the batch's teacher_topk_* (None: no KD features)
    fused_update: bool = False           # the optimizer inside the backward pass (doa_jax/fused_update.py)


@dataclasses.dataclass(frozen=True)
class Program:
    """One program of a run: its name (e.g. `teacher_decode`), phase, kind, model and inputs.

    `lengths` is (inputs, targets) for train/score/forward and (inputs, decode length) for decode.
    `co_resident` names the programs of the same run whose state stays on the devices while this
    one runs (e.g. the teacher's params during the online student step)."""

    name: str
    phase: str
    kind: str
    model: T5Config
    batch: int
    lengths: tuple[int, int]
    mesh: MeshConfig = MeshConfig()
    train: Optional[TrainSpec] = None
    topk: int = 1
    co_resident: tuple[str, ...] = ()
    per_host: bool = False      # on several hosts each runs it alone on its own chips (the teacher's inference)

    def __post_init__(self):
        if self.phase not in PHASES or self.kind not in KINDS:
            raise ValueError(f"program {self.name}: phase {self.phase!r} / kind {self.kind!r} not in "
                             f"{PHASES} / {KINDS}")
        if (self.kind == "train") != (self.train is not None):
            raise ValueError(f"program {self.name}: a train step needs a TrainSpec, other kinds none")


def placed(program: Program, target: Target) -> tuple[Program, Target, list]:
    """Where `program` runs on `target`: (the program, the target it compiles for, its devices). On a
    target of several hosts a `per_host` program runs on one host's chips, with its layout cut to them
    (`MeshConfig.within`), as a multi-host cell runs the teacher's inference: it compiles for one host
    (`targets.one_host`); anything else for the whole target."""
    host = targets.one_host(target) if program.per_host else target
    if host is target:
        return program, target, target.devices()
    return dataclasses.replace(program, mesh=program.mesh.within(host.devices_count)), host, host.devices()


class Layout:
    """A program's mesh and rules on the target's devices (one error when they do not divide)."""

    def __init__(self, program: Program, devices: Sequence[Any]):
        self.mesh, self.rules = program.mesh.build(devices)
        used = self.mesh.shape["data"] * self.mesh.shape["model"]
        if used != len(devices):
            raise ValueError(f"mesh {self.mesh.shape['data']} (data) x {self.mesh.shape['model']} (model) uses {used} "
                             f"of the target's {len(devices)} devices: DATA x MODEL must be {len(devices)} "
                             "(DATA = -1 takes every device MODEL leaves)")
        microbatches = program.train.num_microbatches if program.train else 1
        partitioning.check_batch_size(program.batch, self.mesh, 1, microbatches)
        if program.train is not None and program.train.fused_update:
            fused_update.check(program.model, microbatches)
        self.rules_tuple = tuple(tuple(r) for r in self.rules)

    def context(self):
        return partitioning.mesh_context(self.mesh, self.rules)

    def data(self, shape, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=partitioning.data_sharding(self.mesh))


def step_program(program: Program, layout: Layout) -> StepProgram:
    """The trainer's own step program for a train `program`, from the constructor `Trainer` calls."""
    t = program.train
    total_steps = 1000 if t.optimizer.uses_total_steps else 1   # a schedule constant: no effect on memory
    return trainer.step_program(program.model, t.loss, t.optimizer, total_steps, t.num_microbatches, layout.mesh,
                                layout.rules_tuple, t.param_dtype, t.fused_update)


def inference_params(model: T5Config, layout: Layout) -> Any:
    """Abstract params as inference holds them (`decoding.decoding_params`: the activation dtype,
    the logits kernel float32), sharded by the model's logical axes on the layout's mesh."""
    module = Transformer(model)
    shardings = partitioning.model_shardings(module, layout.mesh, layout.rules)
    cast = jax.eval_shape(lambda p: decoding.decoding_params(p, model), partitioning.abstract_params(module, shardings))
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cast, shardings)


def train_batch(program: Program, layout: Layout) -> dict[str, jax.ShapeDtypeStruct]:
    b, (n_in, n_out) = program.batch, program.lengths
    batch = {"encoder_input_tokens": layout.data((b, n_in), jnp.int32),
             "decoder_input_tokens": layout.data((b, n_out), jnp.int32),
             "decoder_target_tokens": layout.data((b, n_out), jnp.int32),
             "decoder_loss_weights": layout.data((b, n_out), jnp.float32)}
    k = program.train.soft_targets
    if k:    # k = the vocab: the online teacher's logits, in id order, with no ids (`OnlineTeacherBatches`)
        batch["teacher_topk_values"] = layout.data((b, n_out, k), jnp.float32)
        if k != program.model.vocab_size:
            batch["teacher_topk_ids"] = layout.data((b, n_out, k), jnp.int32)
    return batch


def lowered(program: Program, layout: Layout):
    """`jit(...).lower(...)` of the function the runtime calls for `program`, on abstract inputs
    (built outside the mesh context: nothing may run on compile-only devices)."""
    b, (n_in, n_out) = program.batch, program.lengths
    enc = layout.data((b, n_in), jnp.int32)
    if program.kind == "train":
        prog = step_program(program, layout)
        params, opt = prog.abstract_state()
        state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=prog.state_shardings.step), params, opt)
        key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=partitioning.replicated(layout.mesh))
        with layout.context():
            return prog.train_step.lower(state, train_batch(program, layout), rng)
    params = inference_params(program.model, layout)
    dec = layout.data((b, n_out), jnp.int32)
    module = Transformer(program.model)
    with layout.context():
        if program.kind == "decode":
            return decoding.greedy_program(program.model, n_out).lower(params, enc, None)
        if program.kind == "score":
            return teacher_outputs.score_topk.lower(module, params, enc, dec, program.topk)
        return student_data.teacher_logits.lower(module, params, enc, dec)


def state_bytes_per_device(program: Program, layout: Layout) -> int:
    """Bytes per device of the state `program` keeps between calls: a train step's params and
    optimizer slots, inference's params."""
    if program.kind == "train":
        prog = step_program(program, layout)
        tree = prog.abstract_state()
    else:
        tree = inference_params(program.model, layout)
    return sum(_shard_bytes(x) for x in jax.tree_util.tree_leaves(tree))


def least_peak_bytes(program: Program, layout: Layout) -> int:
    """Bytes per device no compile of `program` can go below: its state, and for a plain train step
    with scanned layers the gradient tree as well (the backward scan stacks every layer's gradient
    before the update reads them; the fused update consumes each layer's as it comes). A bound
    `--search` uses to skip compiles, not a figure it reports."""
    state = state_bytes_per_device(program, layout)
    if program.kind != "train" or not program.model.scan_layers or program.train.fused_update:
        return state
    params, _ = step_program(program, layout).abstract_state()
    return state + sum(_shard_bytes(x) for x in jax.tree_util.tree_leaves(params))


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    size = 1
    for d in shape:
        size *= d
    return size * jnp.dtype(x.dtype).itemsize


# ----------------------------------------------------------------------------- memory and refusals

def memory_fields(compiled) -> dict[str, float]:
    """XLA's per-device sizes (GiB) and `peak_gib` = arguments + outputs - aliased + temporaries."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    arg, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
    alias, temp, code = ma.alias_size_in_bytes, ma.temp_size_in_bytes, ma.generated_code_size_in_bytes
    return dict(argument_gib=arg / GIB, output_gib=out / GIB, alias_gib=alias / GIB, temp_gib=temp / GIB,
                generated_code_gib=code / GIB, peak_gib=(arg + out - alias + temp) / GIB)


_REFUSALS = (
    (re.compile(r"HLO temporaries \(([\d.]+)([GMK])\) exceeds available HBM \(([\d.]+)([GMK])\)"), "temporaries"),
    (re.compile(r"Used ([\d.]+)([GMK]) of ([\d.]+)([GMK]) hbm", re.I), "total"),
)
_UNIT = {"G": 1.0, "M": 1.0 / 1024, "K": 1.0 / 1024 ** 2}


def parse_refusal(message: str) -> Optional[dict[str, Any]]:
    """The TPU compiler's out-of-memory refusal as {needs_gib, of_gib, counted, text}; None if `message`
    is not one. `counted` says what `needs_gib` covers: 'temporaries' (a lower bound on the peak) or 'total'."""
    if "RESOURCE_EXHAUSTED" not in message and "memory" not in message.lower():
        return None
    for pattern, counted in _REFUSALS:
        m = pattern.search(message)
        if m:
            return dict(needs_gib=float(m.group(1)) * _UNIT[m.group(2)], of_gib=float(m.group(3)) * _UNIT[m.group(4)],
                        counted=counted, text=_first_line(message, m.start()))
    if "RESOURCE_EXHAUSTED" in message:
        return dict(needs_gib=None, of_gib=None, counted=None, text=_first_line(message, message.find("RESOURCE")))
    return None


def _first_line(message: str, at: int) -> str:
    start = message.rfind("\n", 0, at) + 1
    end = message.find("\n", at)
    return message[start:end if end >= 0 else None].strip()[:400]


# ----------------------------------------------------------------------------- FLOPs and the bound

def analytic_flops(program: Program) -> float:
    """Model FLOPs of one call (a train step: 3 forwards; decode: encoder plus every decode step)."""
    cfg, b, (n_in, n_out) = program.model, program.batch, program.lengths
    if program.kind == "train":
        return flops.train_flops(cfg, b, n_in, n_out)
    if program.kind == "decode":
        return flops.decode_flops(cfg, b, n_in, n_out)
    return flops.forward_flops(cfg, b, n_in, n_out)


def roofline_s(program: Program, target: Target, state_bytes: int) -> Optional[float]:
    """A lower bound on one call's seconds: FLOPs over every device at its datasheet peak, or the
    bytes each device must move at its HBM bandwidth, whichever is larger (per decode step for the
    decoder: it reads its weights and the whole cache every step). Never a prediction."""
    peak, bandwidth = target.hardware.peak_flops, target.bandwidth
    if not (peak and bandwidth):
        return None
    n = target.devices_count
    compute = analytic_flops(program) / (n * peak)
    if program.kind == "decode":
        cfg, b, (n_in, n_out) = program.model, program.batch, program.lengths
        cache = flops.decode_cache_bytes(cfg, b, n_in, n_out) / n
        if cfg.recomputes_cross_kv and program.mesh.activation_partitioning_dims < 2:
            # the encoder output is split over `data` only: each device holds `model` x its 1/n share
            cache += flops.encoder_output_bytes(cfg, b, n_in) * (int(program.mesh.model) - 1) / n
        per_step = (state_bytes + cache) / bandwidth
        return max(compute, n_out * per_step)
    if program.kind == "train":
        compute *= train_passes(program) / 3.0   # 3: one forward and a backward of twice its FLOPs
    moved = 2 * state_bytes if program.kind == "train" else state_bytes   # read, and write back the update
    return max(compute, moved / bandwidth)


def train_passes(program: Program) -> float:
    """A train step's FLOPs in forwards: 3 (forward, backward), one more with REMAT 'full' (the
    layers' forward again in the backward), and with the fused update and gradient clipping a
    second backward pass (doa_jax/fused_update.py)."""
    backward = 2.0 + (1.0 if program.model.remat_policy == "full" else 0.0)
    t = program.train
    clipped_twice = t.fused_update and t.optimizer.grad_clip_norm is not None
    return 1.0 + backward * (2 if clipped_twice else 1)


# ----------------------------------------------------------------------------- compiling

# The GPU compiler without a device has no autotuner to drop a Triton GEMM tiling that does not fit a
# tiny matrix ("Couldn't find output tile sizes"); on such a failure the program is compiled again
# with cuBLAS GEMMs, as the autotuner would have fallen back to, and the row says so.
_GPU_TILING_FAILURE = "Couldn't find output tile sizes"
_GPU_FALLBACK = {"xla_gpu_enable_triton_gemm": False}


# The GPU compiler's note when its rematerialisation could not bring a program under the device's
# memory: kept in the row (`xla_note`), not printed.
_XLA_REMAT_NOTE = re.compile(r"Can't reduce memory use below .*")
_QUIET = re.compile(NOTICES.pattern + "|" + _XLA_REMAT_NOTE.pattern)


def _compile(lowering, target: Target):
    """(compiled, compiler options used, the compiler's memory note or None); the C++ notices of the
    compile-only plugins are filtered out of stderr."""
    quiet = platforms.filtered_stderr(_QUIET, keep_all_on_error=False)
    with quiet, platforms.compilation_cache_off():   # a compile-only executable cannot be cached or reloaded
        try:
            compiled, options = lowering.compile(), None
        except Exception as e:  # noqa: BLE001
            if target.platform != "cuda" or _GPU_TILING_FAILURE not in str(e):
                raise
            compiled, options = lowering.compile(compiler_options=_GPU_FALLBACK), dict(_GPU_FALLBACK)
    note = _XLA_REMAT_NOTE.search(quiet.captured)
    return compiled, options, note.group(0).strip() if note else None


def compile_program(program: Program, target: Target, devices: Sequence[Any],
                    co_resident_bytes: int = 0) -> dict[str, Any]:
    """Compiles `program` for `target`; one row (see the module doc). A refusal by the compiler is a
    row with `fits: False` and `refusal`; other errors propagate."""
    layout = Layout(program, devices)
    state = state_bytes_per_device(program, layout)
    row = describe(program, layout)
    row.update(target=target.name, device_kind=devices[0].device_kind, capacity_gib=target.capacity_gib,
               state_gib=state / GIB, co_resident_gib=co_resident_bytes / GIB, flops=analytic_flops(program))
    start = time.perf_counter()
    try:
        compiled, options, note = _compile(lowered(program, layout), target)
    except Exception as e:   # noqa: BLE001  (the compiler's refusal comes as a runtime error)
        refusal = parse_refusal(str(e))
        if refusal is None:
            raise
        row.update(compile_s=time.perf_counter() - start, refusal=refusal["text"], peak_gib=refusal["needs_gib"],
                   peak_counts=refusal["counted"], fits=False, margin_gib=None)
        if refusal["of_gib"]:
            row["compiler_capacity_gib"] = refusal["of_gib"]
        return row
    row["compile_s"] = time.perf_counter() - start
    if options:
        row["compiler_options"] = options
    if note:
        row["xla_note"] = note
    row.update(memory_fields(compiled))
    row["peak_counts"] = "total"
    need = row["peak_gib"] + row["co_resident_gib"]
    row.update(fits=need <= target.capacity_gib, margin_gib=target.capacity_gib - need,
               bound_s=roofline_s(program, target, state))
    return row


def verdict(row: dict[str, Any]) -> str:
    """One phrase: fits (peak, co-resident, capacity, margin), or does not (what the compiler said)."""
    if row.get("error"):
        return f"ERROR: {row['error']}"
    co = f" + {row['co_resident_gib']:.2f} co-resident" if row.get("co_resident_gib") else ""
    if row.get("refusal"):
        counted = " of temporaries alone" if row.get("peak_counts") == "temporaries" else ""
        need = f"needs {row['peak_gib']:.2f} GiB{counted}" if row.get("peak_gib") else "out of memory"
        return f"REFUSED by the compiler: {need} of {row.get('compiler_capacity_gib', row['capacity_gib']):.2f}"
    if row["fits"]:
        return f"fits: {row['peak_gib']:.2f} GiB{co} of {row['capacity_gib']:.2f} (margin {row['margin_gib']:.2f})"
    return f"does NOT fit: {row['peak_gib']:.2f} GiB{co} of {row['capacity_gib']:.2f}"


def describe(program: Program, layout: Layout) -> dict[str, Any]:
    """The settings of `program` as a row's fields."""
    cfg, t = program.model, program.train
    row = dict(program=program.name, phase=program.phase, kind=program.kind, params=cfg.num_params(),
               batch=program.batch, lengths=list(program.lengths),
               mesh=[layout.mesh.shape["data"], layout.mesh.shape["model"]], fsdp=program.mesh.fsdp,
               dtype=cfg.dtype, scan=cfg.scan_layers, remat=cfg.remat_policy)
    if cfg.scan_layers and t is not None and not t.fused_update:   # the fused update: always the stack's loop
        row.update(scan_backward=cfg.scan_backward)
    if t is not None:
        row.update(optimizer=t.optimizer.name, param_dtype=t.param_dtype, microbatches=t.num_microbatches,
                   soft_targets=t.soft_targets, fused_update=t.fused_update,
                   grad_clip_norm=t.optimizer.grad_clip_norm)
    return row


def compile_all(programs: Sequence[Program], target: Target, *, on_row=None,
                errors_as_rows: bool = False) -> list[dict[str, Any]]:
    """Every program compiled for `target`, with each one's co-resident state counted. With
    `errors_as_rows`, a program that cannot be laid out or lowered there (e.g. 6 attention heads on an
    8-way model axis) gives a row with `error` and `fits: None`, and the others still compile."""
    by_name = {p.name: p for p in programs}
    rows = []
    for program in programs:
        try:
            others = [placed(by_name[n], target) for n in program.co_resident if n in by_name]
            co = sum(state_bytes_per_device(o, Layout(o, here)) for o, _, here in others)
            row = compile_program(*placed(program, target), co)
        except Exception as e:  # noqa: BLE001  (layout and lowering errors of one program, as data)
            if not errors_as_rows:
                raise
            row = dict(program=program.name, phase=program.phase, kind=program.kind, batch=program.batch,
                       lengths=list(program.lengths), target=target.name, capacity_gib=target.capacity_gib,
                       fits=None, error=f"{type(e).__name__}: {_first_line(str(e), 0)}")
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
