"""The native format (Orbax items `params` + `config`), trainer step directories, format detection."""
import numpy as np
import orbax.checkpoint as ocp
import pytest

from doa_jax.checkpoints import (CheckpointError, detect_format, load_checkpoint, load_native,
                                 save_checkpoint, save_native)
from doa_jax.checkpoints.native import config_json
from doa_jax.checkpoints.tree import expected_shapes, flatten, unflatten
from doa_jax.model import config_for_size

CFG = config_for_size("tiny", dtype="float32", vocab_size=64, num_encoder_layers=1, num_decoder_layers=2)
ORIGINAL = config_for_size("t5_small", vocab_size=64, emb_dim=8, num_heads=2, head_dim=4, mlp_dim=12,
                           num_encoder_layers=2, num_decoder_layers=1)


def random_params(cfg, seed=0):
    """Random float32 params of the right tree and shapes (flat)."""
    rng = np.random.default_rng(seed)
    return {p: rng.standard_normal(shape, np.float32) for p, shape in expected_shapes(cfg).items()}


def assert_same(params, flat):
    got = flatten(params)
    assert sorted(got) == sorted(flat)
    for path in flat:
        assert got[path].dtype == np.float32
        np.testing.assert_array_equal(got[path], flat[path], err_msg=path)


def save_step(manager, step, cfg, seed):
    """What the trainer writes: params + config, next to items of its own."""
    params = unflatten(random_params(cfg, seed))
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(config_json(cfg)),
        opt_state=ocp.args.StandardSave({"count": np.int32(step), "mu": params}),
        data_position=ocp.args.JsonSave({"epoch": 0, "index": step})))


@pytest.mark.parametrize("cfg", [CFG, ORIGINAL], ids=["t5_v1_1", "t5_original"])
def test_save_then_load_gives_the_same_config_and_params(cfg, tmp_path):
    flat = random_params(cfg)
    save_native(tmp_path / "ckpt", cfg, unflatten(flat))
    assert detect_format(tmp_path / "ckpt") == "native"
    config, params = load_native(tmp_path / "ckpt")
    assert config == cfg
    assert_same(params, flat)


def test_config_item_is_the_t5config_dict_with_format_marker_and_no_execution_choice(tmp_path):
    cfg = CFG.replace(decode_cross_kv="recompute", scan_backward="autodiff")
    save_checkpoint(tmp_path / "ckpt", cfg, unflatten(random_params(CFG)), format="native")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        item = checkpointer.restore(tmp_path / "ckpt", ocp.args.Composite(config=ocp.args.JsonRestore()))
    marker = {"format": "doa_jax", "format_version": 1, "layout": "unscanned"}
    # how to decode and differentiate: the reader's choice
    model = {k: v for k, v in CFG.to_dict().items() if k not in ("decode_cross_kv", "scan_backward")}
    assert item["config"] == {**model, **marker}


def test_params_item_restores_with_plain_orbax(tmp_path):
    flat = random_params(CFG, seed=3)
    save_native(tmp_path / "ckpt", CFG, unflatten(flat))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(tmp_path / "ckpt",
                                        ocp.args.Composite(params=ocp.args.StandardRestore()))
    assert_same({p: np.asarray(a) for p, a in flatten(restored["params"]).items()}, flat)


def test_run_directory_loads_its_latest_step_and_ignores_trainer_items(tmp_path):
    with ocp.CheckpointManager(tmp_path / "run" / "checkpoints") as manager:
        for step, seed in ((10, 1), (30, 3), (200, 2)):
            save_step(manager, step, CFG, seed)
        manager.wait_until_finished()
    for root in (tmp_path / "run" / "checkpoints", tmp_path / "run"):  # manager root, trainer MODEL_DIR
        assert detect_format(root) == "native_run"
        config, params = load_checkpoint(root)
        assert config == CFG
        assert_same(params, random_params(CFG, 2))
    assert detect_format(tmp_path / "run" / "checkpoints" / "30") == "native"
    assert_same(load_checkpoint(tmp_path / "run" / "checkpoints" / "30")[1], random_params(CFG, 3))


def test_saving_params_that_do_not_fit_the_config_is_refused(tmp_path):
    params = unflatten(random_params(CFG))
    params["decoder"]["layers_1"].pop("mlp")
    with pytest.raises(CheckpointError, match="3 missing: decoder/layers_1/mlp/wi_0/kernel, "
                       "decoder/layers_1/mlp/wi_1/kernel, decoder/layers_1/mlp/wo/kernel"):
        save_native(tmp_path / "ckpt", CFG, params)


def test_checkpoint_with_an_unknown_format_version_is_refused(tmp_path):
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(tmp_path / "ckpt", ocp.args.Composite(
            params=ocp.args.StandardSave(unflatten(random_params(CFG))),
            config=ocp.args.JsonSave({**config_json(CFG), "format_version": 2})))
    with pytest.raises(CheckpointError, match="format_version=2, expected 1"):
        load_checkpoint(tmp_path / "ckpt")


def test_unknown_checkpoint_format_lists_what_it_found(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"\x00" * 10)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=rf"unknown checkpoint format at {tmp_path}.*found: notes.txt, "
                                              r"weights.npz"):
        load_checkpoint(tmp_path)


def test_pytorch_bin_checkpoint_is_refused_not_unpickled(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(CheckpointError, match="PyTorch .bin files are not read"):
        load_checkpoint(tmp_path)


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_params_sharded_over_the_8_device_mesh_load_whole(tmp_path):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    flat = random_params(CFG, seed=5)
    sharded = {p: jax.device_put(a, NamedSharding(mesh, PartitionSpec("model") if a.shape[0] % 4 == 0
                                                   else PartitionSpec())) for p, a in flat.items()}
    assert len(sharded["token_embedder/embedding"].sharding.device_set) == 8
    save_native(tmp_path / "ckpt", CFG, unflatten(sharded))
    _, params = load_native(tmp_path / "ckpt")
    assert_same(params, flat)
