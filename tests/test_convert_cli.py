"""`doa convert SRC DST --to {orbax,hf,t5x}`."""
import numpy as np
import transformers

from doa_jax.checkpoints import detect_format, load_checkpoint, save_checkpoint
from doa_jax.checkpoints.t5x import read_t5x
from doa_jax.checkpoints.tree import flatten
from doa_jax.cli import main
from doa_jax.model import config_for_size


def test_size_name_becomes_an_hf_directory_transformers_loads(tmp_path, capsys):
    assert main(["convert", "tiny", str(tmp_path / "hf"), "--to", "hf", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    tiny = config_for_size("tiny")
    assert f"wrote hf checkpoint: {tmp_path / 'hf'} (T5 v1.1, {tiny.num_params():,} params" in out
    assert "random init of 'tiny' (seed 1)" in out
    # It says what it is doing before each long part (the initialiser's compile, the write).
    assert out.index("initialising 'tiny' randomly") < out.index("writing hf checkpoint to") < out.index("wrote hf")
    model, info = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf",
                                                                          output_loading_info=True)
    assert not any(info.values())
    assert sum(p.numel() for p in model.parameters()) == tiny.num_params()
    config, _ = load_checkpoint(tmp_path / "hf")
    assert config == tiny


def test_t5x_checkpoint_converts_to_native_with_the_same_params(t5x_fixtures, tmp_path, capsys):
    src = t5x_fixtures / "legacy" / "checkpoint_0"
    assert main(["convert", str(src), str(tmp_path / "native"), "--to", "orbax"]) == 0
    out = capsys.readouterr().out
    assert f"reading the t5x_legacy checkpoint {src} ..." in out and f"from t5x_legacy checkpoint {src} in " in out
    assert detect_format(tmp_path / "native") == "native"
    golden = np.load(t5x_fixtures / "golden.npz")
    for path, array in flatten(load_checkpoint(tmp_path / "native")[1]).items():
        np.testing.assert_array_equal(array, golden[f"params/{path}"], err_msg=path)


def test_existing_destination_needs_force(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert main(["convert", "tiny", str(tmp_path / "out"), "--to", "orbax"]) == 2
    assert f"{tmp_path / 'out'} exists; pass --force" in capsys.readouterr().err
    assert main(["convert", "tiny", str(tmp_path / "out"), "--to", "orbax", "--force"]) == 0
    assert detect_format(tmp_path / "out") == "native"
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_unknown_source_is_one_clear_error(tmp_path, capsys):
    assert main(["convert", "not_a_size", str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("doa convert: error: SRC 'not_a_size' is neither an existing checkpoint path "
                          "nor a model size name. doa-jax loads only local files")
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_hf_checkpoint_converts_to_t5x_that_reads_back_bit_identical(t5x_fixtures, tmp_path, capsys):
    assert main(["convert", str(t5x_fixtures / "legacy" / "checkpoint_0"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "t5x_model"), "--to", "t5x"]) == 0
    out = capsys.readouterr().out
    written = tmp_path / "t5x_model" / "checkpoint_0"
    assert f"wrote t5x orbax checkpoint: {written} (T5 v1.1" in out
    assert "T5X gin for this model: network.T5Config(vocab_size=" in out
    assert detect_format(written) == "t5x_orbax"
    hf_config, hf_params = load_checkpoint(tmp_path / "hf")
    t5x_config, t5x_params = load_checkpoint(written)
    assert t5x_config == hf_config
    back = flatten(t5x_params)
    for path, array in flatten(hf_params).items():
        assert np.array_equal(back[path], array), path


def test_t5x_legacy_output_with_its_step_in_the_name(t5x_fixtures, tmp_path, capsys):
    dst = tmp_path / "checkpoint_12"
    assert main(["convert", str(t5x_fixtures / "orbax" / "checkpoint_0"), str(dst), "--to", "t5x",
                 "--t5x-format", "legacy"]) == 0
    assert detect_format(dst) == "t5x_legacy"
    assert int(read_t5x(dst, include_state=True)["state"]["step"]) == 12
    assert main(["convert", "tiny", str(dst), "--to", "t5x", "--step", "3"]) == 2
    assert "step 3 differs from the step in the directory name (12)" in capsys.readouterr().err


def test_existing_t5x_checkpoint_needs_force(t5x_fixtures, tmp_path, capsys):
    src = str(t5x_fixtures / "legacy" / "checkpoint_0")
    assert main(["convert", src, str(tmp_path / "model"), "--to", "t5x"]) == 0
    assert main(["convert", src, str(tmp_path / "model"), "--to", "t5x", "--t5x-format", "legacy"]) == 2
    assert f"{tmp_path / 'model' / 'checkpoint_0'} exists; pass --force" in capsys.readouterr().err
    assert detect_format(tmp_path / "model" / "checkpoint_0") == "t5x_orbax"
    assert main(["convert", src, str(tmp_path / "model"), "--to", "t5x", "--t5x-format", "legacy",
                 "--force"]) == 0
    assert detect_format(tmp_path / "model" / "checkpoint_0") == "t5x_legacy"


def test_model_t5x_cannot_express_is_one_error_line(t5x_fixtures, tmp_path, capsys):
    config, params = load_checkpoint(t5x_fixtures / "legacy" / "checkpoint_0")
    save_checkpoint(tmp_path / "native", config.replace(relative_attention_max_distance=256), params)
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "t5x"), "--to", "t5x"]) == 2
    err = capsys.readouterr().err
    assert err == ("doa convert: error: this model cannot be written as a T5X checkpoint: T5X's T5 network "
                   "(t5x/examples/t5/network.py) cannot express relative_attention_max_distance=256 "
                   "(T5X's network fixes 128)\n")
    assert not (tmp_path / "t5x").exists()


def test_hub_id_source_says_how_to_download_it(tmp_path, capsys):
    assert main(["convert", "google/t5-v1_1-small", str(tmp_path / "out"), "--to", "t5x"]) == 2
    err = capsys.readouterr().err
    assert "run `huggingface-cli download google/t5-v1_1-small --local-dir DIR` and pass DIR" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
