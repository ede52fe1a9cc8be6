"""Partitioned fine-tuning of the Flax T5: train state, jitted train/eval steps, the loop.

One train step is a single `jax.jit` with explicit shardings for the state (params by their
logical axes, optimizer slots like their params) and the batch (over `data`), the state donated.
Inside: loss normalisation on the global batch, gradient accumulation over microbatches
(`lax.scan`), the optimizer update, and summed metrics. Dropout uses `fold_in(rng, step)` (and the
microbatch index), so a step's randomness depends only on the seed and the step, which makes a
resumed run bit-identical to an uninterrupted one.

The loop never waits on the device between steps: metrics stay on the device until a log,
checkpoint or eval step fetches them. Divergence found at such a fetch (a non-finite loss or
gradient, a gradient norm over `max_grad_norm`, or the parameter norm grown over
`max_param_growth` times its initial value) stops training before anything is saved, so the
latest checkpoint is always a good one; `TrainResult.diverged` says why.

Preemption: on SIGTERM or SIGINT (Ctrl-C) the loop finishes the step in flight, saves a
checkpoint of it, waits for every save to be committed, prints what it did, and raises
`TrainingPreempted` (a `SystemExit` with code 128 + the signal number: 143 for SIGTERM, 130
for SIGINT, no traceback). On several hosts the hosts agree on the stop step with an all-gather
of their signal flags after every step, so all save the same step. A second Ctrl-C stops at
once without saving. SIGKILL cannot be caught: the rerun resumes from the last committed
checkpoint (a damaged newest checkpoint is set aside, one line says which and why, and the one before used).

Checkpoints, resume and the initial checkpoint (an explicit switch):
* an existing checkpoint in `MODEL_DIR/checkpoints` is resumed (full state: params, optimizer,
  step, data position, RNG, best metric) when `resume=True` — a preempted job reruns unchanged;
* otherwise `initial_checkpoint` starts the run: `initial_checkpoint_mode='params'` (default)
  loads only its parameters (any format `doa_jax.checkpoints` reads) with a fresh optimizer at
  step 0; `'full'` continues a doa_jax trainer checkpoint's whole state in this MODEL_DIR;
* otherwise parameters are initialised from the seed.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import signal
import sys
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from doa_jax import flops, fused_update, hosts, losses, optimizers, partitioning, progress, storage
from doa_jax.checkpoints import steps as train_checkpoints
from doa_jax.losses import LossConfig
from doa_jax.model import T5Config, Transformer
from doa_jax.optimizers import OptimizerConfig
from doa_jax.partitioning import MeshConfig
from doa_jax.data.batches import BatchSource, take_features

DecodeMetricsFn = Callable[[np.ndarray, Sequence[Mapping[str, np.ndarray]]], Mapping[str, float]]


class NonFiniteLossError(RuntimeError):
    """Training diverged (`TrainResult.diverged` holds the message); raised by callers that treat
    divergence as an error, such as `doa train`."""


class TrainingPreempted(SystemExit):
    """SIGTERM/SIGINT stopped training after a checkpoint of `step` was saved. Exits the process
    with code 128 + the signal number (143 SIGTERM, 130 SIGINT) unless caught."""

    def __init__(self, signum: int, step: int):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


class CheckpointMismatchError(ValueError):
    """An initial checkpoint's parameters do not fit the model (names or shapes)."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any


_FIELD_TYPES = {"batch_size": (int,), "train_steps": (int, type(None)), "epochs": (int, float, type(None)),
                "num_microbatches": (int,), "seed": (int,), "keep_checkpoints": (int, type(None)),
                "max_grad_norm": (int, float, type(None)), "max_param_growth": (int, float, type(None)),
                "param_dtype": (str,), "log_seconds": (int, float, type(None)), "fused_update": (bool,)}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a fine-tuning run except the model and the data.

    Length: exactly one of `train_steps` or `epochs` (epochs need a source that knows its
    epoch size). `batch_size` is global (all hosts); `num_microbatches` splits it for gradient
    accumulation. `eval_metric` names the dev metric for best checkpoints and early stopping:
    'loss', 'token_accuracy' (teacher-forced) or a decode metric's name (e.g. 'accuracy', 'f1');
    `eval_mode` 'min'/'max' (default: 'min' for loss, else 'max'). `eval_every` / `checkpoint_every` are step counts or
    'epoch'; evaluation (when a dev source is given) and a checkpoint also happen at the end.
    """

    model_dir: str
    batch_size: int
    train_steps: Optional[int] = None
    epochs: Optional[float] = None
    num_microbatches: int = 1
    seed: int = 0
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    mesh: MeshConfig = MeshConfig()
    initial_checkpoint: Optional[str] = None
    initial_checkpoint_mode: str = "params"
    resume: bool = True
    log_every: int = 100
    # A console line at least this often (seconds) between logged steps, and a counter during
    # validation decoding; None: only every `log_every` steps. Console only (metrics.jsonl keeps
    # its `log_every` rows).
    log_seconds: Optional[float] = 30.0
    checkpoint_every: Optional[Union[int, str]] = 1000
    keep_checkpoints: Optional[int] = 2
    async_checkpointing: bool = True
    eval_every: Optional[Union[int, str]] = None
    eval_metric: str = "loss"
    eval_mode: Optional[str] = None
    keep_best: bool = True
    early_stopping_patience: Optional[int] = None
    max_decode_len: Optional[int] = None
    tensorboard: bool = True
    verbose: bool = True
    max_grad_norm: Optional[float] = None
    max_param_growth: Optional[float] = 100.0
    handle_signals: bool = True
    # 'bfloat16': params stored (and checkpointed) in bf16, updates computed in float32 and written
    # back with stochastic rounding (`optimizers.apply_updates`); optimizer slots stay float32.
    param_dtype: str = "float32"
    # The optimizer inside the backward pass, layer by layer (doa_jax/fused_update.py): no whole
    # gradient tree is alive; needs scanned layers and one microbatch.
    fused_update: bool = False

    def __post_init__(self):
        for name, kinds in _FIELD_TYPES.items():
            value = getattr(self, name)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                what = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
                raise TypeError(f"{name} must be {what}, got {value!r}")
        if (self.train_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of TRAIN_STEPS (train_steps) and EPOCHS (epochs); "
                             f"got train_steps={self.train_steps}, epochs={self.epochs}")
        if self.train_steps is not None and self.train_steps < 1:
            raise ValueError(f"train_steps must be >= 1, got {self.train_steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1 or self.num_microbatches < 1:
            raise ValueError(f"batch_size ({self.batch_size}) and num_microbatches "
                             f"({self.num_microbatches}) must be >= 1")
        if self.initial_checkpoint_mode not in ("params", "full"):
            raise ValueError(f"initial_checkpoint_mode must be 'params' (weights only, fresh optimizer) or "
                             f"'full' (resume a doa_jax trainer checkpoint), got {self.initial_checkpoint_mode!r}")
        if self.fused_update:
            fused_update.check_microbatches(self.num_microbatches)
        if self.param_dtype not in optimizers.PARAM_DTYPES:
            raise ValueError(f"param_dtype must be one of {optimizers.PARAM_DTYPES}, got {self.param_dtype!r}")
        if self.log_seconds is not None and not self.log_seconds > 0:
            raise ValueError(f"log_seconds must be > 0 or None, got {self.log_seconds!r}")
        if self.eval_mode not in (None, "min", "max"):
            raise ValueError(f"eval_mode must be 'min', 'max' or None, got {self.eval_mode!r}")
        for name in ("log_every", "checkpoint_every", "eval_every", "early_stopping_patience"):
            value = getattr(self, name)
            if value == "epoch" and name in ("checkpoint_every", "eval_every"):
                continue
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive number of steps"
                                 + (", 'epoch'" if name in ("checkpoint_every", "eval_every") else "")
                                 + f" or None, got {value!r}")

    @property
    def metric_mode(self) -> str:
        return self.eval_mode or ("min" if self.eval_metric == "loss" else "max")


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int
    best_metric: Optional[float]
    best_step: Optional[int]
    stopped_early: bool
    last_metrics: dict[str, float]
    stopped_by_budget: bool = False
    diverged: Optional[str] = None     # why training stopped as diverged (None: it did not)
    lost_seconds: float = 0.0          # steps a kill undid before this resume, as logged (redone here)


def _unbox(tree):
    return nn.meta.unbox(tree)


def _abstract_with(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  tree, shardings)


def _tree_paths(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): tuple(np.shape(leaf)) for path, leaf in flat}


def check_params_match(loaded: Any, abstract: Any, *, source: str, model_config: T5Config) -> None:
    """Raises `CheckpointMismatchError` listing every missing, unexpected and mis-shaped param."""
    have, want = _tree_paths(loaded), _tree_paths(abstract)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shaped = [f"{k}: checkpoint {list(have[k])} vs model {list(want[k])}"
              for k in sorted(set(have) & set(want)) if have[k] != want[k]]
    if missing or unexpected or shaped:
        parts = []
        if shaped:
            parts.append("mis-shaped: " + "; ".join(shaped[:8]) + (" ..." if len(shaped) > 8 else ""))
        if missing:
            parts.append("missing: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
        c = model_config
        raise CheckpointMismatchError(
            f"initial checkpoint {source} does not match the model (emb_dim={c.emb_dim}, "
            f"num_heads={c.num_heads}, head_dim={c.head_dim}, mlp_dim={c.mlp_dim}, "
            f"layers={c.num_encoder_layers}/{c.num_decoder_layers}, vocab_size={c.vocab_size}): "
            + " | ".join(parts) + ". Use the model-size gin file of the checkpoint's size.")


def load_initial_params(path: str, model_config: T5Config) -> Any:
    """Params (numpy tree) of a pretrained checkpoint in any format the checkpoint module reads."""
    try:
        from doa_jax.checkpoints import load_checkpoint
    except ImportError:  # checkpoint module not installed: read the native format directly
        load_checkpoint = None
    if load_checkpoint is not None:
        try:
            _, params = load_checkpoint(path, config=model_config)
        except FileNotFoundError:
            raise
        except ValueError as e:   # CheckpointError: names the params; add which file and size
            raise CheckpointMismatchError(
                f"initial checkpoint {path} does not fit the model: {e}. Use the model-size gin file "
                f"of the checkpoint's size") from e
        return params
    params, _, _, _ = train_checkpoints.restore_step_directory(path, abstract_params=None)
    return jax.tree_util.tree_map(np.asarray, params)


class StepProgram:
    """The jitted, partitioned programs of a run: init, train step, eval step, and the shardings.

    Built once per (model, loss, optimizer, schedule length, microbatches, mesh, rules) and cached
    (`step_program`), so runs with the same settings (seeds, budgets, resumed runs) reuse the
    compiled executables instead of recompiling.
    """

    def __init__(self, model_config: T5Config, loss: LossConfig, optimizer: OptimizerConfig, total_steps: int,
                 num_microbatches: int, mesh: jax.sharding.Mesh, rules: tuple, param_dtype: str = "float32",
                 fused: bool = False):
        self.model_config, self.loss, self.num_microbatches = model_config, loss, num_microbatches
        self.param_dtype, self.fused = param_dtype, fused
        if fused:
            fused_update.check(model_config, num_microbatches)
        self.mesh, self.rules = mesh, [tuple(r) for r in rules]
        self.model = Transformer(model_config)
        self.tx, self.schedule = optimizer.build(total_steps)
        shape = jnp.zeros((1, 1), jnp.int32)   # param shapes do not depend on sequence lengths
        self._init_inputs = (shape, shape)
        boxed = jax.eval_shape(lambda: self.model.init(jax.random.PRNGKey(0), shape, shape))
        self.logical_specs = nn.get_partition_spec(boxed)["params"]
        self.abstract_params = optimizers.cast_params(_unbox(boxed)["params"], param_dtype)
        self.param_shardings = partitioning.param_shardings(mesh, self.rules, self.logical_specs)
        self.abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        self.opt_shardings = partitioning.opt_state_shardings(mesh, self.abstract_params, self.param_shardings,
                                                              self.abstract_opt)
        rep = partitioning.replicated(mesh)
        data = partitioning.data_sharding(mesh)
        self.state_shardings = TrainState(step=rep, params=self.param_shardings, opt_state=self.opt_shardings)
        self.init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
        self.init_opt = jax.jit(self.tx.init, out_shardings=self.opt_shardings)
        # The batch argument's sharding is a prefix: every feature's leading dim over `data`.
        self.train_step = jax.jit(self._step_fn, in_shardings=(self.state_shardings, data, rep),
                                  out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
        self.eval_step = jax.jit(self._eval_fn, in_shardings=(self.param_shardings, data), out_shardings=rep)

    def abstract_state(self) -> tuple[Any, Any]:
        """`(params, opt_state)` as ShapeDtypeStructs carrying their shardings (for restores)."""
        return (_abstract_with(self.abstract_params, self.param_shardings),
                _abstract_with(self.abstract_opt, self.opt_shardings))

    def put_step(self, step: int):
        return jax.device_put(jnp.asarray(step, jnp.int32), self.state_shardings.step)

    def state_from_params(self, host_params) -> TrainState:
        """A fresh train state (step 0, new optimizer slots) around host (numpy) params."""
        params = partitioning.put_params(host_params, self.param_shardings)
        with partitioning.mesh_context(self.mesh, self.rules):
            opt_state = self.init_opt(params)
        return TrainState(self.put_step(0), params, opt_state)

    def _init_fn(self, rng):
        params = optimizers.cast_params(_unbox(self.model.init(rng, *self._init_inputs))["params"], self.param_dtype)
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

    def _loss_and_metrics(self, params, batch, weights, divisor, rng, loss: Optional[LossConfig] = None):
        deterministic = rng is None or self.model_config.dropout_rate == 0.0
        logits = self.model.apply(
            {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            batch.get("encoder_segment_ids"), batch.get("decoder_segment_ids"),
            deterministic=deterministic, rngs=None if deterministic else {"dropout": rng})
        return losses.sequence_loss(loss or self.loss, logits, batch, weights, divisor)

    def _step_fn(self, state: TrainState, batch, base_rng):
        rng = jax.random.fold_in(base_rng, state.step)
        if self.fused:   # the optimizer inside the backward pass, layer by layer (doa_jax/fused_update.py)
            params, opt_state, metrics = fused_update.step(self.model_config, self.loss, self.tx, state.params,
                                                           state.opt_state, batch, rng, _rounding_key(rng))
            return (TrainState(state.step + 1, params, opt_state),
                    dict(metrics, learning_rate=self.schedule(state.step)))
        weights, divisor = losses.loss_weights(self.loss, batch)
        grad_fn = jax.value_and_grad(self._loss_and_metrics, has_aux=True)
        m = self.num_microbatches
        if m == 1:
            (_, metrics), grads = grad_fn(state.params, batch, weights, divisor, rng)
        else:
            # Row r goes to microbatch r % m: each microbatch keeps the batch's spread over `data`.
            def split(x):
                x = x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(
                    x, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, "data")))

            micro = jax.tree_util.tree_map(split, dict(batch, __weights=weights))

            def body(carry, xs):
                i, mb = xs
                w = mb.pop("__weights")
                (_, mets), g = grad_fn(state.params, mb, w, divisor, jax.random.fold_in(rng, i))
                return jax.tree_util.tree_map(jnp.add, carry, (g, mets)), None

            first = jax.tree_util.tree_map(lambda x: x[0], micro)
            first_w = first.pop("__weights")
            shapes = jax.eval_shape(self._loss_and_metrics, state.params, first, first_w, divisor, rng)[1]
            zero = (jax.tree_util.tree_map(jnp.zeros_like, state.params),
                    jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
            (grads, metrics), _ = jax.lax.scan(body, zero, (jnp.arange(m), micro))
        # bf16 params are written back with stochastic rounding, keyed by the step (resumes replay it).
        params, opt_state, update_norm = optimizers.apply_gradients(
            self.tx, grads, state.opt_state, state.params, _rounding_key(rng))
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
        metrics = dict(metrics, grad_norm=grad_norm, learning_rate=self.schedule(state.step),
                       nonfinite=(~finite).astype(jnp.int32), param_norm=optax.tree.norm(params))
        return TrainState(state.step + 1, params, opt_state), metrics

    def _eval_fn(self, params, batch):
        weights = (batch.get("decoder_loss_weights", batch["decoder_target_tokens"]) > 0).astype(jnp.float32)
        batch = dict(batch, decoder_loss_weights=weights)
        # Dev metrics are teacher-forced cross-entropy on the gold targets (no soft targets there).
        eval_loss = dataclasses.replace(self.loss, kd_weight=0.0)
        _, metrics = self._loss_and_metrics(params, batch, weights, jnp.float32(1.0), None, eval_loss)
        return {k: metrics[k] for k in ("nll_sum", "correct", "num_tokens")}


def _rounding_key(rng: jax.Array) -> jax.Array:
    """The step's key for bfloat16 params' stochastic rounding (resumes replay it)."""
    return jax.random.fold_in(rng, 0x5352)


@functools.lru_cache(maxsize=8)
def step_program(model_config: T5Config, loss: LossConfig, optimizer: OptimizerConfig, total_steps: int,
                 num_microbatches: int, mesh: jax.sharding.Mesh, rules: tuple,
                 param_dtype: str = "float32", fused: bool = False) -> StepProgram:
    return StepProgram(model_config, loss, optimizer, total_steps, num_microbatches, mesh, rules, param_dtype, fused)


class Trainer:
    """Fine-tunes `Transformer(model_config)` on a device mesh from `config.mesh`."""

    def __init__(self, model_config: T5Config, config: TrainConfig, *, devices: Optional[Sequence[Any]] = None):
        self.model_config, self.config = model_config, config
        self.mesh, self.rules = config.mesh.build(devices)
        self.model_dir = storage.absolute(config.model_dir)   # a local folder or a URL (gs://)
        self._is_chief = partitioning.is_chief()
        self.program: Optional[StepProgram] = None

    def _program(self, total_steps: int = 1) -> StepProgram:
        cfg = self.config
        if self.program is None:
            total_steps = total_steps if cfg.optimizer.uses_total_steps else 1
            self.program = step_program(self.model_config, cfg.loss, cfg.optimizer, total_steps,
                                        cfg.num_microbatches, self.mesh, tuple(tuple(r) for r in self.rules),
                                        cfg.param_dtype, cfg.fused_update)
        return self.program

    # ------------------------------------------------------------------ state creation
    def _restore_or_init(self) -> tuple[TrainState, dict[str, Any], str]:
        """The starting state and trainer-state dict, and a line saying where it came from."""
        cfg, prog = self.config, self.program
        abstract_params, abstract_opt = prog.abstract_state()
        ckpt_dir = self.model_dir / "checkpoints"
        if cfg.resume and train_checkpoints.has_checkpoint(ckpt_dir):
            params, opt_state, tstate = self._restore_newest_intact(abstract_params, abstract_opt)
            state = TrainState(prog.put_step(tstate["step"]), params, opt_state)
            return state, tstate, f"resumed the full train state from {ckpt_dir} at step {tstate['step']}"
        if not cfg.resume and train_checkpoints.has_checkpoint(ckpt_dir):
            raise ValueError(f"{ckpt_dir} already holds checkpoints and resume=False: use a new MODEL_DIR "
                             f"or set resume=True (RESUME = True) to continue it")
        fresh = dict(step=0, data_position={"batches": 0}, seed=cfg.seed, best_metric=None, best_step=None,
                     evals_without_improvement=0)
        if cfg.initial_checkpoint and cfg.initial_checkpoint_mode == "full":
            params, opt_state, tstate, _ = train_checkpoints.restore_step_directory(
                cfg.initial_checkpoint, abstract_params=abstract_params, abstract_opt_state=abstract_opt)
            tstate = {**fresh, **tstate}
            state = TrainState(prog.put_step(tstate["step"]), params, opt_state)
            return state, tstate, (f"continued the full train state of {cfg.initial_checkpoint} "
                                   f"at step {tstate['step']}")
        if cfg.initial_checkpoint:
            host = load_initial_params(cfg.initial_checkpoint, self.model_config)
            check_params_match(host, prog.abstract_params, source=cfg.initial_checkpoint,
                               model_config=self.model_config)
            host = jax.tree_util.tree_map(lambda x, a: np.asarray(x, a.dtype), host, prog.abstract_params)
            return (prog.state_from_params(host), fresh,
                    f"initialised params from {cfg.initial_checkpoint} (params only; fresh optimizer)")
        with partitioning.mesh_context(self.mesh, self.rules):
            state = prog.init(jax.random.PRNGKey(cfg.seed))
        return state, fresh, f"initialised params from seed {cfg.seed}"

    def _restore_newest_intact(self, abstract_params, abstract_opt) -> tuple[Any, Any, dict]:
        """The newest checkpoint that reads back; each damaged newer one is set aside with one line
        naming it and why (a truncated file must not end a days-long run). A store that fails
        (`StorageError`) stops the run instead: its checkpoints may be fine."""
        tried = []
        for step in sorted(self.checkpoints.all_steps(), reverse=True):
            try:
                params, opt_state, tstate, _ = self.checkpoints.restore(
                    step, abstract_params=abstract_params, abstract_opt_state=abstract_opt)
                return params, opt_state, tstate
            except train_checkpoints.DamagedCheckpoint as e:
                _sync_hosts(f"restore_failed_{step}")
                moved = self.checkpoints.quarantine(step, move=self._is_chief)
                _sync_hosts(f"quarantined_{step}")
                tried.append(step)
                if self._is_chief:
                    print(f"checkpoint {self.checkpoints.directory / str(step)} is damaged ({e}); set it aside in "
                          f"{moved}; trying the checkpoint before it", file=sys.stderr, flush=True)
        raise ValueError(f"no intact checkpoint in {self.checkpoints.directory}: steps {tried} are all damaged "
                         f"(moved to {self.checkpoints.directory}.corrupt); use a new MODEL_DIR or remove it")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, params, source: BatchSource, *, decode_metrics: Optional[DecodeMetricsFn] = None,
                 max_decode_len: Optional[int] = None) -> dict[str, float]:
        """Teacher-forced `loss` (per token, no z-loss) and `token_accuracy` over one pass of `source`,
        plus `decode_metrics(predictions, batches)` of greedy decodes when given (all hosts' rows,
        padding rows included: a padding row has an all-zero target)."""
        sums = None
        kept = []
        prog = self._program()
        with partitioning.mesh_context(self.mesh, self.rules):
            for local in source.iterate(0):
                batch = partitioning.global_batch(take_features(local), self.mesh)
                out = prog.eval_step(params, batch)
                sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
                if decode_metrics is not None:
                    kept.append(batch)
        if sums is None:
            raise ValueError("the evaluation source yielded no batches")
        sums = jax.device_get(sums)
        n = max(float(sums["num_tokens"]), 1.0)
        result = {"loss": float(sums["nll_sum"]) / n, "token_accuracy": float(sums["correct"]) / n}
        if decode_metrics is not None:
            preds = self.greedy_decode(params, kept, max_decode_len)
            host = [{k: _to_host(v) for k, v in b.items()} for b in kept]
            result.update({k: float(v) for k, v in decode_metrics(preds, host).items()})
        return result

    def greedy_decode(self, params, batches: Sequence[Mapping[str, Any]],
                      max_decode_len: Optional[int] = None) -> np.ndarray:
        """Greedy decodes `[N, L]` (no start token, 0 after EOS) of the batches' encoder inputs
        (global arrays from `partitioning.global_batch`, or host numpy on one host)."""
        from doa_jax import decoding

        outs, counter = [], _DecodeCounter(self, batches)
        with partitioning.mesh_context(self.mesh, self.rules):
            for b in batches:
                length = max_decode_len or b["decoder_target_tokens"].shape[1]
                outs.append(_to_host(decoding.greedy(self.model_config, params, b["encoder_input_tokens"],
                                                     length).tokens))
                counter.add()
        counter.done()
        return np.concatenate(outs)

    # ------------------------------------------------------------------ the loop
    def fit(self, train: BatchSource, eval_source: Optional[BatchSource] = None, *,
            decode_metrics: Optional[DecodeMetricsFn] = None,
            step_allowed: Optional[Callable[[int], bool]] = None) -> TrainResult:
        """Trains to `train_steps` (or `epochs`), evaluating, checkpointing and logging on the way.

        `step_allowed(step)` (e.g. a budget cap) is asked before each step; when it says no, the
        run stops cleanly at that step boundary, saves a checkpoint and reports `stopped_by_budget`.
        """
        cfg = self.config
        if cfg.epochs is not None:
            if not train.steps_per_epoch:
                raise ValueError("EPOCHS needs a training source that knows its epoch size; set TRAIN_STEPS")
            total_steps = max(1, math.ceil(cfg.epochs * train.steps_per_epoch))
        else:
            total_steps = cfg.train_steps
        if train.batch_size != cfg.batch_size:
            raise ValueError(f"the training source's batch size ({train.batch_size}) differs from "
                             f"BATCH_SIZE ({cfg.batch_size})")
        partitioning.check_batch_size(cfg.batch_size, self.mesh, jax.process_count(), cfg.num_microbatches)
        self._say("starting: first batch, parameters, then compiling the training step (the first step's line "
                  "waits for the compile)")
        example = take_features(next(iter(train.iterate(0))))
        self.program = None
        self._program(total_steps)
        self._eval_period = self._period(cfg.eval_every, train.steps_per_epoch, "eval_every")
        self._ckpt_period = self._period(cfg.checkpoint_every, train.steps_per_epoch, "checkpoint_every")
        storage.makedirs(self.model_dir)
        self.checkpoints = train_checkpoints.TrainCheckpoints(
            self.model_dir / "checkpoints", keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing)
        self.best = (train_checkpoints.TrainCheckpoints(self.model_dir / "best", keep=1,
                                                        async_save=cfg.async_checkpointing, with_optimizer=False)
                     if cfg.keep_best and eval_source is not None else None)
        self._signal: Optional[int] = None
        handlers = self._install_signal_handlers()
        try:
            return self._loop(train, eval_source, decode_metrics, total_steps, example, step_allowed)
        finally:
            for signum, previous in handlers.items():
                signal.signal(signum, previous)
            self.checkpoints.wait()
            self.checkpoints.close()
            if self.best is not None:
                self.best.wait()
                self.best.close()

    def _loop(self, train, eval_source, decode_metrics, total_steps, example, step_allowed=None) -> TrainResult:
        cfg = self.config
        state, tstate, origin = self._restore_or_init()
        self._say(origin)
        step = int(tstate["step"])
        base_rng = jax.random.PRNGKey(cfg.seed)
        tstate.update(seed=cfg.seed, rng_key=[int(x) for x in np.asarray(base_rng).ravel()])
        train_step, meter = self.program.train_step, self._meter(example, total_steps)
        log, events = self._open_outputs(state, tstate, step)
        pending, last, diverged = [], {}, None
        stopped_early = compiled = capped = False
        if tstate.get("stopped_early"):
            self._say(f"this run already stopped early at step {step}; nothing to do")
            total_steps = step
        data = train.iterate(int(tstate["data_position"]["batches"]))
        meter.start(step)
        try:
            with partitioning.mesh_context(self.mesh, self.rules):
                while step < total_steps:
                    if step_allowed is not None and not step_allowed(step):
                        self._say(f"budget reached: stopping at step {step} of {total_steps}")
                        capped = True
                        break
                    try:
                        local = take_features(next(data))
                    except StopIteration:
                        self._say(f"training data ended at step {step}")
                        break
                    state, metrics = train_step(state, partitioning.global_batch(local, self.mesh), base_rng)
                    pending.append(metrics)
                    step += 1
                    if not compiled:
                        compiled = self._first_step_done(metrics, meter, step)
                    tstate["step"] = step
                    tstate["data_position"] = {"batches": int(tstate["data_position"]["batches"]) + 1}
                    stop_signal = self._agreed_signal()
                    do_eval = eval_source is not None and (
                        (self._eval_period and step % self._eval_period == 0) or step == total_steps)
                    do_ckpt = ((self._ckpt_period and step % self._ckpt_period == 0) or step == total_steps
                               or stop_signal is not None)
                    logged = step % cfg.log_every == 0 or do_eval or do_ckpt
                    if logged:
                        row, diverged = self._summarise(pending, step, tstate)
                        pending = []
                        if diverged:
                            break
                        row.update(meter.report(step))
                        if do_eval:
                            row.update(self._eval_and_track(state, eval_source, decode_metrics, tstate, step))
                            if self._should_stop(tstate):
                                stopped_early, do_ckpt = True, True
                                tstate["stopped_early"] = True
                        self._emit(row, step, total_steps, log, events)
                        last = row
                    self._heartbeat(pending, step, total_steps, meter)   # a console line when one is due
                    if do_ckpt:
                        self._save(state, tstate)
                    if stop_signal is not None:
                        self._stop_for_signal(stop_signal, step)
                    if logged:
                        meter.start(step)   # evaluation and checkpoint time stay out of throughput
                    if stopped_early:
                        self._say(f"early stopping at step {step}: no {cfg.eval_metric} improvement in "
                                  f"{cfg.early_stopping_patience} evaluations")
                        break
                if pending:
                    last, diverged = self._summarise(pending, step, tstate)
                    if not diverged:
                        self._emit(last, step, total_steps, log, events)
                        self._save(state, tstate)
                elif capped:
                    self._save(state, tstate)
        finally:
            if events is not None:
                events.close()
        return TrainResult(state, step, tstate.get("best_metric"), tstate.get("best_step"),
                           stopped_early or bool(tstate.get("stopped_early")), last, stopped_by_budget=capped,
                           diverged=diverged, lost_seconds=getattr(self, "_lost_seconds", 0.0))

    def _open_outputs(self, state, tstate: dict, step: int):
        """`(metrics log, event writer)` (None off the chief); records the initial parameter norm
        (the reference of `max_param_growth`) on a fresh run."""
        if tstate.get("initial_param_norm") is None:
            with partitioning.mesh_context(self.mesh, self.rules):
                tstate["initial_param_norm"] = float(_to_host(jax.jit(optax.tree.norm)(state.params)))
        if not self._is_chief:
            return None, None
        log = progress.MetricsLog(self.model_dir / "metrics.jsonl")
        self._lost_seconds = log.drop_after(step)    # steps after the resumed checkpoint run again
        return log, progress.EventWriter(self.model_dir / "tensorboard") if self.config.tensorboard else None

    def _first_step_done(self, metrics, meter: progress.Throughput, step: int) -> bool:
        """Waits for the run's first step (its compile), says so, and restarts the throughput meter
        after it, keeping compilation out of the throughput."""
        jax.block_until_ready(metrics)
        self._say(f"compiled; step {step} done in {meter.since_start():.1f} s")
        meter.start(step)
        return True

    def _meter(self, example, total_steps: int) -> progress.Throughput:
        cfg = self.config
        in_len, out_len = example["encoder_input_tokens"].shape[1], example["decoder_input_tokens"].shape[1]
        peak, peak_note = progress.peak_flops_per_device(jax.devices()[0].device_kind)
        self._say(f"mesh {dict(self.mesh.shape)}, {progress.params_text(self.model_config.num_params())}, "
                  f"batch {cfg.batch_size} x {cfg.num_microbatches} microbatch(es), {total_steps} steps; "
                  f"MFU peak: {peak_note}; loss: {losses.loss_unit(cfg.loss)}; compiling the training step next "
                  f"(minutes for a large model on a CPU), then its first step")
        self._beat = progress.Heartbeat(cfg.log_seconds)   # time-based console lines (`_heartbeat`)
        return progress.Throughput(
            flops_per_step=flops.train_flops(self.model_config, cfg.batch_size, in_len, out_len),
            peak_flops=peak * self.mesh.size if peak else None, total_steps=total_steps,
            examples_per_step=cfg.batch_size, tokens_per_step=cfg.batch_size * (in_len + out_len))

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> dict:
        """SIGTERM/SIGINT set a flag the loop acts on after the step in flight; a second SIGINT
        raises KeyboardInterrupt at once. Only from the main thread (Python's rule)."""
        if not self.config.handle_signals or threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._signal = signum
            if self._is_chief:
                print(f"{signal.Signals(signum).name}: stopping after the current step and saving a "
                      f"checkpoint" + (" (Ctrl-C again to stop at once, without saving)"
                                       if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)

        return {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}

    def _agreed_signal(self) -> Optional[int]:
        """This host's stop signal; on several hosts, the first signal any host got (an all-gather
        of the flags after every step), so every host stops and saves at the same step."""
        if jax.process_count() == 1:
            return self._signal
        from jax.experimental import multihost_utils

        flags = [int(f) for f in np.asarray(multihost_utils.process_allgather(np.int32(self._signal or 0))).ravel()]
        got = [(i, f) for i, f in enumerate(flags) if f]
        if not got:
            return None
        first, signum = got[0]
        if self._is_chief and not getattr(self, "_told_signal", False):
            self._told_signal = True
            print(f"{signal.Signals(signum).name} reached {hosts.describe_host(first)}: every process saves "
                  f"the same step and exits", file=sys.stderr, flush=True)
        return signum

    def _stop_for_signal(self, signum: int, step: int) -> None:
        self.checkpoints.wait()
        if self.best is not None:
            self.best.wait()
        code = 128 + signum
        if self._is_chief:
            print(f"{signal.Signals(signum).name}: saved step {step} in {self.checkpoints.directory}; exiting with "
                  f"code {code}. Rerun the same command to resume.", file=sys.stderr, flush=True)
        raise TrainingPreempted(signum, step)

    @staticmethod
    def _period(value, steps_per_epoch: Optional[int], name: str) -> Optional[int]:
        if value != "epoch":
            return value
        if not steps_per_epoch:
            raise ValueError(f"{name}='epoch' needs a training source that knows its epoch size")
        return steps_per_epoch

    def _summarise(self, pending: list[dict], step: int, tstate: dict) -> tuple[dict[str, float], Optional[str]]:
        """Fetches the pending step metrics: `(row, None)`, or `({}, why)` when a step diverged."""
        got = jax.device_get(pending)
        diverged = self._divergence(got, step - len(got) + 1, tstate)
        if diverged:
            self._say(diverged)
            return {}, diverged
        tokens = sum(float(m["num_tokens"]) for m in got)
        row = dict(step=step, loss=float(np.mean([float(m["loss"]) for m in got])),
                   loss_per_token=sum(float(m["nll_sum"]) for m in got) / max(tokens, 1.0),
                   token_accuracy=sum(float(m["correct"]) for m in got) / max(tokens, 1.0),
                   z_loss=float(np.mean([float(m["z_loss"]) for m in got])),
                   **({"kd_loss": float(np.mean([float(m["kd_loss"]) for m in got]))}
                      if self.config.loss.kd_weight > 0 else {}),
                   learning_rate=float(got[-1]["learning_rate"]), grad_norm=float(got[-1]["grad_norm"]),
                   param_norm=float(got[-1]["param_norm"]))
        return row, None

    def _divergence(self, got: list[dict], first: int, tstate: dict) -> Optional[str]:
        """Why the first diverged step of `got` (steps from `first`) diverged, or None."""
        cfg = self.config
        latest = self.checkpoints.latest_step()
        where = (f"the last good checkpoint is step {latest} in {self.checkpoints.directory}"
                 if latest is not None else "no checkpoint had been saved yet")
        limit = (cfg.max_param_growth * tstate["initial_param_norm"]
                 if cfg.max_param_growth and tstate.get("initial_param_norm") else None)
        for i, m in enumerate(got):
            s, loss, norm, pnorm = first + i, float(m["loss"]), float(m["grad_norm"]), float(m["param_norm"])
            if m["nonfinite"]:
                what = "loss became non-finite (NaN/inf in the loss or gradients)"
            elif cfg.max_grad_norm is not None and norm > cfg.max_grad_norm:
                what = f"gradient norm exploded past max_grad_norm={cfg.max_grad_norm:g}"
            elif limit is not None and pnorm > limit:
                what = (f"parameter norm grew past {cfg.max_param_growth:g} x its initial "
                        f"{tstate['initial_param_norm']:.6g} (max_param_growth)")
            else:
                continue
            return (f"{what} at step {s} (loss {loss:.6g}, gradient norm {norm:.6g}, parameter norm {pnorm:.6g}); "
                    f"training stopped without saving; {where}. Lower the learning rate or check the data.")
        return None

    def _eval_and_track(self, state, eval_source, decode_metrics, tstate, step) -> dict[str, float]:
        cfg = self.config
        result = self.evaluate(state.params, eval_source, decode_metrics=decode_metrics,
                               max_decode_len=cfg.max_decode_len)
        if cfg.eval_metric not in result:
            raise ValueError(f"eval_metric {cfg.eval_metric!r} is not among the dev metrics {sorted(result)}")
        value = result[cfg.eval_metric]
        best = tstate.get("best_metric")
        better = best is None or (value < best if cfg.metric_mode == "min" else value > best)
        if better:
            tstate.update(best_metric=value, best_step=step, evals_without_improvement=0)
            if self.best is not None:
                self.best.save(step, params=state.params, model_config=self.model_config,
                               trainer_state=dict(tstate, metrics=result))
        else:
            tstate["evals_without_improvement"] = int(tstate.get("evals_without_improvement", 0)) + 1
        return {f"eval/{k}": v for k, v in result.items()}

    def _should_stop(self, tstate) -> bool:
        p = self.config.early_stopping_patience
        return p is not None and int(tstate.get("evals_without_improvement", 0)) >= p

    def _save(self, state: TrainState, tstate: dict) -> None:
        if self.checkpoints.latest_step() == tstate["step"]:
            return
        self.checkpoints.save(int(tstate["step"]), params=state.params, opt_state=state.opt_state,
                              model_config=self.model_config, trainer_state=dict(tstate))

    def _emit(self, row, step, total_steps, log, events) -> None:
        if log is not None:
            log.write(row)
        if events is not None:
            events.scalars(step, {k if k.startswith("eval/") else f"train/{k}": v
                                  for k, v in row.items() if k != "step"})
        if self.config.verbose and self._is_chief:
            print(progress.console_line(step, total_steps, row, losses.loss_unit(self.config.loss)), flush=True)
        self._beat.reset()

    def _heartbeat(self, pending: list, step: int, total_steps: int, meter: progress.Throughput) -> None:
        """A console line between logged steps when `log_seconds` have passed (no metrics row): the
        mean loss of the steps since the last line, the rate and ETA so far."""
        if not (pending and self._beat.due()):
            return
        if self.config.verbose and self._is_chief:
            row = dict(loss=float(np.mean([float(m["loss"]) for m in jax.device_get(pending)])), **meter.peek(step))
            n = len(pending)
            print(progress.console_line(step, total_steps, row, losses.loss_unit(self.config.loss))
                  + f" | {n} step{'' if n == 1 else 's'} since the last line", flush=True)
        self._beat.reset()

    def _say(self, text: str) -> None:
        if self.config.verbose and self._is_chief:
            print(text, flush=True)


class _DecodeCounter:
    """Validation decoding's progress: `decoding validation: 128/835 examples (12.3 ex/s)` at most
    every `log_seconds`, and one closing line; counts real rows (a padding row has no target)."""

    def __init__(self, trainer: "Trainer", batches: Sequence[Mapping[str, Any]]):
        self.on = trainer.config.verbose and trainer._is_chief and trainer.config.log_seconds is not None
        self.beat = progress.Heartbeat(trainer.config.log_seconds)
        self.start, self.done_rows = time.perf_counter(), 0
        real = [int((_to_host(b["decoder_target_tokens"]).max(axis=1) > 0).sum()) for b in batches] if self.on else []
        self.total, self.rows = sum(real), iter(real)

    def add(self) -> None:
        self.done_rows += next(self.rows, 0)
        if self.on and self.beat.due():
            print(f"decoding validation: {self.done_rows}/{self.total} examples ({self._rate():.1f} ex/s)", flush=True)
            self.beat.reset()

    def done(self) -> None:
        if self.on:
            print(f"decoded {self.total} validation examples in {time.perf_counter() - self.start:.1f} s "
                  f"({self._rate():.1f} ex/s)", flush=True)

    def _rate(self) -> float:
        return self.done_rows / max(time.perf_counter() - self.start, 1e-9)


def _sync_hosts(name: str) -> None:
    """A barrier across hosts (nothing on one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _to_host(x) -> np.ndarray:
    """The full value of a (possibly multi-host) global array on every host."""
    if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def token_sequence_accuracy(predictions: np.ndarray, batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Decode metric on token ids: % of examples whose decode equals the target up to EOS."""
    targets = np.concatenate([b["decoder_target_tokens"] for b in batches])
    keep = targets.max(axis=1) > 0                                   # drop padding rows
    length = targets.shape[1]
    preds = np.zeros_like(targets)
    n = min(length, predictions.shape[1])
    preds[:, :n] = predictions[: len(targets), :n]
    same = np.all(np.where(targets > 0, preds == targets, True), axis=1)
    return {"sequence_accuracy": 100.0 * float(np.mean(same[keep]))}


__all__ = ["CheckpointMismatchError", "NonFiniteLossError", "TrainConfig", "TrainResult", "TrainState",
           "Trainer", "TrainingPreempted", "check_params_match", "load_initial_params", "token_sequence_accuracy"]
