"""The fine-tuning loop: learning, microbatches, epochs, evaluation, best/last checkpoints, early
stopping, NaN handling, and starting from a pretrained checkpoint."""
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from doa_jax import losses
from doa_jax.checkpoints import load_checkpoint, save_checkpoint
from doa_jax.model import Transformer
from doa_jax.optimizers import OptimizerConfig
from doa_jax.data.batches import ArrayBatches
from doa_jax.checkpoints.steps import TrainCheckpoints
from doa_jax.trainer import CheckpointMismatchError, Trainer, token_sequence_accuracy
from train_helpers import (copy_arrays, eval_source, flat, metric_rows, run_config, tiny_config,
                           train_source)

ADAMW = OptimizerConfig(name="adamw", learning_rate=3e-3)


@pytest.mark.slow
def test_tiny_t5_learns_a_copy_task(tmp_path):
    cfg = tiny_config()
    trainer = Trainer(cfg, run_config(tmp_path, batch_size=32, train_steps=150, log_every=50, optimizer=ADAMW))
    result = trainer.fit(train_source(32))
    dev = trainer.evaluate(result.state.params, eval_source(32), decode_metrics=token_sequence_accuracy)
    assert dev["token_accuracy"] >= 0.95, dev
    assert dev["sequence_accuracy"] >= 80.0, dev   # greedy decodes copy whole inputs, not just tokens


def test_four_microbatches_of_eight_equal_one_batch_of_32(tmp_path):
    cfg = tiny_config()
    common = dict(batch_size=32, train_steps=3,
                  loss=losses.LossConfig(loss_normalizing_factor="NUM_REAL_TARGET_TOKENS"))
    runs = {}
    for m in (1, 4):
        result = Trainer(cfg, run_config(tmp_path / f"m{m}", num_microbatches=m, **common)).fit(train_source(32))
        runs[m] = ([r["loss"] for r in metric_rows(tmp_path / f"m{m}")], flat(result.state.params))
    np.testing.assert_allclose(runs[4][0], runs[1][0], rtol=1e-5)
    for name, value in runs[1][1].items():
        np.testing.assert_allclose(runs[4][1][name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_epochs_set_the_length_and_evaluation_runs_each_epoch(tmp_path):
    trainer = Trainer(tiny_config(), run_config(tmp_path, train_steps=None, epochs=2, eval_every="epoch",
                                                checkpoint_every="epoch", optimizer=ADAMW))
    result = trainer.fit(train_source(16), eval_source(16))   # 64 examples / 16 = 4 steps per epoch
    rows = metric_rows(tmp_path)
    assert result.step == 8
    assert [r["step"] for r in rows if "eval/loss" in r] == [4, 8]
    assert trainer.checkpoints.all_steps() == [4, 8]
    assert rows[-1]["eval/loss"] < rows[3]["eval/loss"]


def test_best_checkpoint_and_early_stopping(tmp_path):
    # Treat a *higher* dev loss as better: training lowers it, so the first evaluation stays best
    # and two more evaluations without improvement stop the run.
    cfg = run_config(tmp_path, train_steps=50, eval_every=2, eval_metric="loss", eval_mode="max",
                     early_stopping_patience=2, optimizer=ADAMW)
    result = Trainer(tiny_config(), cfg).fit(train_source(16), eval_source(16))
    assert result.stopped_early and result.step == 6
    assert result.best_step == 2
    best_config, best_params = load_checkpoint(tmp_path / "best")
    last_config, last_params = load_checkpoint(tmp_path / "checkpoints")
    assert best_config == last_config == tiny_config()
    assert not np.allclose(best_params["decoder"]["logits_dense"]["kernel"],
                           last_params["decoder"]["logits_dense"]["kernel"])
    np.testing.assert_array_equal(flat(last_params)["token_embedder/embedding"],
                                  flat(result.state.params)["token_embedder/embedding"])
    # Rerunning the same command after an early stop does not train on.
    again = Trainer(tiny_config(), cfg).fit(train_source(16), eval_source(16))
    assert again.stopped_early and again.step == 6 and max(r["step"] for r in metric_rows(tmp_path)) == 6


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    # A learning rate that jumps to 1e12 after step 4 makes the parameters blow up.
    blow_up = OptimizerConfig(name="adamw", learning_rate=1.0,
                              schedule=optax.piecewise_constant_schedule(1e-3, {4: 1e12}))
    cfg = run_config(tmp_path, train_steps=30, checkpoint_every=2, optimizer=blow_up, max_param_growth=None)
    result = Trainer(tiny_config(), cfg).fit(train_source(16))
    assert re.match(r"loss became non-finite .* at step (5|6) .* last good checkpoint is step 4 in .*checkpoints",
                    result.diverged)
    assert result.step in (5, 6)
    config, params = load_checkpoint(tmp_path / "checkpoints")
    assert all(np.all(np.isfinite(v)) for v in flat(params).values())
    assert [r["step"] for r in metric_rows(tmp_path)] == [1, 2, 3, 4, 5][: len(metric_rows(tmp_path))]


def test_exploding_parameters_stop_the_run_as_diverged(tmp_path):
    # lr 1e12 from step 5 multiplies the parameter norm by ~1e9 at once, yet stays finite (adam's
    # update is bounded by the learning rate).
    blow_up = OptimizerConfig(name="adamw", learning_rate=1.0,
                              schedule=optax.piecewise_constant_schedule(1e-3, {4: 1e12}))
    cfg = run_config(tmp_path, train_steps=30, checkpoint_every=2, optimizer=blow_up, max_param_growth=100.0)
    result = Trainer(tiny_config(), cfg).fit(train_source(16))
    assert re.match(r"parameter norm grew past 100 x its initial [\d.]+ \(max_param_growth\) at step 5 ",
                    result.diverged), result.diverged
    assert TrainCheckpoints(tmp_path / "checkpoints").latest_step() == 4
    assert max(r["step"] for r in metric_rows(tmp_path)) == 4


def test_a_gradient_norm_over_the_limit_stops_the_run(tmp_path):
    cfg = run_config(tmp_path, train_steps=5, max_grad_norm=1e-6)
    result = Trainer(tiny_config(), cfg).fit(train_source(16))
    assert result.diverged.startswith("gradient norm exploded past max_grad_norm=1e-06 at step 1 ")
    assert result.step == 1 and not (tmp_path / "checkpoints" / "1").exists()


def test_initial_checkpoint_params_only_and_the_result_loads_as_a_model(tmp_path):
    cfg = tiny_config()
    enc = jnp.zeros((1, 8), jnp.int32)
    pretrained = jax.device_get(nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(7), enc, enc))["params"])
    save_checkpoint(tmp_path / "pretrained", cfg, pretrained)
    run = run_config(tmp_path / "run", train_steps=2, initial_checkpoint=str(tmp_path / "pretrained"))
    result = Trainer(cfg, run).fit(train_source(16))
    # Step 1's loss is the pretrained params' loss on the first batch (z-loss 1e-4, summed).
    batch = next(train_source(16).iterate(0))
    logits = Transformer(cfg).apply({"params": pretrained}, batch["encoder_input_tokens"],
                                    batch["decoder_input_tokens"])
    w, d = losses.normalizing_factor_and_weights(None, batch)
    want, _ = losses.sequence_loss(losses.LossConfig(), logits, batch, w, d)
    assert metric_rows(tmp_path / "run")[0]["loss"] == pytest.approx(float(want), rel=1e-5)
    loaded_cfg, loaded = load_checkpoint(tmp_path / "run" / "checkpoints")
    assert loaded_cfg == cfg
    for name, value in flat(result.state.params).items():
        np.testing.assert_array_equal(flat(loaded)[name], value)


def test_initial_checkpoint_of_another_size_is_refused_with_the_shapes(tmp_path):
    small = tiny_config(emb_dim=8)
    enc = jnp.zeros((1, 4), jnp.int32)
    params = nn.meta.unbox(Transformer(small).init(jax.random.PRNGKey(0), enc, enc))["params"]
    save_checkpoint(tmp_path / "other", small, jax.device_get(params))
    run = run_config(tmp_path / "run", initial_checkpoint=str(tmp_path / "other"))
    with pytest.raises(CheckpointMismatchError, match=r"initial checkpoint .*other.*token_embedder/embedding"):
        Trainer(tiny_config(), run).fit(train_source(16))


def test_full_state_continues_another_runs_checkpoint(tmp_path):
    cfg = tiny_config()
    Trainer(cfg, run_config(tmp_path / "a", train_steps=3, optimizer=ADAMW)).fit(train_source(16))
    run_b = run_config(tmp_path / "b", train_steps=5, optimizer=ADAMW,
                       initial_checkpoint=str(tmp_path / "a" / "checkpoints"), initial_checkpoint_mode="full")
    result = Trainer(cfg, run_b).fit(train_source(16))
    assert [r["step"] for r in metric_rows(tmp_path / "b")] == [4, 5]
    assert int(result.state.opt_state[0].count) == 5     # Adam's step count came along


def test_resume_false_refuses_a_model_dir_with_checkpoints(tmp_path):
    Trainer(tiny_config(), run_config(tmp_path, train_steps=1, optimizer=ADAMW)).fit(train_source(16))
    with pytest.raises(ValueError, match="already holds checkpoints and resume=False"):
        Trainer(tiny_config(), run_config(tmp_path, train_steps=2, optimizer=ADAMW, resume=False)).fit(train_source(16))


def test_batch_not_divisible_by_the_data_axis_fails_before_compiling(tmp_path):
    with pytest.raises(ValueError, match=r"batch size 12 is not divisible by the mesh's data axis \(8\)"):
        Trainer(tiny_config(), run_config(tmp_path, batch_size=12, data=8)).fit(
            ArrayBatches(copy_arrays(), 12))
    with pytest.raises(ValueError, match="set exactly one of TRAIN_STEPS"):
        run_config(tmp_path, train_steps=10, epochs=2)


def test_a_resume_reports_the_seconds_of_the_steps_a_kill_undid(tmp_path):
    # Steps 5-8 ran and were logged, but the kill came before step 8's checkpoint: they run again,
    # and the result says how long they had taken (the ledger records it as lost compute).
    cfg = run_config(tmp_path, train_steps=8, checkpoint_every=4, keep_checkpoints=3)
    Trainer(tiny_config(), cfg).fit(train_source(16))
    logged = {r["step"]: r.get("step_time_s", 0.0) for r in metric_rows(tmp_path)}
    shutil.rmtree(tmp_path / "checkpoints" / "8")
    again = Trainer(tiny_config(), cfg).fit(train_source(16))
    assert again.step == 8 and again.lost_seconds == pytest.approx(sum(logged[s] for s in range(5, 9)))
    assert [r["step"] for r in metric_rows(tmp_path)] == list(range(1, 9))


def test_validation_decoding_counts_the_examples_it_has_decoded(tmp_path, capsys):
    # 80 real examples in batches of 32: 32, 32, then 16 real + 16 padding rows (not counted); the
    # shapes of the copy-task test above, so its compiled decode is reused
    cfg = tiny_config()
    trainer = Trainer(cfg, run_config(tmp_path, verbose=True, log_seconds=1e-9))
    tokens = jnp.ones((1, 4), jnp.int32)
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), tokens, tokens))["params"]
    batches = list(eval_source(32, num_examples=80).iterate(0))
    assert len(trainer.greedy_decode(params, batches)) == 96
    out = capsys.readouterr().out
    assert "decoding validation: 32/80 examples (" in out and "decoding validation: 64/80 examples (" in out
    assert re.search(r"decoded 80 validation examples in [\d.]+ s \([\d.]+ ex/s\)", out)
