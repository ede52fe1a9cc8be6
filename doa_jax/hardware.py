"""Accelerator facts: peak FLOP/s and memory bandwidth, from one table (`hardware.toml`).

Rate cards price these accelerators by key; training progress and `doa bench` find them by jax's
`device_kind`. Each peak is written once, here.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import tomllib
from typing import Optional

TABLE = pathlib.Path(__file__).with_name("hardware.toml")


@dataclasses.dataclass(frozen=True)
class Hardware:
    key: str
    name: str
    device_kinds: tuple[str, ...]
    peak_flops: float
    source: str
    nominal: bool = False
    measured_peak_flops: Optional[float] = None
    measured_note: str = ""
    hbm_bytes_per_s: Optional[float] = None

    def note(self) -> str:
        return f"{self.name}: {self.peak_flops:.3g} FLOP/s, {self.source}"


@functools.lru_cache(maxsize=None)
def table() -> dict[str, Hardware]:
    """Every accelerator of `hardware.toml`, by key, in the file's order (device kinds match in it)."""
    data = tomllib.loads(TABLE.read_text())
    out = {}
    for key, row in data.items():
        missing = [f for f in ("name", "device_kinds", "peak_flops", "source") if f not in row]
        if missing:
            raise ValueError(f"{TABLE}: [{key}] lacks {', '.join(missing)}")
        out[key] = Hardware(key, row["name"], tuple(row["device_kinds"]), float(row["peak_flops"]), row["source"],
                            bool(row.get("nominal", False)), row.get("measured_peak_flops"),
                            row.get("measured_note", ""), row.get("hbm_bytes_per_s"))
    return out


def get(key: str) -> Optional[Hardware]:
    """The accelerator `key` (a rate card's key), or None."""
    return table().get(key)


def for_device_kind(device_kind: str) -> Optional[Hardware]:
    """The accelerator whose device kinds name `device_kind` (lowercase substring), or None."""
    kind = device_kind.lower()
    return next((hw for hw in table().values() if any(k in kind for k in hw.device_kinds)), None)
