"""Cost profiles: where the seconds behind a compute dollar come from (data in `cost_profiles.toml`).

Work is described as `Work` items: one program (a teacher train step, a decoded batch, a distillation
step, ...) run some number of times, with its analytic FLOPs. A profile turns work into
chip-seconds, and its accelerator's rate card turns those into dollars:

- `paper`: the paper's accounting, per-phase rates (effective FLOP/s of encoder and decoder tokens,
  seconds per step and per run) fitted to what the paper paid on four tasks (scripts/fit_paper_costs.py;
  notes/costs.md); a plan for another task is an extrapolation and says so, with the fit's
  leave-one-task-out error as its expected uncertainty;
- `calibrated`: examples per second measured by `doa calibrate` on the user's machine (a JSON file);
- `mfu`: FLOPs at an assumed share of the rate card's peak, said to be assumed wherever it prints.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pathlib
import tomllib
from typing import Any, Mapping, Optional

from doa_jax import storage
from doa_jax.experiment import costs
from doa_jax.model.config import SIZES, T5Config

PROFILES_FILE = pathlib.Path(__file__).with_name("cost_profiles.toml")
# The paper's Pareto points (§7.2): what its runs scored and what distillation cost; the `paper`
# profile is fitted to their compute $, and `doa advise` uses them as pilots.
PAPER_PARETO = pathlib.Path(__file__).with_name("paper_pareto.csv")
PROFILE_NAMES = ("paper", "calibrated", "mfu")
CALIBRATION_FORMAT = "doa-calibration/1"
ONCE_PER_RUN = ("startup_s", "run_overhead_s")   # calibrated seconds a run of a program pays once
# The programs work is made of, and the ledger phase each is charged to.
PROGRAMS = {
    "teacher_train": "teacher_finetune",          # one teacher train step on a batch of labels
    "teacher_decode": "teacher_inference",        # greedy pseudo-labels of a batch of inputs
    "teacher_score": "teacher_inference",         # one teacher-forced pass for the stored top-k logits
    "student_train": "student_training",          # one student step on labels (cross-entropy)
    "student_distill_stored": "student_training",  # one student step on stored top-k soft targets
    "student_distill_online": "student_training",  # the same plus the teacher's forward (the paper's code)
    "eval_decode": "evaluation",                  # greedy decodes of a batch of test inputs
}


# Length statistics of a task's data that `scripts/fit_paper_costs.py --measure-lengths` records in
# `[paper_lengths.TASK]`; the fit names the ones the `paper` profile prices at.
LENGTH_STATISTICS = {
    "inputs": "mean input length",
    "targets": "mean target length",
    "inputs_padded": "mean longest input of a batch of 32 (dynamic padding)",
    "targets_padded": "mean longest target of a batch of 32 (dynamic padding)",
    "inputs_padded_cut": "mean longest input of a batch of 32, cut at the released run_t5.py's max_source_length",
}


@dataclasses.dataclass(frozen=True)
class Work:
    """`steps` runs of `program` over `rows` examples in all (padded batches counted in full).

    For decoding, `steps` counts decoded positions of a batch (batches x decode length): each one
    re-reads the weights. `params` is the parameter count of the model whose step overhead it is.
    `decoder_flops` is the part of `flops` computed on decoder tokens (their self- and cross-attention,
    MLP and logits); the rest ran on encoder tokens.
    """

    program: str
    rows: float
    steps: float
    flops: float
    params: int
    decoder_flops: float = 0.0

    def __post_init__(self):
        if self.program not in PROGRAMS:
            raise ValueError(f"unknown program {self.program!r}; programs: {', '.join(PROGRAMS)}")
        if not 0 <= self.decoder_flops <= self.flops * (1 + 1e-9):
            raise ValueError(f"decoder_flops must be in [0, flops], got {self.decoder_flops} of {self.flops}")


def size_name(name: str) -> str:
    """The canonical size key (`t5_1_1_small`) for a size name as `config_for_size` accepts it."""
    key = name.strip().lower().replace("-", "_").replace("v1_1", "1_1")
    for candidate in (key, f"t5_1_1_{key}", key.replace("google/", "")):
        if candidate in SIZES:
            return candidate
    raise ValueError(f"unknown model size {name!r}; known sizes: {sorted(SIZES)}")


def _read_profiles(path: Optional[str | os.PathLike] = None) -> dict[str, Any]:
    path = pathlib.Path(path or PROFILES_FILE)
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None


# ----------------------------------------------------------------------------- profiles

@dataclasses.dataclass(frozen=True)
class CostProfile:
    """Base: a named way of turning `Work` into chip-seconds on `accelerator`."""

    name: str
    source: str
    accelerator: costs.Accelerator

    assumed = False

    def chip_seconds(self, work: Work) -> float:
        raise NotImplementedError

    def usd(self, work: Work) -> float:
        return self.accelerator.usd(self.chip_seconds(work))

    def as_dict(self, task: Optional[str] = None) -> dict[str, Any]:
        """What a plan, a ledger entry or a result row records about the profile (pricing `task`)."""
        return {"name": self.name, "source": self.source, "assumed": self.assumed,
                "accelerator": self.accelerator.key, "usd_per_chip_hour": self.accelerator.usd_per_chip_hour}


@dataclasses.dataclass(frozen=True)
class MfuProfile(CostProfile):
    """Analytic FLOPs at an assumed MFU of the rate card's peak: an assumption, never a measurement."""

    mfu: float = 0.4
    assumed = True

    def __post_init__(self):
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu must be in (0, 1], got {self.mfu}")

    def chip_seconds(self, work: Work) -> float:
        return self.accelerator.chip_seconds_for(work.flops, self.mfu)


@dataclasses.dataclass(frozen=True)
class Rate:
    """A fitted phase rate: chip-seconds = encoder FLOPs / flops_per_s + decoder FLOPs / decoder_flops_per_s
    + steps x seconds_per_step x params / reference_params + seconds_per_run (once, for work of any steps)."""

    flops_per_s: float           # effective FLOP/s per paid chip on encoder tokens (inf: no such term)
    seconds_per_step: float      # chip-seconds per step of a model with `reference_params` parameters
    reference_params: int
    decoder_flops_per_s: float = 0.0  # effective FLOP/s on decoder tokens (0: the same as flops_per_s)
    seconds_per_run: float = 0.0      # chip-seconds a run of the program pays once
    charged: bool = True
    why_not: str = ""

    def chip_seconds(self, work: Work) -> float:
        if not self.charged:
            return 0.0
        decoder_rate = self.decoder_flops_per_s or self.flops_per_s
        return ((work.flops - work.decoder_flops) / self.flops_per_s + work.decoder_flops / decoder_rate
                + work.steps * self.seconds_per_step * work.params / self.reference_params
                + (self.seconds_per_run if work.steps > 0 else 0.0))


@dataclasses.dataclass(frozen=True)
class TaskLengths:
    """The token lengths the `paper` profile prices a task at, and which statistics of its data they are."""

    inputs: float
    targets: float
    examples: int
    statistics: str = "mean lengths"


@dataclasses.dataclass(frozen=True)
class PaperProfile(CostProfile):
    """The paper's accounting: per-program fitted rates, priced at the paper's mean token lengths."""

    rates: Mapping[str, Rate] = dataclasses.field(default_factory=dict)
    lengths: Mapping[str, TaskLengths] = dataclasses.field(default_factory=dict)
    recipe: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fit: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def chip_seconds(self, work: Work) -> float:
        if work.program not in self.rates:
            raise ValueError(f"cost profile 'paper' has no rate for {work.program!r}: the paper's runs had no such "
                             f"program (it distilled with online soft targets); price it with --cost-profile "
                             f"calibrated or mfu")
        return self.rates[work.program].chip_seconds(work)

    def task_lengths(self, task: str) -> Optional[TaskLengths]:
        return self.lengths.get(task)

    def task_fit(self, task: str) -> dict[str, Any]:
        """Whether the rates were fitted to `task`'s costs or extrapolate to it, and the error to expect:
        the leave-one-task-out error (each fitted task predicted by a fit to the other ones)."""
        fit, loo = self.fit, {"median": self.fit["loo_median_abs_residual"], "max": self.fit["loo_max_abs_residual"]}
        tasks = list(fit["tasks"])
        if task in tasks:
            mine = fit["per_task"][task]
            return {"status": "fitted", "fitted_tasks": tasks,
                    "in_sample_error": {"median": mine["in_sample_median"], "max": mine["in_sample_max"]},
                    "expected_error": loo, "leave_one_out_error": {"median": mine["loo_median"], "max": mine["loo_max"]},
                    "note": f"fitted to {task}'s §7.2 costs (|residual| median {mine['in_sample_median']:.0%}, max "
                            f"{mine['in_sample_max']:.0%}); predicted without them, {mine['loo_median']:.0%} median, "
                            f"{mine['loo_max']:.0%} max"}
        return {"status": "extrapolation", "fitted_tasks": tasks, "expected_error": loo,
                "note": f"EXTRAPOLATION: {task} is not among the {len(tasks)} tasks the rates were fitted to "
                        f"({', '.join(tasks)}); expect about ±{loo['median']:.0%} (leave-one-task-out median "
                        f"|error|; up to {loo['max']:.0%})"}

    def as_dict(self, task: Optional[str] = None) -> dict[str, Any]:
        return {**super().as_dict(), **({"fit": self.task_fit(task)} if task is not None else {})}


@dataclasses.dataclass(frozen=True)
class CalibratedProfile(CostProfile):
    """Examples per second measured by `doa calibrate` on this hardware, per program, plus what each
    run of a program pays once in a fresh process, as a cell does: its compilation (`startup_s`) and,
    for training, the fixed seconds of a run (set-up, final checkpoint: `run_overhead_s`). The
    accelerator is held, and billed, for both."""

    calibration: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    path: str = ""

    def chip_seconds(self, work: Work) -> float:
        programs = self.calibration["programs"]
        if work.program not in programs:
            raise ValueError(f"calibration {self.path} has no measurement of {work.program!r}; "
                             f"measured: {', '.join(programs)}")
        row = programs[work.program]
        fixed = sum(row.get(f, 0.0) for f in ONCE_PER_RUN) if work.rows > 0 else 0.0
        return (work.rows / row["examples_per_s"] + fixed) * self.calibration["device_count"]


# ----------------------------------------------------------------------------- loading

_FIT_FIELDS = ("points", "tasks", "inputs_length", "targets_length", "in_sample_median_abs_residual",
               "in_sample_max_abs_residual", "loo_median_abs_residual", "loo_max_abs_residual", "per_task")


def _paper_rate(row: Mapping[str, Any], where: str) -> Rate:
    if not row.get("charged", True):
        return Rate(math.inf, 0.0, 1, charged=False, why_not=row.get("why_not", ""))
    try:
        rate = Rate(float(row["effective_tflops"]) * 1e12, float(row["seconds_per_step"]), int(row["reference_params"]),
                    decoder_flops_per_s=float(row.get("decoder_effective_tflops", 0.0)) * 1e12,
                    seconds_per_run=float(row.get("seconds_per_run", 0.0)))
    except KeyError as e:
        raise ValueError(f"{where}: field {e.args[0]!r} is missing") from None
    if not (rate.flops_per_s > 0 and rate.decoder_flops_per_s >= 0 and rate.seconds_per_step >= 0
            and rate.seconds_per_run >= 0 and rate.reference_params > 0):
        raise ValueError(f"{where} needs effective_tflops > 0, decoder_effective_tflops >= 0, seconds_per_step >= 0, "
                         f"seconds_per_run >= 0 and reference_params > 0")
    return rate


def _paper_lengths(data: Mapping[str, Any], fit: Mapping[str, Any], where: str) -> dict[str, TaskLengths]:
    """Each measured task's lengths, at the statistics the fit chose (`inputs_length`, `targets_length`)."""
    chosen = (fit["inputs_length"], fit["targets_length"])
    for name in chosen:
        if name not in LENGTH_STATISTICS:
            raise ValueError(f"{where}: [paper_rates.fit] names length statistic {name!r}; known: "
                             f"{', '.join(LENGTH_STATISTICS)}")
    what = f"inputs: {LENGTH_STATISTICS[chosen[0]]}; targets: {LENGTH_STATISTICS[chosen[1]]}"
    lengths = {}
    for task, r in data.get("paper_lengths", {}).items():
        if not isinstance(r, dict):
            continue
        if any(name not in r for name in chosen):
            raise ValueError(f"{where}: [paper_lengths.{task}] lacks {' or '.join(chosen)}: run "
                             f"scripts/fit_paper_costs.py --measure-lengths --vocab V --write")
        lengths[task] = TaskLengths(float(r[chosen[0]]), float(r[chosen[1]]), int(r["examples"]), what)
    return lengths


def _paper_profile(data: Mapping[str, Any], cards: Mapping[str, costs.Accelerator], where: str) -> PaperProfile:
    table = data["profiles"]["paper"]
    rates_table = data.get("paper_rates")
    if not rates_table:
        raise ValueError(f"{where}: no [paper_rates.*] tables: run scripts/fit_paper_costs.py --write")
    fit = rates_table.get("fit", {})
    missing = [f for f in _FIT_FIELDS if f not in fit]
    if missing:
        raise ValueError(f"{where}: [paper_rates.fit] lacks {', '.join(missing)}: run scripts/fit_paper_costs.py --write")
    rates = {}
    for program, row in rates_table.items():
        if program == "fit":
            continue
        if program not in PROGRAMS:
            raise ValueError(f"{where}: [paper_rates.{program}] is not a program ({', '.join(PROGRAMS)})")
        rates[program] = _paper_rate(row, f"{where}: [paper_rates.{program}]")
    recipe = {k: table[k] for k in ("teacher_epochs", "distill_epochs", "student_epochs", "batch_size",
                                    "soft_targets")}
    source = (f"the paper's accounting (A100 fp32 at ${cards[table['accelerator']].usd_per_chip_hour:g}/GPU-hour), "
              f"rates fitted to its §7.2 costs of {len(fit['tasks'])} tasks ({fit['points']} points; |residual| median "
              f"{fit['in_sample_median_abs_residual']:.0%}, max {fit['in_sample_max_abs_residual']:.0%}; "
              f"leave-one-task-out median {fit['loo_median_abs_residual']:.0%}, max "
              f"{fit['loo_max_abs_residual']:.0%}; scripts/fit_paper_costs.py)")
    return PaperProfile("paper", source, cards[table["accelerator"]], rates=rates,
                        lengths=_paper_lengths(data, fit, where), recipe=recipe, fit=fit)


def load_profile(name: str, *, accelerator: Optional[str] = None, calibration: Optional[str | os.PathLike] = None,
                 mfu: Optional[float] = None, rate_cards: Optional[str | os.PathLike] = None,
                 path: Optional[str | os.PathLike] = None,
                 cards: Optional[Mapping[str, costs.Accelerator]] = None) -> CostProfile:
    """The named profile. `accelerator` is a rate-card key (mfu; checked against paper/calibrated);
    `cards` are rate cards already read (default: those of the `rate_cards` file)."""
    if name not in PROFILE_NAMES:
        raise ValueError(f"unknown cost profile {name!r}; profiles: {', '.join(PROFILE_NAMES)}")
    where = str(path or PROFILES_FILE)
    data = _read_profiles(path)
    cards = cards if cards is not None else costs.load_rate_cards(rate_cards)
    if name == "paper":
        profile = _paper_profile(data, cards, where)
        if accelerator is not None and costs.get_accelerator(accelerator, cards).key != profile.accelerator.key:
            raise ValueError(f"cost profile 'paper' prices the paper's A100s, not {accelerator!r}; use "
                             f"--cost-profile calibrated (measured) or mfu (assumed) for other accelerators")
        return profile
    if name == "calibrated":
        if calibration is None:
            raise ValueError("cost profile 'calibrated' needs a calibration file (--calibration FILE); "
                             "make one with `doa calibrate`")
        cal = read_calibration(calibration)
        acc = costs.get_accelerator(cal["accelerator"], cards)
        if accelerator is not None and costs.get_accelerator(accelerator, cards).key != acc.key:
            raise ValueError(f"calibration {calibration} was measured for accelerator {acc.key!r}, not "
                             f"{accelerator!r}: calibrate on that machine with --accelerator {accelerator}")
        source = (f"measured by `doa calibrate` on {cal['device_count']} x {cal['device_kind']} ({cal['date']}), "
                  f"priced as {acc.key}: {calibration}")
        return CalibratedProfile("calibrated", source, acc, calibration=cal, path=str(calibration))
    value = float(data["profiles"]["mfu"]["mfu"] if mfu is None else mfu)
    acc = costs.get_accelerator(accelerator or "a100", cards)
    return MfuProfile("mfu", f"ASSUMED {value:.0%} MFU of {acc.name}'s peak {acc.peak_flops:.3g} FLOP/s "
                             f"(not measured)", acc, mfu=value)


def default_profile_name(calibration: Optional[str | os.PathLike], paper_programs: bool = True) -> str:
    """The one rule for the cost profile nobody named: `calibrated` when a calibration file is given;
    else the paper's accounting for work that runs the paper's programs (what `doa plan` and
    `doa advise` price; a cell with online soft targets), else `mfu` (an ASSUMED utilisation: a cell
    whose programs are not the paper's, e.g. stored top-k targets, has no paper price)."""
    if calibration is not None:
        return "calibrated"
    return "paper" if paper_programs else "mfu"


# ----------------------------------------------------------------------------- calibration files

_CALIBRATION_FIELDS = {"format": str, "date": str, "jax_version": str, "device_kind": str, "device_count": int,
                       "accelerator": str, "teacher": dict, "student": dict, "task": str, "lengths": dict,
                       "batch_size": int, "programs": dict}


def read_calibration(path: str | os.PathLike) -> dict[str, Any]:
    """A calibration file, checked field by field (one clear error naming the file and the field)."""
    path = storage.path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} not found; make one with `doa calibrate`")
    try:
        cal = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"calibration file {path} is not valid JSON ({e}); re-run `doa calibrate`") from None
    if not isinstance(cal, dict):
        raise ValueError(f"calibration file {path}: expected a JSON object, got {type(cal).__name__}")
    for field, kind in _CALIBRATION_FIELDS.items():
        if not isinstance(cal.get(field), kind):
            raise ValueError(f"calibration file {path}: field {field!r} is missing or not a {kind.__name__}")
    if cal["format"] != CALIBRATION_FORMAT:
        raise ValueError(f"calibration file {path}: format {cal['format']!r}, expected {CALIBRATION_FORMAT!r}")
    for program, row in cal["programs"].items():
        rate = row.get("examples_per_s") if isinstance(row, dict) else None
        if program not in PROGRAMS or not isinstance(rate, (int, float)) or not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"calibration file {path}: programs.{program} needs a known program and a positive "
                             f"examples_per_s")
        for field in ONCE_PER_RUN:
            fixed = row.get(field, 0.0)
            if not isinstance(fixed, (int, float)) or not 0 <= fixed < math.inf:
                raise ValueError(f"calibration file {path}: programs.{program}.{field} must be seconds >= 0, "
                                 f"got {fixed!r}")
    return cal


def check_calibration(profile: CostProfile, *, teacher: T5Config, student: T5Config,
                      lengths: Mapping[str, float], batch_size: int) -> None:
    """Refuse to price with a calibration measured for other models, lengths or batch size."""
    if not isinstance(profile, CalibratedProfile):
        return
    cal, where = profile.calibration, profile.path
    for role, cfg in (("teacher", teacher), ("student", student)):
        measured = cal[role]
        if measured.get("params") != cfg.num_params():
            raise ValueError(f"calibration {where} was measured for a {role} of {measured.get('params')} parameters "
                             f"({measured.get('size')}), not this {role}'s {cfg.num_params()}: re-run "
                             f"`doa calibrate` with this {role}")
        if measured.get("dtype") not in (None, cfg.dtype):
            raise ValueError(f"calibration {where} was measured with {role} activations in {measured['dtype']}, "
                             f"this {role} runs in {cfg.dtype}: re-run `doa calibrate --dtype {cfg.dtype}`")
        # Files from before the setting existed were measured with the cache.
        if measured.get("decode_cross_kv", "cache") != cfg.decode_cross_kv:
            raise ValueError(f"calibration {where} timed the {role}'s decode with cross-attention K/V "
                             f"'{measured.get('decode_cross_kv', 'cache')}', this {role} decodes with "
                             f"'{cfg.decode_cross_kv}': re-run `doa calibrate --cross-kv {cfg.decode_cross_kv}`")
    for key in ("inputs", "targets"):
        if int(cal["lengths"].get(key, -1)) != int(lengths[key]):
            raise ValueError(f"calibration {where} was measured at {key} length {cal['lengths'].get(key)} "
                             f"(task {cal['task']}), this prices {int(lengths[key])}: re-run `doa calibrate` "
                             f"for this task")
    if cal["batch_size"] != batch_size:
        raise ValueError(f"calibration {where} was measured at batch size {cal['batch_size']}, this prices "
                         f"{batch_size}: re-run `doa calibrate --batch-size {batch_size}`")


def paper_pareto_points(path: str | os.PathLike = PAPER_PARETO) -> list[dict[str, Any]]:
    """The paper's Pareto points, one dict per (task, labels, unlabeled); U = 0 rows are annotation only."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    ints, floats = ("labels", "unlabeled"), ("labels_usd", "total_usd", "compute_usd", "value")
    return [{**r, **{k: int(r[k]) for k in ints}, **{k: float(r[k]) for k in floats}} for r in rows]
