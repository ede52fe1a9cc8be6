"""Money: accelerator rate cards (data), and the ledger every phase of an experiment writes to.

Two views of the same work:
- measured: accelerator-seconds this machine spent x chips x this machine's $/chip-hour;
- projected: the analytic FLOPs of the work run on a named accelerator at a stated MFU, so a CPU
  run can be priced as the A100 run it stands for (what the paper's cost axis means).
The ledger is an append-only JSON-lines file; each entry has a key, and an entry whose key is
already there is not counted again (a resumed run re-adding a finished chunk costs nothing).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tomllib
from typing import Any, Iterable, Optional, Sequence

import jax

from doa_jax import hardware, storage
from doa_jax.data import jsonl

RATE_CARDS = pathlib.Path(__file__).with_name("rate_cards.toml")
# The ledger's phases: those charged against a cell's extra budget, then evaluation (recorded, not charged).
CHARGED_PHASES = ("labels", "teacher_finetune", "teacher_inference", "student_training")
PHASES = CHARGED_PHASES + ("evaluation",)


@dataclasses.dataclass(frozen=True)
class Accelerator:
    key: str
    name: str
    usd_per_chip_hour: float
    peak_flops: float
    source: str
    date: str
    spot_usd_per_chip_hour: Optional[float] = None   # None: the card has no published spot price
    spot_source: str = ""

    def usd(self, chip_seconds: float) -> float:
        return chip_seconds / 3600.0 * self.usd_per_chip_hour

    def chip_seconds_for(self, flops: float, mfu: float) -> float:
        """Chip-seconds to do `flops` of work at model FLOP utilisation `mfu`."""
        return flops / (self.peak_flops * mfu)


def load_rate_cards(path: Optional[str | os.PathLike] = None) -> dict[str, Accelerator]:
    """Accelerators by key from a TOML rate-card file (default: the packaged `rate_cards.toml`)."""
    path = pathlib.Path(path or RATE_CARDS)
    if not path.exists():
        raise FileNotFoundError(f"rate-card file {path} not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    cards = {}
    for key, row in data.get("accelerators", {}).items():
        missing = [f for f in ("name", "usd_per_chip_hour", "source", "date") if f not in row]
        if missing:
            raise ValueError(f"{path}: [accelerators.{key}] lacks {', '.join(missing)}")
        row = {**row, "peak_flops": _peak_flops(row, key, path)}
        spot = "spot_usd_per_chip_hour" in row
        if spot and ("spot_source" not in row or "spot_date" not in row):
            raise ValueError(f"{path}: [accelerators.{key}] gives spot_usd_per_chip_hour without spot_source "
                             f"and spot_date")
        for f in ("usd_per_chip_hour", "peak_flops") + (("spot_usd_per_chip_hour",) if spot else ()):
            if not isinstance(row[f], (int, float)) or row[f] <= 0:
                raise ValueError(f"{path}: accelerators.{key}.{f} must be a positive number, got {row[f]!r}")
        cards[key] = Accelerator(key, row["name"], float(row["usd_per_chip_hour"]), float(row["peak_flops"]),
                                 row["source"], str(row["date"]),
                                 float(row["spot_usd_per_chip_hour"]) if spot else None,
                                 f"{row['spot_source']} ({row['spot_date']})" if spot else "")
    if not cards:
        raise ValueError(f"{path}: no [accelerators.*] tables")
    return cards


def _peak_flops(row: dict, key: str, path: pathlib.Path) -> float:
    """A card's peak: from the one hardware table (its key, or `hardware = KEY`), unless the card (a
    user's own file, for an accelerator the table lacks) gives `peak_flops` itself."""
    if "peak_flops" in row:
        return row["peak_flops"]
    hw = hardware.get(row.get("hardware", key))
    if hw is None:
        raise ValueError(f"{path}: [accelerators.{key}] names no accelerator of doa_jax/hardware.toml "
                         f"({', '.join(hardware.table())}): set hardware = KEY or peak_flops")
    return hw.peak_flops


def get_accelerator(key: str, cards: Optional[dict[str, Accelerator]] = None) -> Accelerator:
    cards = cards if cards is not None else load_rate_cards()
    norm = key.strip().lower().replace("-", "_")
    if norm not in cards:
        raise ValueError(f"unknown accelerator {key!r}; known: {', '.join(sorted(cards))}")
    return cards[norm]


def job_accelerator(measured_on: Optional[str], cards: Optional[dict[str, Accelerator]] = None
                    ) -> tuple[Accelerator, int]:
    """The rate card and chip count of what this job runs on, for the measured view: MEASURED_ON when
    set, else the device kind of `jax.devices()` (every host's) matched in hardware.toml; chips: the
    job's accelerators, or its hosts when it runs on CPUs. A device
    kind with no rate card is an error naming it (never priced as another accelerator)."""
    devices = jax.devices()
    # A CPU card prices a host (its devices are the host's cores, or fake ones for a test mesh).
    chips = jax.process_count() if devices[0].platform == "cpu" else len(devices)
    if measured_on:
        return get_accelerator(measured_on, cards), chips
    cards = cards if cards is not None else load_rate_cards()
    kind = devices[0].device_kind
    hw = hardware.for_device_kind(kind)
    if hw is None or hw.key not in cards:
        raise ValueError(f"this job runs on {len(devices)} x {kind!r}, which has no rate card in {RATE_CARDS.name} "
                         f"({'no accelerator of hardware.toml names it' if hw is None else f'[{hw.key}] has none'}): "
                         f"set MEASURED_ON to a card ({', '.join(sorted(cards))}) or add one")
    return cards[hw.key], chips


@dataclasses.dataclass(frozen=True)
class Entry:
    """One priced piece of work. `measured_usd` is None for work not run here (labels bought)."""

    key: str
    phase: str
    usd: float  # the amount charged against the budget (projected view for compute)
    measured_usd: float = 0.0
    seconds: float = 0.0
    chips: int = 0
    flops: float = 0.0
    labels: int = 0
    cost_profile: str = ""  # what priced `usd`: a cost profile's name, or "measured" (this machine's seconds)


class Ledger:
    """Append-only, resumable record of what an experiment spent, by phase.

    `measured_on` is the accelerator this process runs on (its price x the measured seconds).
    Compute is charged by `profile` (a `cost_profiles.CostProfile`: the paper's accounting, a
    calibration, or an ASSUMED MFU) for work described as `cost_profiles.Work`; without a profile,
    as measured. Every entry names what priced it (`cost_profile`).
    """

    def __init__(self, path: Optional[str | os.PathLike], measured_on: Accelerator, chips: int = 1,
                 profile: Optional[Any] = None, writable: bool = True):
        self.path = storage.path(path) if path is not None else None
        self.writable = writable    # False: reads the entries, appends none (multi-host: not process 0)
        self.measured_on, self.chips, self.profile = measured_on, chips, profile
        self.cost_profile = profile.name if profile is not None else "measured"
        self.entries: dict[str, Entry] = {}
        if self.path is not None and storage.log_exists(self.path):
            if writable:
                self._cut_torn_line()
            lines = storage.read_appended(self.path).decode().splitlines()
            for lineno, raw in jsonl.parse_lines(lines, str(self.path)):
                try:
                    entry = Entry(**raw)
                except TypeError as e:
                    raise ValueError(f"{self.path}:{lineno}: not a ledger entry ({e})") from None
                self.entries.setdefault(entry.key, entry)

    def _cut_torn_line(self) -> None:
        """A last line without its newline is an entry a kill cut short: it is dropped (its work is
        charged again when the phase reruns), as results.jsonl does."""
        storage.cut_torn_line(self.path)

    def _add(self, entry: Entry) -> Entry:
        if entry.key in self.entries:
            return self.entries[entry.key]
        if entry.phase not in PHASES:
            raise ValueError(f"unknown phase {entry.phase!r}; phases: {', '.join(PHASES)}")
        self.entries[entry.key] = entry
        if self.path is not None and self.writable:
            storage.append_line(self.path, json.dumps(dataclasses.asdict(entry)))
        return entry

    def compute_usd(self, seconds: float, flops: float, work: Sequence[Any] = ()) -> float:
        """What `seconds` of this machine doing `flops` (the `work` items) costs against the budget."""
        if self.profile is not None:
            if not work:
                raise ValueError(f"the ledger prices compute with cost profile {self.profile.name!r}, which needs "
                                 f"the work done (cost_profiles.Work), not only seconds and FLOPs")
            return sum(self.profile.usd(w) for w in work)
        return self.measured_on.usd(seconds * self.chips)

    def add_compute(self, key: str, phase: str, seconds: float, flops: float, work: Sequence[Any] = ()) -> Entry:
        return self._add(Entry(key, phase, self.compute_usd(seconds, flops, work),
                               measured_usd=self.measured_on.usd(seconds * self.chips),
                               seconds=seconds, chips=self.chips, flops=flops, cost_profile=self.cost_profile))

    def add_lost(self, key: str, phase: str, seconds: float, why: str = "lost to a kill") -> Optional[Entry]:
        """Compute a kill undid (steps after the last checkpoint, run again on resume), or that was lost
        another way (`why`: a teacher-store chunk whose files were damaged, computed again): measured here,
        not charged to the budget (the plan prices the work once), so `measured_total` shows what
        the run really cost. Nothing is recorded for no loss."""
        if seconds <= 0:
            return None
        return self._add(Entry(key, phase, 0.0, measured_usd=self.measured_on.usd(seconds * self.chips),
                               seconds=seconds, chips=self.chips, cost_profile=f"{why} (measured only)"))

    def add_labels(self, key: str, count: int, usd_per_label: float) -> Entry:
        return self._add(Entry(key, "labels", count * usd_per_label, labels=count, cost_profile="task card"))

    def total(self, phases: Iterable[str] = PHASES) -> float:
        wanted = set(phases)
        return sum(e.usd for e in self.entries.values() if e.phase in wanted)

    def by_phase(self) -> dict[str, float]:
        return {p: sum(e.usd for e in self.entries.values() if e.phase == p) for p in PHASES}

    def measured_total(self) -> float:
        return sum(e.measured_usd for e in self.entries.values())
