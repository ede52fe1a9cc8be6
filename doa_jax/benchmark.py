"""Speed and memory of this project's T5 on whatever device JAX sees (random weights, T5 v1.1 shapes).

Each *case* is a dict naming a part and its settings; `run_case` measures it and returns one
JSON-ready row. Parts (`PARTS`):

* `train`: the trainer's own jitted train step (`trainer.step_program`) on a one-device mesh:
  param init, AOT compile and first step each timed, then `steps` timed steps -> step time,
  tokens/s, MFU by the peer's formula (6 x non-embedding params x tokens: encoder params x
  encoder tokens + decoder and logits params x decoder tokens) and by `doa_jax.flops` with
  attention, compiled memory (argument/output/temp) and the device's peak memory.
* `decode`: `decoding.greedy` of `batch` rows of `in_len` tokens, exactly `new_tokens` new
  tokens (`min_length`, so no row stops early), params created directly in bfloat16 (no
  float32 copy) -> examples/s; init and compile+first call timed.
* `distill`: per student step, stored top-k KD (the student's step alone) against online KD (the
  paper's code: a teacher forward pass every step as well), as FLOPs and, where it runs, time.
* `aot_train`, `aot_decode`: `jit(...).lower(abstract inputs).compile()` with
  `jax.ShapeDtypeStruct`s only (nothing allocated): compile time and `memory_analysis()` /
  `cost_analysis()` of the XL/XXL programs on any backend, the CPU included.

`run_cases` runs each case in a fresh subprocess by default, so peak memory and start-up times
are per case and an out-of-memory case is recorded and skipped. Rows go to JSON; `table` prints
them, next to the PyTorch peer's rows (`../shared/bench/hf_t5_baseline.py` JSON) when given.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from doa_jax import decoding, flops, hardware, losses, partitioning, progress, trainer
from doa_jax.model import Transformer, config_for_size
from doa_jax.optimizers import OptimizerConfig
from doa_jax.trainer import TrainState

# MFU on H100/H200 uses the bf16 matmul rate measured on the lent kind (doa_jax/hardware.toml), so
# our MFU and the PyTorch peer's share a denominator.
PEER_PEAK = hardware.get("h100").measured_peak_flops
GIB = 2.0 ** 30
DEFAULTS = dict(batch=None, enc_len=512, dec_len=128, steps=10, warmup=2, optimizer="adamw", scan=True,
                remat="none", param_dtype="float32", dtype="bfloat16", new_tokens=32, in_len=128,
                decode_batch=256, reps=3, teacher="xxl", student="small", topk=8, seed=0, profile=None)


def default_batch(size: str) -> int:
    """The issue's train batch: 32, or 8 for XL and XXL."""
    return 8 if size.lower().endswith(("xl", "xxl")) else 32


def peak_flops(device_kind: str) -> tuple[Optional[float], str]:
    """The MFU denominator: a measured matmul rate where `hardware.toml` has one, else the datasheet peak."""
    hw = hardware.for_device_kind(device_kind)
    if hw is not None and hw.measured_peak_flops:
        return hw.measured_peak_flops, hw.measured_note
    return progress.peak_flops_per_device(device_kind)


def bandwidth(device_kind: str) -> Optional[float]:
    """Memory bandwidth measured on the lent kind (`hardware.toml`), or None."""
    hw = hardware.for_device_kind(device_kind)
    return hw.hbm_bytes_per_s if hw is not None else None


def decode_floor_s(cfg, batch: int, in_len: int, new_tokens: int, peak: float, bytes_per_s: float) -> float:
    """Least time a greedy decode can take: the encoder (and cross K/V) at the peak FLOP rate, then
    per step the larger of its FLOPs over the peak and its bytes over the bandwidth. A step reads
    every decoder weight once (bf16; the logits kernel float32), the whole cross cache and the
    self-attention cache (bf16, full length as attention reads it)."""
    d, inner, f, vocab = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    mlp = (len(cfg.mlp_activations) + 1) * d * f
    attn = 4 * d * inner
    enc_layers, dec_layers = cfg.num_encoder_layers, cfg.num_decoder_layers
    encode = (2 * batch * in_len * (enc_layers * (attn + mlp) + dec_layers * 2 * d * inner)
              + 4 * inner * batch * in_len * in_len * enc_layers)
    dec_weights = dec_layers * (attn + 2 * d * inner + mlp)       # per token, cross K/V excluded
    step_flops = 2 * batch * (dec_weights + d * vocab) + 4 * inner * batch * dec_layers * (new_tokens + in_len)
    cache = 2 * 2 * batch * dec_layers * inner                    # K and V, bf16, per cached position
    step_bytes = 2 * dec_weights + 4 * d * vocab + cache * (in_len + new_tokens)
    return encode / peak + new_tokens * max(step_flops / peak, step_bytes / bytes_per_s)


# ---------------------------------------------------------------------------------- helpers

def _now() -> float:
    return time.perf_counter()


def _profile(directory: Optional[str], run: Callable[[], Any], row: dict) -> None:
    """A `jax.profiler` trace of `run()` (after the timed loop, so timing is unaffected)."""
    if not directory:
        return

    with jax.profiler.trace(directory):
        jax.block_until_ready(run())
    row["profile_dir"] = directory


def _device_memory() -> dict[str, float]:
    stats = jax.devices()[0].memory_stats() or {}
    out = {}
    if "peak_bytes_in_use" in stats:
        out["peak_gib"] = stats["peak_bytes_in_use"] / GIB
    if "bytes_limit" in stats:
        out["limit_gib"] = stats["bytes_limit"] / GIB
    return out


def _memory_analysis(compiled) -> dict[str, float]:
    """Sizes from XLA's buffer assignment; `est_peak_gib` = arguments + temps + non-aliased outputs."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return {}
    if ma is None:
        return {}
    arg, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
    alias, temp = ma.alias_size_in_bytes, ma.temp_size_in_bytes
    return dict(argument_gib=arg / GIB, output_gib=out / GIB, alias_gib=alias / GIB, temp_gib=temp / GIB,
                est_peak_gib=(arg + temp + out - alias) / GIB)


def _cost_flops(compiled) -> Optional[float]:
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def model_config(size: str, *, scan: bool, remat: str = "none", dtype: str = "bfloat16"):
    return config_for_size(size, dtype=dtype, scan_layers=bool(scan), remat_policy=remat)


def stack_param_counts(abstract_params: Mapping[str, Any]) -> tuple[int, int]:
    """(encoder, decoder + logits) parameter counts without the shared embedding: the peer's N."""

    def count(tree):
        return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)))

    return count(abstract_params["encoder"]), count(abstract_params["decoder"])


def peer_train_flops(abstract_params, batch: int, enc_len: int, dec_len: int) -> float:
    """The peer's model FLOPs of a train step: 6 (N_enc x encoder tokens + N_dec x decoder tokens)."""
    enc, dec = stack_param_counts(abstract_params)
    return 6.0 * (enc * batch * enc_len + dec * batch * dec_len)


def random_batch(vocab_size: int, batch: int, enc_len: int, dec_len: int, seed: int = 0) -> dict:
    """Full-length random examples (no padding), tokens in [2, min(vocab, 32000)) as the peer draws."""

    rng = np.random.default_rng(seed)
    high = min(vocab_size, 32000)
    targets = rng.integers(2, high, (batch, dec_len), dtype=np.int32)
    return dict(encoder_input_tokens=rng.integers(2, high, (batch, enc_len), dtype=np.int32),
                decoder_input_tokens=np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], 1),
                decoder_target_tokens=targets,
                decoder_loss_weights=np.ones((batch, dec_len), np.float32))


def _one_device_mesh():
    mesh = partitioning.make_mesh(1, 1, jax.devices()[:1])
    return mesh, partitioning.logical_axis_rules()


def _program(cfg, optimizer: str, loss=None, param_dtype: str = "float32"):
    mesh, rules = _one_device_mesh()
    prog = trainer.step_program(cfg, loss or losses.LossConfig(), OptimizerConfig(name=optimizer), 1, 1,
                                mesh, tuple(tuple(r) for r in rules), param_dtype)
    return prog, mesh, rules


def _cast_floats(tree, dtype):
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _init_state(prog, seed: int):
    """The program's train state, params in the program's `param_dtype` (the trainer's own init)."""

    return prog.init(jax.random.PRNGKey(seed))


def _abstract_state(prog):
    """ShapeDtypeStructs (with shardings) of the train state: nothing is allocated."""


    params, opt = prog.abstract_state()
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=prog.state_shardings.step)
    return TrainState(step, params, opt)


def _abstract_batch(mesh, vocab: int, batch: int, enc_len: int, dec_len: int):
    data = partitioning.data_sharding(mesh)
    shapes = dict(encoder_input_tokens=((batch, enc_len), jnp.int32),
                  decoder_input_tokens=((batch, dec_len), jnp.int32),
                  decoder_target_tokens=((batch, dec_len), jnp.int32),
                  decoder_loss_weights=((batch, dec_len), jnp.float32))
    return {k: jax.ShapeDtypeStruct(s, d, sharding=data) for k, (s, d) in shapes.items()}


def _train_flops_fields(cfg, prog, batch, enc_len, dec_len) -> dict[str, float]:
    return dict(peer_flops=peer_train_flops(prog.abstract_params, batch, enc_len, dec_len),
                attn_flops=flops.train_flops(cfg, batch, enc_len, dec_len, attention=True))


# ---------------------------------------------------------------------------------- parts

def _train_case(case: Mapping[str, Any], part: str):
    """A train-step case's settings, model config, step program and the start of its row."""
    c = {**DEFAULTS, **case}
    size, batch = c["size"], c["batch"] or default_batch(c["size"])
    cfg = model_config(size, scan=c["scan"], remat=c["remat"], dtype=c["dtype"])
    prog, mesh, rules = _program(cfg, c["optimizer"], param_dtype=c["param_dtype"])
    row = dict(part=part, size=size, optimizer=c["optimizer"], batch=batch, enc_len=c["enc_len"],
               dec_len=c["dec_len"], scan=c["scan"], remat=c["remat"], param_dtype=c["param_dtype"],
               params=cfg.num_params())
    return c, batch, cfg, prog, mesh, rules, row


def bench_train(case: Mapping[str, Any]) -> dict[str, Any]:
    """One train-step configuration: start-up (init, compile, first step), then timed steps."""


    c, batch, cfg, prog, mesh, rules, row = _train_case(case, "train")
    with partitioning.mesh_context(mesh, rules):
        t = _now()
        state = _init_state(prog, c["seed"])
        jax.block_until_ready(state)
        row["init_s"] = _now() - t
        host = random_batch(cfg.vocab_size, batch, c["enc_len"], c["dec_len"], c["seed"])
        data = partitioning.global_batch(host, mesh)
        rng = jax.random.PRNGKey(c["seed"])
        t = _now()
        compiled = prog.train_step.lower(state, data, rng).compile()
        row["compile_s"] = _now() - t
        t = _now()
        state, metrics = compiled(state, data, rng)
        jax.block_until_ready(metrics)
        row["first_step_s"] = _now() - t
        row["startup_s"] = row["init_s"] + row["compile_s"] + row["first_step_s"]
        for _ in range(c["warmup"]):
            state, metrics = compiled(state, data, rng)
        jax.block_until_ready(metrics)
        if c["steps"] > 0:
            t = _now()
            for _ in range(c["steps"]):
                state, metrics = compiled(state, data, rng)
            jax.block_until_ready(metrics)
            step_s = (_now() - t) / c["steps"]
            row.update(step_s=step_s, tokens_per_s=batch * (c["enc_len"] + c["dec_len"]) / step_s)
        row["loss"] = float(metrics["loss"])
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"non-finite loss {row['loss']} in the {c['size']} train step")

        def three_steps():
            nonlocal state, metrics
            for _ in range(3):
                state, metrics = compiled(state, data, rng)
            return metrics

        _profile(c["profile"], three_steps, row)
    row.update(_train_flops_fields(cfg, prog, batch, c["enc_len"], c["dec_len"]))
    _add_mfu(row)
    row.update(_memory_analysis(compiled))
    row.update(_device_memory())
    return row


def _add_mfu(row: dict) -> None:
    peak, note = peak_flops(jax.devices()[0].device_kind)
    row.update(device=jax.devices()[0].device_kind, peak_flops=peak, peak_note=note)
    if peak:
        row["floor_s"] = row["attn_flops"] / peak       # every FLOP at the peak rate
    if peak and row.get("step_s"):
        row["mfu"] = row["peer_flops"] / row["step_s"] / peak
        row["mfu_attn"] = row["attn_flops"] / row["step_s"] / peak


def _decode_params(cfg, seed: int):
    """Random params created straight in the decoding dtypes (bf16 kernels, float32 logits)."""


    model, tokens = Transformer(cfg), jnp.zeros((1, 1), jnp.int32)
    return jax.jit(lambda rng: decoding.decoding_params(nn.meta.unbox(model.init(rng, tokens, tokens))["params"],
                                                        cfg))(jax.random.PRNGKey(seed))


def bench_decode(case: Mapping[str, Any]) -> dict[str, Any]:
    """Greedy decoding throughput: exactly `new_tokens` tokens for each of `decode_batch` rows."""


    c = {**DEFAULTS, **case}
    size, batch, in_len, new = c["size"], c["decode_batch"], c["in_len"], c["new_tokens"]
    cfg = model_config(size, scan=c["scan"], dtype=c["dtype"])
    row = dict(part="decode", size=size, batch=batch, in_len=in_len, new_tokens=new, scan=c["scan"],
               params=cfg.num_params(), device=jax.devices()[0].device_kind)
    t = _now()
    params = jax.block_until_ready(_decode_params(cfg, c["seed"]))
    row["init_s"] = _now() - t
    enc = np.random.default_rng(c["seed"]).integers(2, min(cfg.vocab_size, 32000), (batch, in_len)).astype(np.int32)
    enc = jax.device_put(enc)
    run = lambda: decoding.greedy(cfg, params, enc, new, min_length=new)  # noqa: E731
    t = _now()
    out = jax.block_until_ready(run())
    row["compile_and_first_s"] = _now() - t
    row["startup_s"] = row["init_s"] + row["compile_and_first_s"]
    if int(out.steps) != new:
        raise AssertionError(f"decode ran {int(out.steps)} steps, expected exactly {new}")
    if c["reps"] > 0:
        t = _now()
        for _ in range(c["reps"]):
            out = run()
        jax.block_until_ready(out)
        batch_s = (_now() - t) / c["reps"]
        row.update(batch_s=batch_s, examples_per_s=batch / batch_s, tokens_per_s=batch * new / batch_s)
    _profile(c["profile"], run, row)
    peak, _ = peak_flops(jax.devices()[0].device_kind)
    bytes_per_s = bandwidth(jax.devices()[0].device_kind)
    if peak and bytes_per_s:
        row["floor_s"] = decode_floor_s(cfg, batch, in_len, new, peak, bytes_per_s)
        row["floor_examples_per_s"] = batch / row["floor_s"]
    row.update(_device_memory())
    return row


def bench_distill(case: Mapping[str, Any]) -> dict[str, Any]:
    """Student step with stored top-k teacher logits vs the same step plus a teacher forward (online KD)."""


    c = {**DEFAULTS, **case}
    batch = c["batch"] or 32
    enc_len, dec_len, k = c["enc_len"], c["dec_len"], c["topk"]
    student = model_config(c["student"], scan=c["scan"], dtype=c["dtype"])
    teacher = model_config(c["teacher"], scan=c["scan"], dtype=c["dtype"])
    row = dict(part="distill", teacher=c["teacher"], student=c["student"], batch=batch, enc_len=enc_len,
               dec_len=dec_len, topk=k, device=jax.devices()[0].device_kind)
    student_flops = flops.train_flops(student, batch, enc_len, dec_len)
    teacher_flops = flops.forward_flops(teacher, batch, enc_len, dec_len)
    row.update(student_step_flops=student_flops, teacher_forward_flops=teacher_flops,
               flops_ratio_online_vs_stored=(student_flops + teacher_flops) / student_flops)
    if c["steps"] <= 0:
        return row
    kd = losses.LossConfig(kd_weight=1.0, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
    prog, mesh, rules = _program(student, "adamw", kd)
    host = random_batch(student.vocab_size, batch, enc_len, dec_len, c["seed"])
    rng_np = np.random.default_rng(c["seed"] + 1)
    host["teacher_topk_values"] = rng_np.standard_normal((batch, dec_len, k)).astype("float32")
    host["teacher_topk_ids"] = rng_np.integers(0, student.vocab_size, (batch, dec_len, k)).astype("int32")
    with partitioning.mesh_context(mesh, rules):
        state = prog.init(jax.random.PRNGKey(c["seed"]))
        data = partitioning.global_batch(host, mesh)
        rng = jax.random.PRNGKey(c["seed"])
        step = prog.train_step.lower(state, data, rng).compile()
        state, metrics = step(state, data, rng)
        jax.block_until_ready(metrics)
        t = _now()
        for _ in range(c["steps"]):
            state, metrics = step(state, data, rng)
        jax.block_until_ready(metrics)
        row["student_step_s"] = (_now() - t) / c["steps"]
    del state
    model, tokens = Transformer(teacher), jnp.zeros((1, 1), jnp.int32)
    tparams = jax.jit(lambda r: _cast_floats(nn.meta.unbox(model.init(r, tokens, tokens))["params"],
                                             jnp.bfloat16))(jax.random.PRNGKey(1))
    forward = jax.jit(lambda p, e, d: model.apply({"params": p}, e, d))   # full logits, as online KD uses
    enc, dec = jax.device_put(host["encoder_input_tokens"]), jax.device_put(host["decoder_input_tokens"])
    jax.block_until_ready(forward(tparams, enc, dec))
    t = _now()
    for _ in range(c["steps"]):
        out = forward(tparams, enc, dec)
    jax.block_until_ready(out)
    row["teacher_forward_s"] = (_now() - t) / c["steps"]
    row["time_ratio_online_vs_stored"] = (row["student_step_s"] + row["teacher_forward_s"]) / row["student_step_s"]
    row.update(_device_memory())
    return row


def _lower_and_compile(fn, row: dict[str, Any], *args):
    """AOT-compiles jitted `fn` for (abstract) `args`, timing both stages into `row`."""
    t = _now()
    lowered = fn.lower(*args)
    row["lower_s"] = _now() - t
    t = _now()
    compiled = lowered.compile()
    row["compile_s"] = _now() - t
    return compiled


def aot_train(case: Mapping[str, Any]) -> dict[str, Any]:
    """Compile the train step for abstract inputs (nothing allocated): compile time, memory, FLOPs."""


    c, batch, cfg, prog, mesh, rules, row = _train_case(case, "aot_train")
    row["backend"] = jax.default_backend()
    state = _abstract_state(prog)
    data = _abstract_batch(mesh, cfg.vocab_size, batch, c["enc_len"], c["dec_len"])
    rng = jax.ShapeDtypeStruct((2,), jax.numpy.uint32, sharding=partitioning.replicated(mesh))
    with partitioning.mesh_context(mesh, rules):
        compiled = _lower_and_compile(prog.train_step, row, state, data, rng)
    row.update(_memory_analysis(compiled))
    row["state_gib"] = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state)) / GIB
    row["xla_flops"] = _cost_flops(compiled)
    row.update(_train_flops_fields(cfg, prog, batch, c["enc_len"], c["dec_len"]))
    row["model_flops_no_remat"] = row["attn_flops"]
    return row


def aot_decode(case: Mapping[str, Any]) -> dict[str, Any]:
    """Compile the greedy decode loop for abstract bf16 params and tokens: compile time and memory."""


    c = {**DEFAULTS, **case}
    size, batch, in_len, new = c["size"], c["decode_batch"], c["in_len"], c["new_tokens"]
    cfg = model_config(size, scan=c["scan"], dtype=c["dtype"])
    model, tokens = Transformer(cfg), jnp.zeros((1, 1), jnp.int32)
    params = jax.eval_shape(lambda: decoding.decoding_params(
        nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens, tokens))["params"], cfg))
    enc = jax.ShapeDtypeStruct((batch, in_len), jnp.int32)
    row = dict(part="aot_decode", size=size, batch=batch, in_len=in_len, new_tokens=new, scan=c["scan"],
               params=cfg.num_params(), backend=jax.default_backend())
    fn = jax.jit(lambda p, e: decoding.greedy(cfg, p, e, new, min_length=new).tokens)
    compiled = _lower_and_compile(fn, row, params, enc)
    row.update(_memory_analysis(compiled))
    row["params_gib"] = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)) / GIB
    cache = batch * cfg.num_decoder_layers * cfg.num_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    row["cross_cache_gib"] = 2 * cache * in_len / GIB
    row["self_cache_gib"] = 2 * cache * new / GIB
    return row


PARTS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "train": bench_train, "decode": bench_decode, "distill": bench_distill,
    "aot_train": aot_train, "aot_decode": aot_decode,
}


def run_case(case: Mapping[str, Any]) -> dict[str, Any]:
    if case.get("part") not in PARTS:
        raise ValueError(f"unknown benchmark part {case.get('part')!r}; known: {sorted(PARTS)}")
    return PARTS[case["part"]](case)


# ---------------------------------------------------------------------------------- running

def run_cases(cases: Iterable[Mapping[str, Any]], *, isolate: bool = True, timeout_s: Optional[float] = None,
              on_row: Optional[Callable[[dict], None]] = None) -> list[dict[str, Any]]:
    """Measures each case (each in a fresh Python process when `isolate`); a failing case gives a
    row with `error` (e.g. out of memory) and the rest still run."""
    rows = []
    for case in cases:
        if isolate:
            row = _run_isolated(case, timeout_s)
        else:
            try:
                row = run_case(case)
            except Exception as e:  # recorded like the peer does (OOM etc.), then carry on
                row = _error_row(case, e)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def _error_row(case: Mapping[str, Any], error: Any) -> dict[str, Any]:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {**{k: case[k] for k in ("part", "size", "optimizer", "teacher", "student") if k in case},
            "case": dict(case), "error": text[-600:]}


def _run_isolated(case: Mapping[str, Any], timeout_s: Optional[float]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "doa_jax.benchmark", json.dumps(dict(case))]
    env = os.environ.copy()   # the child imports this package from where the parent did
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return _error_row(case, f"timed out after {timeout_s} s")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
    return _error_row(case, f"exit {done.returncode}: " + " | ".join(tail))


def expand(parts: Sequence[str], sizes: Sequence[str], *, optimizers: Sequence[str] = ("adamw",),
           **settings: Any) -> list[dict[str, Any]]:
    """Cases for `parts` x `sizes` (x `optimizers` for train parts). `startup` is one train step and
    one decode with the timed loops cut short (its rows carry init/compile/first-step times)."""
    cases = []
    for part in parts:
        if part == "distill":
            cases.append(dict(settings, part="distill"))
            continue
        for size in sizes:
            if part in ("train", "aot_train"):
                cases += [dict(settings, part=part, size=size, optimizer=o) for o in optimizers]
            elif part in ("decode", "aot_decode"):
                cases.append(dict(settings, part=part, size=size))
            elif part == "startup":
                cases.append(dict(settings, part="train", size=size, optimizer=optimizers[0], steps=0,
                                  warmup=0, startup=True))
                cases.append(dict(settings, part="decode", size=size, reps=0, startup=True))
            else:
                raise ValueError(f"unknown part {part!r}; known: {sorted(PARTS) + ['startup']}")
    return cases


# ---------------------------------------------------------------------------------- reporting

def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if spec == "k":
        return f"{value / 1e3:.1f}k"
    if spec == "%":
        return f"{100 * value:.1f}%"
    return format(value, spec)


def _peer_index(peer_rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    return {(r.get("kind"), r.get("size")): r for r in peer_rows if "error" not in r}


def table(rows: Sequence[Mapping[str, Any]], peer_rows: Sequence[Mapping[str, Any]] = ()) -> str:
    """Markdown tables: train, decode, start-up, distillation, AOT; peer figures and ratios beside ours."""
    peer = _peer_index(peer_rows)
    out = []
    train = [r for r in rows if r.get("part") == "train" and "error" not in r and r.get("step_s")]
    if train:
        out += ["| train | opt | batch | scan/remat/params | step s | tokens/s | MFU (peer formula) | MFU (+attn) "
                "| peak GiB | peer tokens/s (eager / compile) | peer MFU | ratio vs peer (eager / compile) |",
                "|" + "---|" * 12]
        for r in train:
            p, pc = peer.get(("train", r["size"])), peer.get(("trainc", r["size"]))
            same_batch = lambda q: q is not None and q.get("batch") == r["batch"]  # noqa: E731
            ratio = " / ".join(_fmt(r["tokens_per_s"] / q["tokens_per_s"], ".2f") + "x" if same_batch(q) else "-"
                               for q in (p, pc))
            out.append(f"| {r['size']} | {r['optimizer']} | {r['batch']} | "
                       f"{'scan' if r['scan'] else 'unrolled'}/{r['remat']}/{r['param_dtype']} | "
                       f"{_fmt(r['step_s'], '.4f')} | {_fmt(r['tokens_per_s'], 'k')} | {_fmt(r.get('mfu'), '%')} | "
                       f"{_fmt(r.get('mfu_attn'), '%')} | {_fmt(r.get('peak_gib'), '.1f')} | "
                       f"{_fmt(p and p['tokens_per_s'], 'k')} / {_fmt(pc and pc['tokens_per_s'], 'k')} | "
                       f"{_fmt(p and p.get('mfu'), '%')} | {ratio} |")
        out.append("")
    decode = [r for r in rows if r.get("part") == "decode" and "error" not in r and r.get("batch_s")]
    if decode:
        out += ["| decode | batch | in/new | scan | batch s | examples/s | floor examples/s | peak GiB "
                "| peer examples/s | ratio |", "|" + "---|" * 10]
        for r in decode:
            p = peer.get(("generate", r["size"]))
            out.append(f"| {r['size']} | {r['batch']} | {r['in_len']}/{r['new_tokens']} | {r['scan']} | "
                       f"{_fmt(r['batch_s'], '.3f')} | {_fmt(r['examples_per_s'], '.1f')} | "
                       f"{_fmt(r.get('floor_examples_per_s'), '.0f')} | "
                       f"{_fmt(r.get('peak_gib'), '.1f')} | {_fmt(p and p['examples_per_s'], '.1f')} | "
                       f"{_fmt(p and r['examples_per_s'] / p['examples_per_s'], '.2f')}"
                       f"{'x' if p else ''} |")
        out.append("")
    start = [r for r in rows if r.get("part") in ("train", "decode") and "error" not in r and "startup_s" in r]
    if start:
        out += ["| start-up | size | scan | init s | compile s | first step s | total s |", "|" + "---|" * 7]
        for r in start:
            first = r.get("first_step_s")
            compile_s = r.get("compile_s", r.get("compile_and_first_s"))
            out.append(f"| {r['part']}{' ' + r['optimizer'] if 'optimizer' in r else ''} | {r['size']} | "
                       f"{r['scan']} | {_fmt(r['init_s'], '.1f')} | {_fmt(compile_s, '.1f')}"
                       f"{'' if first is not None else ' (incl. first)'} | {_fmt(first, '.1f')} | "
                       f"{_fmt(r['startup_s'], '.1f')} |")
        out.append("")
    distill = [r for r in rows if r.get("part") == "distill" and "error" not in r]
    if distill:
        out += ["| distill | teacher/student | batch | FLOPs ratio online/stored | student step s | teacher fwd s "
                "| time ratio online/stored |", "|" + "---|" * 7]
        for r in distill:
            out.append(f"| per epoch | {r['teacher']}/{r['student']} | {r['batch']} | "
                       f"{_fmt(r['flops_ratio_online_vs_stored'], '.1f')} | {_fmt(r.get('student_step_s'), '.4f')} | "
                       f"{_fmt(r.get('teacher_forward_s'), '.4f')} | {_fmt(r.get('time_ratio_online_vs_stored'), '.1f')} |")
        out.append("")
    aot = [r for r in rows if r.get("part", "").startswith("aot") and "error" not in r]
    if aot:
        out += ["| AOT | size | opt | scan/remat/params | compile s | args GiB | temp GiB | est. peak GiB "
                "| XLA FLOPs / model FLOPs |", "|" + "---|" * 9]
        for r in aot:
            ratio = (r["xla_flops"] / r["model_flops_no_remat"]) if r.get("xla_flops") and r.get(
                "model_flops_no_remat") else None
            out.append(f"| {r['part']} ({r['backend']}) | {r['size']} | {r.get('optimizer', '-')} | "
                       f"{'scan' if r['scan'] else 'unrolled'}/{r.get('remat', '-')}/{r.get('param_dtype', 'bf16')} | "
                       f"{_fmt(r['compile_s'], '.1f')} | {_fmt(r.get('argument_gib'), '.1f')} | "
                       f"{_fmt(r.get('temp_gib'), '.1f')} | {_fmt(r.get('est_peak_gib'), '.1f')} | "
                       f"{_fmt(ratio, '.2f')} |")
        out.append("")
    errors = [r for r in rows if "error" in r]
    for r in errors:
        out.append(f"error in {r.get('part')} {r.get('size', '')} {r.get('optimizer', '')}: {r['error']}")
    return "\n".join(out)


def _main(argv: Sequence[str]) -> int:
    """`python -m doa_jax.benchmark CASE_JSON`: measures one case, prints its row as one JSON line."""
    case = json.loads(argv[0])
    print(json.dumps(run_case(case)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
