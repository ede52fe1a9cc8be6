"""`doa convert SRC DST --to {orbax,hf}`."""
import numpy as np
import transformers

from doa_jax.checkpoints import detect_format, load_checkpoint
from doa_jax.checkpoints.tree import flatten
from doa_jax.cli import main
from doa_jax.model import config_for_size


def test_size_name_becomes_an_hf_directory_transformers_loads(tmp_path, capsys):
    assert main(["convert", "tiny", str(tmp_path / "hf"), "--to", "hf", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    tiny = config_for_size("tiny")
    assert f"wrote hf checkpoint: {tmp_path / 'hf'} (T5 v1.1, {tiny.num_params():,} params" in out
    assert "random init of 'tiny' (seed 1)" in out
    model, info = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf",
                                                                          output_loading_info=True)
    assert not any(info.values())
    assert sum(p.numel() for p in model.parameters()) == tiny.num_params()
    config, _ = load_checkpoint(tmp_path / "hf")
    assert config == tiny


def test_t5x_checkpoint_converts_to_native_with_the_same_params(t5x_fixtures, tmp_path, capsys):
    src = t5x_fixtures / "legacy" / "checkpoint_0"
    assert main(["convert", str(src), str(tmp_path / "native"), "--to", "orbax"]) == 0
    assert f"from t5x_legacy checkpoint {src}" in capsys.readouterr().out
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
                          "nor a size name")
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()
