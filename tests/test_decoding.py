"""Decoding with the KV cache: T5X's golden decodes, internal consistency, sampling, meshes.

Parity with HF `generate` lives in tests/test_decoding_hf.py.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doa_jax import decoding, flops, partitioning
from doa_jax.decoding import beam
from doa_jax.model import T5Config, Transformer, config_for_size
from doa_jax.model import scan as scan_convert
from decoding_helpers import eos_biased, init_params, teacher_forced, valid

# The T5X fixture's tiny T5.1.1 (see ../shared/fixtures/t5x_tiny/README.md).
T5X_TINY = T5Config(vocab_size=128, emb_dim=16, num_heads=4, head_dim=8, mlp_dim=32, num_encoder_layers=2,
                    num_decoder_layers=2, dtype="float32")
# Ours: unequal depths, vocab big enough for rows to differ.
CFG = config_for_size("tiny", dtype="float32", vocab_size=64, emb_dim=32, num_heads=4, head_dim=16,
                      mlp_dim=64, num_encoder_layers=2, num_decoder_layers=3)
_ROWS = np.array([[5, 9, 13, 40, 22, 1], [7, 30, 1, 0, 0, 0], [11, 12, 50, 60, 1, 0], [3, 1, 0, 0, 0, 0]])
ENC = np.concatenate([_ROWS, _ROWS[::-1] + 2 * (_ROWS[::-1] > 0)]).astype(np.int32)  # 8 rows, padded


def tree_from_flat(npz, prefix):
    """`{'a/b/c': x}` (keys under `prefix`) -> nested dict."""
    tree = {}
    for key in npz.files:
        if key.startswith(prefix):
            *parents, leaf = key[len(prefix):].split("/")
            node = tree
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = npz[key]
    return tree


@pytest.fixture(scope="module")
def biased():
    """CFG's params nudged toward EOS: rows end at different steps."""
    return eos_biased(CFG, init_params(CFG), ENC, 12)


# ---------------------------------------------------------------------------------- T5X goldens


@pytest.mark.parametrize("key,length", [("greedy_tokens", 6), ("greedy_tokens_len16", 16)])
def test_greedy_reproduces_t5x_golden_tokens(t5x_fixtures, key, length):
    golden = np.load(t5x_fixtures / "golden.npz")
    params = tree_from_flat(golden, "params/")
    result = decoding.greedy(T5X_TINY, params, golden["encoder_input_tokens"], length)
    np.testing.assert_array_equal(np.asarray(result.tokens), golden[key])


def test_t5x_one_beam_reproduces_golden_tokens_and_scores(t5x_fixtures):
    golden = np.load(t5x_fixtures / "golden.npz")
    params = tree_from_flat(golden, "params/")
    result = decoding.beam_search(T5X_TINY, params, golden["encoder_input_tokens"], 6, num_beams=1,
                                  length_penalty=0.6, convention="t5x")
    np.testing.assert_array_equal(np.asarray(result.tokens), golden["beam1_tokens"])
    # No beam finished within 6 tokens: T5X returns the live beam's raw summed log-prob.
    np.testing.assert_allclose(np.asarray(result.scores), golden["beam1_scores"], rtol=1e-5)


def test_t5x_beam_search_reproduces_t5x_infer_with_brevity_penalty(t5x_fixtures):
    """`t5x.infer` on the trained checkpoint: every row ends with EOS, scores = logp / ((5+len)/6)^0.6."""
    sentencepiece = pytest.importorskip("sentencepiece")
    run = t5x_fixtures / "train_run"
    params = tree_from_flat(np.load(run / "expected_state.npz"), "target/")
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(run / "tiny_spm.model"))
    rows = [json.loads(line) for line in (t5x_fixtures / "infer_example_with_aux.jsonl").read_text().splitlines()]
    enc = np.zeros((len(rows), 16), np.int32)
    for i, row in enumerate(rows):
        ids = vocab.EncodeAsIds(row["inputs"]["inputs_pretokenized"]) + [decoding.EOS_ID]
        enc[i, :len(ids)] = ids
    result = decoding.beam_search(T5X_TINY, params, enc, 16, num_beams=1, length_penalty=0.6,
                                  convention="t5x")
    expected = np.zeros((len(rows), 16), np.int32)
    for i, row in enumerate(rows):
        expected[i, :len(row["prediction_tokens"])] = row["prediction_tokens"]
    np.testing.assert_array_equal(np.asarray(result.tokens), expected)
    np.testing.assert_allclose(np.asarray(result.scores), [r["aux"]["scores"] for r in rows], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(result.lengths), [len(r["prediction_tokens"]) for r in rows])


# ------------------------------------------------------------------------- internal consistency


def test_cached_decode_step_logits_equal_teacher_forced_logits():
    params = init_params(CFG)
    model = Transformer(CFG)
    dec = np.array([[0, 17, 3, 44, 9, 1, 0], [0, 8, 8, 21, 60, 2, 35]], np.int32)
    enc = ENC[:2]
    full = model.apply({"params": params}, enc, dec)
    encoded = model.apply({"params": params}, enc, method=model.encode)
    cache = model.apply({"params": params}, encoded, dec.shape[1], method=model.init_cache)
    step = jax.jit(lambda p, tok, cache, t: model.apply({"params": p}, tok, cache, t, enc,
                                                        method=model.decode_step))
    for t in range(dec.shape[1]):
        logits, cache = step(params, dec[:, t], cache, jnp.int32(t))
        np.testing.assert_allclose(logits, full[:, t], atol=1e-5, err_msg=f"position {t}")


def test_greedy_tokens_and_log_probs_agree_with_the_full_forward_pass(biased):
    result = decoding.greedy(CFG, biased, ENC, 12)
    tokens = np.asarray(result.tokens)
    token_logp, logits, _ = teacher_forced(CFG, biased, ENC, tokens)
    mask = valid(tokens)
    np.testing.assert_array_equal(np.where(mask, np.argmax(logits, -1), 0), tokens)
    np.testing.assert_allclose(np.asarray(result.log_probs), (token_logp * mask).sum(1), atol=1e-5)


def test_rows_that_finish_early_are_padded_with_zeros(biased):
    result = decoding.greedy(CFG, biased, ENC, 12)
    tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    assert len(set(lengths.tolist())) >= 3, lengths  # rows end at different steps
    for row, n in zip(tokens, lengths):
        assert decoding.EOS_ID not in row[:n - 1] and not row[n:].any()
        assert row[n - 1] == decoding.EOS_ID or n == 12


def test_the_loop_stops_once_every_row_has_ended(biased):
    lengths = np.asarray(decoding.greedy(CFG, biased, ENC, 12).lengths)
    ended = ENC[lengths < 12]
    result = decoding.greedy(CFG, biased, ended, 12)
    assert int(result.steps) == lengths[lengths < 12].max() < 12


def test_one_beam_hf_beam_search_equals_greedy(biased):
    greedy = decoding.greedy(CFG, biased, ENC, 12)
    beam = decoding.beam_search(CFG, biased, ENC, 12, num_beams=1, length_penalty=1.0)
    np.testing.assert_array_equal(np.asarray(beam.tokens), np.asarray(greedy.tokens))
    np.testing.assert_allclose(np.asarray(beam.log_probs), np.asarray(greedy.log_probs), atol=1e-6)
    np.testing.assert_allclose(np.asarray(beam.scores), np.asarray(greedy.log_probs) / np.asarray(greedy.lengths),
                               rtol=1e-6)


@pytest.mark.parametrize("convention,penalty", [("hf", lambda n: n ** 0.8),
                                                ("t5x", lambda n: ((5 + n) / 6) ** 0.8)])
def test_beam_scores_are_teacher_forced_log_probs_over_the_length_penalty(biased, convention, penalty):
    result = decoding.beam_search(CFG, biased, ENC, 8, num_beams=3, num_return_sequences=3,
                                  length_penalty=0.8, convention=convention)
    for r in range(3):
        tokens = np.asarray(result.all_tokens[:, r])
        token_logp, _, _ = teacher_forced(CFG, biased, ENC, tokens)
        logp = (token_logp * valid(tokens)).sum(1)
        np.testing.assert_allclose(np.asarray(result.all_log_probs[:, r]), logp, atol=1e-5)
        finished = (tokens == decoding.EOS_ID).any(1) | (convention == "hf")
        expected = np.where(finished, logp / penalty(valid(tokens).sum(1)), logp)
        np.testing.assert_allclose(np.asarray(result.all_scores[:, r]), expected, rtol=1e-5)
    assert (np.diff(np.asarray(result.all_scores), axis=1) <= 0).all()  # best first


def test_another_length_penalty_reuses_the_compiled_beam_search(biased):
    # The penalty's divisors are an argument of the program: sweeping it compiles nothing new.
    first = decoding.beam_search(CFG, biased, ENC, 8, num_beams=3, length_penalty=0.8)
    compiled = beam._compiled_beam.cache_info().currsize
    second = decoding.beam_search(CFG, biased, ENC, 8, num_beams=3, length_penalty=1.7)
    assert beam._compiled_beam.cache_info().currsize == compiled
    lengths = np.asarray(second.lengths)
    np.testing.assert_allclose(np.asarray(second.scores), np.asarray(second.log_probs) / lengths ** 1.7, rtol=1e-5)
    assert not np.array_equal(np.asarray(first.scores), np.asarray(second.scores))


def test_decoding_params_cast_once_gives_bit_identical_bfloat16_logits():
    cfg = CFG.replace(dtype="bfloat16")
    params = init_params(cfg)
    cast = decoding.decoding_params(params, cfg)
    assert cast["decoder"]["layers_0"]["mlp"]["wo"]["kernel"].dtype == jnp.bfloat16
    assert cast["decoder"]["logits_dense"]["kernel"].dtype == jnp.float32
    dec = np.array([[0, 17, 3, 44, 9, 1]] * len(ENC), np.int32)
    model = Transformer(cfg)
    np.testing.assert_array_equal(model.apply({"params": cast}, ENC, dec), model.apply({"params": params}, ENC, dec))


def test_tied_embedding_stays_float32_when_cast_for_decoding():
    cfg = config_for_size("t5_small", dtype="bfloat16", vocab_size=64, emb_dim=16, num_heads=4, head_dim=8,
                          mlp_dim=32, num_encoder_layers=1, num_decoder_layers=1)
    cast = decoding.decoding_params(init_params(cfg), cfg)
    assert cast["token_embedder"]["embedding"].dtype == jnp.float32
    assert cast["encoder"]["layers_0"]["mlp"]["wi"]["kernel"].dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------- sampling


def test_sampling_with_top_k_one_is_greedy(biased):
    greedy = decoding.greedy(CFG, biased, ENC, 8)
    sampled = decoding.sample(CFG, biased, ENC, 8, rng=jax.random.PRNGKey(3), temperature=5.0, top_k=1)
    np.testing.assert_array_equal(np.asarray(sampled.tokens), np.asarray(greedy.tokens))


def test_sampling_with_a_tiny_nucleus_is_greedy(biased):
    greedy = decoding.greedy(CFG, biased, ENC, 8)
    sampled = decoding.sample(CFG, biased, ENC, 8, rng=jax.random.PRNGKey(3), temperature=2.0, top_p=1e-6)
    np.testing.assert_array_equal(np.asarray(sampled.tokens), np.asarray(greedy.tokens))


def test_samples_depend_on_the_key_only_and_stay_in_the_top_k():
    params = init_params(CFG)
    run = lambda seed: decoding.sample(CFG, params, ENC, 8, rng=jax.random.PRNGKey(seed), top_k=5)  # noqa
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    tokens = np.asarray(a.tokens)
    token_logp, logits, _ = teacher_forced(CFG, params, ENC, tokens)
    kth = np.sort(logits, axis=-1)[..., -5]
    chosen = np.take_along_axis(logits, tokens[..., None], -1)[..., 0]
    assert (chosen >= kth)[valid(tokens)].all()
    assert (chosen < logits.max(-1))[valid(tokens)].any()  # not just argmax
    np.testing.assert_allclose(np.asarray(a.log_probs), (token_logp * valid(tokens)).sum(1), atol=1e-5)


# ---------------------------------------------------------------------------- compile and errors


def test_second_call_with_the_same_shapes_does_not_recompile():
    params = init_params(CFG)
    decoding.greedy(CFG, params, ENC, 5)
    fn = decoding.greedy_program(CFG, 5)
    before = fn._cache_size()
    decoding.greedy(Transformer(CFG), params, ENC + 1, 5)
    assert fn._cache_size() == before == 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(convention="fairseq"), "unknown beam convention"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(early_stopping="sometimes"), "early_stopping"),
])
def test_bad_beam_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        decoding.beam_search(CFG, init_params(CFG), ENC, 4, **kwargs)


def test_bad_inputs_are_rejected():
    params = init_params(CFG)
    with pytest.raises(ValueError, match="encoder_input_tokens"):
        decoding.greedy(CFG, params, ENC[0], 4)
    with pytest.raises(ValueError, match="max_decode_len"):
        decoding.greedy(CFG, params, ENC, 0)
    with pytest.raises(ValueError, match="rng"):
        decoding.generate(CFG, params, ENC, 4, do_sample=True)


# ------------------------------------------------- cross-attention K/V recomputed at each step

RECOMPUTE = CFG.replace(decode_cross_kv="recompute")


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("method, kwargs", [
    ("greedy", {}), ("beam_search", {"num_beams": 3}), ("sample", {"rng": jax.random.PRNGKey(5), "top_k": 8})])
def test_recomputing_cross_kv_each_step_decodes_the_same_tokens_and_scores(biased, scan, method, kwargs):
    params = scan_convert.stack_layers(biased) if scan else biased
    cached, recomputed = (CFG.replace(scan_layers=scan), RECOMPUTE.replace(scan_layers=scan))
    a = getattr(decoding, method)(cached, params, ENC, 12, **kwargs)
    b = getattr(decoding, method)(recomputed, params, ENC, 12, **kwargs)
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
    np.testing.assert_allclose(np.asarray(b.scores), np.asarray(a.scores), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(b.lengths), np.asarray(a.lengths))
    assert len(set(np.asarray(a.lengths).ravel().tolist())) >= 3   # rows end at different steps


@pytest.mark.parametrize("mode, entries", [("cache", {"self_k", "self_v", "cross_k", "cross_v"}),
                                           ("recompute", {"self_k", "self_v", "encoded"})])
def test_the_cache_holds_cross_kv_or_the_encoder_output_and_its_bytes_are_what_flops_counts(mode, entries):
    cfg = CFG.replace(decode_cross_kv=mode, scan_layers=True, dtype="bfloat16")
    model, enc = Transformer(cfg), ENC[:, :5]
    params = model.init(jax.random.PRNGKey(0), enc, enc)["params"]
    encoded = model.apply({"params": params}, enc, method=model.encode)
    cache = model.apply({"params": params}, encoded, 7, method=model.init_cache)
    assert set(cache) == entries
    held = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    assert held == flops.decode_cache_bytes(cfg, batch=8, in_len=5, new_tokens=7)


def test_an_unknown_cross_kv_mode_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="decode_cross_kv must be one of cache, recompute, got 'keep'"):
        CFG.replace(decode_cross_kv="keep")


# ----------------------------------------------------------------------------------------- mesh


@pytest.mark.slow
@pytest.mark.parametrize("data,model_axis", [(2, 4), (8, 1)])
def test_decoding_with_sharded_params_under_a_mesh_matches_unsharded(biased, data, model_axis):
    params, enc = biased, ENC
    expected_greedy = decoding.greedy(CFG, params, enc, 8)
    expected_beam = decoding.beam_search(CFG, params, enc, 8, num_beams=4)

    mesh = partitioning.make_mesh(data=data, model=model_axis)
    rules = partitioning.logical_axis_rules()
    specs = partitioning.logical_param_specs(Transformer(CFG), enc[:, :1], enc[:, :1])
    sharded = jax.device_put(params, partitioning.param_shardings(mesh, rules, specs))
    assert sharded["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"].sharding.num_devices == 8
    with partitioning.mesh_context(mesh, rules):
        greedy = decoding.greedy(CFG, sharded, enc, 8)
        beam = decoding.beam_search(CFG, sharded, enc, 8, num_beams=4)
    np.testing.assert_array_equal(np.asarray(greedy.tokens), np.asarray(expected_greedy.tokens))
    np.testing.assert_array_equal(np.asarray(beam.tokens), np.asarray(expected_beam.tokens))
    np.testing.assert_allclose(np.asarray(beam.scores), np.asarray(expected_beam.scores), atol=1e-5)


def test_recomputing_cross_kv_under_a_model_parallel_mesh_matches_the_unsharded_cached_decode(biased):
    expected = decoding.beam_search(CFG, biased, ENC, 8, num_beams=2)
    mesh = partitioning.make_mesh(data=2, model=4)
    rules = partitioning.logical_axis_rules()
    specs = partitioning.logical_param_specs(Transformer(RECOMPUTE), ENC[:, :1], ENC[:, :1])
    sharded = jax.device_put(biased, partitioning.param_shardings(mesh, rules, specs))
    with partitioning.mesh_context(mesh, rules):
        got = decoding.beam_search(RECOMPUTE, sharded, ENC, 8, num_beams=2)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(expected.tokens))
    np.testing.assert_allclose(np.asarray(got.scores), np.asarray(expected.scores), atol=1e-5)
