"""Training progress: the console line, `metrics.jsonl`, and TensorBoard event files.

MFU, the project's one definition (`mfu` below; the trainer's lines, `doa bench` and `doa calibrate`
all use it): model FLOPs per second (`doa_jax.flops`, recomputation not counted) / the datasheet
peak dense bf16 FLOP/s (`peak_flops` of `doa_jax/hardware.toml`) of the devices in use. A rate
against a *measured* matmul peak is not MFU and is named for what it is (`doa bench`'s
`matmul_peak_fraction`).
The event-file writer is self-contained (TFRecord framing + the two protobuf messages
TensorBoard reads), so training needs neither TensorFlow nor tensorboard installed.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Any, Mapping, Optional, Sequence

from doa_jax import hardware, storage

def peak_flops_per_device(device_kind: str) -> tuple[Optional[float], str]:
    """MFU's denominator: `(datasheet peak FLOP/s, note)` of one device of a kind (`doa_jax/hardware.toml`);
    `(None, reason)` when the kind is unknown or its peak is only nominal (the CPU's): MFU against it
    would mean nothing."""
    hw = hardware.for_device_kind(device_kind)
    if hw is None:
        return None, f"no peak FLOP/s known for device kind {device_kind!r}"
    if hw.nominal:
        return None, f"{hw.name}: no real peak FLOP/s ({hw.source}), so no MFU"
    return hw.peak_flops, hw.note()


def mfu(flops_per_s: float, peak_flops_per_device: Optional[float], devices: int = 1) -> Optional[float]:
    """Model FLOP utilisation: `flops_per_s` model FLOPs per second over `devices` devices' datasheet
    peak (`peak_flops_per_device`); None without a real peak."""
    return flops_per_s / (peak_flops_per_device * devices) if peak_flops_per_device else None


def params_text(n: int) -> str:
    """A parameter count for a console line: '22.98k params', '76.96M params' (not '0.0M')."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit} params"
    return f"{n} params"


def _fmt_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.1f}"


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def console_line(step: int, total_steps: Optional[int], metrics: Mapping[str, float],
                 loss_unit: Optional[str] = None) -> str:
    """`step 120/1000 | loss 2.3456 (per target token) | lr 1.0e-03 | 310.2 ex/s | 40.1k tok/s | ETA 0:05:12`.

    The training loss is labelled with its unit (`loss_unit`, from the loss normalisation: a sum
    over the batch's tokens is not a per-token number); eval losses are per target token.
    """
    parts = [f"step {step}" + (f"/{total_steps}" if total_steps else "")]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}" + (f" ({loss_unit})" if loss_unit else ""))
    if "learning_rate" in metrics:
        parts.append(f"lr {metrics['learning_rate']:.1e}")
    if "examples_per_s" in metrics:
        parts.append(f"{metrics['examples_per_s']:.1f} ex/s")
    if "tokens_per_s" in metrics:
        parts.append(f"{_fmt_count(metrics['tokens_per_s'])} tok/s")
    if metrics.get("mfu") is not None:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    if "eta_s" in metrics:
        parts.append(f"ETA {_fmt_eta(metrics['eta_s'])}")
    evals = [f"{k} {v:.4g}" + (" (per target token)" if k == "eval/loss" else "")
             for k, v in metrics.items() if k.startswith("eval/")]
    return " | ".join(parts + evals)


class Heartbeat:
    """Says when `seconds` have passed since the last console line, so long stretches between
    logged steps (or of decoding) still show progress; `seconds=None` never fires."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self._last = time.perf_counter()

    def due(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self._last >= self.seconds

    def reset(self) -> None:
        self._last = time.perf_counter()


class Throughput:
    """Examples/s, tokens/s, MFU and ETA over the interval since the last `report`."""

    def __init__(self, *, flops_per_step: float, peak_flops_per_device: Optional[float], devices: int,
                 total_steps: Optional[int], examples_per_step: int, tokens_per_step: int):
        self.flops_per_step, self.peak_flops_per_device, self.devices = flops_per_step, peak_flops_per_device, devices
        self.total_steps = total_steps
        self.examples_per_step, self.tokens_per_step = examples_per_step, tokens_per_step
        self._t, self._step = None, None

    def start(self, step: int) -> None:
        self._t, self._step = time.perf_counter(), step

    def since_start(self) -> float:
        """Seconds since the last `start`."""
        return time.perf_counter() - self._t

    def peek(self, step: int) -> dict[str, float]:
        """Examples/s and ETA since the last `report`, without starting a new interval."""
        if self._t is None or step <= self._step:
            return {}
        rate = (step - self._step) / (time.perf_counter() - self._t)
        out = dict(examples_per_s=rate * self.examples_per_step)
        if self.total_steps:
            out["eta_s"] = max(self.total_steps - step, 0) / rate
        return out

    def report(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        if self._t is None or step <= self._step:
            self.start(step)
            return {}
        dt, steps = now - self._t, step - self._step
        self._t, self._step = now, step
        rate = steps / dt
        out = dict(examples_per_s=rate * self.examples_per_step, tokens_per_s=rate * self.tokens_per_step,
                   step_time_s=dt / steps)
        if self.peak_flops_per_device:
            out["mfu"] = mfu(rate * self.flops_per_step, self.peak_flops_per_device, self.devices)
        if self.total_steps:
            out["eta_s"] = max(self.total_steps - step, 0) / rate
        return out


def _step_of(line: str) -> Optional[int]:
    """The step of a metrics row, or None for a line that is not one (torn by a kill)."""
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class MetricsLog:
    """Appends one JSON object per logged step to `metrics.jsonl` (resumed runs keep appending,
    after `drop_after(resume_step)` removes the rows the resumed steps will log again)."""

    def __init__(self, path: os.PathLike):
        self.path = storage.path(path)
        storage.makedirs(self.path.parent)

    def drop_after(self, step: int) -> float:
        """Rewrites the log without rows of steps after `step` (and without a torn last line, left
        by a kill mid-write); returns the seconds those steps took (`step_time_s` x the steps each
        row covers): compute a kill lost, to be done again. A lower bound: steps after the last
        logged row left no trace."""
        if not storage.log_exists(self.path):
            return 0.0
        def keep(line: str) -> bool:
            row_step = _step_of(line)
            return row_step is not None and row_step <= step

        lost, previous, drop = 0.0, 0, False
        for line in storage.read_appended(self.path).decode("utf-8", errors="replace").splitlines():
            row_step = _step_of(line)
            if not keep(line):
                drop = True
                if row_step is not None:
                    lost += float(json.loads(line).get("step_time_s") or 0.0) * (row_step - previous)
            if row_step is not None:
                previous = row_step
        if drop:
            storage.rewrite_appended(self.path, keep)
        return lost

    def write(self, row: Mapping[str, Any]) -> None:
        clean = {k: (float(v) if not isinstance(v, (int, str, bool, type(None))) else v)
                 for k, v in row.items()}
        storage.append_line(self.path, json.dumps(clean, allow_nan=True), durable=False)


# ----------------------------------------------------------------------------- TensorBoard

def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: Optional[str] = None,
           scalars: Sequence[tuple[str, float]] = ()) -> bytes:
    """A serialized `tensorflow.Event` (wall_time=1, step=2, file_version=3, summary=5)."""
    msg = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        msg += _field_bytes(3, file_version.encode())
    if scalars:
        # Summary.value (1) -> Value{tag (1), simple_value (2, float32)}.
        values = b"".join(_field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5)
                                       + struct.pack("<f", value)) for tag, value in scalars)
        msg += _field_bytes(5, values)
    return msg


class EventWriter:
    """Writes TensorBoard scalar summaries to `logdir/events.out.tfevents.<time>.<host>` (on an object
    store the file is one upload, completed when the writer closes)."""

    def __init__(self, logdir: os.PathLike):
        logdir = storage.path(logdir)
        storage.makedirs(logdir)
        self.path = logdir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._f = self.path.open("wb") if storage.is_url(self.path) else open(self.path, "ab")
        self._record(_event(time.time(), 0, file_version="brain.Event:2"))

    def _record(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._f.write(header + struct.pack("<I", _masked_crc(header)) + data
                      + struct.pack("<I", _masked_crc(data)))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        items = [(k, float(v)) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if items:
            self._record(_event(time.time(), step, scalars=items))
            self._f.flush()

    def close(self) -> None:
        self._f.close()


__all__ = ["EventWriter", "Heartbeat", "MetricsLog", "Throughput", "console_line",
           "mfu", "peak_flops_per_device"]
