"""Greedy and beam search give HF `generate`'s tokens and beam scores on the same random PyTorch T5.

Both variants (T5 v1.1 and original T5), unequal encoder/decoder depths, padded rows. Both copies
of the model are nudged toward EOS (the same weights in each) so that rows and beams finish at
different steps, which exercises EOS handling, length penalties and early stopping.
"""
import jax
import numpy as np
import pytest
import torch
import transformers

from doa_jax import decoding
from doa_jax.model import config_for_size
from decoding_helpers import eos_biased, valid
from torch_t5 import make_hf_t5

V11 = config_for_size("tiny", dtype="float32", vocab_size=96, emb_dim=32, num_heads=4, head_dim=8,
                      mlp_dim=64, num_encoder_layers=3, num_decoder_layers=2)
ORIGINAL = config_for_size("t5_small", dtype="float32", vocab_size=96, emb_dim=32, num_heads=4,
                           head_dim=8, mlp_dim=64, num_encoder_layers=2, num_decoder_layers=3)
MAX_LEN = 10


def padded_batch(cfg, lengths=(12, 5, 9, 3, 12, 7), width=12, seed=0):
    """Random rows padded with 0; v1.1 rows end with EOS (tied models: see `eos_biased`)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, cfg.vocab_size, (len(lengths), width))
    if not cfg.logits_via_embedding:
        tokens[np.arange(len(lengths)), np.array(lengths) - 1] = decoding.EOS_ID
    return np.where(np.arange(width)[None] < np.array(lengths)[:, None], tokens, 0).astype(np.int32)


@pytest.fixture(scope="module", params=[V11, ORIGINAL], ids=["t5_v1_1", "t5_original"])
def models(request):
    """(config, HF model, our params, encoder tokens): identical weights, nudged toward EOS."""
    cfg = request.param
    hf_model, params = make_hf_t5(cfg, seed=5)
    enc = padded_batch(cfg)
    params = eos_biased(cfg, params, enc, MAX_LEN)
    with torch.no_grad():
        if cfg.logits_via_embedding:  # lm_head is tied to `shared`
            hf_model.shared.weight[decoding.EOS_ID] = torch.from_numpy(
                params["token_embedder"]["embedding"][decoding.EOS_ID])
        else:
            hf_model.lm_head.weight[decoding.EOS_ID] = torch.from_numpy(
                params["decoder"]["logits_dense"]["kernel"][:, decoding.EOS_ID])
    return cfg, hf_model, params, enc


def hf_generate(hf_model, enc, **kwargs):
    # An explicit cache: the default one is sized from the *encoder* depth (transformers 5.24), so
    # `generate` fails with IndexError when the decoder has more layers than the encoder.
    cache = transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor(enc, dtype=torch.long), cache=cache,
                                attention_mask=torch.tensor(enc > 0, dtype=torch.long), do_sample=False,
                                max_new_tokens=MAX_LEN, min_length=0, output_scores=True,
                                return_dict_in_generate=True, **kwargs)
    seqs = out.sequences.numpy()
    assert (seqs[:, 0] == 0).all()  # decoder start token, which our outputs omit
    seqs = np.pad(seqs[:, 1:], ((0, 0), (0, MAX_LEN + 1 - seqs.shape[1])))
    # HF beam search fills after EOS with `pad_token_id or eos_token_id`, i.e. EOS when pad is 0.
    return np.where(valid(seqs), seqs, 0), out


def test_greedy_tokens_equal_hf_generate(models):
    cfg, hf_model, params, enc = models
    theirs, _ = hf_generate(hf_model, enc, num_beams=1)
    ours = decoding.greedy(cfg, params, enc, MAX_LEN)
    lengths = np.asarray(ours.lengths)
    assert len(set(lengths.tolist())) >= 3 and lengths.min() < MAX_LEN, lengths  # EOS at different steps
    np.testing.assert_array_equal(np.asarray(ours.tokens), theirs)


# early_stopping changes the outputs of these models at length_penalty 1.0 and 2.0.
@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (1.0, True), (1.0, "never"),
                                                           (2.0, True), (2.0, "never"), (0.5, False),
                                                           (-1.0, False)])
def test_four_beam_tokens_and_scores_equal_hf_generate(models, length_penalty, early_stopping):
    cfg, hf_model, params, enc = models
    theirs, out = hf_generate(hf_model, enc, num_beams=4, num_return_sequences=2,
                              length_penalty=length_penalty, early_stopping=early_stopping)
    ours = decoding.beam_search(cfg, params, enc, MAX_LEN, num_beams=4, num_return_sequences=2,
                                length_penalty=length_penalty, early_stopping=early_stopping)
    tokens = np.asarray(ours.all_tokens).reshape(-1, MAX_LEN)  # HF: [B * R, T], beams of a row together
    np.testing.assert_array_equal(tokens, theirs)
    score_diff = np.abs(np.asarray(ours.all_scores).reshape(-1) - out.sequences_scores.numpy()).max()
    print(f"{cfg.mlp_activations} lp={length_penalty} early_stopping={early_stopping}: "
          f"max |beam score diff| {score_diff:.2e}")
    assert score_diff <= 1e-4
    assert (np.asarray(ours.all_tokens[:, 0]) == decoding.EOS_ID).any()  # some beams ended with EOS


def test_one_beam_equals_hf_greedy(models):
    cfg, hf_model, params, enc = models
    theirs, _ = hf_generate(hf_model, enc, num_beams=1)
    ours = decoding.generate(cfg, params, enc, MAX_LEN, num_beams=1)
    np.testing.assert_array_equal(np.asarray(ours.tokens), theirs)
    assert jax.tree_util.tree_leaves(ours)  # a DecodeResult
