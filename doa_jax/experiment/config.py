"""One cell's configuration, composed of the pieces that run it (gin: `gin/runs/experiment.gin`).

A cell is a task, the labels already bought, an extra budget and a strategy. How it trains is the
trainer's own `TrainConfig` (optimizer, loss, batch size, seed, logging; gin `cell/TrainConfig`),
used for every training phase with only its directory and epochs set per phase; how it distils is
a `DistillConfig`; what its phases cost is a `PricingConfig`. No setting is copied field by field:
the cell hands these objects on.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from typing import Any, Mapping, Optional

from doa_jax.experiment import cost_profiles, strategies
from doa_jax.metrics import PROTOCOLS
from doa_jax.experiment.results import KEY_VERSION, PAPER_REFERENCES
from doa_jax.model import T5Config
from doa_jax.model.config import EXECUTION_FIELDS, config_for_size
from doa_jax.partitioning import MeshConfig
from doa_jax.trainer import TrainConfig

SOFT_TARGETS = ("stored", "online")
PAPER_LEARNING_RATE = 3e-5
PAPER_SCHEDULE = "constant * linear_to_zero"


def _schedule_factors(schedule: Any) -> Optional[frozenset]:
    return frozenset(f.strip() for f in schedule.split("*")) if isinstance(schedule, str) else None


def paper_contradictions(cell: "CellConfig") -> list[str]:
    """The settings of `cell` that the paper's protocol (the released run_t5.py under HF Trainer's
    defaults) does not allow, each as 'SETTING=actual (paper: required)'; [] when none."""
    opt, loss, d = cell.train.optimizer, cell.train.loss, cell.distill
    checks = [
        ("OPTIMIZER", opt.name, "adamw"),
        ("LEARNING_RATE", opt.learning_rate, PAPER_LEARNING_RATE),
        ("cell/OptimizerConfig.schedule",
         opt.schedule if _schedule_factors(opt.schedule) != _schedule_factors(PAPER_SCHEDULE) else PAPER_SCHEDULE,
         PAPER_SCHEDULE),
        ("cell/OptimizerConfig.warmup_steps", opt.warmup_steps, 0),
        ("cell/OptimizerConfig.grad_clip_norm", opt.grad_clip_norm, 1.0),
        ("cell/OptimizerConfig.weight_decay", opt.weight_decay, 0.0),
        ("cell/OptimizerConfig.(b1, b2, eps)", (opt.b1, opt.b2, opt.eps), (0.9, 0.999, 1e-8)),
        ("cell/OptimizerConfig.eps_before_bias_correction", opt.eps_before_bias_correction, True),
        ("cell/LossConfig.z_loss", loss.z_loss, 0.0),
        ("cell/LossConfig.label_smoothing", loss.label_smoothing, 0.0),
        ("cell/LossConfig.loss_normalizing_factor", loss.loss_normalizing_factor, "NUM_REAL_TARGET_TOKENS"),
        ("KD_WEIGHT", loss.kd_weight, 1.0),
        ("KD_TEMPERATURE", loss.kd_temperature, 2.0),
        ("KD_PAPER_EXACT", loss.kd_paper_exact, True),
        ("SOFT_TARGETS", d.soft_targets, "online"),
        ("TOPK", d.topk, None),
        ("TEACHER_NUM_BEAMS", d.teacher_num_beams, 1),
        ("MIN_TEACHER_CONFIDENCE", d.min_teacher_confidence, 0.0),
        ("ACTIVATION_DTYPE (teacher)", cell.teacher.dtype, "float32"),
        ("ACTIVATION_DTYPE (student)", cell.student.dtype, "float32"),
        ("teacher/T5Size.dropout_rate", cell.teacher.dropout_rate, 0.1),
        ("student/T5Size.dropout_rate", cell.student.dropout_rate, 0.1),
    ]
    return [f"{name}={actual!r} (paper: {required!r})" for name, actual, required in checks if actual != required]


def check_protocol(cell: "CellConfig") -> None:
    """Unknown protocol, or `paper` with settings it contradicts: one error naming them."""
    if cell.protocol not in PROTOCOLS:
        raise ValueError(f"PROTOCOL must be one of {', '.join(PROTOCOLS)}, got {cell.protocol!r}")
    if cell.protocol == "paper":
        bad = paper_contradictions(cell)
        if bad:
            raise ValueError("PROTOCOL='paper' contradicts " + "; ".join(bad)
                             + ". Include gin/protocols/paper.gin after runs/experiment.gin and override none of these")


def check_given_teacher(cell: "CellConfig") -> None:
    """TEACHER_FINETUNED=True names a teacher fine-tuned elsewhere (T5X, `doa train`): it needs that
    checkpoint, and a cell that uses a teacher."""
    if not isinstance(cell.teacher_finetuned, bool):
        raise ValueError(f"TEACHER_FINETUNED must be True or False, got {cell.teacher_finetuned!r}")
    if not cell.teacher_finetuned:
        return
    if not cell.teacher_checkpoint:
        raise ValueError("TEACHER_FINETUNED=True needs TEACHER_CHECKPOINT: the teacher already fine-tuned on the "
                         "cell's start labels (a T5X checkpoint_N, an HF folder or a doa-jax checkpoint)")
    if not strategies.get(cell.strategy, "STRATEGY").uses_teacher:
        raise ValueError(f"TEACHER_FINETUNED=True is for cells that use a teacher (distill, mixed); "
                         f"STRATEGY={cell.strategy!r} trains none: run it with TEACHER_FINETUNED=False")


@dataclasses.dataclass(frozen=True)
class Epochs:
    """Epochs of each training phase (the paper's: 20 teacher, 20 student, 50 distillation)."""

    teacher: float = 20
    student: float = 20   # annotate: the student on gold labels
    distill: float = 50   # distill / mixed: the student on the teacher's outputs

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name.upper()}_EPOCHS must be > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """What the student learns from: the teacher's stored top-k logits or a forward per step."""

    soft_targets: str = "stored"        # stored top-k logits, or 'online' (teacher forward every step)
    topk: Optional[int] = 8             # None: no stored top-k (online soft targets only)
    teacher_num_beams: int = 1
    min_teacher_confidence: float = 0.0  # drop pseudo-labels whose mean token probability is lower
    max_unlabeled: Optional[int] = None  # cap on the unlabeled pool

    def __post_init__(self):
        if self.soft_targets not in SOFT_TARGETS:
            raise ValueError(f"SOFT_TARGETS must be one of {', '.join(SOFT_TARGETS)}, got {self.soft_targets!r}")
        if not 0.0 <= self.min_teacher_confidence < 1.0:
            raise ValueError(f"MIN_TEACHER_CONFIDENCE must be in [0, 1), got {self.min_teacher_confidence}")
        if self.topk is None and self.soft_targets == "stored":
            raise ValueError("TOPK=None stores no soft targets: it needs SOFT_TARGETS='online'")
        if (self.topk is not None and self.topk < 1) or self.teacher_num_beams < 1:
            raise ValueError(f"TOPK and TEACHER_NUM_BEAMS must be >= 1, got {self.topk}, {self.teacher_num_beams}")

    @property
    def stored_topk(self) -> int:
        """k of the teacher store (1 when online targets need only the store's tokens)."""
        return self.topk or 1

    def unlabeled_available(self, pool_size: int) -> int:
        """The unlabeled inputs a cell may use: the pool, capped by MAX_UNLABELED."""
        return pool_size if self.max_unlabeled is None else min(self.max_unlabeled, pool_size)


@dataclasses.dataclass(frozen=True)
class PricingConfig:
    """How compute is charged: by a cost profile (experiment/pricing.py), for the sizes the models
    stand for; `accelerator` and `mfu` are the `mfu` profile's (an assumed utilisation)."""

    accelerator: str = "a100"
    mfu: float = 0.4
    teacher_as: Optional[str] = None    # price the teacher's FLOPs as this size (e.g. 'xxl')
    student_as: Optional[str] = None
    measured_on: Optional[str] = None   # the measured view's rate card; None: the job's devices' (costs.job_accelerator)
    cost_profile: Optional[str] = None  # 'paper' | 'calibrated' | 'mfu'; None: see experiment/pricing.py
    calibration: Optional[str] = None   # a `doa calibrate` file (the `calibrated` profile)
    unlabeled_grid: Optional[tuple[int, ...]] = None   # U chosen on this grid (the paper: 10K, 100K)

    def __post_init__(self):
        if self.cost_profile is not None and self.cost_profile not in cost_profiles.PROFILE_NAMES:
            raise ValueError(f"COST_PROFILE must be one of {', '.join(cost_profiles.PROFILE_NAMES)}, "
                             f"got {self.cost_profile!r}")
        if self.unlabeled_grid is not None:
            object.__setattr__(self, "unlabeled_grid", tuple(self.unlabeled_grid))


@dataclasses.dataclass(frozen=True)
class PhaseLayout:
    """Where one model's phases sit on the job's devices (gin `teacher/PhaseLayout`,
    `student/PhaseLayout`; macros in runs/experiment.gin). How a phase is laid out never changes
    its result, so it is not part of a cell's key (`CellConfig.key`)."""

    mesh: MeshConfig = MeshConfig()     # data x model axes, FSDP
    num_microbatches: int = 1           # gradient accumulation per training step
    decode_batch_size: Optional[int] = None   # rows per decode/scoring call; None: the phase's default

    def __post_init__(self):
        if not isinstance(self.num_microbatches, int) or self.num_microbatches < 1:
            raise ValueError(f"PhaseLayout.num_microbatches must be an integer >= 1, got {self.num_microbatches!r}")
        if self.decode_batch_size is not None and (not isinstance(self.decode_batch_size, int)
                                                   or self.decode_batch_size < 1):
            raise ValueError(f"PhaseLayout.decode_batch_size must be None or an integer >= 1, "
                             f"got {self.decode_batch_size!r}")


# Settings that say how a cell runs on hardware (and how many checkpoints it keeps), not what it
# computes: hashed at their defaults in
# `CellConfig.key`, so a sweep resumed on another slice, mesh or recipe of rematerialisation reuses
# its finished cells (and cells keyed before these were settable keep their keys).
_LAYOUT_DEFAULTS = {("train", "mesh"): dataclasses.asdict(MeshConfig()), ("train", "num_microbatches"): 1,
                    ("train", "keep_checkpoints"): 1, ("train", "async_checkpointing"): False,
                    ("teacher", "remat_policy"): "none", ("teacher", "scan_layers"): False,
                    ("student", "remat_policy"): "none", ("student", "scan_layers"): False,
                    ("pricing", "measured_on"): "cpu"}
# How the models are decoded and differentiated (added after key version 2): not hashed at all, so
# cells keyed before keep their keys.
_NEVER_KEYED = tuple((role, name) for role in ("teacher", "student") for name in EXECUTION_FIELDS)
# Settings added after key version 2 that change results only away from their default: hashed only
# when set, so cells keyed before they existed keep their keys.
_KEYED_WHEN_SET = {("train", "optimizer", "eps_before_bias_correction"): False, ("teacher_finetuned",): False}


@dataclasses.dataclass(frozen=True)
class CellConfig:
    """Everything that defines one cell; `key()` is its identity in results.jsonl."""

    task: str                       # a task card name/path, or 'demo' (the built-in task)
    start_labels: int
    extra_budget_usd: float
    strategy: str                   # a name in strategies.TABLE
    output_dir: str
    student: T5Config
    teacher: T5Config
    train: TrainConfig              # every training phase; model_dir and epochs are set per phase
    epochs: Epochs = Epochs()
    distill: DistillConfig = DistillConfig()
    pricing: PricingConfig = PricingConfig()
    vocab: Optional[str] = None     # SentencePiece model; None: the demo builds one
    student_checkpoint: Optional[str] = None   # pretrained weights; None = random init
    teacher_checkpoint: Optional[str] = None
    teacher_finetuned: bool = False  # True: TEACHER_CHECKPOINT is already fine-tuned on the teacher's labels
    compute_share: float = 0.5      # mixed: share of the budget spent on compute
    feature_lengths: Optional[Mapping[str, int]] = None   # None: the card's
    max_eval_examples: Optional[int] = None
    cache_dir: Optional[str] = None  # shared teacher runs and stores (default: OUTPUT_DIR/cache)
    demo_sizes: Optional[Mapping[str, int]] = None  # demo pools: labeled, unlabeled, test
    protocol: str = "efficient"      # 'efficient' or 'paper' (gin/protocols/<name>.gin; see check_protocol)
    teacher_layout: PhaseLayout = PhaseLayout()
    student_layout: PhaseLayout = PhaseLayout()
    verbose: bool = True

    def __post_init__(self):
        strategies.get(self.strategy, "STRATEGY")
        check_protocol(self)
        check_given_teacher(self)
        if self.train.loss.kd_paper_exact and self.distill.soft_targets == "stored":
            raise ValueError("KD_PAPER_EXACT=True needs SOFT_TARGETS='online': the released reduction counts "
                             "every position of the padded batch, and the stored top-k has no teacher targets "
                             "after EOS (the teacher's logits there are what the released code trains on)")
        if not isinstance(self.extra_budget_usd, (int, float)) or isinstance(self.extra_budget_usd, bool) \
                or not math.isfinite(self.extra_budget_usd) or self.extra_budget_usd < 0:
            raise ValueError(f"EXTRA_BUDGET_USD must be a finite non-negative number, got {self.extra_budget_usd!r}")
        if not isinstance(self.start_labels, int) or self.start_labels < 0:
            raise ValueError(f"START_LABELS must be an integer >= 0, got {self.start_labels!r}")
        if self.train.mesh != MeshConfig() or self.train.num_microbatches != 1:
            raise ValueError("a cell lays out each model on its own: set TEACHER_MESH_* / STUDENT_MESH_* and "
                             "*_MICROBATCHES (teacher/PhaseLayout, student/PhaseLayout in runs/experiment.gin), "
                             "not cell/TrainConfig.mesh or cell/TrainConfig.num_microbatches")
        # 5 and 5.0 are the same budget: one cell key.
        object.__setattr__(self, "extra_budget_usd", float(self.extra_budget_usd))
        object.__setattr__(self, "compute_share", float(self.compute_share))

    @property
    def kind(self) -> strategies.Strategy:
        return strategies.TABLE[self.strategy]

    @property
    def seed(self) -> int:
        return self.train.seed

    def key(self) -> str:
        """A hash of everything that changes the result: not where it writes, how chatty it is, nor
        how its phases are laid out on the hardware (`_LAYOUT_DEFAULTS`)."""
        d = dataclasses.asdict(self)
        for k in ("output_dir", "cache_dir", "verbose", "teacher_layout", "student_layout"):
            d.pop(k)
        for (part, field), default in _LAYOUT_DEFAULTS.items():
            d[part][field] = default
        for part, field in _NEVER_KEYED:
            d[part].pop(field)
        for path, default in _KEYED_WHEN_SET.items():
            *parents, field = path
            holder = functools.reduce(lambda x, k: x[k], parents, d)
            if holder.get(field) == default:
                holder.pop(field)
        for k in ("model_dir", "epochs", "log_every", "log_seconds", "checkpoint_every", "verbose", "tensorboard",
                  "fused_update"):    # the fused update is the same math in another order: a layout
            d["train"].pop(k)
        if d["protocol"] == "efficient":
            d.pop("protocol")   # cells keyed before protocols existed keep their keys
        else:   # paper cells scored before the released code's references run again (results.PAPER_REFERENCES)
            d["paper_references"] = PAPER_REFERENCES
        d["key_version"] = KEY_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def layout(self, role: str) -> PhaseLayout:
        """The layout of the 'teacher' or 'student' phases."""
        return {"teacher": self.teacher_layout, "student": self.student_layout}[role]

    def train_config(self, role: str) -> TrainConfig:
        """The cell's TrainConfig laid out for the `role`'s model (its mesh and microbatches)."""
        layout = self.layout(role)
        return dataclasses.replace(self.train, mesh=layout.mesh, num_microbatches=layout.num_microbatches)

    def pricing_models(self) -> tuple[T5Config, T5Config]:
        """(teacher, student) whose FLOPs are charged: the trained models, or the sizes they stand for."""
        p = self.pricing
        return (config_for_size(p.teacher_as) if p.teacher_as else self.teacher,
                config_for_size(p.student_as) if p.student_as else self.student)

    def describe(self) -> str:
        return f"{self.task} {self.strategy} +${self.extra_budget_usd:g}"


def fingerprint(obj: Any) -> str:
    """A short content hash of a JSON-able object (keys of shared teacher runs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
