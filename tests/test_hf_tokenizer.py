"""HF exports carry the vocabulary as a tokenizer that `transformers.AutoTokenizer` loads.

The model: T5X's tiny fixture params with the embedding and logits padded to 256 rows, the size the
46-piece fixture vocabulary needs with T5's 100 extra ids (146 ids, padded to a multiple of 128).
"""
import json

import numpy as np
import pytest
import transformers

import doa_jax
from doa_jax.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from doa_jax.cli import main
from doa_jax.data.vocab import load_vocab

TEXTS = ["reverse: one two three", "red blue green", "sun moon hot cold"]


@pytest.fixture(scope="module")
def vocab_path(t5x_fixtures):
    return t5x_fixtures / "train_run" / "tiny_spm.model"


@pytest.fixture(scope="module")
def native_256(t5x_fixtures, tmp_path_factory):
    config, params = load_checkpoint(t5x_fixtures / "legacy" / "checkpoint_0")
    pad = ((0, 256 - config.vocab_size), (0, 0))
    params["token_embedder"]["embedding"] = np.pad(params["token_embedder"]["embedding"], pad)
    params["decoder"]["logits_dense"]["kernel"] = np.pad(params["decoder"]["logits_dense"]["kernel"], pad[::-1])
    path = tmp_path_factory.mktemp("tok") / "native"
    save_checkpoint(path, config.replace(vocab_size=256), params)
    return path


def assert_same_ids(tokenizer, vocab_path):
    vocab = load_vocab(vocab_path)
    for text in TEXTS:
        assert tokenizer(text).input_ids == vocab.encode(text) + [1], text
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == vocab.vocab_size - 1 == 145


def test_convert_with_vocab_writes_a_tokenizer_autotokenizer_loads(native_256, vocab_path, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["convert", str(native_256), str(out), "--to", "hf", "--vocab", str(vocab_path)]) == 0
    assert f"tokenizer: {vocab_path} (transformers.AutoTokenizer loads it)" in capsys.readouterr().out
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "T5Tokenizer"
    assert_same_ids(transformers.AutoTokenizer.from_pretrained(out), vocab_path)


def test_hf_source_passes_its_tokenizer_on(native_256, vocab_path, tmp_path, capsys):
    doa_jax.load_model(native_256).save(tmp_path / "first", format="hf", vocab=vocab_path)
    assert main(["convert", str(tmp_path / "first"), str(tmp_path / "second"), "--to", "hf"]) == 0
    assert f"tokenizer: {tmp_path / 'first' / 'spiece.model'}" in capsys.readouterr().out
    assert_same_ids(transformers.AutoTokenizer.from_pretrained(tmp_path / "second"), vocab_path)


def test_export_without_a_vocab_says_no_tokenizer_was_written(native_256, tmp_path, capsys):
    assert main(["convert", str(native_256), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "no tokenizer written: pass --vocab spiece.model" in capsys.readouterr().out
    assert not (tmp_path / "hf" / "spiece.model").exists()


def test_vocab_that_does_not_fit_the_model_is_refused_before_writing(t5x_fixtures, vocab_path, tmp_path):
    config, params = load_checkpoint(t5x_fixtures / "legacy" / "checkpoint_0")  # vocab_size 128 < 146 ids
    with pytest.raises(CheckpointError, match=r"cannot export the tokenizer: vocabulary .*tiny_spm.model has 146 "
                                              r"ids \(46 pieces \+ 100 extra ids\) but the model's vocab_size is 128"):
        save_checkpoint(tmp_path / "hf", config, params, format="hf", vocab=vocab_path)
    assert not (tmp_path / "hf").exists()
