"""Our Flax T5 gives HF PyTorch T5's logits, for both variants, unequal depths and padded rows.

The HF model has random weights (no downloads) and reaches us through the HF importer, so this
also checks the name/transpose/relpos mapping. Lengths of 40 reach the log-spaced relative
position buckets (distances >= 8 in the encoder, >= 16 in the decoder).
"""
import jax
import numpy as np
import pytest
import torch

from doa_jax.model import Transformer, config_for_size
from torch_t5 import make_hf_t5

# head_dim * num_heads (24) != emb_dim (16), so a swapped transpose cannot pass.
V11 = config_for_size("tiny", dtype="float32", vocab_size=96, emb_dim=16, num_heads=4, head_dim=6,
                      mlp_dim=40, num_encoder_layers=3, num_decoder_layers=2)
ORIGINAL = config_for_size("t5_small", dtype="float32", vocab_size=96, emb_dim=16, num_heads=4,
                           head_dim=6, mlp_dim=40, num_encoder_layers=2, num_decoder_layers=3)
TOL = 1e-4


def batch(cfg, enc_lengths, dec_lengths, enc_len=40, dec_len=40, seed=0):
    """Random tokens (ids >= 2) with each row padded (0) after its length; decoder starts with 0."""
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, cfg.vocab_size, (len(enc_lengths), enc_len))
    dec = rng.integers(2, cfg.vocab_size, (len(dec_lengths), dec_len))
    dec[:, 0] = 0
    enc_valid = np.arange(enc_len)[None] < np.array(enc_lengths)[:, None]
    dec_valid = np.arange(dec_len)[None] < np.array(dec_lengths)[:, None]
    return np.where(enc_valid, enc, 0), np.where(dec_valid, dec, 0), enc_valid, dec_valid


def hf_logits(model, enc, dec, enc_valid, dec_valid):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc_valid.astype(np.int64)),
                    decoder_input_ids=torch.tensor(dec),
                    decoder_attention_mask=torch.tensor(dec_valid.astype(np.int64)))
    return out.logits.numpy(), out.encoder_last_hidden_state.numpy()


def our_logits(cfg, params, enc, dec):
    model = Transformer(cfg)
    logits = model.apply({"params": params}, enc, dec)
    encoded = model.apply({"params": params}, enc, method=model.encode)
    return np.asarray(logits), np.asarray(encoded)


@pytest.mark.parametrize("cfg", [V11, ORIGINAL], ids=["t5_v1_1", "t5_original"])
def test_logits_equal_pytorch_t5_on_padded_batch(cfg):
    hf_model, params = make_hf_t5(cfg, seed=3)
    enc, dec, enc_valid, dec_valid = batch(cfg, enc_lengths=[40, 23, 7], dec_lengths=[40, 31, 5])
    theirs, theirs_encoded = hf_logits(hf_model, enc, dec, enc_valid, dec_valid)
    ours, ours_encoded = our_logits(cfg, params, enc, dec)
    logit_diff = np.abs(ours - theirs)[dec_valid].max()
    encoder_diff = np.abs(ours_encoded - theirs_encoded)[enc_valid].max()
    print(f"{cfg.mlp_activations} max |logit diff| {logit_diff:.2e}, max |encoder diff| {encoder_diff:.2e}, "
          f"max |logit| {np.abs(theirs[dec_valid]).max():.2f}")
    assert logit_diff <= TOL
    assert encoder_diff <= TOL


def test_v1_1_logits_come_from_untied_lm_head_without_scaling():
    hf_model, params = make_hf_t5(V11, seed=5)
    embedding = params["token_embedder"]["embedding"]
    assert not np.allclose(params["decoder"]["logits_dense"]["kernel"], embedding.T)
    enc, dec, enc_valid, dec_valid = batch(V11, [12, 12], [9, 9], enc_len=12, dec_len=9, seed=1)
    theirs, _ = hf_logits(hf_model, enc, dec, enc_valid, dec_valid)
    ours, _ = our_logits(V11, params, enc, dec)
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


def test_jitted_forward_equals_pytorch_t5():
    """The jitted forward pass (what `load_model(...).logits` runs) agrees too."""
    hf_model, params = make_hf_t5(ORIGINAL, seed=7)
    enc, dec, enc_valid, dec_valid = batch(ORIGINAL, [16, 9], [11, 4], enc_len=16, dec_len=11, seed=2)
    theirs, _ = hf_logits(hf_model, enc, dec, enc_valid, dec_valid)
    model = Transformer(ORIGINAL)
    ours = np.asarray(jax.jit(lambda p, e, d: model.apply({"params": p}, e, d))(params, enc, dec))
    assert np.abs(ours - theirs)[dec_valid].max() <= TOL
