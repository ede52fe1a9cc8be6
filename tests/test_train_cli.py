"""`doa train --gin_file ... --gin.MACRO=value`: a smoke run and one clear error per bad input."""
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from doa_jax import cli, configurables, gin_utils
from doa_jax.commands import train as train_command
from doa_jax.checkpoints import load_checkpoint, save_checkpoint
from doa_jax.data import vocab as vocab_lib
from doa_jax.model import Transformer, config_for_size

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = ["train", "--gin_file", "models/t5_1_1_tiny.gin", "--gin_file", "runs/smoke.gin"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_smoke_run_writes_checkpoints_metrics_config_and_events(tmp_path, capsys):
    assert cli.main(SMOKE + [f"--gin.MODEL_DIR={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "step 20/20 | loss " in out and " ex/s | " in out and " tok/s | " in out and "ETA 0:00:00" in out
    assert "| MFU" not in out     # the CPU's peak is only nominal (doa_jax/hardware.toml): no MFU claimed
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert {"step", "loss", "learning_rate", "examples_per_s", "tokens_per_s"} <= set(rows[0])
    assert "eval/loss" in rows[1] and "eval/token_accuracy" in rows[3]
    assert "TrainConfig.batch_size = %BATCH_SIZE" in (tmp_path / "config.gin").read_text()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    config, _ = load_checkpoint(tmp_path / "checkpoints")
    assert config == config_for_size("tiny", dtype="float32", vocab_size=128)   # the copy task's 32 ids, padded


def test_missing_required_macro(tmp_path, capsys):
    argv = ["train", "--gin_file", "models/t5_1_1_tiny.gin", "--gin_file", "runs/finetune.gin",
            f"--gin.MODEL_DIR={tmp_path}", "--gin.BATCH_SIZE=8"]
    assert cli.main(argv) == 2
    line = _error_line(capsys)
    assert line.startswith("doa train: error: gin macros not set: TASK (required by gin/runs/finetune.gin:")
    assert "BATCH_SIZE" not in line and "--gin.TASK=VALUE" in line


@pytest.mark.parametrize("command", ["train", "run", "sweep"])
def test_doa_train_run_and_sweep_refuse_incomplete_multihost_flags_before_reading_gin(command, capsys):
    assert cli.main([command, "--gin_file", "no_such_file.gin", "--num_processes", "2", "--process_id", "0"]) == 2
    assert _error_line(capsys) == (f"doa {command}: error: multi-host start needs coordinator_address, "
                                   "num_processes and process_id together (or auto-detection on a TPU VM / SLURM)")


def test_missing_model_size_file(tmp_path, capsys):
    assert cli.main(["train", "--gin_file", "runs/smoke.gin", f"--gin.MODEL_DIR={tmp_path}"]) == 2
    assert "MODEL_CONFIG is not set: add a model-size gin file" in _error_line(capsys)


def test_batch_not_divisible_by_the_data_axis(tmp_path, capsys):
    assert cli.main(SMOKE + [f"--gin.MODEL_DIR={tmp_path}", "--gin.BATCH_SIZE=12"]) == 2
    assert "batch size 12 is not divisible by the mesh's data axis (8)" in _error_line(capsys)
    assert not (tmp_path / "checkpoints").exists()


def _save_tiny(path, **overrides):
    config = config_for_size("tiny", dtype="float32", **overrides)
    tokens = jnp.ones((1, 4), jnp.int32)
    params = nn.meta.unbox(Transformer(config).init(jax.random.PRNGKey(0), tokens, tokens))["params"]
    save_checkpoint(path, config, jax.device_get(params))


def test_initial_checkpoint_of_another_size(tmp_path, capsys):
    _save_tiny(tmp_path / "other", vocab_size=128, emb_dim=16)
    argv = SMOKE + [f"--gin.MODEL_DIR={tmp_path / 'run'}", f"--gin.INITIAL_CHECKPOINT_PATH={tmp_path / 'other'}"]
    assert cli.main(argv) == 2
    line = _error_line(capsys)
    assert f"initial checkpoint {tmp_path / 'other'} does not fit the model" in line
    assert "token_embedder/embedding expected (128, 8) found (128, 16)" in line


def _smoke_model(tmp_path, *bindings):
    """The model config `doa train` would build for runs/smoke.gin (copy task: 32 ids), before compute."""
    configurables.register()
    gin_utils.parse(["models/t5_1_1_tiny.gin", "runs/smoke.gin"], [f"MODEL_DIR = '{tmp_path / 'run'}'", *bindings])
    return train_command.fit_vocab_size(gin_utils.macro("MODEL_CONFIG"), gin_utils.macro("TRAIN_DATA"),
                                        gin_utils.macro("TRAIN_CONFIG"))


def test_the_model_vocab_size_follows_the_checkpoint_it_starts_from(tmp_path):
    _save_tiny(tmp_path / "ckpt", vocab_size=64)     # 64 rows hold the copy task's 32 ids
    assert _smoke_model(tmp_path).vocab_size == 128
    assert _smoke_model(tmp_path, f"INITIAL_CHECKPOINT_PATH = '{tmp_path / 'ckpt'}'").vocab_size == 64


def test_a_checkpoint_whose_vocab_does_not_fit_the_data_is_an_error_naming_both(tmp_path, capsys):
    _save_tiny(tmp_path / "ckpt", vocab_size=256)    # T5-like rows for a 32-id task
    argv = SMOKE + [f"--gin.MODEL_DIR={tmp_path / 'run'}", f"--gin.INITIAL_CHECKPOINT_PATH={tmp_path / 'ckpt'}"]
    assert cli.main(argv) == 2
    assert _error_line(capsys) == (
        f"doa train: error: CopyTaskData has 32 ids but checkpoint {tmp_path / 'ckpt'} has 256 embedding rows "
        "(expected 32..128): use the vocabulary that checkpoint was trained with")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_model_vocab_size_overrides_the_vocabulary_in_doa_train(tmp_path):
    assert _smoke_model(tmp_path, "MODEL_VOCAB_SIZE = 64").vocab_size == 64     # not the 128 it would follow


def test_a_model_vocab_size_that_does_not_fit_names_the_knob_before_any_compute(tmp_path, capsys):
    assert cli.main(SMOKE + [f"--gin.MODEL_DIR={tmp_path}", "--gin.MODEL_VOCAB_SIZE=16"]) == 2
    assert _error_line(capsys) == (
        "doa train: error: CopyTaskData has 32 ids but MODEL_VOCAB_SIZE (the model's vocab_size) is 16; "
        "expected 32..128: set MODEL_VOCAB_SIZE = 128, or None to follow the vocabulary")
    assert not (tmp_path / "checkpoints").exists()


def test_a_progress_line_appears_between_logged_steps_every_log_seconds(tmp_path, capsys):
    argv = SMOKE + [f"--gin.MODEL_DIR={tmp_path}", "--gin.TRAIN_STEPS=6", "--gin.LOG_PERIOD=100",
                    "--gin.EVAL_DATA=None", "--gin.CHECKPOINT_PERIOD=100", "--gin.LOG_SECONDS=1e-6"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    # steps 1..5 each get a time-based line (the loss labelled with its unit); step 6 is the logged row
    for step in range(2, 6):
        assert f"step {step}/6 | loss " in out and "(sum over the batch's target tokens)" in out
    assert "| 1 step since the last line" in out
    assert "input pipeline: building CopyTaskData" in out and "input pipeline: ready in " in out
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [6]


def test_exploding_parameters_stop_with_one_line(tmp_path, capsys):
    argv = SMOKE + [f"--gin.MODEL_DIR={tmp_path}", "--gin.LEARNING_RATE=1e12", "--gin.CHECKPOINT_PERIOD=1"]
    assert cli.main(argv) == 2
    line = _error_line(capsys)
    assert "parameter norm grew past 100 x its initial" in line and "at step 1 " in line
    assert "no checkpoint had been saved yet" in line and not (tmp_path / "checkpoints" / "1").exists()


def test_a_misspelled_macro_is_an_error_with_a_did_you_mean(tmp_path, capsys):
    assert cli.main(SMOKE + [f"--gin.MODEL_DIR={tmp_path}", "--gin.TRAIN_STEPSS=5"]) == 2
    assert _error_line(capsys) == (
        "doa train: error: --gin.TRAIN_STEPSS: unknown gin macro TRAIN_STEPSS (no loaded gin file defines "
        "or uses it); did you mean TRAIN_STEPS or TRAIN_DATA?")
    assert not (tmp_path / "checkpoints").exists()


def test_a_value_of_the_wrong_type_is_one_line_naming_the_flag(tmp_path, capsys):
    assert cli.main(SMOKE + [f"--gin.MODEL_DIR={tmp_path}", "--gin.TRAIN_STEPS=5.5"]) == 2
    assert _error_line(capsys) == ("doa train: error: TrainConfig: train_steps must be int or None, got 5.5 "
                                   "(train_steps = %TRAIN_STEPS from --gin.TRAIN_STEPS)")


def test_a_value_of_the_wrong_type_in_a_gin_file_names_its_line(tmp_path, capsys):
    run = tmp_path / "run.gin"
    run.write_text("include 'runs/smoke.gin'\n\nBATCH_SIZE = 'eight'\n")
    assert cli.main(["train", "--gin_file", "models/t5_1_1_tiny.gin", "--gin_file", str(run),
                     f"--gin.MODEL_DIR={tmp_path}"]) == 2
    assert _error_line(capsys) == ("doa train: error: TrainConfig: batch_size must be int, got 'eight' "
                                   f"(batch_size = %BATCH_SIZE from {run}:3)")


def test_a_gin_syntax_error_is_one_line_with_file_and_line(tmp_path, capsys):
    run = tmp_path / "run.gin"
    run.write_text("include 'runs/smoke.gin'\nBATCH_SIZE = 8 8\n")
    assert cli.main(["train", "--gin_file", "models/t5_1_1_tiny.gin", "--gin_file", str(run),
                     f"--gin.MODEL_DIR={tmp_path}"]) == 2
    assert _error_line(capsys) == f"doa train: error: {run}:2: gin syntax error: Expected newline.: BATCH_SIZE = 8 8"


def test_an_unclosed_bracket_names_the_line_it_opens_on(tmp_path, capsys):
    run = tmp_path / "run.gin"
    run.write_text("include 'runs/smoke.gin'\nTASK_FEATURE_LENGTHS = {'inputs': 8,\n\n")
    assert cli.main(["train", "--gin_file", "models/t5_1_1_tiny.gin", "--gin_file", str(run),
                     f"--gin.MODEL_DIR={tmp_path}"]) == 2
    assert _error_line(capsys) == (f"doa train: error: {run}:2: gin syntax error: EOF in multi-line statement "
                                   "(a bracket left open)")


def test_a_syntax_error_in_a_flag_names_the_flag(tmp_path, capsys):
    assert cli.main(SMOKE + [f"--gin.MODEL_DIR={tmp_path}", "--gin_bindings", "BATCH_SIZE = 8 8"]) == 2
    assert _error_line(capsys) == ("doa train: error: --gin.BATCH_SIZE (BATCH_SIZE = 8 8): gin syntax error: "
                                   "Expected newline.")


def test_a_bad_value_in_an_included_file_names_that_file_and_line(tmp_path, capsys):
    base = tmp_path / "base.gin"
    base.write_text("include 'runs/smoke.gin'\nNUM_MICROBATCHES = 'two'\n")
    run = tmp_path / "run.gin"
    run.write_text(f"include '{base}'\n")
    assert cli.main(["train", "--gin_file", "models/t5_1_1_tiny.gin", "--gin_file", str(run),
                     f"--gin.MODEL_DIR={tmp_path}"]) == 2
    assert _error_line(capsys) == ("doa train: error: TrainConfig: num_microbatches must be int, got 'two' "
                                   f"(num_microbatches = %NUM_MICROBATCHES from {base}:2)")


TOY_CARD = """
name = "toycopy"
input_prefix = "copy: "
metric = "squad"
primary_metric = "f1"
annotation_cost_usd = 0.1
[lengths]
inputs = 12
targets = 8
[data]
files = { all = "toycopy.json" }
[pools]
carve_from = "all"
fractions = { test = 0.125, validation = 0.25, unlabeled = 0.125, train = 0.5 }
"""


def test_doa_train_fits_the_model_to_a_tasks_own_vocabulary_before_any_compute(tmp_path, monkeypatch):
    # A user's task and a vocabulary built on its text (not T5's spiece.model), no vocab_size binding:
    # the model doa train builds has the vocabulary's ids padded to 128 rows, not T5's 32128.
    words = ["red", "green", "blue", "cyan", "plum", "gold", "teal"]
    examples = [{"source": f"{words[i % 7]} {words[i % 5]}", "target": f"{words[i % 7]} {words[i % 5]}"}
                for i in range(64)]
    (tmp_path / "data" / "toycopy").mkdir(parents=True)
    (tmp_path / "data" / "toycopy" / "toycopy.json").write_text("".join(json.dumps(e) + "\n" for e in examples))
    (tmp_path / "toycopy.toml").write_text(TOY_CARD)
    monkeypatch.setenv("DOA_DATA_DIR", str(tmp_path / "data"))
    vocab = vocab_lib.Vocabulary(vocab_lib.build_vocab(["copy: " + e["source"] for e in examples],
                                                       tmp_path / "toy.model", vocab_size=30))
    configurables.register()
    gin_utils.parse(["models/t5_1_1_tiny.gin", "runs/finetune.gin"], [
        f"MODEL_DIR = '{tmp_path / 'run'}'", f"TASK = '{tmp_path / 'toycopy.toml'}'", f"VOCABULARY = '{vocab.path}'",
        "TASK_FEATURE_LENGTHS = None", "BATCH_SIZE = 8", "TRAIN_STEPS = 2", "EPOCHS = None",
        "INITIAL_CHECKPOINT_PATH = None"])
    model = train_command.fit_vocab_size(gin_utils.macro("MODEL_CONFIG"), gin_utils.macro("TRAIN_DATA"),
                                         gin_utils.macro("TRAIN_CONFIG"))
    assert vocab.vocab_size == 127 and model.vocab_size == 128


def test_seqios_uncached_function_dataset_warning_is_dropped_and_other_warnings_kept(caplog):
    import logging

    import doa_jax.data.pipeline  # noqa: F401  (installs the filter on absl's logger)

    absl = logging.getLogger("absl")
    with caplog.at_level(logging.WARNING):
        absl.warning("Using an uncached FunctionDataset for training is not recommended since ...")
        absl.warning("a real problem")
    assert [r.getMessage() for r in caplog.records] == ["a real problem"]


@pytest.mark.slow   # a fresh TensorFlow import: 10-20 s on 2 shared cores
def test_importing_the_tf_data_pipeline_prints_no_start_up_noise():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", "import doa_jax.data.pipeline"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == ""     # no oneDNN notice, no "cudart_stub ... cuda drivers"
