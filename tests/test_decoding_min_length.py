"""`min_length` (HF's `min_new_tokens`): EOS may not be chosen before that many tokens, so a
benchmark can decode exactly N tokens per row. Uses params nudged toward EOS so rows would end early."""
import numpy as np
import pytest

from doa_jax import decoding
from doa_jax.model import config_for_size
from decoding_helpers import eos_biased, init_params, teacher_forced, valid

CFG = config_for_size("tiny", dtype="float32", vocab_size=64, emb_dim=32, num_heads=4, head_dim=16,
                      mlp_dim=64, num_encoder_layers=2, num_decoder_layers=3)
ENC = np.array([[5, 9, 13, 40, 22, 1], [7, 30, 1, 0, 0, 0], [11, 12, 50, 60, 1, 0], [3, 1, 0, 0, 0, 0],
                [5, 3, 1, 0, 0, 0], [13, 14, 52, 62, 1, 0], [9, 32, 1, 0, 0, 0], [7, 11, 15, 42, 24, 1]], np.int32)


@pytest.fixture(scope="module")
def biased():
    return eos_biased(CFG, init_params(CFG), ENC, 12)


def test_min_length_of_the_full_length_decodes_every_step_of_every_row(biased):
    free = decoding.greedy(CFG, biased, ENC, 12)
    assert (np.asarray(free.lengths) < 12).sum() >= 3          # without it, rows end early
    forced = decoding.greedy(CFG, biased, ENC, 12, min_length=12)
    tokens = np.asarray(forced.tokens)
    assert int(forced.steps) == 12 and decoding.EOS_ID not in tokens
    # Each token is the argmax over every token but EOS, given the tokens before it.
    token_logp, logits, _ = teacher_forced(CFG, biased, ENC, tokens)
    logits = logits.copy()
    logits[..., decoding.EOS_ID] = -np.inf
    np.testing.assert_array_equal(np.argmax(logits, -1), tokens)
    # log_probs stay the model's own (EOS not masked out of the normaliser).
    np.testing.assert_allclose(np.asarray(forced.log_probs), token_logp.sum(1), atol=1e-5)


def test_eos_is_allowed_from_min_length_on(biased):
    forced = decoding.greedy(CFG, biased, ENC, 12, min_length=4)
    tokens, lengths = np.asarray(forced.tokens), np.asarray(forced.lengths)
    assert lengths.min() >= 5 and (lengths < 12).any()          # EOS can come at position 4 (0-based)
    for row, n in zip(tokens, lengths):
        assert decoding.EOS_ID not in row[:n - 1] and not row[n:].any()
    logits = teacher_forced(CFG, biased, ENC, tokens)[1].copy()
    logits[:, :4, decoding.EOS_ID] = -np.inf
    mask = valid(tokens)
    np.testing.assert_array_equal(np.where(mask, np.argmax(logits, -1), 0), tokens)


def test_min_length_zero_is_plain_greedy(biased):
    a = decoding.greedy(CFG, biased, ENC, 12)
    b = decoding.greedy(CFG, biased, ENC, 12, min_length=0)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


@pytest.mark.parametrize("bad", [-1, 2.5, "3"])
def test_bad_min_length_is_rejected(bad):
    with pytest.raises(ValueError, match="min_length must be an int >= 0"):
        decoding.greedy(CFG, init_params(CFG), ENC, 4, min_length=bad)
