"""A cell's task as it runs: the card, the seeded pools, the vocabulary (built once) and the lengths,
and the models' vocab sizes resolved against that vocabulary.

`load_task` reads everything a cell needs about its task; `resolve_models` then fixes each model's
vocab size from the same vocabulary (never a second build), before the cell's key is taken.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, Optional, Sequence

from doa_jax import checkpoints, partitioning, storage
from doa_jax.data import cards, demo, pools as pools_lib, vocab as vocab_lib
from doa_jax.experiment.config import CellConfig, fingerprint


def decode_length(lengths: Mapping[str, int], protocol: str) -> int:
    """Most tokens a decode may produce: the targets length, or under the paper's protocol one less
    (HF `generate(max_length=L)` counts the start token, so the released code gets L - 1)."""
    return lengths["targets"] - 1 if protocol == "paper" else lengths["targets"]


def scored_references(vocab: Any, targets: Sequence[str], lengths: Mapping[str, int], protocol: str) -> list[str]:
    """The references outputs are scored against: the targets, or under the paper's protocol the targets as
    the released code scored them (`vocab.released_references`, cut at the targets length)."""
    return vocab_lib.released_references(vocab, targets, lengths["targets"]) if protocol == "paper" else list(targets)


@dataclasses.dataclass
class TaskSetup:
    card: Any
    pools: Any
    vocab: Any
    lengths: dict[str, int]
    protocol: str = "efficient"   # how outputs are decoded and scored (see `decode_length`)

    @property
    def decode_length(self) -> int:
        return decode_length(self.lengths, self.protocol)

    def decode(self, ids) -> str:
        """An output's text: the vocabulary's decode, or under the paper's protocol the released code's."""
        return vocab_lib.released_decode(self.vocab, ids) if self.protocol == "paper" else self.vocab.decode(ids)

    def references(self, examples: Sequence[Mapping[str, str]]) -> list[str]:
        """What the examples' outputs are scored against, under this setup's protocol (`scored_references`)."""
        return scored_references(self.vocab, [ex["target"] for ex in examples], self.lengths, self.protocol)


def load_task(cfg: CellConfig) -> TaskSetup:
    """Card, pools (seeded, nested annotation order) and vocabulary of the cell's task."""
    if cfg.task == "demo":
        card, pools = demo.card(), demo.pools(seed=0, **dict(cfg.demo_sizes or {}))
        vocab = task_vocab(cfg, pools)
    else:
        card = cards.load_card(cfg.task)
        vocab = task_vocab(cfg)
        pools = pools_lib.make_pools(card)
    lengths = dict(cfg.feature_lengths or card.feature_lengths)
    if cfg.protocol == "paper" and lengths["targets"] < 2:
        raise ValueError(f"PROTOCOL='paper' decodes targets length - 1 tokens; targets length {lengths['targets']} "
                         "leaves none")
    return TaskSetup(card, pools, vocab, lengths, cfg.protocol)


def cache_dir(cfg: CellConfig) -> storage.AnyPath:
    """CACHE_DIR, else OUTPUT_DIR/cache (a local folder or a URL)."""
    return storage.path(cfg.cache_dir) if cfg.cache_dir else storage.path(cfg.output_dir) / "cache"


def _local_vocab_dir(cfg: CellConfig) -> pathlib.Path:
    """Where the demo's vocabulary is built: the cache when local; with a URL cache, a local folder
    (SentencePiece trains into local files; the build is deterministic, so any host rebuilds it alike)
    named by the demo's sizes, whose texts it is trained on (one folder for all sizes served a
    vocabulary trained on other texts)."""
    cache = cache_dir(cfg)
    sizes = fingerprint(dict(sorted((cfg.demo_sizes or {}).items())))
    return cache if not storage.is_url(cache) else pathlib.Path.home() / ".cache" / "doa_jax" / "vocab" / sizes


def task_vocab(cfg: CellConfig, demo_pools: Any = None) -> vocab_lib.Vocabulary:
    """The cell's vocabulary: VOCABULARY, or for the demo task without one the demo's own (built
    once in the cache directory)."""
    if cfg.vocab:
        return vocab_lib.load_vocab(cfg.vocab)
    if cfg.task == "demo":
        pools = demo_pools or demo.pools(seed=0, **dict(cfg.demo_sizes or {}))
        # process 0 first: processes that share a folder (several on one host) then find it built
        return partitioning.chief_first(lambda: demo.build_vocab(_local_vocab_dir(cfg), pools))
    raise ValueError(f"task {cfg.task} needs VOCABULARY: T5's spiece.model (or `doa vocab build`)")


def resolve_models(cfg: CellConfig, vocab: Optional[vocab_lib.Vocabulary] = None) -> CellConfig:
    """`cfg` with each model's vocab size fixed (before its key is taken): the rows of the checkpoint
    it starts from, else MODEL_VOCAB_SIZE, else the vocabulary's ids padded to 128. A size that does
    not fit is a configuration error (no results row) naming MODEL_VOCAB_SIZE. The teacher's
    checkpoint is read only by cells that use the teacher."""
    vocab = vocab or task_vocab(cfg)
    what = vocab_lib.describe(vocab)
    fixed = {}
    for role, model_cfg, ckpt in (("student", cfg.student, cfg.student_checkpoint),
                                  ("teacher", cfg.teacher, cfg.teacher_checkpoint)):
        try:
            fixed[role] = checkpoints.resolve_vocab_size(
                model_cfg, vocab.vocab_size, what, ckpt if role == "student" or cfg.kind.uses_teacher else None)
        except ValueError as e:
            raise ValueError(f"the {role}'s vocabulary does not fit the task's: {e}") from None
    return dataclasses.replace(cfg, **fixed) if fixed != {"student": cfg.student, "teacher": cfg.teacher} else cfg


def check_models(cfg: CellConfig) -> None:
    """Configuration errors, raised before any compute (no results row), after `resolve_models`
    (which refuses a model whose vocab size does not fit the task's vocabulary): a teacher and
    student with different vocabularies."""
    if cfg.kind.uses_teacher and cfg.student.vocab_size != cfg.teacher.vocab_size:
        raise ValueError(f"teacher and student vocabularies differ ({cfg.teacher.vocab_size} vs "
                         f"{cfg.student.vocab_size} ids): distillation needs one vocabulary")


def unfit_reason(cfg: CellConfig, setup: TaskSetup) -> Optional[str]:
    """Why the cell cannot run on this task's data (a results row says `infeasible`), or None."""
    if cfg.start_labels > len(setup.pools.train):
        return f"START_LABELS {cfg.start_labels} exceeds the labeled pool ({len(setup.pools.train)} examples)"
    return None
