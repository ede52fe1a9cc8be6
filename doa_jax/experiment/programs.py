"""The programs a cell runs, phase by phase, as `doa aot` compiles them for a target.

One `bench.aot.Program` per jitted function a cell calls, with the cell's own models, lengths,
batches, loss, optimizer, parameter dtype and fused update, each model on its own layout (mesh,
microbatches, decode batch: `teacher/PhaseLayout`, `student/PhaseLayout`):

    distill / mixed: teacher_train ─► teacher_decode ─► teacher_score [─► teacher_score_gold (mixed)]
                     ─► [teacher_forward (online soft targets)] ─► student_distill ─► eval_decode
    annotate:        student_train ─► eval_decode

The teacher's inference programs (decode, scoring, the online forward) are `per_host`: on a target of
several hosts each host runs them alone on its own chips, the teacher's layout cut to them
(`bench.aot.placed`), as a multi-host cell does.

Nothing is read but the task card (for its lengths) when both models' vocab sizes are set
(MODEL_VOCAB_SIZE); otherwise they are resolved as `doa run` resolves them (the vocabulary and the
checkpoints they start from).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from doa_jax.bench.aot import Program, TrainSpec
from doa_jax.data import cards, demo
from doa_jax.experiment import phases, task_setup
from doa_jax.experiment.config import CellConfig


def task_lengths(cfg: CellConfig) -> dict[str, int]:
    """FEATURE_LENGTHS, else the task card's (no data file is read)."""
    if cfg.feature_lengths:
        return dict(cfg.feature_lengths)
    card = demo.card() if cfg.task == "demo" else cards.load_card(cfg.task)
    return dict(card.feature_lengths)


def resolved(cfg: CellConfig) -> CellConfig:
    """`cfg` with both models' vocab sizes known: as given, else resolved as `doa run` does."""
    if cfg.student.vocab_size is not None and cfg.teacher.vocab_size is not None:
        return cfg
    return task_setup.resolve_models(cfg)


def cell_programs(cfg: CellConfig, lengths: Mapping[str, int]) -> list[Program]:
    """Every program of the cell, in the order the cell runs them (see the module doc)."""
    t = cfg.train
    n_in, n_out = lengths["inputs"], lengths["targets"]
    n_dec = task_setup.decode_length(lengths, cfg.protocol)
    t_mesh, s_mesh = cfg.teacher_layout.mesh, cfg.student_layout.mesh

    def train_spec(role: str, soft_targets, kd: bool) -> TrainSpec:
        loss = t.loss if kd else dataclasses.replace(t.loss, kd_weight=0.0)
        return TrainSpec(loss, t.optimizer, t.param_dtype, cfg.layout(role).num_microbatches, soft_targets,
                         t.fused_update)

    programs = []
    if cfg.kind.uses_teacher:
        store = phases.store_batch_size(cfg)
        online = cfg.distill.soft_targets == "online" and t.loss.kd_weight != 0.0
        student_step = "student_distill"
        if not cfg.teacher_finetuned:    # TEACHER_FINETUNED: the teacher arrives trained, no fine-tuning here
            programs.append(Program("teacher_train", "train", "train", cfg.teacher, t.batch_size, (n_in, n_out), t_mesh,
                                    train_spec("teacher", None, kd=False)))
        programs += [
            Program("teacher_decode", "decode", "decode", cfg.teacher, store, (n_in, n_dec), t_mesh, per_host=True),
            Program("teacher_score", "score", "score", cfg.teacher, store, (n_in, n_dec), t_mesh,
                    topk=cfg.distill.stored_topk, per_host=True)]
        if cfg.kind.mixes_gold:
            programs.append(Program("teacher_score_gold", "score", "score", cfg.teacher, phases.EVAL_BATCH_SIZE,
                                    (n_in, n_out), t_mesh, topk=cfg.distill.topk or 1, per_host=True))
        if online:
            programs.append(Program("teacher_forward", "distill", "forward", cfg.teacher, t.batch_size,
                                    (n_in, n_out), t_mesh, co_resident=(student_step,), per_host=True))
        soft = cfg.teacher.vocab_size if online else cfg.distill.stored_topk
        programs.append(Program(student_step, "distill", "train", cfg.student, t.batch_size, (n_in, n_out), s_mesh,
                                train_spec("student", soft, kd=True),
                                co_resident=("teacher_forward",) if online else ()))
    else:
        student_step = "student_train"
        programs.append(Program(student_step, "train", "train", cfg.student, t.batch_size, (n_in, n_out), s_mesh,
                                train_spec("student", None, kd=False)))
    programs.append(Program("eval_decode", "decode", "decode", cfg.student, phases.eval_batch_size(cfg),
                            (n_in, n_dec), s_mesh, co_resident=(student_step,)))
    return programs
