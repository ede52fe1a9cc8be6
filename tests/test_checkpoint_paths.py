"""Every checkpoint format loads by a relative path, a path through `..` and a symlink.

TensorStore rejects `..` in file paths ("Invalid file path"); paths are resolved before reading.
"""
import os

import numpy as np
import pytest

from doa_jax.checkpoints import detect_format, load_checkpoint, save_checkpoint
from doa_jax.checkpoints.t5x import read_t5x
from doa_jax.checkpoints.tree import flatten
from doa_jax.cli import main

# format -> (save format, subpath that is loaded)
FORMATS = {"hf": ("hf", "hf"), "native": ("native", "native"), "native_run": ("native", "run/7"),
           "t5x_legacy": ("t5x_legacy", "legacy/checkpoint_0"), "t5x_orbax": ("t5x_orbax", "orbax/checkpoint_0")}


SINGLE_FILE = "single/test_t5_tiny.checkpoint_0"  # T5X's one-msgpack-file layout, all arrays inline


@pytest.fixture(scope="module")
def store(t5x_fixtures, tmp_path_factory):
    """Each format written once from the tiny T5X params, under store/."""
    from flax import serialization

    root = tmp_path_factory.mktemp("paths") / "store"
    config, params = load_checkpoint(t5x_fixtures / "legacy" / "checkpoint_0")
    for fmt, (save_format, sub) in FORMATS.items():
        save_checkpoint(root / sub, config, params, format=save_format)
    state = read_t5x(t5x_fixtures / "legacy" / "checkpoint_0", include_state=True)
    (root / "single").mkdir()
    (root / SINGLE_FILE).write_bytes(serialization.msgpack_serialize({"version": 3, "optimizer": state}))
    return root, params


def load_path(fmt, store):
    root, _ = store
    return {"native_run": root / "run", "t5x_legacy": root / "legacy" / "checkpoint_0",
            "t5x_orbax": root / "orbax" / "checkpoint_0", "t5x_single_file": root / SINGLE_FILE}.get(fmt, root / fmt)


def assert_same(params, expected):
    flat = flatten(params)
    for path, array in flatten(expected).items():
        assert np.array_equal(flat[path], array), path


ALL = sorted(FORMATS) + ["t5x_single_file"]


@pytest.mark.parametrize("fmt", ALL)
def test_path_through_dotdot_loads(store, fmt):
    path = load_path(fmt, store)
    dotted = path.parent / ".." / path.parent.name / path.name
    assert ".." in str(dotted)
    assert detect_format(dotted) == fmt.replace("_single_file", "_legacy")
    assert_same(load_checkpoint(dotted)[1], store[1])


@pytest.mark.parametrize("fmt", ALL)
def test_relative_path_loads(store, fmt, monkeypatch):
    path = load_path(fmt, store)
    monkeypatch.chdir(store[0].parent)
    relative = os.path.relpath(path, store[0].parent)
    assert not os.path.isabs(relative)
    assert_same(load_checkpoint(relative)[1], store[1])


@pytest.mark.parametrize("fmt", ALL)
def test_symlinked_path_loads(store, fmt, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(load_path(fmt, store), target_is_directory=load_path(fmt, store).is_dir())
    assert detect_format(link) == fmt.replace("_single_file", "_legacy")
    assert_same(load_checkpoint(link)[1], store[1])


def test_convert_of_a_dotdot_legacy_path(store, tmp_path, monkeypatch, capsys):
    """The issue's command: `doa convert ../ckpt/checkpoint_0 out --to hf` from a sibling directory."""
    (store[0] / "work").mkdir(exist_ok=True)
    monkeypatch.chdir(store[0] / "work")
    assert main(["convert", "../legacy/checkpoint_0", str(tmp_path / "out"), "--to", "hf"]) == 0
    assert "from t5x_legacy checkpoint ../legacy/checkpoint_0" in capsys.readouterr().out
    assert_same(load_checkpoint(tmp_path / "out")[1], store[1])
