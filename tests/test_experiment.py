"""One budget cell end to end: both arms on real WLP data, infeasible cells, the budget cap, reuse."""
import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from doa_jax import cli, experiment
from doa_jax.checkpoints import save_checkpoint
from doa_jax.distill import student_data
from doa_jax.data.cards import load_card
from doa_jax.data.vocab import load_vocab
from doa_jax.experiment import planner, task_setup
from doa_jax.experiment.pricing import Pricer
from doa_jax.experiment.config import DistillConfig, Epochs, PricingConfig
from doa_jax.losses import LossConfig
from doa_jax.optimizers import OptimizerConfig
from doa_jax.trainer import TrainConfig
from doa_jax.data.demo import model_vocab_size
from doa_jax.model import Transformer, config_for_size
from data_helpers import task_vocab

LENGTHS = {"inputs": 48, "targets": 48}


def tiny(vocab_size, **kw):
    base = dict(vocab_size=vocab_size, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=1,
                num_decoder_layers=1, dtype="float32")
    return config_for_size("tiny", **{**base, **kw})


@pytest.fixture(scope="module")
def wlp(doa_data, tmp_path_factory):
    vocab = task_vocab(str(doa_data), vocab_size=2000)
    v = model_vocab_size(vocab)
    out = str(tmp_path_factory.mktemp("cells"))
    train = TrainConfig(model_dir=out, epochs=1, batch_size=16, optimizer=OptimizerConfig("adamw", learning_rate=3e-3),
                        loss=LossConfig(z_loss=0.0, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS", kd_weight=1.0),
                        keep_checkpoints=1, async_checkpointing=False, tensorboard=False)
    return experiment.CellConfig(
        task="wlp", start_labels=32, extra_budget_usd=5.0, strategy="annotate", output_dir=out, vocab=str(vocab.path),
        student=tiny(v), teacher=tiny(v, emb_dim=32, num_encoder_layers=2, num_decoder_layers=2), train=train,
        epochs=Epochs(teacher=2, student=2, distill=2), distill=DistillConfig(max_unlabeled=48),
        feature_lengths=LENGTHS, max_eval_examples=32, verbose=False)


def distilling(cfg, **changes):
    """`cfg` as a distill cell with DistillConfig fields changed."""
    return dataclasses.replace(cfg, strategy="distill", distill=dataclasses.replace(cfg.distill, **changes))


@pytest.mark.slow
def test_annotate_and_distill_on_real_wlp_each_produce_a_row_with_entity_f1(wlp):
    rows = {s: experiment.run_cell(dataclasses.replace(wlp, strategy=s)) for s in ("annotate", "distill")}
    ann, dist = rows["annotate"], rows["distill"]
    assert ann["status"] == dist["status"] == "ok" and ann["metric"] == dist["metric"] == "f1"
    assert 0.0 <= ann["value"] <= 100.0 and 0.0 <= dist["value"] <= 100.0
    assert ann["labels_bought"] == 19 and ann["spent_usd"]["labels"] == pytest.approx(19 * 0.26)  # $5 / $0.26
    assert dist["labels_bought"] == 0 and dist["unlabeled_used"] == 48
    assert dist["spent_usd"]["teacher_finetune"] > 0 and dist["spent_usd"]["teacher_inference"] > 0
    assert dist["spent_total_usd"] <= 5.0 and ann["spent_total_usd"] <= 5.0
    written = [json.loads(line) for line in open(f"{wlp.output_dir}/results.jsonl")]
    assert {r["cell_key"] for r in written} == {ann["cell_key"], dist["cell_key"]}


def test_a_finished_cell_is_not_run_again(wlp):
    row = experiment.run_cell(dataclasses.replace(wlp, strategy="annotate"))
    again = experiment.run_cell(dataclasses.replace(wlp, strategy="annotate"))
    assert again == row
    keys = [json.loads(line)["cell_key"] for line in open(f"{wlp.output_dir}/results.jsonl")]
    assert keys.count(row["cell_key"]) == 1


def test_cells_that_share_a_teacher_reuse_its_fine_tune_and_store(wlp, tmp_path):
    cache = tmp_path / "cache"
    for budget in (5.0, 6.0):
        experiment.run_cell(dataclasses.replace(wlp, strategy="distill", extra_budget_usd=budget,
                                                output_dir=str(tmp_path), cache_dir=str(cache)))
    assert len(list((cache / "teachers").iterdir())) == 1 and len(list((cache / "stores").iterdir())) == 1
    rows = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    # Both cells are charged the shared teacher's cost: each cell stands on its own budget.
    assert rows[0]["spent_usd"]["teacher_finetune"] == rows[1]["spent_usd"]["teacher_finetune"] > 0
    # The pool caps U at 48 for both budgets: the same plan, so the second cell reuses the student too.
    assert rows[0]["unlabeled_used"] == rows[1]["unlabeled_used"] == 48
    assert rows[0]["student_trained_by"] is None and rows[1]["student_trained_by"] == rows[0]["cell_key"]
    assert rows[1]["value"] == rows[0]["value"] and rows[1]["spent_usd"] == rows[0]["spent_usd"]
    assert len(list((cache / "students").iterdir())) == 1


def test_a_store_whose_record_was_lost_is_charged_what_its_chunks_took(wlp, tmp_path):
    # A first attempt finished every chunk of the store and was killed before writing its record: the next cell
    # to use the store records it from the chunks' markers (here 2.5 s each on this host's 1 chip, the ledger's
    # unit on a CPU) and is charged that, not 0 s.
    cache = tmp_path / "cache"
    run = lambda budget: experiment.run_cell(dataclasses.replace(  # noqa: E731
        wlp, strategy="distill", extra_budget_usd=budget, output_dir=str(tmp_path), cache_dir=str(cache)))
    run(5.0)
    [store] = (cache / "stores").iterdir()
    (store / "record.json").unlink()
    markers = sorted(store.glob("chunk_*.COMPLETED"))
    for marker in markers:
        marker.write_text(json.dumps(dict(json.loads(marker.read_text()), seconds=2.5)))
    row = run(6.0)
    record = json.loads((store / "record.json").read_text())
    assert record["seconds"] == record["earlier_attempts_seconds"] == 2.5 * len(markers)
    ledger = [json.loads(line) for line in open(tmp_path / "cells" / row["cell_key"] / "ledger.jsonl")]
    [entry] = [e for e in ledger if e["phase"] == "teacher_inference"]
    assert entry["seconds"] == 2.5 * len(markers) and entry["chips"] == 1


def test_a_reused_store_is_read_once_and_a_chunk_failing_its_checksums_is_recomputed_and_charged(
        wlp, tmp_path, monkeypatch):
    import pathlib

    cache = tmp_path / "cache"
    run = lambda budget: experiment.run_cell(dataclasses.replace(  # noqa: E731
        wlp, strategy="distill", extra_budget_usd=budget, output_dir=str(tmp_path), cache_dir=str(cache)))
    run(5.0)
    [store] = (cache / "stores").iterdir()
    chunks = sorted(p.name for p in store.glob("chunk_*.npz"))
    read = []
    read_bytes = pathlib.Path.read_bytes
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: read.append(self.name) or read_bytes(self))
    run(6.0)   # another cell, the same store: each chunk's files read once (as `load` checks them)
    assert sorted(name for name in read if name.endswith(".npz")) == chunks
    monkeypatch.undo()

    before = json.loads((store / "record.json").read_text())
    npz = store / chunks[0]
    npz.write_bytes(npz.read_bytes()[:100])
    for marker in store.glob("chunk_*.COMPLETED"):   # what the first build took, as its markers say
        marker.write_text(json.dumps(dict(json.loads(marker.read_text()), seconds=2.5)))
    with pytest.warns(RuntimeWarning, match=f"{npz} does not match its checksum .*; recomputing chunk 0"):
        row = run(7.0)
    assert row["status"] == "ok"
    record = json.loads((store / "record.json").read_text())
    # the recomputed chunk is in the record once, as this attempt's seconds, beside what the others took before
    assert record["computed_chunks"] == 1 and record["earlier_attempts_seconds"] == 2.5 * (len(chunks) - 1)
    assert record["seconds"] > record["earlier_attempts_seconds"] and record != before
    ledger = [json.loads(line) for line in open(tmp_path / "cells" / row["cell_key"] / "ledger.jsonl")]
    [entry, lost] = [e for e in ledger if e["phase"] == "teacher_inference"]
    assert entry["seconds"] == record["seconds"]
    # chunk 0's first computation (2.5 s by its marker) was lost: measured, not charged
    assert (lost["key"].startswith("lost:"), lost["seconds"], lost["usd"]) == (True, 2.5, 0.0)


@pytest.mark.parametrize("change,reason", [
    (dict(strategy="distill", distill=DistillConfig(max_unlabeled=0)), "the unlabeled pool is empty"),
    (dict(strategy="distill", distill=DistillConfig(max_unlabeled=48, min_teacher_confidence=0.999)),
     "no pseudo-label reaches MIN_TEACHER_CONFIDENCE"),
    (dict(strategy="annotate", extra_budget_usd=0.1), "buys no label"),
    (dict(strategy="distill", teacher=config_for_size("xxl", dtype="float32"), extra_budget_usd=0.001,
          epochs=Epochs(teacher=20, student=2, distill=2)), "fine-tuning the teacher on 32 labels costs"),
])
def test_infeasible_cells_are_reported_with_their_reason(wlp, tmp_path, change, reason):
    if "teacher" in change and change["teacher"].emb_dim == 4096:  # xxl: only priced, never built
        change["teacher"] = change["teacher"].replace(vocab_size=wlp.student.vocab_size)
    row = experiment.run_cell(dataclasses.replace(wlp, output_dir=str(tmp_path), **change))
    assert row["status"] == "infeasible" and reason in row["reason"] and row["value"] is None


@pytest.mark.parametrize("teacher_vocab,message", [
    (4096, r"the teacher's vocabulary does not fit the task's: .* set MODEL_VOCAB_SIZE = \d+, or None to follow"),
    ("unpadded", r"teacher and student vocabularies differ"),
])
def test_a_model_that_does_not_fit_the_vocabulary_is_an_error_before_any_compute(wlp, tmp_path, teacher_vocab,
                                                                                  message):
    # A configuration mistake is not a budget outcome: no `infeasible` row is written, nothing is trained.
    size = load_vocab(wlp.vocab).vocab_size if teacher_vocab == "unpadded" else teacher_vocab   # fits, unpadded
    cfg = dataclasses.replace(wlp, strategy="distill", teacher=wlp.teacher.replace(vocab_size=size),
                              output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=message):
        experiment.run_cell(cfg)
    assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / "cache" / "teachers").exists()


def test_models_left_to_follow_the_vocabulary_get_its_ids_padded_to_128_and_the_same_key(wlp):
    follow = dataclasses.replace(wlp, student=wlp.student.replace(vocab_size=None),
                                 teacher=wlp.teacher.replace(vocab_size=None))
    resolved = task_setup.resolve_models(follow)
    rows = model_vocab_size(load_vocab(wlp.vocab))
    assert (resolved.student.vocab_size, resolved.teacher.vocab_size) == (rows, rows)
    assert resolved.key() == wlp.key()     # the cell an explicit, fitting size would have been


def _hf_checkpoint(path, vocab_size):
    cfg = tiny(vocab_size)
    tokens = np.ones((1, 4), np.int32)
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), tokens, tokens))["params"]
    save_checkpoint(path, cfg, jax.device_get(params), format="hf")
    return str(path)


def test_the_checkpoint_a_model_starts_from_fixes_its_vocab_size(wlp, tmp_path):
    ids = load_vocab(wlp.vocab).vocab_size
    ckpt = _hf_checkpoint(tmp_path / "student", ids)     # unpadded rows: they fit, and the checkpoint rules
    cfg = dataclasses.replace(wlp, student=wlp.student.replace(vocab_size=None), student_checkpoint=ckpt)
    assert task_setup.resolve_models(cfg).student.vocab_size == ids


def test_a_checkpoint_whose_vocab_differs_from_the_tasks_is_an_error_naming_both(wlp, tmp_path):
    ckpt = _hf_checkpoint(tmp_path / "student", 4096)
    cfg = dataclasses.replace(wlp, student=wlp.student.replace(vocab_size=None), student_checkpoint=ckpt,
                              output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=rf"the student's vocabulary does not fit the task's: vocabulary {wlp.vocab} "
                                         rf"has \d+ ids .* but checkpoint {ckpt} has 4096 embedding rows"):
        experiment.run_cell(cfg)
    assert not (tmp_path / "results.jsonl").exists()


def test_model_vocab_size_conflicting_with_a_checkpoint_names_both(wlp, tmp_path):
    rows = model_vocab_size(load_vocab(wlp.vocab))
    ckpt = _hf_checkpoint(tmp_path / "student", rows)
    cfg = dataclasses.replace(wlp, student=wlp.student.replace(vocab_size=rows - 64), student_checkpoint=ckpt)
    with pytest.raises(ValueError, match=rf"MODEL_VOCAB_SIZE is {rows - 64} but checkpoint {ckpt} has {rows} "
                                         r"embedding rows; set MODEL_VOCAB_SIZE = None"):
        task_setup.resolve_models(cfg)


def _doa_run(wlp, out, *flags):
    """`doa run` of a WLP cell that plans and stops (+$0.10 buys no label): no training."""
    return cli.main(["run", "--gin_file", "runs/experiment.gin", f"--gin.OUTPUT_DIR='{out}'", "--gin.TASK='wlp'",
                     "--gin.START_LABELS=16", "--gin.EXTRA_BUDGET_USD=0.1", "--gin.STRATEGY='annotate'",
                     f"--gin.VOCABULARY='{wlp.vocab}'", *flags])


def test_doa_run_with_a_non_t5_vocabulary_needs_no_vocab_size_binding(wlp, tmp_path, capsys):
    assert _doa_run(wlp, tmp_path) == 0
    rows = model_vocab_size(load_vocab(wlp.vocab))
    assert f"models' vocab size: student {rows}, teacher {rows} (task vocabulary {wlp.vocab}" in capsys.readouterr().out
    (row,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert row["status"] == "infeasible" and "buys no label" in row["reason"]    # a budget outcome, not a config error


def test_model_vocab_size_overrides_the_vocabulary_in_doa_run(wlp, tmp_path, capsys):
    ids = load_vocab(wlp.vocab).vocab_size                                        # unpadded: fits
    assert _doa_run(wlp, tmp_path, f"--gin.MODEL_VOCAB_SIZE={ids}") == 0
    assert f"models' vocab size: student {ids}, teacher {ids}" in capsys.readouterr().out
    assert _doa_run(wlp, tmp_path / "bad", "--gin.MODEL_VOCAB_SIZE=4096") == 2
    err = capsys.readouterr().err
    assert f"MODEL_VOCAB_SIZE (the model's vocab_size) is 4096; expected {ids}..{model_vocab_size(load_vocab(wlp.vocab))}: " \
           f"set MODEL_VOCAB_SIZE = {model_vocab_size(load_vocab(wlp.vocab))}" in err
    assert not (tmp_path / "bad" / "results.jsonl").exists()


def test_the_budget_cap_stops_the_student_within_one_step_and_reports_the_spend(wlp, tmp_path, monkeypatch):
    # The plan believes distillation is free, so it takes every unlabeled input; the real per-step
    # cost (priced as a T5-Small student) then meets the cap part-way through the student's training.
    monkeypatch.setattr(planner.Planner, "distill_usd", lambda self, n: 0.0)
    cfg = dataclasses.replace(wlp, strategy="distill", output_dir=str(tmp_path), pricing=PricingConfig(student_as="base"),
                              epochs=Epochs(teacher=2, student=2, distill=50), extra_budget_usd=3e-4)
    row = experiment.run_cell(cfg)
    pricer = Pricer.for_cell(cfg, load_card("wlp"), LENGTHS)
    step_usd = pricer.step_usd(pricer.student(True, row["pseudo_labels_kept"]))
    assert row["status"] == "capped" and "budget reached at student step" in row["reason"]
    assert row["spent_total_usd"] <= 3e-4 + 1e-12 and 3e-4 - row["spent_total_usd"] < step_usd
    assert 0 < row["student_steps"] < 50 * 3


def test_teacher_confidence_filter_keeps_pseudo_labels_at_or_above_the_threshold():
    from doa_jax.distill.store import TeacherOutputs

    logp = np.log(np.array([0.9, 0.5, 0.7])) * np.array([2, 4, 1])  # mean token probs 0.9, 0.5, 0.7
    outputs = TeacherOutputs([""] * 3, [""] * 3, np.ones((3, 4), np.int32), np.array([2, 4, 1]), logp,
                             np.zeros((3, 4, 2), np.float32), np.zeros((3, 4, 2), np.int32))
    np.testing.assert_allclose(student_data.teacher_confidence(outputs), [0.9, 0.5, 0.7])
    assert student_data.confident_rows(outputs, 0.6).tolist() == [0, 2]
    assert student_data.confident_rows(outputs, 0.0).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="MIN_TEACHER_CONFIDENCE must be in"):
        student_data.confident_rows(outputs, 1.5)


def test_online_soft_targets_run_the_teacher_every_step_and_are_charged_for_it(wlp, tmp_path):
    stored = experiment.run_cell(dataclasses.replace(wlp, strategy="distill", output_dir=str(tmp_path / "s")))
    online = experiment.run_cell(dataclasses.replace(distilling(wlp, soft_targets="online"),
                                                     output_dir=str(tmp_path / "o")))
    assert online["status"] == "ok" and online["metric"] == "f1"
    assert online["student_steps"] == stored["student_steps"]
    # Each online step adds one teacher forward pass to the student's step.
    assert online["spent_usd"]["student_training"] > stored["spent_usd"]["student_training"]
