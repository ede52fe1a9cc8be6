"""Distillation losses against a NumPy reference and the paper's PyTorch formulation."""
import jax
import numpy as np
import pytest

from doa_jax.distill import losses as dl

B, T, V = 3, 5, 11
rng = np.random.default_rng(0)
STUDENT = rng.normal(size=(B, T, V)).astype(np.float32) * 2
TEACHER = rng.normal(size=(B, T, V)).astype(np.float32) * 2
WEIGHTS = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.float32)


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl(student, teacher, temp):
    t, s = np_log_softmax(teacher / temp), np_log_softmax(student / temp)
    return (np.exp(t) * (t - s)).sum(-1)  # [B, T]


def test_masked_kd_loss_equals_numpy_reference():
    expected = 4.0 * (np_kl(STUDENT, TEACHER, 2.0) * WEIGHTS).sum() / WEIGHTS.sum()
    got = dl.kd_loss(STUDENT, TEACHER, WEIGHTS, temperature=2.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_paper_exact_kd_counts_every_position_and_divides_by_batch_times_length():
    expected = 4.0 * np_kl(STUDENT, TEACHER, 2.0).sum() / (B * T)
    got = dl.kd_loss(STUDENT, TEACHER, WEIGHTS, temperature=2.0, paper_exact=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_paper_exact_equals_the_released_pytorch_code():
    torch = pytest.importorskip("torch")
    s = torch.tensor(STUDENT).view(-1, V)
    t = torch.tensor(TEACHER).view(-1, V)
    loss = torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(s / 2.0, -1), torch.softmax(t / 2.0, -1)) * 4.0
    np.testing.assert_allclose(dl.kd_loss(STUDENT, TEACHER, paper_exact=True), loss.item(), rtol=1e-5)


def test_topk_kd_with_k_equal_to_vocab_equals_full_kd():
    values, ids = jax.lax.top_k(TEACHER, V)
    for paper_exact in (False, True):
        full = dl.kd_loss(STUDENT, TEACHER, WEIGHTS, paper_exact=paper_exact)
        topk = dl.topk_kd_loss(STUDENT, values, ids, WEIGHTS, paper_exact=paper_exact)
        np.testing.assert_allclose(topk, full, rtol=1e-5)


def test_topk_kd_renormalises_the_teacher_over_its_k_entries():
    values, ids = jax.lax.top_k(TEACHER, 3)
    values, ids = np.asarray(values), np.asarray(ids)
    t = np_log_softmax(values / 2.0)
    s = np.take_along_axis(np_log_softmax(STUDENT / 2.0), ids, -1)
    expected = 4.0 * ((np.exp(t) * (t - s)).sum(-1) * WEIGHTS).sum() / WEIGHTS.sum()
    np.testing.assert_allclose(dl.topk_kd_loss(STUDENT, values, ids, WEIGHTS), expected, rtol=1e-5)


def test_kd_of_a_student_equal_to_its_teacher_is_zero():
    np.testing.assert_allclose(dl.kd_loss(TEACHER, TEACHER, WEIGHTS), 0.0, atol=1e-6)


def test_sequence_kd_is_mean_token_nll_of_the_teacher_tokens():
    tokens = rng.integers(0, V, size=(B, T))
    nll = -np.take_along_axis(np_log_softmax(STUDENT), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(dl.sequence_kd_loss(STUDENT, tokens, WEIGHTS),
                               (nll * WEIGHTS).sum() / WEIGHTS.sum(), rtol=1e-5)


def test_mix_weights_kd_and_gold_and_rejects_alpha_outside_unit_interval():
    assert float(dl.mix(2.0, 4.0, 0.25)) == pytest.approx(3.5)
    with pytest.raises(ValueError, match="alpha must be in"):
        dl.mix(1.0, 1.0, 1.5)
