"""`doa predict`: a teacher checkpoint's outputs stored, resumed, reused; T5X infer as pseudo-labels."""
import json

import numpy as np
import pytest

import doa_jax
from doa_jax import cli, decoding
from doa_jax.distill import store as teacher_store
from doa_jax.data.encode import encode_texts
from doa_jax.data.vocab import load_vocab
import xla_env


@pytest.mark.slow
def test_predict_writes_a_store_equal_to_greedy_decoding_and_reuses_it(tmp_path, capsys, t5x_fixtures):
    vocab_path = t5x_fixtures / "train_run" / "tiny_spm.model"  # 46 pieces + 100 extra ids, padded to 256
    teacher = doa_jax.load_model("tiny", seed=2, vocab_size=256)
    ckpt = teacher.save(tmp_path / "teacher")
    inputs = tmp_path / "inputs.jsonl"
    sources = [f"reverse: {w}" for w in ("one two", "red blue green", "dog", "sun moon hot cold", "fish")]
    inputs.write_text("".join(json.dumps({"source": s}) + "\n" for s in sources))
    argv = ["predict", "--checkpoint", ckpt, "--vocab", str(vocab_path), "--inputs", str(inputs),
            "--out", str(tmp_path / "stores"), "--max-decode-len", "6", "--inputs-length", "12",
            "--batch-size", "8", "--chunk-size", "2", "--dtype", "float32", "--topk", "4"]
    assert cli.main(argv) == 0
    assert "computed 3 chunk(s), reused 0" in capsys.readouterr().out
    assert cli.main(argv) == 0
    assert "computed 0 chunk(s), reused 3" in capsys.readouterr().out

    [store_dir] = list((tmp_path / "stores").iterdir())
    out = teacher_store.TeacherStore(tmp_path / "stores", store_dir.name).load()
    vocab = load_vocab(str(vocab_path))
    enc = encode_texts(vocab, sources, 12)
    np.testing.assert_array_equal(out.tokens, np.asarray(decoding.greedy(teacher.config, teacher.params, enc, 6).tokens))
    assert out.sources == sources and out.topk_ids.shape == (5, 6, 4)


def test_t5x_infer_output_becomes_pseudo_labels(tmp_path, t5x_fixtures, capsys):
    out = tmp_path / "pseudo.jsonl"
    assert cli.main(["predict", "--t5x-infer", str(t5x_fixtures / "infer_example_with_aux.jsonl"),
                     "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and rows[0]["source"] == "reverse: run big five four" and "score" in rows[0]
    assert "sources are T5X's inputs as given, any task prefix kept" in capsys.readouterr().out


def t5x_infer_file(path, inputs):
    """T5X `infer` output in predict_with_aux mode, for `inputs` as the SeqIO task fed them."""
    path.write_text("".join(json.dumps({"inputs": {"inputs_pretokenized": text, "targets_pretokenized": ""},
                                        "prediction": f"label {i}", "prediction_tokens": [5, 1],
                                        "aux": {"scores": -0.5 * i}}) + "\n" for i, text in enumerate(inputs)))
    return path


def test_t5x_infer_with_a_task_stores_raw_inputs(tmp_path, capsys):
    """WLP's card prefixes inputs with 'wlp: '; stored sources are raw, as every other data file."""
    infer = t5x_infer_file(tmp_path / "doa_wlp_inputs-predict_with_aux.jsonl-00000-of-00001",
                           ["wlp: Add 5 ml buffer.", "wlp: Spin at 4 C."])
    out = tmp_path / "pseudo.jsonl"
    assert cli.main(["predict", "--t5x-infer", str(infer), "--task", "wlp", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"source": "Add 5 ml buffer.", "target": "label 0", "score": 0.0},
                    {"source": "Spin at 4 C.", "target": "label 1", "score": -0.5}]
    assert "sources are raw inputs, task wlp's prefix 'wlp: ' removed" in capsys.readouterr().out


def test_t5x_infer_of_another_task_is_an_error_naming_the_line(tmp_path, capsys):
    infer = t5x_infer_file(tmp_path / "infer.jsonl", ["wlp: Add buffer.", "fever: The sky is green."])
    assert cli.main(["predict", "--t5x-infer", str(infer), "--task", "wlp", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == (f"doa predict: error: {infer}:2: input 'fever: The sky is green.' does not start with "
                   f"the task's prefix 'wlp: ': T5X output of a different task?\n")
    assert not (tmp_path / "o").exists()


def test_t5x_infer_file_named_for_another_task_is_an_error(tmp_path, capsys):
    infer = t5x_infer_file(tmp_path / "doa_fever_inputs-predict.jsonl-00000-of-00001", ["wlp: Add buffer."])
    assert cli.main(["predict", "--t5x-infer", str(infer), "--task", "wlp", "--out", str(tmp_path / "o")]) == 2
    assert f"{infer} is T5X output of task doa_fever, not of --task wlp" in capsys.readouterr().err


def test_predict_without_a_teacher_is_a_clear_error(capsys, tmp_path):
    assert cli.main(["predict", "--task", "wlp", "--out", str(tmp_path)]) == 2
    assert "--checkpoint and --vocab are required" in capsys.readouterr().err


@pytest.mark.slow
def test_a_predict_killed_mid_run_resumes_without_recomputing_finished_chunks(tmp_path, capsys, t5x_fixtures):
    import os
    import signal
    import subprocess
    import sys
    import time

    vocab_path = t5x_fixtures / "train_run" / "tiny_spm.model"
    ckpt = doa_jax.load_model("tiny", seed=3, vocab_size=256).save(tmp_path / "teacher")
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"source": f"reverse: {i} one two"}) + "\n" for i in range(400)))
    argv = ["predict", "--checkpoint", ckpt, "--vocab", str(vocab_path), "--inputs", str(inputs),
            "--out", str(tmp_path / "stores"), "--max-decode-len", "8", "--inputs-length", "12",
            "--batch-size", "8", "--chunk-size", "2", "--dtype", "float32"]
    env = {**os.environ, "XLA_FLAGS": xla_env.flags(1)}
    child = subprocess.Popen([sys.executable, "-m", "doa_jax", *argv], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(tmp_path.glob("stores/*/*.COMPLETED"))) < 2:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = len(list(tmp_path.glob("stores/*/*.COMPLETED")))
    assert 2 <= finished < 200, "the kill should land part-way through the 200 chunks"
    assert cli.main(argv) == 0
    assert f"computed {200 - finished} chunk(s), reused {finished}" in capsys.readouterr().out
