"""Compile targets: TPU slices and NVIDIA GPUs by the names users rent them under (`targets.toml`).

`get("v5e-8")` or `get("h100x8")` gives a `Target`: how many JAX devices, the device memory a
program may use (`capacity_gib`), the accelerator of `hardware.toml` (peak FLOP/s, bandwidth), and
`devices()`: compile-only devices from libtpu or the CUDA plugin (the `aot` extra), which
`jax.jit(...).lower(...).compile()` accepts on a host with no such hardware. Names are data: every
target is a row of the table, and `names()` lists them.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib
import re
import tomllib
from typing import Any, Mapping, Optional, Sequence

from doa_jax import hardware, platforms

TABLE = pathlib.Path(__file__).with_name("targets.toml")
GIB = 2.0 ** 30
# Protobuf enum fields of GpuTargetConfigProto (written bare, not quoted, in text format).
_ENUM_FIELDS = ("feature_extension",)
AOT_EXTRA = 'the `aot` extra: pip install -c constraints.txt -e ".[aot]"'
# What libtpu and the CUDA plugin print when making compile-only devices on a host without them.
NOTICES = re.compile(platforms.NOTICES.pattern
                     + r"|TPU_ACCELERATOR_TYPE|TPU_WORKER_HOSTNAMES|TPU worker|Logging before InitGoogle"
                       r"|^=== Source Location Trace|libtpu_init_utils|^[EIW]\d{4} .*(tpu|TPU)")


class TargetError(ValueError):
    """An unknown target name, or one the table cannot build devices for."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str                  # as the user wrote it, normalised: "v5e-8", "h100x8"
    platform: str              # "tpu" | "cuda"
    family: str                # "v5e", "h100", ...
    devices_count: int         # JAX devices
    chips: int
    capacity_gib: float        # device memory one device's programs may use
    capacity_note: str
    hardware_key: str          # hardware.toml key
    bandwidth: float           # datasheet HBM bytes/s per device (the roofline bound's)
    topology: Mapping[str, Any]   # get_topology_desc arguments

    @property
    def hardware(self) -> hardware.Hardware:
        return hardware.get(self.hardware_key)

    @property
    def next_larger(self) -> Optional[str]:
        """The next larger slice (or GPU count) of the same family, or None."""
        sizes = _family_sizes(self.platform, self.family)
        larger = [n for n in sizes if n > _size_of(self)]
        return _name(self.platform, self.family, larger[0]) if larger else None

    def devices(self) -> list:
        """Compile-only devices of this target (needs the `aot` extra)."""
        return list(_topology(self.platform, tuple(sorted(_freeze(self.topology).items()))).devices)


@functools.lru_cache(maxsize=None)
def table() -> dict[str, Any]:
    return tomllib.loads(TABLE.read_text())


def names() -> list[str]:
    """Every target name, TPU slices first, then GPUs."""
    out = []
    for platform in ("tpu", "gpu"):
        for family in table()[platform]:
            out += [_name(platform if platform == "tpu" else "cuda", family, n)
                    for n in _family_sizes("tpu" if platform == "tpu" else "cuda", family)]
    return out


def one_host(target: Target) -> Target:
    """The slice (or GPU box) of one host of `target`: `target` itself when it has one host, else the
    smallest target of its family with as many devices as one of its hosts (v5e-16, 4 hosts of 4
    chips: v5e-4). Programs a host runs alone compile for it (the same chips, their own ids)."""
    per_host = sum(1 for d in target.devices() if d.process_index == 0)
    if per_host == target.devices_count:
        return target
    for name in names():
        other = get(name)
        if other.family == target.family and other.devices_count == per_host:
            return other
    raise TargetError(f"no target of one {target.name} host ({per_host} {target.family} devices) in the table")


def get(name: str) -> Target:
    """The target called `name` (e.g. `v5e-8`, `v5p-8`, `h100`, `h100x8`); one error listing the valid names."""
    text = str(name).strip().lower()
    m = re.fullmatch(r"(v\d+[a-z]?)-(\d+)", text)
    if m and m.group(1) in table()["tpu"]:
        return _tpu(m.group(1), int(m.group(2)), text)
    m = re.fullmatch(r"([a-z]\d+(?:-\d+)?)(?:x(\d+))?", text)
    if m and m.group(1) in table()["gpu"]:
        return _gpu(m.group(1), int(m.group(2) or 1), text)
    raise TargetError(f"unknown target {name!r}; valid: {_summary()}")


def _summary() -> str:
    parts = []
    for family, row in table()["tpu"].items():
        parts.append(f"{family}-{{{','.join(str(n) for n in sorted(int(k) for k in row['sizes']))}}}")
    for family, row in table()["gpu"].items():
        parts.append(f"{family}[x{{{','.join(str(n) for n in row['counts'] if n > 1)}}}]")
    return ", ".join(parts)


def for_devices(devices: Sequence[Any]) -> Optional[str]:
    """The target name of the devices a job has (`jax.devices()`): their kind matched in hardware.toml,
    then the first family of this table with that hardware and their count; None for CPUs and for
    kinds or counts the table lacks."""
    hw = hardware.for_device_kind(devices[0].device_kind)
    if hw is None or devices[0].platform == "cpu":
        return None
    for platform in ("tpu", "gpu"):
        for family, row in table()[platform].items():
            if row["hardware"] != hw.key:
                continue
            n = len(devices) * (row["tensorcores_per_chip"] if row.get("suffix_counts") == "tensorcores" else 1)
            name = _name("tpu" if platform == "tpu" else "cuda", family, n)
            return name if n in _family_sizes("tpu" if platform == "tpu" else "cuda", family) else None
    return None


def _family_sizes(platform: str, family: str) -> list[int]:
    if platform == "tpu":
        return sorted(int(k) for k in table()["tpu"][family]["sizes"])
    return sorted(table()["gpu"][family]["counts"])


def _size_of(t: Target) -> int:
    return int(t.name.rsplit("-", 1)[1]) if t.platform == "tpu" else t.devices_count


def _name(platform: str, family: str, n: int) -> str:
    return f"{family}-{n}" if platform == "tpu" else (family if n == 1 else f"{family}x{n}")


def _tpu(family: str, n: int, text: str) -> Target:
    row = table()["tpu"][family]
    shape = row["sizes"].get(str(n))
    if shape is None:
        raise TargetError(f"unknown target {text!r}: {family} slices are {family}-"
                          f"{{{','.join(str(k) for k in _family_sizes('tpu', family))}}}; valid: {_summary()}")
    chips = n // row["tensorcores_per_chip"] if row["suffix_counts"] == "tensorcores" else n
    bounds = row["host_bounds"].get(str(n), row["host_bounds"]["default"])
    topology = {"topology_name": f"{row['topology_prefix']}:{shape}", "chip_config_name": row["chip_config_name"],
                "chips_per_host_bounds": tuple(bounds)}
    return Target(text, "tpu", family, chips, chips, float(row["usable_hbm_gib"]),
                  f"{row['usable_hbm_gib']} GiB of {row['hbm_gib']} GiB HBM per chip: what the TPU compiler "
                  "allows (its refusal message, libtpu 0.0.42)", row["hardware"], float(row["hbm_bytes_per_s"]), topology)


def _gpu(family: str, n: int, text: str) -> Target:
    row = table()["gpu"][family]
    if n not in row["counts"]:
        raise TargetError(f"unknown target {text!r}: {family} comes as {family}"
                          f"[x{{{','.join(str(k) for k in row['counts'] if k > 1)}}}]; valid: {_summary()}")
    info = row["device_info"]
    fraction = memory_fraction(row)
    hosts, per_host = (1, n) if n <= 8 else (n // 8, 8)
    topology = {"target_config": target_config(family), "topology": f"1x{hosts}x{per_host}"}
    return Target(_name("cuda", family, n), "cuda", family, n, n, info["device_memory_size"] * fraction / GIB,
                  f"{fraction:g} x {info['device_memory_size'] / GIB:.2f} GiB: JAX's GPU client share of the "
                  "device (XLA_PYTHON_CLIENT_MEM_FRACTION" + (" as set" if _env_fraction() else ", default 0.75") + ")",
                  row["hardware"], float(info["memory_bandwidth"]), topology)


def _env_fraction() -> Optional[float]:
    value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    return float(value) if value else None


def memory_fraction(row: Mapping[str, Any]) -> float:
    """JAX's GPU memory share: XLA_PYTHON_CLIENT_MEM_FRACTION when set (the run's own setting), else the table's."""
    return _env_fraction() or float(row["memory_fraction"])


def target_config(family: str) -> str:
    """The GpuTargetConfigProto (text format) of GPU `family`: its generation's fields, then its own."""
    row = table()["gpu"][family]
    info = {**table()["gpu_generation"][row["generation"]], **row["device_info"]}
    message = {"gpu_device_info": info, "platform_name": "CUDA", "dnn_version_info": row["dnn_version_info"],
               "device_description_str": row["device_info"]["name"]}
    return _text_proto(message)


def _text_proto(message: Mapping[str, Any], indent: str = "") -> str:
    lines = []
    for key, value in message.items():
        for item in (value if isinstance(value, list) else [value]):
            if isinstance(item, Mapping):
                lines.append(f"{indent}{key} {{\n{_text_proto(item, indent + '  ')}{indent}}}\n")
            elif isinstance(item, bool):
                lines.append(f"{indent}{key}: {'true' if item else 'false'}\n")
            elif isinstance(item, str) and key not in _ENUM_FIELDS:
                lines.append(f'{indent}{key}: "{item}"\n')
            else:
                lines.append(f"{indent}{key}: {item}\n")
    return "".join(lines)


def _freeze(topology: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in topology.items()}


def aot_available(platform: str) -> Optional[str]:
    """None when compile-only devices of `platform` can be made here, else why not (naming the extra)."""
    module = "libtpu" if platform == "tpu" else "jax_plugins.xla_cuda12"
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        what = "libtpu" if platform == "tpu" else "the CUDA PJRT plugin (jax-cuda12-pjrt)"
        return f"compiling for {'a TPU slice' if platform == 'tpu' else 'an NVIDIA GPU'} needs {what}: install {AOT_EXTRA}"
    return None


@functools.lru_cache(maxsize=16)
def _topology(platform: str, frozen: tuple):
    """Compile-only devices (cached: libtpu builds a topology once per shape). TPU: no metadata
    server query, no host lock, and only the CPU backend started (the process has no TPU)."""
    problem = aot_available(platform)
    if problem:
        raise TargetError(problem)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # libtpu takes a host-wide lock for the TPU it drives; compile-only devices drive none, and
    # several processes (a sweep's dry runs, test workers) may compile at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kwargs = dict(frozen)
    with platforms.filtered_stderr(NOTICES):
        if platform == "tpu":
            return topologies.get_topology_desc(platform="tpu", **kwargs)
        return topologies.get_topology_desc("doa_aot", "cuda", **kwargs)
