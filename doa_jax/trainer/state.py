"""Where a run's state comes from: resumed from its own checkpoints, continued or initialised from
an initial checkpoint, or initialised from the seed; and the host half of that state (`Progress`).

Checkpoints, resume and the initial checkpoint (an explicit switch):
* an existing checkpoint in `MODEL_DIR/checkpoints` is resumed (full state: params, optimizer,
  step, data position, RNG, best metric) when `resume=True` — a preempted job reruns unchanged; a
  damaged newest checkpoint is set aside (one line says which and why) and the one before used;
* otherwise `initial_checkpoint` starts the run: `initial_checkpoint_mode='params'` (default)
  loads only its parameters (any format `doa_jax.checkpoints` reads) with a fresh optimizer at
  step 0; `'full'` continues a doa_jax trainer checkpoint's whole state in this MODEL_DIR;
* otherwise parameters are initialised from the seed.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from doa_jax import partitioning
from doa_jax.checkpoints import load_checkpoint
from doa_jax.checkpoints import steps as train_checkpoints
from doa_jax.model import T5Config
from doa_jax.trainer.config import TrainConfig
from doa_jax.trainer.program import StepProgram, TrainState


class CheckpointMismatchError(ValueError):
    """An initial checkpoint's parameters do not fit the model (names or shapes)."""


@dataclasses.dataclass
class Progress:
    """The host half of a run's state (the device half is `TrainState`), saved with every
    checkpoint as its `trainer_state` (JSON) and restored with it on resume."""

    step: int = 0
    batches: int = 0                      # training batches consumed: where the data resumes
    seed: int = 0
    rng_key: Optional[list] = None        # the base dropout key (from `seed`), for the record
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    initial_param_norm: Optional[float] = None   # the reference of `max_param_growth`

    def as_dict(self) -> dict[str, Any]:
        saved = dataclasses.asdict(self)
        saved["data_position"] = {"batches": saved.pop("batches")}
        return saved

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> "Progress":
        known = {f.name for f in dataclasses.fields(cls)} - {"batches"}
        return cls(batches=int(saved.get("data_position", {}).get("batches", 0)),
                   **{k: v for k, v in saved.items() if k in known})


def _tree_paths(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): tuple(np.shape(leaf)) for path, leaf in flat}


def _listed(names: list[str], sep: str) -> str:
    return sep.join(names[:8]) + (" ..." if len(names) > 8 else "")


def check_params_match(loaded: Any, abstract: Any, *, source: str, model_config: T5Config) -> None:
    """Raises `CheckpointMismatchError` listing every missing, unexpected and mis-shaped param."""
    have, want = _tree_paths(loaded), _tree_paths(abstract)
    shaped = [f"{k}: checkpoint {list(have[k])} vs model {list(want[k])}"
              for k in sorted(set(have) & set(want)) if have[k] != want[k]]
    parts = ([f"mis-shaped: {_listed(shaped, '; ')}"] if shaped else []) + [
        f"{what}: {_listed(names, ', ')}" for what, names in (("missing", sorted(set(want) - set(have))),
                                                            ("unexpected", sorted(set(have) - set(want)))) if names]
    if parts:
        c = model_config
        raise CheckpointMismatchError(
            f"initial checkpoint {source} does not match the model (emb_dim={c.emb_dim}, "
            f"num_heads={c.num_heads}, head_dim={c.head_dim}, mlp_dim={c.mlp_dim}, "
            f"layers={c.num_encoder_layers}/{c.num_decoder_layers}, vocab_size={c.vocab_size}): "
            + " | ".join(parts) + ". Use the model-size gin file of the checkpoint's size.")


def load_initial_params(path: str, model_config: T5Config) -> Any:
    """Params (numpy tree) of a pretrained checkpoint in any format `doa_jax.checkpoints` reads."""
    try:
        _, params = load_checkpoint(path, config=model_config)
    except FileNotFoundError:
        raise
    except ValueError as e:   # CheckpointError: names the params; add which file and size
        raise CheckpointMismatchError(
            f"initial checkpoint {path} does not fit the model: {e}. Use the model-size gin file "
            f"of the checkpoint's size") from e
    return params


def sync_hosts(name: str) -> None:
    """A barrier across hosts (nothing on one host)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def restore_or_init(config: TrainConfig, program: StepProgram, model_config: T5Config,
                    checkpoints: train_checkpoints.TrainCheckpoints) -> tuple[TrainState, Progress, str]:
    """The starting state, its progress, and a line saying where it came from."""
    abstract_params, abstract_opt = program.abstract_state()
    if config.resume and train_checkpoints.has_checkpoint(checkpoints.directory):
        params, opt_state, saved = restore_newest_intact(checkpoints, abstract_params, abstract_opt)
        progress = Progress.from_dict(saved)
        return (TrainState(program.put_step(progress.step), params, opt_state), progress,
                f"resumed the full train state from {checkpoints.directory} at step {progress.step}")
    if not config.resume and train_checkpoints.has_checkpoint(checkpoints.directory):
        raise ValueError(f"{checkpoints.directory} already holds checkpoints and resume=False: use a new MODEL_DIR "
                         f"or set resume=True (RESUME = True) to continue it")
    source = config.initial_checkpoint
    if source and config.initial_checkpoint_mode == "full":
        params, opt_state, saved, _ = train_checkpoints.restore_step_directory(
            source, abstract_params=abstract_params, abstract_opt_state=abstract_opt)
        progress = Progress.from_dict(saved)
        return (TrainState(program.put_step(progress.step), params, opt_state), progress,
                f"continued the full train state of {source} at step {progress.step}")
    if source:
        host = load_initial_params(source, model_config)
        check_params_match(host, program.abstract_params, source=source, model_config=model_config)
        host = jax.tree_util.tree_map(lambda x, a: np.asarray(x, a.dtype), host, program.abstract_params)
        return (program.state_from_params(host), Progress(),
                f"initialised params from {source} (params only; fresh optimizer)")
    with partitioning.mesh_context(program.mesh, program.rules):
        state = program.init(jax.random.PRNGKey(config.seed))
    return state, Progress(), f"initialised params from seed {config.seed}"


def restore_newest_intact(checkpoints: train_checkpoints.TrainCheckpoints, abstract_params,
                          abstract_opt) -> tuple[Any, Any, dict]:
    """The newest checkpoint that reads back; each damaged newer one is set aside with one line
    naming it and why (a truncated file must not end a days-long run). A store that fails
    (`StorageError`) stops the run instead: its checkpoints may be fine."""
    tried, chief = [], partitioning.is_chief()
    for step in sorted(checkpoints.all_steps(), reverse=True):
        try:
            params, opt_state, saved, _ = checkpoints.restore(
                step, abstract_params=abstract_params, abstract_opt_state=abstract_opt)
            return params, opt_state, saved
        except train_checkpoints.DamagedCheckpoint as e:
            sync_hosts(f"restore_failed_{step}")
            moved = checkpoints.quarantine(step, move=chief)
            sync_hosts(f"quarantined_{step}")
            tried.append(step)
            if chief:
                print(f"checkpoint {checkpoints.directory / str(step)} is damaged ({e}); set it aside in "
                      f"{moved}; trying the checkpoint before it", file=sys.stderr, flush=True)
    raise ValueError(f"no intact checkpoint in {checkpoints.directory}: steps {tried} are all damaged "
                     f"(moved to {checkpoints.directory}.corrupt); use a new MODEL_DIR or remove it")
