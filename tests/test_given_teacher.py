"""TEACHER_FINETUNED: a teacher fine-tuned elsewhere (here a T5X checkpoint, as `t5x.train` on
`doa_<task>_L<n>` writes) labels and distils in a cell without a second fine-tune, and the cell is
still charged the fine-tune its plan prices."""
import json
import pathlib

import jax
import numpy as np
import pytest

from doa_jax import api, gin_utils
from doa_jax.checkpoints import save_checkpoint
from doa_jax.data import demo
from doa_jax.experiment import phases, run_cell, task_setup

GIN_FILES = ["gin/runs/experiment.gin", "gin/runs/demo_models.gin", "gin/experiments/demo_distill.gin"]
# The demo cell made small: 32 start labels, 32 unlabeled inputs, one distillation epoch.
SMALL = ["START_LABELS = 32", "MAX_UNLABELED = 32", "DISTILL_EPOCHS = 1", "BATCH_SIZE = 16",
         "MAX_EVAL_EXAMPLES = 16", "CellConfig.demo_sizes = {'labeled': 64, 'unlabeled': 32, 'test': 16}"]


def cell(out, *bindings):
    """The demo distill cell, made small, as `doa run --gin.X=...` builds it."""
    gin_utils.parse(GIN_FILES, [f"OUTPUT_DIR = '{out}'", *SMALL, *bindings])
    return gin_utils.macro("CELL")


def t5x_teacher(path, cfg, seed=0):
    """A T5X train state (checkpoint_0) of the cell's teacher; its params."""
    teacher = cfg.teacher.replace(vocab_size=demo.MODEL_VOCAB_SIZE)
    params = jax.device_get(api.init_params(teacher, seed))
    save_checkpoint(path, teacher, params, format="t5x")
    return params


@pytest.fixture
def given(tmp_path):
    ckpt = tmp_path / "teacher_demo" / "checkpoint_0"
    cfg = cell(tmp_path / "out", f"TEACHER_CHECKPOINT = '{ckpt}'", "TEACHER_FINETUNED = True")
    return cfg, t5x_teacher(ckpt, cfg), ckpt


@pytest.mark.slow   # one small demo cell: the teacher's store and a student (~21 s on 2 cores)
def test_a_cell_with_a_finetuned_teacher_labels_and_distils_with_it_and_is_charged_its_finetune(given, monkeypatch):
    cfg, saved, ckpt = given
    roles, stored = [], []
    train, build = phases.train, phases.teacher_store.build_store
    monkeypatch.setattr(phases, "train", lambda *a, role, **kw: roles.append(role) or train(*a, role=role, **kw))
    monkeypatch.setattr(phases.teacher_store, "build_store",
                        lambda root, request, vocab, module, params, **kw: stored.append(params)
                        or build(root, request, vocab, module, params, **kw))
    row = run_cell(cfg)

    assert roles == ["student"]                                     # the teacher never trained here
    assert not (pathlib.Path(cfg.output_dir) / "cache" / "teachers").exists()   # nor its training folder
    (params,) = stored                                               # the store came from the checkpoint's params
    flat = jax.tree_util.tree_leaves_with_path(params)
    assert len(flat) == len(jax.tree_util.tree_leaves(saved))
    for path, leaf in flat:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(_at(saved, path)))

    assert row["status"] in ("ok", "capped") and row["unlabeled_used"] == 32
    assert row["teacher_given"] == cfg.teacher_checkpoint                # the row says where the teacher came from
    assert row["cell_key"] == task_setup.resolve_models(cfg).key()
    ledger = [json.loads(line) for line in
              (pathlib.Path(row["output"]) / "ledger.jsonl").read_text().splitlines()]
    (charge,) = [e for e in ledger if e["phase"] == "teacher_finetune"]
    assert charge["seconds"] == 0.0 and charge["measured_usd"] == 0.0 and charge["cost_profile"] == "paper"
    assert charge["key"].endswith(f":fine-tuned elsewhere:{ckpt}")
    # what the plan priced for a 40-epoch fine-tune on the 32 start labels, priced as T5-XXL
    assert charge["usd"] == pytest.approx(row["plan"]["teacher_finetune_usd"]) and charge["usd"] > 0.5
    assert row["spent_usd"]["teacher_finetune"] == pytest.approx(charge["usd"])


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_the_option_is_keyed_only_when_set_and_a_different_checkpoint_is_a_different_teacher(given, tmp_path):
    cfg, _, ckpt = given
    plain = cell(tmp_path / "out", f"TEACHER_CHECKPOINT = '{ckpt}'")
    assert not plain.teacher_finetuned
    assert cell(tmp_path / "out", f"TEACHER_CHECKPOINT = '{ckpt}'", "TEACHER_FINETUNED = False").key() == plain.key()
    assert cfg.key() != plain.key()

    other = tmp_path / "teacher_demo_2" / "checkpoint_0"
    t5x_teacher(other, cfg, seed=1)
    setup = task_setup.load_task(cfg)
    keys = [phases.given_teacher_key(cfg, setup, phases.checkpoint_identity(str(p))) for p in (ckpt, other, ckpt)]
    assert keys[0] != keys[1] and keys[0] == keys[2]


def test_a_finetuned_teacher_needs_its_checkpoint_and_a_cell_that_uses_a_teacher(tmp_path):
    with pytest.raises(ValueError, match="TEACHER_FINETUNED=True needs TEACHER_CHECKPOINT"):
        cell(tmp_path, "TEACHER_FINETUNED = True")
    with pytest.raises(ValueError, match="STRATEGY='annotate' trains none"):
        cell(tmp_path, "TEACHER_CHECKPOINT = '/ckpt/teacher/checkpoint_0'", "TEACHER_FINETUNED = True",
             "STRATEGY = 'annotate'")
    with pytest.raises(ValueError, match="TEACHER_FINETUNED must be True or False, got 'yes'"):
        cell(tmp_path, "TEACHER_CHECKPOINT = '/ckpt/teacher/checkpoint_0'", "TEACHER_FINETUNED = 'yes'")
