"""Stored teacher outputs equal a direct greedy decode and the teacher's own logits."""
import numpy as np

from doa_jax import decoding
from doa_jax.distill import outputs as teacher_outputs
from doa_jax.distill import store as teacher_store
from doa_jax.api import init_params
from doa_jax.data.encode import shift_right
from doa_jax.model import Transformer, config_for_size

CFG = config_for_size("tiny", dtype="float32", vocab_size=40, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32)
ENC = np.array([[5, 9, 13, 22, 1], [7, 3, 1, 0, 0], [30, 31, 32, 1, 0]] * 3, np.int32)  # 9 rows


def test_store_built_from_a_teacher_equals_direct_greedy_decoding_and_scoring(tmp_path):
    module, params = Transformer(CFG), init_params(CFG, seed=3)
    predict = teacher_outputs.make_predict_fn(module, params, max_decode_len=6, topk=CFG.vocab_size, batch_size=4)
    store = teacher_store.TeacherStore(tmp_path, "k")
    store.build([f"s{i}" for i in range(len(ENC))], ENC, predict, lambda t: " ".join(map(str, t)), chunk_size=5)
    out = store.load()

    direct = decoding.greedy(module, params, ENC, 6)
    np.testing.assert_array_equal(out.tokens, np.asarray(direct.tokens))
    np.testing.assert_allclose(out.sequence_logprob, np.asarray(direct.log_probs), atol=1e-4)

    # With k = vocab, the stored values are the teacher's logits at every real output position.
    logits = module.apply({"params": params}, ENC, shift_right(out.tokens))
    valid = np.asarray(teacher_outputs._valid_positions(out.tokens)) > 0
    full = np.take_along_axis(np.asarray(logits), out.topk_ids, axis=-1)
    np.testing.assert_allclose(out.topk_values[valid], full[valid], atol=1e-5)
    assert np.all(np.diff(out.topk_values[valid], axis=-1) <= 0)  # sorted, best first
