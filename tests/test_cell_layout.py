"""Each model of a cell on its own layout (teacher/PhaseLayout, student/PhaseLayout), on the 8-device
CPU mesh: the teacher's params are read onto its mesh, its store and online soft targets computed
there, and none of it changes the cell's result or its key."""
import dataclasses
import json

import jax
import pytest

from doa_jax import gin_utils
from doa_jax.distill import student_data
from doa_jax.experiment import CellConfig, DistillConfig, Epochs, phases, run_cell
from doa_jax.experiment.config import PhaseLayout
from doa_jax.data.demo import MODEL_VOCAB_SIZE
from doa_jax.losses import LossConfig
from doa_jax.model import config_for_size
from doa_jax.optimizers import OptimizerConfig
from doa_jax.partitioning import MeshConfig
from doa_jax.trainer import TrainConfig


def tiny(**kw):
    base = dict(vocab_size=MODEL_VOCAB_SIZE, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=1,
                num_decoder_layers=1, dtype="float32")
    return config_for_size("tiny", **{**base, **kw})


def online_cell(out, **layout) -> CellConfig:
    train = TrainConfig(model_dir=str(out), epochs=1, batch_size=16, optimizer=OptimizerConfig("adamw", learning_rate=3e-3),
                        loss=LossConfig(z_loss=0.0, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS", kd_weight=1.0),
                        keep_checkpoints=1, async_checkpointing=False, tensorboard=False)
    return CellConfig(task="demo", start_labels=32, extra_budget_usd=5.0, strategy="distill", output_dir=str(out),
                      student=tiny(), teacher=tiny(emb_dim=32), train=train, epochs=Epochs(teacher=2, distill=1),
                      distill=DistillConfig(soft_targets="online", topk=None, max_unlabeled=32),
                      demo_sizes={"labeled": 64, "unlabeled": 32, "test": 16}, verbose=False, **layout)


def test_layout_settings_leave_the_cell_key_as_it_was_before_they_existed():
    gin_utils.parse(["gin/runs/experiment.gin", "gin/runs/demo_models.gin", "gin/experiments/demo_distill.gin"],
                    ["OUTPUT_DIR='/tmp/unused'"])
    base = gin_utils.macro("CELL")
    assert base.key() == "6a0f7ade170325ae"     # the demo distill cell's key at the 2026-11-29 release
    laid_out = dataclasses.replace(
        base, teacher=base.teacher.replace(remat_policy="full", scan_layers=True, decode_cross_kv="recompute",
                                           scan_backward="autodiff"),
        student=base.student.replace(scan_layers=True, decode_cross_kv="recompute", scan_backward="stack"),
        teacher_layout=PhaseLayout(MeshConfig(data=2, model=4, fsdp=True), num_microbatches=2, decode_batch_size=8),
        student_layout=PhaseLayout(MeshConfig(data=8)),
        train=dataclasses.replace(base.train, fused_update=True),
        pricing=dataclasses.replace(base.pricing, measured_on="tpu_v5e"))
    assert laid_out.key() == base.key()
    changed = dataclasses.replace(base, train=dataclasses.replace(
        base.train, optimizer=dataclasses.replace(base.train.optimizer, learning_rate=1e-3)))
    assert changed.key() != base.key()


@pytest.mark.parametrize("binding,field,want", [
    ("TEACHER_DECODE_CROSS_KV='recompute'", "decode_cross_kv", ("recompute", "cache")),
    ("STUDENT_SCAN_BACKWARD='autodiff'", "scan_backward", ("auto", "autodiff")),
], ids=["decode_cross_kv", "scan_backward"])
def test_an_execution_macro_sets_its_models_field_and_keeps_the_key(binding, field, want):
    # How a model is decoded or differentiated (model.config.EXECUTION_FIELDS) never makes another cell.
    files = ["gin/runs/experiment.gin", "gin/runs/demo_models.gin", "gin/experiments/demo_distill.gin"]
    gin_utils.parse(files, ["OUTPUT_DIR='/tmp/unused'"])
    base = gin_utils.macro("CELL")
    gin_utils.parse(files, ["OUTPUT_DIR='/tmp/unused'", binding])
    cell = gin_utils.macro("CELL")
    assert (getattr(cell.teacher, field), getattr(cell.student, field)) == want
    assert cell.key() == base.key()


def test_a_bad_layout_macro_names_the_model_it_sets_and_where_it_was_set(capsys):
    from doa_jax import cli

    assert cli.main(["run", "--gin_file", "runs/experiment.gin", "--gin_file", "runs/demo_models.gin",
                     "--gin_file", "experiments/demo_distill.gin", "--gin.OUTPUT_DIR='/tmp/unused'",
                     "--gin.STUDENT_SCAN_BACKWARD='manual'", "--dry_run"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "doa run: error: student/T5Size: T5Config.scan_backward must be one of auto, stack, autodiff, got 'manual' "
        "(scan_backward = %STUDENT_SCAN_BACKWARD from --gin.STUDENT_SCAN_BACKWARD)")


def test_a_teacher_stores_key_ignores_how_the_teacher_decodes_and_is_differentiated():
    teacher = tiny(emb_dim=32)
    key = phases.layout_free(teacher)
    assert phases.layout_free(teacher.replace(decode_cross_kv="recompute", scan_layers=True,
                                              scan_backward="stack")) == key
    assert set(key) == {f.name for f in dataclasses.fields(teacher)} - {"decode_cross_kv", "scan_backward"}


def test_a_cell_refuses_a_mesh_set_on_its_train_config_and_names_the_macros(tmp_path):
    cell = online_cell(tmp_path)
    with pytest.raises(ValueError, match="set TEACHER_MESH_\\* / STUDENT_MESH_\\*"):
        dataclasses.replace(cell, train=dataclasses.replace(cell.train, mesh=MeshConfig(model=2)))


@pytest.mark.slow   # two tiny online-distillation cells (~1 min on 2 cores)
def test_the_teacher_runs_on_its_own_mesh_and_the_cell_ends_as_on_the_default_layout(tmp_path, monkeypatch):
    seen = {"params": [], "logits": []}
    restore = phases.teacher_params

    def spy_params(run, directory):
        params = restore(run, directory)
        seen["params"].append(params)
        return params

    iterate = student_data.OnlineTeacherBatches.iterate

    def spy_iterate(self, start=0):
        for batch in iterate(self, start):
            seen["logits"].append((batch["teacher_topk_values"], "teacher_topk_ids" in batch))
            yield batch

    monkeypatch.setattr(phases, "teacher_params", spy_params)
    monkeypatch.setattr(student_data.OnlineTeacherBatches, "iterate", spy_iterate)
    laid_out = online_cell(tmp_path / "model2", teacher_layout=PhaseLayout(MeshConfig(data=-1, model=2)))
    row = run_cell(laid_out)

    (params,) = seen["params"]
    leaves = jax.tree_util.tree_leaves_with_path(params)
    assert {tuple(leaf.sharding.mesh.shape.items()) for _, leaf in leaves} == {(("data", 4), ("model", 2))}
    mlp = [leaf for path, leaf in leaves if "wi" in jax.tree_util.keystr(path)]
    assert mlp and all("model" in leaf.sharding.spec for leaf in mlp)      # tensor-parallel, not replicated
    values, has_ids = seen["logits"][0]
    assert isinstance(values, jax.Array) and not has_ids                  # on the devices, full vocabulary
    assert values.sharding.spec[0] == "data" and values.shape[-1] == MODEL_VOCAB_SIZE

    plain = online_cell(tmp_path / "default")
    assert plain.key() == laid_out.key()
    reference = run_cell(plain)
    same = ("status", "value", "metrics", "spent_usd", "student_steps", "unlabeled_used", "pseudo_labels_kept")
    assert {k: row[k] for k in same} == {k: reference[k] for k in same}
    predictions = [(tmp_path / d / "cells" / row["cell_key"] / "predictions.jsonl").read_text()
                   for d in ("model2", "default")]
    assert predictions[0] == predictions[1] and json.loads(predictions[0].splitlines()[0])["prediction"] is not None
