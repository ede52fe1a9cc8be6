"""Shared pieces of the trainer tests (no tests here): a tiny T5, a copy task, run settings."""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from doa_jax.model import T5Config, config_for_size
from doa_jax.partitioning import MeshConfig
from doa_jax.data.batches import ArrayBatches, copy_task
from doa_jax.trainer import TrainConfig, Trainer

# Small enough to compile in seconds on CPU; every dim divides the 8-device mesh's axes.
TINY = dict(vocab_size=64, emb_dim=16, num_heads=4, head_dim=4, mlp_dim=32, num_encoder_layers=2,
            num_decoder_layers=2, dtype="float32")


def tiny_config(**overrides) -> T5Config:
    return config_for_size("tiny", **{**TINY, **overrides})


def copy_arrays(num_examples: int = 64, length: int = 8, vocab_size: int = 32, seed: int = 0, kind: str = "copy"):
    return copy_task(num_examples, length, vocab_size, seed=seed, kind=kind)


def train_source(batch_size: int, **kw) -> ArrayBatches:
    return ArrayBatches(copy_arrays(**kw), batch_size, shuffle=True, seed=0)


def eval_source(batch_size: int, **kw) -> ArrayBatches:
    return ArrayBatches(copy_arrays(**kw), batch_size, pad_remainder=True, num_epochs=1)


def run_config(model_dir, *, data=1, model=1, fsdp=False, **overrides) -> TrainConfig:
    settings = dict(model_dir=str(model_dir), batch_size=16, train_steps=5, log_every=1, checkpoint_every=None,
                    tensorboard=False, verbose=False, async_checkpointing=False,
                    mesh=MeshConfig(data=data, model=model, fsdp=fsdp))
    settings.update(overrides)
    return TrainConfig(**settings)


def metric_rows(model_dir) -> list[dict]:
    path = pathlib.Path(model_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def flat(params) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    return {"/".join(str(k.key) for k in path): np.asarray(v) for path, v in leaves}


def logged_steps(model_dir) -> list[int]:
    """The steps a (possibly still running) training process has logged to MODEL_DIR/metrics.jsonl."""
    path = pathlib.Path(model_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def final_params(model_dir) -> dict:
    """The parameters a child training process saved to MODEL_DIR/final.npz."""
    with np.load(pathlib.Path(model_dir) / "final.npz") as f:
        return {k: f[k] for k in f.files}


def stopped_and_resumed(cfg: T5Config, tmp_path, **common):
    """`(whole, resumed)`: a 4-step run, and the same run stopped after step 2 and rerun to step 4
    (it resumes from the step-2 checkpoint); each a `TrainResult`. `common`: TrainConfig fields."""
    whole = Trainer(cfg, run_config(tmp_path / "whole", train_steps=4, **common)).fit(train_source(16))
    Trainer(cfg, run_config(tmp_path / "split", train_steps=2, **common)).fit(train_source(16))
    resumed = Trainer(cfg, run_config(tmp_path / "split", train_steps=4, **common)).fit(train_source(16))
    return whole, resumed


def assert_same_params(a, b) -> None:
    """Every parameter of `b` equals `a`'s, bit for bit (named on failure)."""
    params = flat(a)
    for name, value in flat(b).items():
        np.testing.assert_array_equal(value, params[name], err_msg=name)
