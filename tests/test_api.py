"""The public API: load_model from a size name or any checkpoint; numpy logits and generate."""
import numpy as np
import pytest

import doa_jax
from doa_jax import decoding

ENC = np.array([[5, 17, 42, 9, 1], [8, 64, 1, 0, 0]])
DEC = np.array([[0, 12, 33], [0, 45, 2]])


@pytest.fixture(scope="module")
def tiny():
    return doa_jax.load_model("tiny", seed=1, vocab_size=128)


def test_size_name_gives_a_float32_numpy_model(tiny):
    logits = tiny.logits(ENC, DEC)
    assert isinstance(logits, np.ndarray) and logits.dtype == np.float32 and logits.shape == (2, 3, 128)
    assert tiny.config.dtype == "float32" and tiny.config.emb_dim == 8


def test_generate_returns_ids_without_the_start_token_and_equals_greedy(tiny):
    out = tiny.generate(ENC, max_decode_len=5)
    assert out.shape == (2, 5) and out.dtype.kind == "i"
    np.testing.assert_array_equal(out, np.asarray(decoding.greedy(tiny.module, tiny.params, ENC, 5).tokens))


def test_generate_with_beams_matches_the_decoding_module(tiny):
    out = tiny.generate(ENC, max_decode_len=5, num_beams=3)
    expected = decoding.beam_search(tiny.module, tiny.params, ENC, 5, num_beams=3)
    np.testing.assert_array_equal(out, np.asarray(expected.tokens))


@pytest.mark.parametrize("fmt", ["native", "hf", "t5x", "t5x_legacy"])
def test_a_saved_model_loads_back_with_identical_logits(tiny, tmp_path, fmt):
    path = tiny.save(tmp_path / fmt, format=fmt)
    if fmt.startswith("t5x"):
        assert path == str(tmp_path / fmt / "checkpoint_0")  # T5X reads the step from the name
    again = doa_jax.load_model(path)
    assert again.config == tiny.config
    np.testing.assert_array_equal(again.logits(ENC, DEC), tiny.logits(ENC, DEC))


def test_t5x_checkpoint_loads_through_the_api(t5x_fixtures):
    golden = np.load(t5x_fixtures / "golden.npz")
    model = doa_jax.load_model(t5x_fixtures / "legacy" / "checkpoint_0")
    logits = model.logits(golden["encoder_input_tokens"], golden["decoder_input_tokens"])
    real = golden["decoder_loss_weights"] > 0
    np.testing.assert_allclose(logits[real], golden["logits"][real], atol=1e-5)
    np.testing.assert_array_equal(model.generate(golden["encoder_input_tokens"], 6), golden["greedy_tokens"])


def test_unknown_name_or_missing_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither an existing checkpoint path nor a model size name") as e:
        doa_jax.load_model("/no/such/dir")
    assert "huggingface-cli" not in str(e.value)  # a path, not a Hub id


@pytest.mark.parametrize("name", ["t5-base", "google/t5-v1_1-small", "google/flan-t5-base", "t5-v1_1-small"])
def test_hub_ids_are_an_error_saying_how_to_get_the_checkpoint(name):
    """Hub ids once parsed as size names and silently gave random weights."""
    with pytest.raises(FileNotFoundError) as e:
        doa_jax.load_model(name)
    message = str(e.value)
    assert message.startswith(f"{name!r} is neither an existing checkpoint path nor a model size name. "
                              "doa-jax loads only local files and never downloads")
    assert f"run `huggingface-cli download {name} --local-dir DIR` and pass DIR" in message
    assert "Random weights need an explicit size name: base, large, small, t5_1_1_base" in message


def test_random_init_is_announced_on_stderr(tiny, capsys):
    model = doa_jax.load_model("tiny", seed=1, vocab_size=128)
    assert "doa-jax: 'tiny' is a size name: RANDOM weights (seed 1), not a pretrained checkpoint" \
        in capsys.readouterr().err
    np.testing.assert_array_equal(model.params["token_embedder"]["embedding"],
                                  tiny.params["token_embedder"]["embedding"])


def test_bad_token_arrays_are_rejected_with_their_name(tiny):
    with pytest.raises(ValueError, match="decoder_input_tokens has token id 500 >= vocab_size 128"):
        tiny.logits(ENC, np.array([[0, 500, 1], [0, 1, 1]]))
    with pytest.raises(ValueError, match="encoder_input_tokens must be a \\[batch, length\\] array of int"):
        tiny.generate(np.ones((2, 3), np.float32), 4)
