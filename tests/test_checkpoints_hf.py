"""HF T5 directories: import, export loadable by transformers, bit-identical round trips, bad files."""
import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from doa_jax.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from doa_jax.checkpoints.hf import read_safetensors, save_hf
from doa_jax.checkpoints.tree import flatten
from doa_jax.model import config_for_size
from torch_t5 import make_hf_t5

V11 = config_for_size("tiny", dtype="float32", vocab_size=80, emb_dim=16, num_heads=4, head_dim=6,
                      mlp_dim=40, num_encoder_layers=3, num_decoder_layers=2)
ORIGINAL = config_for_size("t5_small", dtype="float32", vocab_size=80, emb_dim=16, num_heads=4,
                           head_dim=6, mlp_dim=40, num_encoder_layers=2, num_decoder_layers=3)
VARIANTS = pytest.mark.parametrize("cfg", [V11, ORIGINAL], ids=["t5_v1_1", "t5_original"])


def saved_by_transformers(cfg, directory, seed=0):
    model, params = make_hf_t5(cfg, seed)
    model.save_pretrained(directory)
    return model, params


def forward(model, seed=0):
    rng = np.random.default_rng(seed)
    enc = torch.tensor(rng.integers(2, model.config.vocab_size, (2, 9)))
    dec = torch.tensor(rng.integers(2, model.config.vocab_size, (2, 6)))
    with torch.no_grad():
        return model(input_ids=enc, decoder_input_ids=dec).logits


def assert_same_params(a, b):
    fa, fb = flatten(a), flatten(b)
    assert sorted(fa) == sorted(fb)
    for path in fa:
        np.testing.assert_array_equal(fa[path], fb[path], err_msg=path)


@VARIANTS
def test_import_gives_the_config_and_the_weights(cfg, tmp_path):
    _, params = saved_by_transformers(cfg, tmp_path / "hf")
    config, loaded = load_checkpoint(tmp_path / "hf")
    assert config == cfg.replace(dtype=config.dtype)
    assert_same_params(loaded, params)
    assert {a.dtype for a in flatten(loaded).values()} == {np.dtype(np.float32)}


@VARIANTS
def test_hf_native_hf_round_trip_is_bit_identical_and_loads_in_transformers(cfg, tmp_path):
    original, _ = saved_by_transformers(cfg, tmp_path / "hf")
    save_checkpoint(tmp_path / "native", *load_checkpoint(tmp_path / "hf"), format="native")
    save_checkpoint(tmp_path / "back", *load_checkpoint(tmp_path / "native"), format="hf")

    before = load_file(tmp_path / "hf" / "model.safetensors")
    after = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(after) == sorted(before)
    for name in before:
        assert after[name].dtype == before[name].dtype
        assert after[name].tobytes() == before[name].tobytes(), name

    reloaded, info = transformers.T5ForConditionalGeneration.from_pretrained(
        tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.scale_decoder_outputs == cfg.logits_via_embedding
    assert (reloaded.lm_head.weight is reloaded.shared.weight) == cfg.logits_via_embedding
    assert torch.equal(forward(reloaded.eval()), forward(original))


def test_exported_v1_1_config_is_what_transformers_expects(tmp_path):
    _, params = make_hf_t5(V11)
    save_checkpoint(tmp_path / "hf", V11, params, format="hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["feed_forward_proj"] == "gated-gelu"
    assert written["is_gated_act"] is True and written["dense_act_fn"] == "gelu_new"
    assert written["tie_word_embeddings"] is False
    hf_config = transformers.T5Config.from_pretrained(tmp_path / "hf")
    assert (hf_config.d_model, hf_config.d_kv, hf_config.d_ff, hf_config.num_heads) == (16, 6, 40, 4)
    assert (hf_config.num_layers, hf_config.num_decoder_layers) == (3, 2)
    assert hf_config.scale_decoder_outputs is False
    assert "lm_head.weight" in load_file(tmp_path / "hf" / "model.safetensors")


def test_sharded_export_loads_in_transformers_and_back(tmp_path):
    model, params = make_hf_t5(V11, seed=2)
    written = save_hf(tmp_path / "sharded", V11, params, max_shard_bytes=20_000)
    shards = [f for f in written if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in written
    _, loaded = load_checkpoint(tmp_path / "sharded")
    assert_same_params(loaded, params)
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "sharded").eval()
    assert torch.equal(forward(reloaded), forward(model))


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
    model, _ = make_hf_t5(V11, seed=4)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _, loaded = load_checkpoint(tmp_path / "bf16")
    expected = model.shared.weight.detach().float().numpy()
    np.testing.assert_array_equal(loaded["token_embedder"]["embedding"], expected)
    assert loaded["token_embedder"]["embedding"].dtype == np.float32


def test_truncated_safetensors_file_is_named_with_byte_counts(tmp_path):
    saved_by_transformers(V11, tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    data = file.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    needed = max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
    file.write_bytes(data[:-1000])
    found = len(data) - 1000 - 8 - header_len
    with pytest.raises(CheckpointError, match=rf"model.safetensors is truncated or corrupt \(expected "
                                              rf"{needed} bytes of tensor data, found {found}\)"):
        load_checkpoint(tmp_path / "hf")


def test_safetensors_cut_inside_the_header_is_an_error(tmp_path):
    saved_by_transformers(V11, tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        read_safetensors(file)


def test_config_that_disagrees_with_the_weights_names_each_parameter(tmp_path):
    saved_by_transformers(V11, tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    config["d_ff"] = 48
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "hf")
    message = str(err.value)
    assert "15 mis-shaped" in message  # wi_0, wi_1 and wo in each of the 3 + 2 layers
    assert ("encoder/layers_0/mlp/wi_0/kernel (encoder.block.0.layer.1.DenseReluDense.wi_0.weight) "
            "expected (16, 48) found (16, 40)") in message
    assert "decoder/layers_1/mlp/wo/kernel (decoder.block.1.layer.2.DenseReluDense.wo.weight)" in message


def test_missing_and_unexpected_tensors_are_all_named(tmp_path):
    _, params = make_hf_t5(V11)
    save_checkpoint(tmp_path / "hf", V11, params, format="hf")
    file = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(file)
    del tensors["encoder.block.1.layer.0.SelfAttention.k.weight"]
    del tensors["decoder.final_layer_norm.weight"]
    tensors["encoder.block.0.layer.0.SelfAttention.q.bias"] = np.zeros(24, np.float32)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "hf")
    message = str(err.value)
    assert ("2 missing: decoder/decoder_norm/scale (decoder.final_layer_norm.weight), "
            "encoder/layers_1/attention/key/kernel (encoder.block.1.layer.0.SelfAttention.k.weight)"
            ) in message
    assert "1 unexpected: encoder.block.0.layer.0.SelfAttention.q.bias" in message


def test_tied_config_with_a_different_lm_head_is_an_error(tmp_path):
    _, params = make_hf_t5(V11)
    save_checkpoint(tmp_path / "hf", V11, params, format="hf")
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(tie_word_embeddings=True, scale_decoder_outputs=True)
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from shared.weight"):
        load_checkpoint(tmp_path / "hf")


# config.json as older transformers wrote them on the Hub (google/t5-v1_1-*, t5-small), with our
# dims: no relative_attention_max_distance, scale_decoder_outputs or dense_act_fn; t5-small also
# lacks feed_forward_proj and tie_word_embeddings (transformers' defaults: relu, tied).
HUB_STYLE = {
    "t5_v1_1": (V11, {"d_ff": 40, "d_kv": 6, "d_model": 16, "decoder_start_token_id": 0, "dropout_rate": 0.1,
                      "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
                      "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
                      "num_decoder_layers": 2, "num_heads": 4, "num_layers": 3, "output_past": True,
                      "pad_token_id": 0, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
                      "vocab_size": 80}),
    "t5_original": (ORIGINAL, {"architectures": ["T5WithLMHeadModel"], "d_ff": 40, "d_kv": 6, "d_model": 16,
                               "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1,
                               "initializer_factor": 1.0, "is_encoder_decoder": True,
                               "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
                               "num_decoder_layers": 3, "num_heads": 4, "num_layers": 2, "output_past": True,
                               "pad_token_id": 0, "relative_attention_num_buckets": 32, "vocab_size": 80}),
}


@pytest.mark.parametrize("variant", sorted(HUB_STYLE))
def test_hub_style_config_without_newer_keys_loads(variant, tmp_path):
    cfg, hub_config = HUB_STYLE[variant]
    _, params = saved_by_transformers(cfg, tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hub_config))
    config, loaded = load_checkpoint(tmp_path / "hf")
    assert config == cfg.replace(dropout_rate=0.1, dtype=config.dtype)
    assert_same_params(loaded, params)
