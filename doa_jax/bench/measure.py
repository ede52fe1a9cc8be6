"""Speed and memory of this project's T5 on the device JAX sees (random weights, T5 v1.1 shapes).

Each *case* is a dict naming a part and its settings; its function measures it and returns one
JSON-ready row (`run.py` runs cases, `table.py` prints rows). Parts:

* `train`: the trainer's own jitted train step (`trainer.program.StepProgram`) on a one-device mesh:
  param init, AOT compile and first step each timed, then `steps` timed steps -> step time,
  tokens/s, MFU (`progress.mfu`: over the datasheet peak) by the peer's formula (6 x
  non-embedding params x tokens: encoder params x encoder tokens + decoder and logits params x
  decoder tokens) and by `doa_jax.flops` with attention; the peer's formula over the *measured*
  matmul peak as well (`matmul_peak_fraction`, the figure the PyTorch peer calls its MFU);
  compiled memory (argument/output/temp) and the device's peak memory.
* `decode`: `decoding.greedy` of `batch` rows of `in_len` tokens, exactly `new_tokens` new
  tokens (`min_length`, so no row stops early), params created directly in bfloat16 (no
  float32 copy) -> examples/s; init and compile+first call timed.
* `distill`: per student step, stored top-k KD (the student's step alone) against online KD (the
  paper's code: a teacher forward pass every step as well), as FLOPs and, where it runs, time.

Compiling for a device this host does not have (memory per device, fits) is `doa aot` (`aot.py`).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from doa_jax import decoding, flops, hardware, losses, partitioning, progress
from doa_jax.bench.aot import memory_fields
from doa_jax.model import Transformer, config_for_size
from doa_jax.optimizers import OptimizerConfig
from doa_jax.trainer.program import step_program

GIB = 2.0 ** 30
DEFAULTS = dict(batch=None, enc_len=512, dec_len=128, steps=10, warmup=2, optimizer="adamw", scan=True,
                remat="none", param_dtype="float32", dtype="bfloat16", new_tokens=32, in_len=128,
                decode_batch=256, cross_kv="cache", reps=3, teacher="xxl", student="small", topk=8, seed=0, profile=None)


def default_batch(size: str) -> int:
    """The issue's train batch: 32, or 8 for XL and XXL."""
    return 8 if size.lower().endswith(("xl", "xxl")) else 32


def matmul_peak(device_kind: str) -> tuple[Optional[float], str]:
    """The fastest bf16 matmul rate known for a device: measured on the lent kind where `hardware.toml`
    has one (the PyTorch peer's PEAK, so `matmul_peak_fraction` and the peer's "MFU" share it), else
    the datasheet peak. The floors (`floor_s`) use it too. Not MFU's denominator (`progress.mfu`)."""
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
    every decoder weight once (bf16; the logits kernel float32; with `decode_cross_kv='recompute'`
    the cross K/V projections too), the cache (`flops.decode_cache_bytes`: cross K/V or the encoder
    output, and the self-attention K/V at full length, as attention reads them)."""
    d, inner, f, vocab = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    mlp = (len(cfg.mlp_activations) + 1) * d * f
    dec_weights = cfg.num_decoder_layers * (6 * d * inner + mlp)   # per token: self q/k/v/out, cross q/out
    if cfg.recomputes_cross_kv:
        dec_weights += cfg.num_decoder_layers * 2 * d * inner           # cross k/v, applied again each step
    step = flops.decode_step_flops(cfg, batch, in_len, new_tokens)
    encode = flops.decode_flops(cfg, batch, in_len, new_tokens) - new_tokens * step
    step_bytes = 2 * dec_weights + 4 * d * vocab + flops.decode_cache_bytes(cfg, batch, in_len, new_tokens)
    return encode / peak + new_tokens * max(step / peak, step_bytes / bytes_per_s)


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


def _compiled_memory(compiled) -> dict[str, float]:
    """XLA's sizes of the compiled step; its peak as `est_peak_gib` (`peak_gib` is the device's measured one)."""
    fields = memory_fields(compiled)
    if "peak_gib" in fields:
        fields["est_peak_gib"] = fields.pop("peak_gib")
    return fields


def _device_memory() -> dict[str, float]:
    stats = jax.devices()[0].memory_stats() or {}
    out = {}
    if "peak_bytes_in_use" in stats:
        out["peak_gib"] = stats["peak_bytes_in_use"] / GIB
    if "bytes_limit" in stats:
        out["limit_gib"] = stats["bytes_limit"] / GIB
    return out


def model_config(size: str, *, scan: bool, remat: str = "none", dtype: str = "bfloat16", cross_kv: str = "cache"):
    return config_for_size(size, dtype=dtype, scan_layers=bool(scan), remat_policy=remat, decode_cross_kv=cross_kv)


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
    prog = step_program(cfg, loss or losses.LossConfig(), OptimizerConfig(name=optimizer), 1, 1,
                        mesh, tuple(tuple(r) for r in rules), param_dtype)
    return prog, mesh, rules


def _cast_floats(tree, dtype):
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _init_state(prog, seed: int):
    """The program's train state, params in the program's `param_dtype` (the trainer's own init)."""

    return prog.init(jax.random.PRNGKey(seed))


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
    row.update(_compiled_memory(compiled))
    row.update(_device_memory())
    return row


def _add_mfu(row: dict) -> None:
    """MFU over the datasheet peak (`progress.mfu`), the fraction of the measured matmul peak, and the
    floor (every FLOP at that matmul rate)."""
    kind = jax.devices()[0].device_kind
    peak, note = progress.peak_flops_per_device(kind)
    matmul, matmul_note = matmul_peak(kind)
    row.update(device=kind, peak_flops=peak, peak_note=note, matmul_peak_flops=matmul, matmul_peak_note=matmul_note)
    if matmul:
        row["floor_s"] = row["attn_flops"] / matmul
    if row.get("step_s"):
        row["mfu"] = progress.mfu(row["peer_flops"] / row["step_s"], peak)
        row["mfu_attn"] = progress.mfu(row["attn_flops"] / row["step_s"], peak)
        row["matmul_peak_fraction"] = row["peer_flops"] / row["step_s"] / matmul if matmul else None


def _decode_params(cfg, seed: int):
    """Random params created straight in the decoding dtypes (bf16 kernels, float32 logits)."""


    model, tokens = Transformer(cfg), jnp.zeros((1, 1), jnp.int32)
    return jax.jit(lambda rng: decoding.decoding_params(nn.meta.unbox(model.init(rng, tokens, tokens))["params"],
                                                        cfg))(jax.random.PRNGKey(seed))


def bench_decode(case: Mapping[str, Any]) -> dict[str, Any]:
    """Greedy decoding throughput: exactly `new_tokens` tokens for each of `decode_batch` rows."""


    c = {**DEFAULTS, **case}
    size, batch, in_len, new = c["size"], c["decode_batch"], c["in_len"], c["new_tokens"]
    cfg = model_config(size, scan=c["scan"], dtype=c["dtype"], cross_kv=c["cross_kv"])
    row = dict(part="decode", size=size, batch=batch, in_len=in_len, new_tokens=new, scan=c["scan"],
               cross_kv=c["cross_kv"],
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
    peak, _ = matmul_peak(jax.devices()[0].device_kind)
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
