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


# Teacher sequences of different lengths (EOS = 1 included; 0 after EOS), a longest of 3 tokens, so
# the released batch has L = 4 columns (start token + 3) of T = 5; the last row pads a short batch.
TOKENS = np.array([[7, 1, 0, 0, 0], [4, 9, 1, 0, 0], [3, 1, 0, 0, 0]])


def released_kd(student, teacher, length):
    """The released formula (run_t5.py DistillationTrainer.compute_loss) in PyTorch, on the batch's
    first `length` decoder positions: KLDivLoss(batchmean) over [B*L, V], times T^2, T = 2."""
    torch = pytest.importorskip("torch")
    v = student.shape[-1]
    s = torch.tensor(student[:, :length]).reshape(-1, v)
    t = torch.tensor(teacher[:, :length]).reshape(-1, v)
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    return float(kl(torch.log_softmax(s / 2.0, -1), torch.softmax(t / 2.0, -1)) * 4.0)


def test_paper_positions_are_the_batch_padded_to_its_longest_teacher_sequence_plus_start():
    weights, divisor = dl.paper_positions(np.concatenate([TOKENS, np.zeros((1, T), int)]))
    np.testing.assert_array_equal(weights, [[1, 1, 1, 1, 0]] * 3 + [[0, 0, 0, 0, 0]])
    assert float(divisor) == 3 * 4


def test_paper_positions_take_the_released_padded_length_when_given():
    """From the second epoch the released code pads a batch to its rows' cached lengths (here 5)."""
    padded = np.array([5, 5, 5, 0])
    weights, divisor = dl.paper_positions(np.concatenate([TOKENS, np.zeros((1, T), int)]), padded)
    np.testing.assert_array_equal(weights, [[1, 1, 1, 1, 1]] * 3 + [[0, 0, 0, 0, 0]])
    assert float(divisor) == 3 * 5


def test_released_padding_is_its_own_length_until_every_row_was_seen_then_the_first_lengths():
    """The released DistillationTrainer caches generate's padded output per input: a batch of seen
    rows is padded to the longest length those rows were first generated at."""
    from doa_jax.distill.student_data import ReleasedPadding

    enc = np.arange(1, 7)[:, None] * np.ones((1, 3), int)          # six distinct inputs
    tokens = np.array([[7, 6, 5, 4, 1], [3, 1, 0, 0, 0], [2, 1, 0, 0, 0],
                       [4, 1, 0, 0, 0], [5, 1, 0, 0, 0], [6, 1, 0, 0, 0]])
    pad = ReleasedPadding()
    np.testing.assert_array_equal(pad(enc[[0, 1]], tokens[[0, 1]]), [5, 5])       # fresh: 1 + 5 tokens, capped at T
    np.testing.assert_array_equal(pad(enc[[2, 3]], tokens[[2, 3]]), [3, 3])       # fresh: 1 + 2
    np.testing.assert_array_equal(pad(enc[[1, 2]], tokens[[1, 2]]), [5, 5])       # seen: row 1 was padded to 5
    np.testing.assert_array_equal(pad(enc[[1, 4]], tokens[[1, 4]]), [3, 3])       # row 4 is new: its own 3 ...
    np.testing.assert_array_equal(pad(enc[[1, 2]], tokens[[1, 2]]), [3, 3])       # ... which row 1 now remembers
    padded = pad(np.concatenate([enc[[1]], np.zeros((1, 3), int)]), np.concatenate([tokens[[1]], np.zeros((1, 5), int)]))
    np.testing.assert_array_equal(padded, [3, 0])                                 # a padding row: 0


def test_paper_exact_kd_equals_the_released_pytorch_formula_with_unequal_lengths():
    got = dl.kd_loss(STUDENT, TEACHER, temperature=2.0, paper_exact=True, target_tokens=TOKENS)
    np.testing.assert_allclose(got, released_kd(STUDENT, TEACHER, 4), rtol=1e-5)


def test_paper_exact_ignores_the_all_zero_rows_that_pad_a_short_last_batch():
    pad = rng.normal(size=(1, T, V)).astype(np.float32)
    got = dl.kd_loss(np.concatenate([STUDENT, pad]), np.concatenate([TEACHER, -pad]), paper_exact=True,
                     target_tokens=np.concatenate([TOKENS, np.zeros((1, T), int)]))
    np.testing.assert_allclose(got, released_kd(STUDENT, TEACHER, 4), rtol=1e-5)


def test_paper_exact_length_is_capped_at_the_arrays_length():
    full = np.array([[5, 6, 7, 8, 9], [4, 1, 0, 0, 0], [3, 1, 0, 0, 0]])   # no EOS within T: L = T
    got = dl.kd_loss(STUDENT, TEACHER, paper_exact=True, target_tokens=full)
    np.testing.assert_allclose(got, released_kd(STUDENT, TEACHER, T), rtol=1e-5)


def test_paper_exact_online_soft_targets_in_the_topk_format_equal_the_released_formula():
    ids = np.broadcast_to(np.arange(V), (B, T, V))   # what OnlineTeacherBatches gives: k = V
    got = dl.topk_kd_loss(STUDENT, TEACHER, ids, paper_exact=True, target_tokens=TOKENS)
    np.testing.assert_allclose(got, released_kd(STUDENT, TEACHER, 4), rtol=1e-5)


def test_paper_exact_with_stored_topk_is_refused():
    values, ids = jax.lax.top_k(TEACHER, 3)
    with pytest.raises(ValueError, match=r"kd_paper_exact with top-3 soft targets: .* \(SOFT_TARGETS='online'\)"):
        dl.topk_kd_loss(STUDENT, values, ids, paper_exact=True, target_tokens=TOKENS)


def test_topk_kd_with_k_equal_to_vocab_equals_full_kd():
    values, ids = jax.lax.top_k(TEACHER, V)
    np.testing.assert_allclose(dl.topk_kd_loss(STUDENT, values, ids, WEIGHTS),
                               dl.kd_loss(STUDENT, TEACHER, WEIGHTS), rtol=1e-5)


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
