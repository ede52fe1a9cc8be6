"""Distillation inside the trainer: the KD term equals the reference losses and a student learns it."""
import dataclasses

import jax
import numpy as np
import pytest

from doa_jax import losses
from doa_jax.distill import losses as distill_losses
from doa_jax.api import init_params
from doa_jax.model import Transformer
from doa_jax.optimizers import OptimizerConfig
from doa_jax.data.batches import ArrayBatches
from doa_jax.trainer import Trainer
from train_helpers import copy_arrays, metric_rows, run_config, tiny_config

B, T, V = 2, 4, 9
rng = np.random.default_rng(0)
STUDENT = rng.normal(size=(B, T, V)).astype(np.float32)
TEACHER = rng.normal(size=(B, T, V)).astype(np.float32)
TARGETS = np.array([[3, 4, 1, 0], [5, 1, 0, 0]])
BATCH = {"decoder_target_tokens": TARGETS, "decoder_loss_weights": (TARGETS > 0).astype(np.float32),
         "teacher_topk_values": TEACHER, "teacher_topk_ids": np.broadcast_to(np.arange(V), (B, T, V))}


def loss_of(cfg):
    w, d = losses.loss_weights(cfg, BATCH)
    return float(losses.sequence_loss(cfg, STUDENT, BATCH, w, d)[0])


def test_kd_weight_one_is_the_papers_masked_kd_loss():
    cfg = losses.LossConfig(z_loss=0.0, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS", kd_weight=1.0)
    expected = distill_losses.kd_loss(STUDENT, TEACHER, BATCH["decoder_loss_weights"], temperature=2.0)
    assert loss_of(cfg) == pytest.approx(float(expected), rel=1e-5)


def test_kd_paper_exact_counts_every_position_of_the_batch_padded_to_its_longest_sequence():
    cfg = losses.LossConfig(z_loss=0.0, kd_weight=1.0, kd_paper_exact=True)
    # Longest teacher sequence 3 tokens -> 4 positions (start token + 3) of T = 4 for both rows.
    expected = distill_losses.kd_loss(STUDENT, TEACHER, np.ones((B, T)), temperature=2.0)
    assert loss_of(cfg) == pytest.approx(float(expected), rel=1e-5)


def test_kd_paper_exact_with_stored_topk_is_refused_in_the_trainer_loss():
    cfg = losses.LossConfig(z_loss=0.0, kd_weight=1.0, kd_paper_exact=True)
    top = dict(BATCH, teacher_topk_values=TEACHER[..., :3], teacher_topk_ids=BATCH["teacher_topk_ids"][..., :3])
    w, d = losses.loss_weights(cfg, top)
    with pytest.raises(ValueError, match="top-3 soft targets"):
        losses.sequence_loss(cfg, STUDENT, top, w, d)


def test_kd_weight_mixes_soft_targets_with_cross_entropy_on_the_targets():
    base = dict(z_loss=0.0, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
    kd, ce = loss_of(losses.LossConfig(**base, kd_weight=1.0)), loss_of(losses.LossConfig(**base))
    assert loss_of(losses.LossConfig(**base, kd_weight=0.3)) == pytest.approx(0.3 * kd + 0.7 * ce, rel=1e-5)


def test_kd_without_teacher_logits_in_the_batch_is_an_error():
    cfg = losses.LossConfig(kd_weight=1.0)
    batch = {k: v for k, v in BATCH.items() if not k.startswith("teacher")}
    with pytest.raises(ValueError, match="needs teacher_topk_values"):
        losses.sequence_loss(cfg, STUDENT, batch, *losses.loss_weights(cfg, batch))


@pytest.mark.slow
def test_student_trained_on_stored_top_k_logits_moves_toward_the_teacher(tmp_path):
    cfg = tiny_config()
    teacher = Transformer(cfg)
    teacher_params = init_params(cfg, seed=7)
    arrays = copy_arrays(num_examples=32, length=6, vocab_size=cfg.vocab_size)
    logits = np.asarray(teacher.apply({"params": teacher_params}, arrays["encoder_input_tokens"],
                                      arrays["decoder_input_tokens"]))
    values, ids = jax.lax.top_k(logits, 8)
    data = dict(arrays, teacher_topk_values=np.asarray(values), teacher_topk_ids=np.asarray(ids))
    config = run_config(tmp_path, train_steps=60, seed=1, loss=losses.LossConfig(
        kd_weight=1.0, z_loss=0.0, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS"))
    config = dataclasses.replace(config, optimizer=OptimizerConfig(name="adamw", learning_rate=1e-2))
    Trainer(cfg, config).fit(ArrayBatches(data, 16, shuffle=True))
    kd = [row["kd_loss"] for row in metric_rows(tmp_path)]
    assert kd[-1] < 0.5 * kd[0]


def test_a_step_cap_stops_the_run_at_a_step_boundary_and_keeps_a_checkpoint(tmp_path):
    from doa_jax.checkpoints.steps import has_checkpoint
    from train_helpers import train_source

    asked = []

    def allowed(step):
        asked.append(step)
        return step < 3

    result = Trainer(tiny_config(), run_config(tmp_path, train_steps=10)).fit(train_source(16), step_allowed=allowed)
    assert (result.step, result.stopped_by_budget) == (3, True)
    assert asked == [0, 1, 2, 3] and has_checkpoint(tmp_path / "checkpoints")
