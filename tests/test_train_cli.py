"""`doa train --gin_file ... --gin.MACRO=value`: a smoke run and one clear error per bad input."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp

from doa_jax import cli
from doa_jax.checkpoints import load_checkpoint, save_checkpoint
from doa_jax.model import Transformer, config_for_size

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
    assert config == config_for_size("tiny", dtype="float32")


def test_missing_required_macro(tmp_path, capsys):
    argv = ["train", "--gin_file", "models/t5_1_1_tiny.gin", "--gin_file", "runs/finetune.gin",
            f"--gin.MODEL_DIR={tmp_path}", "--gin.BATCH_SIZE=8"]
    assert cli.main(argv) == 2
    line = _error_line(capsys)
    assert line.startswith("doa train: error: gin macros not set: TASK (required by gin/runs/finetune.gin:")
    assert "BATCH_SIZE" not in line and "--gin.TASK=VALUE" in line


def test_missing_model_size_file(tmp_path, capsys):
    assert cli.main(["train", "--gin_file", "runs/smoke.gin", f"--gin.MODEL_DIR={tmp_path}"]) == 2
    assert "MODEL_CONFIG is not set: add a model-size gin file" in _error_line(capsys)


def test_batch_not_divisible_by_the_data_axis(tmp_path, capsys):
    assert cli.main(SMOKE + [f"--gin.MODEL_DIR={tmp_path}", "--gin.BATCH_SIZE=12"]) == 2
    assert "batch size 12 is not divisible by the mesh's data axis (8)" in _error_line(capsys)
    assert not (tmp_path / "checkpoints").exists()


def test_initial_checkpoint_of_another_size(tmp_path, capsys):
    other = config_for_size("tiny", vocab_size=64, dtype="float32")
    tokens = jnp.ones((1, 4), jnp.int32)
    params = nn.meta.unbox(Transformer(other).init(jax.random.PRNGKey(0), tokens, tokens))["params"]
    save_checkpoint(tmp_path / "other", other, jax.device_get(params))
    argv = SMOKE + [f"--gin.MODEL_DIR={tmp_path / 'run'}", f"--gin.INITIAL_CHECKPOINT_PATH={tmp_path / 'other'}"]
    assert cli.main(argv) == 2
    line = _error_line(capsys)
    assert f"initial checkpoint {tmp_path / 'other'} does not fit the model" in line
    assert "token_embedder/embedding expected (32128, 8) found (64, 8)" in line


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
