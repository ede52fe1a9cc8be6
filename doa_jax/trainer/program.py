"""The compiled programs of a run: the train state, the partitioned init, train step and eval step.

This is what `doa train` runs, what `doa bench` times and what `doa aot` compiles for hardware it
does not have (`doa_jax.bench`), so all three measure the same program.

One train step is a single `jax.jit` with explicit shardings for the state (params by their
logical axes, optimizer slots like their params) and the batch (over `data`), the state donated.
Inside: loss normalisation on the global batch, gradient accumulation over microbatches
(`lax.scan`) or the fused per-layer update (`doa_jax.fused_update`), the optimizer update, and
summed metrics. Dropout uses `fold_in(rng, step)` (and the microbatch index), so a step's
randomness depends only on the seed and the step, which makes a resumed run bit-identical to an
uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from doa_jax import fused_update, losses, optimizers, partitioning
from doa_jax.losses import LossConfig
from doa_jax.model import T5Config, Transformer
from doa_jax.model.stack import by_backward
from doa_jax.optimizers import OptimizerConfig


@flax.struct.dataclass
class TrainState:
    """The device half of a run's state (the host half is `state.Progress`)."""

    step: jax.Array          # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any


def _abstract_with(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  tree, shardings)


def rounding_key(rng: jax.Array) -> jax.Array:
    """The step's key for bfloat16 params' stochastic rounding (resumes replay it)."""
    return jax.random.fold_in(rng, 0x5352)


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
        self.abstract_params = optimizers.cast_params(nn.meta.unbox(boxed)["params"], param_dtype)
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
        params = optimizers.cast_params(nn.meta.unbox(self.model.init(rng, *self._init_inputs))["params"],
                                        self.param_dtype)
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
                                                           state.opt_state, batch, rng, rounding_key(rng))
            return (TrainState(state.step + 1, params, opt_state),
                    dict(metrics, learning_rate=self.schedule(state.step)))
        weights, divisor = losses.loss_weights(self.loss, batch)
        if self.num_microbatches == 1:
            (_, metrics), grads = jax.value_and_grad(self._loss_and_metrics, has_aux=True)(
                state.params, batch, weights, divisor, rng)
        else:
            grads, metrics = self._accumulate(state.params, batch, weights, divisor, rng)
        grads, grad_norm = gradient_norm_first(grads, scanned=self.model_config.scan_layers,
                                               backward=self.model_config.scan_backward)
        # bf16 params are written back with stochastic rounding, keyed by the step (resumes replay it).
        params, opt_state, update_norm = optimizers.apply_gradients(
            self.tx, grads, state.opt_state, state.params, rounding_key(rng))
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
        metrics = dict(metrics, grad_norm=grad_norm, learning_rate=self.schedule(state.step),
                       nonfinite=(~finite).astype(jnp.int32), param_norm=optax.tree.norm(params))
        return TrainState(state.step + 1, params, opt_state), metrics

    def _accumulate(self, params, batch, weights, divisor, rng):
        """`(summed gradients, summed metrics)` over the microbatches (`lax.scan`)."""
        m = self.num_microbatches
        grad_fn = jax.value_and_grad(self._loss_and_metrics, has_aux=True)

        # Row r goes to microbatch r % m: each microbatch keeps the batch's spread over `data`.
        def split(x):
            x = x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(
                x, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, "data")))

        micro = jax.tree_util.tree_map(split, dict(batch, __weights=weights))

        def body(carry, xs):
            i, mb = xs
            w = mb.pop("__weights")
            (_, mets), g = grad_fn(params, mb, w, divisor, jax.random.fold_in(rng, i))
            return jax.tree_util.tree_map(jnp.add, carry, (g, mets)), None

        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        first_w = first.pop("__weights")
        shapes = jax.eval_shape(self._loss_and_metrics, params, first, first_w, divisor, rng)[1]
        zero = (jax.tree_util.tree_map(jnp.zeros_like, params),
                jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
        (grads, metrics), _ = jax.lax.scan(body, zero, (jnp.arange(m), micro))
        return grads, metrics

    def _eval_fn(self, params, batch):
        weights = (batch.get("decoder_loss_weights", batch["decoder_target_tokens"]) > 0).astype(jnp.float32)
        batch = dict(batch, decoder_loss_weights=weights)
        # Dev metrics are teacher-forced cross-entropy on the gold targets (no soft targets there).
        eval_loss = dataclasses.replace(self.loss, kd_weight=0.0)
        _, metrics = self._loss_and_metrics(params, batch, weights, jnp.float32(1.0), None, eval_loss)
        return {k: metrics[k] for k in ("nll_sum", "correct", "num_tokens")}


@functools.lru_cache(maxsize=8)
def step_program(model_config: T5Config, loss: LossConfig, optimizer: OptimizerConfig, total_steps: int,
                 num_microbatches: int, mesh: jax.sharding.Mesh, rules: tuple,
                 param_dtype: str = "float32", fused: bool = False) -> StepProgram:
    """The `StepProgram` of these settings, built once and cached by value."""
    return StepProgram(model_config, loss, optimizer, total_steps, num_microbatches, mesh, rules, param_dtype, fused)


def gradient_norm_first(grads: Any, scanned: bool, backward: str = "auto") -> tuple[Any, jax.Array]:
    """`(grads, global norm)`. With the stack's own backward loop (`T5Config.scan_backward`: 'stack',
    or 'auto' lowered for anything but a TPU) and float32 gradients, each leaf's squared sum is taken
    before anything reads the leaf again: XLA otherwise schedules the norm after the update, keeping a
    whole stack's gradients alive through the other stack's backward pass (XXL on one H100: 91.9 ->
    77.5 GiB). With JAX's transposed scan ('autodiff', TPUs' choice) it is left to XLA, which needs
    less without the barrier there; unrolled layers too (the measurements: notes/aot.md). bf16
    gradients: the barrier would materialise them in bf16, where XLA otherwise keeps them in float32
    inside the fused update (excess precision), which would change results."""
    if not scanned or any(g.dtype != jnp.float32 for g in jax.tree_util.tree_leaves(grads)):
        return _norm_after(grads)
    return by_backward(backward, {"stack": _norm_first, "autodiff": _norm_after}, grads)


def _norm_after(grads: Any) -> tuple[Any, jax.Array]:
    return grads, optax.tree.norm(grads)


def _norm_first(grads: Any) -> tuple[Any, jax.Array]:
    """Each leaf's squared sum behind an optimisation barrier with the leaf (see `gradient_norm_first`)."""
    def squared(g):
        return jax.lax.optimization_barrier((g, jnp.sum(jnp.square(g.astype(jnp.float32)))))

    pairs = jax.tree_util.tree_map(squared, grads)
    is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
    grads = jax.tree_util.tree_map(lambda p: p[0], pairs, is_leaf=is_pair)
    squares = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda p: p[1], pairs, is_leaf=is_pair))
    return grads, jnp.sqrt(sum(squares))
