"""`save_t5x`: the train state T5X saves, compared with checkpoints real T5X wrote (../shared fixtures).

The legacy msgpack file and every zarr directory are byte-identical to T5X's `checkpoint_0` of the
same params; the Orbax item has T5X's tree, array metadata and file layout; a wider model gets
T5X's factored Adafactor slots; and doa-jax's T5X reader gives back bit-identical params and logits.
"""
import base64
import json
import os

import msgpack
import numpy as np
import pytest

from doa_jax.checkpoints import CheckpointError, detect_format, load_checkpoint, save_checkpoint
from doa_jax.checkpoints.t5x import read_t5x
from doa_jax.checkpoints.t5x_save import adafactor_slots, chunk_shape, save_t5x
from doa_jax.checkpoints.tree import flatten
from doa_jax.model import Transformer, config_for_size


def listing(root):
    """Every file and directory under `root`, relative; Orbax's content-addressed data files as `d/*`."""
    out = set()
    for base, dirs, files in os.walk(root):
        rel = os.path.relpath(base, root)
        for name in dirs + files:
            path = os.path.normpath(os.path.join(rel, name))
            out.add(os.path.join(os.path.dirname(path), "*") if os.path.basename(rel) == "d" else path)
    return out


def skeleton(node):
    """A msgpack checkpoint's tree with inline arrays reduced to (shape, dtype)."""
    if isinstance(node, dict):
        return {k: skeleton(v) for k, v in node.items()}
    if isinstance(node, msgpack.ExtType):
        shape, dtype, _ = msgpack.unpackb(node.data)
        return ("inline", tuple(shape), dtype)
    return node


def unpack(file):
    return msgpack.unpackb(file.read_bytes(), ext_hook=msgpack.ExtType, strict_map_key=False)


@pytest.fixture(scope="module")
def tiny(t5x_fixtures):
    return load_checkpoint(t5x_fixtures / "legacy" / "checkpoint_0")


def test_legacy_checkpoint_is_byte_identical_to_t5x(t5x_fixtures, tiny, tmp_path):
    written = save_t5x(tmp_path / "model", *tiny, format="legacy")
    reference = t5x_fixtures / "legacy" / "checkpoint_0"
    assert written == tmp_path / "model" / "checkpoint_0"
    assert listing(written) == listing(reference)
    assert len(listing(reference)) == 1 + 2 * 52 * 3  # msgpack; params and v: directory, .zarray, chunk
    for rel in sorted(listing(reference)):
        if (reference / rel).is_file():
            assert (written / rel).read_bytes() == (reference / rel).read_bytes(), rel


def test_orbax_checkpoint_has_t5x_tree_layout_and_array_metadata(t5x_fixtures, tiny, tmp_path):
    written = save_checkpoint(tmp_path / "checkpoint_0", *tiny, format="t5x")
    reference = t5x_fixtures / "orbax" / "checkpoint_0"
    assert listing(written) == listing(reference)
    ours, theirs = (json.loads((d / "state" / "_METADATA").read_text()) for d in (written, reference))
    assert ours == theirs  # 261 leaves: paths, value types (jax.Array), write shapes, OCDBT, zarr2
    assert len(theirs["tree_metadata"]) == 261
    ours, theirs = (json.loads((d / "state" / "array_metadatas" / "process_0").read_text())
                    for d in (written, reference))
    assert ours == theirs  # chunk shapes
    ours, theirs = (json.loads((d / "_CHECKPOINT_METADATA").read_text()) for d in (written, reference))
    assert ours["item_handlers"] == theirs["item_handlers"]
    ours, theirs = (json.loads((d / "state" / "_sharding").read_text()) for d in (written, reference))
    assert sorted(base64.b64decode(k) for k in ours) == sorted(base64.b64decode(k) for k in theirs)
    assert {json.loads(v)["axis_names"].__str__() for v in ours.values()} == {"['data', 'model']"}


def test_orbax_state_values_equal_t5x_state_values(t5x_fixtures, tiny, tmp_path):
    written = save_t5x(tmp_path / "checkpoint_0", *tiny)
    ours = flatten(read_t5x(written, include_state=True))
    theirs = flatten(read_t5x(t5x_fixtures / "orbax" / "checkpoint_0", include_state=True))
    assert sorted(ours) == sorted(theirs)
    for path in theirs:
        assert ours[path].dtype == theirs[path].dtype, path
        np.testing.assert_array_equal(ours[path], theirs[path], err_msg=path)


def test_wide_model_gets_t5x_factored_slots(t5x_fixtures, tmp_path):
    """legacy_factored (d=128): factored v_row/v_col inline, v placeholders, zarr v for the rest."""
    reference = t5x_fixtures / "legacy_factored" / "checkpoint_3"
    written = save_t5x(tmp_path / "checkpoint_3", *load_checkpoint(reference), format="legacy")
    ours, theirs = skeleton(unpack(written / "checkpoint")), skeleton(unpack(reference / "checkpoint"))
    assert ours == theirs
    assert theirs["optimizer"]["state"]["param_states"]["decoder"]["logits_dense"]["kernel"]["v_row"] \
        == ("inline", (128,), "float32")
    assert listing(written) == listing(reference)
    for rel in listing(reference):
        if rel.endswith(".zarray"):
            assert json.loads((written / rel).read_text()) == json.loads((reference / rel).read_text()), rel
    assert int(read_t5x(written, include_state=True)["state"]["step"]) == 3


@pytest.mark.parametrize("fmt", ["t5x_orbax", "t5x_legacy"])
def test_read_back_gives_bit_identical_params_and_logits(t5x_fixtures, tiny, tmp_path, fmt):
    config, params = tiny
    written = save_checkpoint(tmp_path / "checkpoint_0", config, params, format=fmt)
    assert detect_format(written) == fmt
    config_back, params_back = load_checkpoint(written)
    assert config_back == config
    for path, array in flatten(params).items():
        assert np.array_equal(flatten(params_back)[path], array), path
    golden = np.load(t5x_fixtures / "golden.npz")
    model = Transformer(config)
    logits = [np.asarray(model.apply({"params": p}, golden["encoder_input_tokens"],
                                     golden["decoder_input_tokens"])) for p in (params, params_back)]
    assert np.array_equal(logits[0], logits[1])


def test_adafactor_factors_two_dims_of_at_least_128():
    assert {k: v.shape for k, v in adafactor_slots((32128, 768)).items()} == \
        {"m": (1,), "v": (1,), "v_row": (768,), "v_col": (32128,)}
    assert {k: v.shape for k, v in adafactor_slots((768, 3072)).items()} == \
        {"m": (1,), "v": (1,), "v_row": (768,), "v_col": (3072,)}
    assert adafactor_slots((127, 4096))["v"].shape == (127, 4096)
    assert adafactor_slots((768,))["v"].shape == (768,)


def test_chunks_stay_under_64_mib_and_divide_the_shape():
    assert chunk_shape((32128, 4096), 4) == [4016, 4096]  # XXL embedding: 8 chunks of 62.75 MiB
    assert chunk_shape((768, 3072), 4) == [768, 3072]
    # The cases T5X's checkpoints_test checks for its chunking (in elements, itemsize 1).
    assert chunk_shape((8192, 8193), 1, 4096 * 4096) == [4096, 2731]
    assert chunk_shape((8192, 8192), 1, 4096 * 4096) == [4096, 4096]
    assert chunk_shape((8193,), 1, 4096) == [2731]


def test_model_t5x_cannot_express_is_one_clear_error(tmp_path):
    config = config_for_size("tiny", relative_attention_num_buckets=64, layer_norm_epsilon=1e-5)
    with pytest.raises(CheckpointError, match=r"^this model cannot be written as a T5X checkpoint: T5X's T5 "
                       r"network \(t5x/examples/t5/network.py\) cannot express relative_attention_num_buckets=64 "
                       r"\(T5X's network fixes 32\), layer_norm_epsilon=1e-05 \(T5X's network fixes 1e-06\)$"):
        save_t5x(tmp_path / "out", config, {})  # the config is checked before the params
    assert not (tmp_path / "out").exists()


def test_existing_checkpoint_is_not_overwritten(tiny, tmp_path):
    (tmp_path / "checkpoint_0").mkdir()
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'checkpoint_0'} exists; refusing to overwrite"):
        save_t5x(tmp_path, *tiny)


def test_step_comes_from_the_directory_name_and_must_agree(tiny, tmp_path):
    written = save_t5x(tmp_path / "checkpoint_5", *tiny, format="legacy")
    assert int(read_t5x(written, include_state=True)["state"]["step"]) == 5
    with pytest.raises(CheckpointError, match=r"step 4 differs from the step in the directory name \(6\)"):
        save_t5x(tmp_path / "checkpoint_6", *tiny, step=4)
    assert save_t5x(tmp_path / "model", *tiny, step=7) == tmp_path / "model" / "checkpoint_7"


def test_orbax_checkpoint_manager_as_t5x_configures_it_restores_the_state(tiny, tmp_path):
    """T5X's Orbax manager: steps found by the `checkpoint` prefix, `state` restored onto shardings."""
    import jax
    import orbax.checkpoint as ocp

    from doa_jax.checkpoints.t5x_save import train_state

    save_t5x(tmp_path / "checkpoint_4", *tiny)
    options = ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=False)
    manager = ocp.CheckpointManager(tmp_path, item_names=("state", "dataset"), options=options)
    assert manager.all_steps() == [4]
    expected = train_state(*tiny, step=4)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), expected)
    restore_args = jax.tree_util.tree_map(
        lambda a: ocp.ArrayRestoreArgs(sharding=sharding, global_shape=a.shape, dtype=a.dtype), expected)
    restored = manager.restore(4, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)))["state"]
    flat, want = flatten(restored), flatten(expected)
    assert sorted(flat) == sorted(want) and len(want) == 261
    for path, array in want.items():
        assert np.array_equal(np.asarray(flat[path]), array), path
