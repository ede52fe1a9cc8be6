"""T5X checkpoints written by real T5X (../shared/fixtures/t5x_tiny): legacy and Orbax.

They load bit-identically to the params T5X itself reported, give a config equal to the one T5X was
built with, and reproduce T5X's golden logits.
"""
import json
import os
import shutil

import numpy as np
import pytest

from doa_jax.checkpoints import CheckpointError, detect_format, load_checkpoint, stored_vocab_size, t5x
from doa_jax.checkpoints.t5x import infer_config, read_t5x
from doa_jax.checkpoints.tree import expected_shapes, flatten
from doa_jax.model import T5Config, Transformer, config_for_size

TINY = {"legacy/checkpoint_0": "t5x_legacy", "orbax/checkpoint_0": "t5x_orbax"}


def writable_copy(src, dst):
    """A copy of a (read-only) fixture directory that the test may damage."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for root, dirs, _ in os.walk(dst):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
    os.chmod(dst, 0o755)
    return dst


def manifest_config(fixtures, dtype="float32"):
    """The T5Config T5X was built with, read from the fixture's manifest."""
    t5x = json.loads((fixtures / "manifest.json").read_text())["t5config"]
    fields = {k: v for k, v in t5x.items() if k != "float32_attention_logits"}
    return T5Config(**{**fields, "dtype": dtype})


@pytest.mark.parametrize("checkpoint", sorted(TINY))
def test_format_is_detected_from_the_path(t5x_fixtures, checkpoint):
    assert detect_format(t5x_fixtures / checkpoint) == TINY[checkpoint]


@pytest.mark.parametrize("checkpoint", sorted(TINY))
def test_params_equal_the_params_t5x_reported(t5x_fixtures, checkpoint):
    golden = np.load(t5x_fixtures / "golden.npz")
    config, params = load_checkpoint(t5x_fixtures / checkpoint)
    assert config == manifest_config(t5x_fixtures, dtype=config.dtype)
    flat = flatten(params)
    assert sorted(flat) == sorted(k[len("params/"):] for k in golden.files if k.startswith("params/"))
    for path, array in flat.items():
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, golden[f"params/{path}"], err_msg=path)


@pytest.mark.parametrize("checkpoint", sorted(TINY))
def test_loaded_checkpoint_reproduces_golden_logits(t5x_fixtures, checkpoint):
    golden = np.load(t5x_fixtures / "golden.npz")
    config, params = load_checkpoint(t5x_fixtures / checkpoint, manifest_config(t5x_fixtures))
    model = Transformer(config)
    logits = np.asarray(model.apply({"params": params}, golden["encoder_input_tokens"],
                                    golden["decoder_input_tokens"]))
    # T5X also masks padded queries; we mask keys only, so compare the real target positions.
    real = golden["decoder_loss_weights"] > 0
    diff = np.abs(logits - golden["logits"])[real].max()
    print(f"{checkpoint}: max |logit diff| vs T5X golden {diff:.2e}")
    assert diff <= 1e-5


def test_orbax_train_state_equals_what_orbax_restored(t5x_fixtures):
    """train_run/checkpoint_3 after 3 Adafactor steps: params, slots and step, bit for bit."""
    expected = np.load(t5x_fixtures / "train_run" / "expected_state.npz")
    flat = flatten(read_t5x(t5x_fixtures / "train_run" / "checkpoint_3", include_state=True))
    assert sorted(flat) == sorted(expected.files)
    for path, array in flat.items():
        assert array.dtype == expected[path].dtype, path
        np.testing.assert_array_equal(array, expected[path], err_msg=path)
    assert int(flat["state/step"]) == 3


def test_legacy_state_with_inline_factored_slots_matches_t5x_stats(t5x_fixtures):
    """legacy_factored/checkpoint_3 keeps v_row/v_col inline in msgpack and the rest in zarr dirs."""
    stats = json.loads((t5x_fixtures / "legacy_factored" / "expected_state_stats.json").read_text())
    flat = flatten(read_t5x(t5x_fixtures / "legacy_factored" / "checkpoint_3", include_state=True))
    assert sorted(flat) == sorted(stats)
    for path, s in stats.items():
        array = flat[path]
        assert (list(array.shape), str(array.dtype)) == (s["shape"], s["dtype"]), path
        wide = array.astype(np.float64)
        np.testing.assert_allclose(wide.sum(), s["sum"], rtol=1e-6, atol=1e-12, err_msg=path)
        np.testing.assert_allclose(np.square(wide).sum(), s["sum_sq"], rtol=1e-6, atol=1e-12, err_msg=path)
        first = np.asarray(s["first"], array.dtype)
        np.testing.assert_array_equal(array.reshape(-1)[:len(first)], first, err_msg=path)
    assert np.abs(flat["state/param_states/decoder/logits_dense/kernel/v_row"]).sum() > 0


def test_config_of_the_wide_legacy_checkpoint_is_inferred(t5x_fixtures):
    config, _ = load_checkpoint(t5x_fixtures / "legacy_factored" / "checkpoint_3")
    assert config == T5Config(vocab_size=128, emb_dim=128, num_heads=4, head_dim=8, mlp_dim=128,
                              num_encoder_layers=1, num_decoder_layers=1, mlp_activations=("gelu", "linear"),
                              logits_via_embedding=False, dtype=config.dtype)


@pytest.mark.parametrize("cfg", [
    config_for_size("tiny", num_encoder_layers=3, num_decoder_layers=1),
    config_for_size("t5_small", vocab_size=64, emb_dim=8, num_heads=2, head_dim=4, mlp_dim=12,
                    num_encoder_layers=1, num_decoder_layers=2),
], ids=["t5_v1_1", "t5_original"])
def test_config_is_inferred_from_param_shapes(cfg):
    flat = {path: np.zeros(shape, np.float32) for path, shape in expected_shapes(cfg).items()}
    assert infer_config(flat, "test") == cfg


def test_missing_array_directory_is_named(t5x_fixtures, tmp_path):
    ckpt = writable_copy(t5x_fixtures / "legacy" / "checkpoint_0", tmp_path / "checkpoint_0")
    shutil.rmtree(ckpt / "target.encoder.layers_0.mlp.wi_0.kernel")
    with pytest.raises(CheckpointError, match=rf"T5X checkpoint {ckpt}: array directory "
                                              r"target.encoder.layers_0.mlp.wi_0.kernel/ is missing"):
        load_checkpoint(ckpt)


def test_unreadable_msgpack_file_is_named(t5x_fixtures, tmp_path):
    ckpt = writable_copy(t5x_fixtures / "legacy" / "checkpoint_0", tmp_path / "checkpoint_0")
    data = (ckpt / "checkpoint").read_bytes()
    (ckpt / "checkpoint").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{ckpt}/checkpoint is not a readable T5X msgpack checkpoint"):
        load_checkpoint(ckpt)


def write_single_file_checkpoint(t5x_fixtures, file):
    """The tiny checkpoint laid out as T5X's testdata `test_t5_tiny.checkpoint_0`: one msgpack file
    `{version: 3, optimizer: {state, target}}` with every array inline (flax's own msgpack writer)."""
    from flax import serialization

    state = read_t5x(t5x_fixtures / "legacy" / "checkpoint_0", include_state=True)
    file.write_bytes(serialization.msgpack_serialize({"version": 3, "optimizer": state}))
    return file


def test_single_file_checkpoint_loads_by_its_path(t5x_fixtures, tmp_path):
    file = write_single_file_checkpoint(t5x_fixtures, tmp_path / "test_t5_tiny.checkpoint_0")
    golden = np.load(t5x_fixtures / "golden.npz")
    assert detect_format(file) == "t5x_legacy"
    config, params = load_checkpoint(file)
    assert config == manifest_config(t5x_fixtures, dtype=config.dtype)
    for path, array in flatten(params).items():
        np.testing.assert_array_equal(array, golden[f"params/{path}"], err_msg=path)
    assert int(read_t5x(file, include_state=True)["state"]["step"]) == 0


def test_single_file_checkpoint_loads_by_its_directory(t5x_fixtures, tmp_path):
    """As in T5X's testdata/, the file sits beside other checkpoints' directories and files."""
    write_single_file_checkpoint(t5x_fixtures, tmp_path / "test_t5_tiny.checkpoint_0")
    (tmp_path / "tiny_t5" / "checkpoint_1").mkdir(parents=True)
    (tmp_path / "README").write_text("not a checkpoint")
    assert detect_format(tmp_path) == "t5x_legacy"
    _, params = load_checkpoint(tmp_path)
    golden = np.load(t5x_fixtures / "golden.npz")
    np.testing.assert_array_equal(params["token_embedder"]["embedding"], golden["params/token_embedder/embedding"])


def test_directory_with_two_single_file_checkpoints_names_both(t5x_fixtures, tmp_path):
    write_single_file_checkpoint(t5x_fixtures, tmp_path / "a.checkpoint_0")
    shutil.copyfile(tmp_path / "a.checkpoint_0", tmp_path / "b.checkpoint_1")
    with pytest.raises(CheckpointError, match=r"holds 2 T5X msgpack checkpoint files "
                                              r"\(a.checkpoint_0, b.checkpoint_1\); pass one of them"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("checkpoint", sorted(TINY))
def test_the_vocab_size_a_checkpoint_fixes_is_read_without_its_weights(t5x_fixtures, checkpoint, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(t5x, "read_arrays", no_reads)
    monkeypatch.setattr(t5x, "read_orbax_item", no_reads)
    assert stored_vocab_size(t5x_fixtures / checkpoint) == 128
