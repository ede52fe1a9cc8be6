"""Optimizers (optax) and learning-rate schedules, named by one frozen config.

* `adafactor`: T5X's fine-tuning defaults — second-moment decay `1 - (t+1)^-0.8`, factored
  second moments for matrices whose two largest dims are >= 128, update clipping at RMS 1.0, no
  momentum, updates scaled by the parameter's RMS (at least 1e-3). `optax.adafactor` implements
  exactly this rule; a fresh state starts at step 0 (T5X restores step 1e6 from the public
  checkpoints, so its decay starts near 1 — see t5x issue #1478).
* `adamw`: decoupled weight decay (the paper's PyTorch fine-tuning: lr 3e-5, batch 32); with
  `eps_before_bias_correction` the eps of transformers' AdamW (`scale_by_adam_hf`), which the
  paper's HF Trainer used.

Scanned layers (`T5Config.scan_layers`) hold each stack's params on a leading `layers` axis.
`per_layer` runs the optimizer once per layer over that axis (a `fori_loop` that slices a layer,
updates it and writes it back in place), so every layer keeps its own statistics (Adafactor's
parameter-scale and update clipping are per layer, exactly as T5X's per-layer names give them)
and the float32 temporaries are one layer's, not the whole stack's. `OptimizerConfig.build`
always wraps the optimizer in it; on per-layer (unscanned) params, and for element-wise AdamW
(whose whole-array update is the per-layer one), it is the plain optimizer with the same state. The update is computed in float32 whatever the params' dtype;
`apply_updates` writes it back, stochastically rounded when params are bfloat16.

Schedules are T5X's `create_learning_rate_scheduler` factor strings (`'constant'`,
`'constant * rsqrt_decay'`, `'constant * linear_warmup * rsqrt_decay'`, ...) plus
`'linear_to_zero'` (PyTorch/HF's linear decay from `warmup_steps` to the last step).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from doa_jax.model.scan import STACKED

Schedule = Callable[[Any], Any]


# ----------------------------------------------------------------------------- schedules

def _warmup(step, c):
    return jnp.minimum(1.0, step / c.warmup_steps) if c.warmup_steps > 0 else 1.0


def _rsqrt(step, c):
    return 1.0 / jnp.sqrt(jnp.maximum(step, max(c.warmup_steps, 1)))


def _rsqrt_normalized(step, c):
    return math.sqrt(max(c.warmup_steps, 1)) * _rsqrt(step, c)


def _cosine(step, c):
    progress = jnp.maximum(0.0, (step - c.warmup_steps) / float(c.steps_per_cycle))
    return jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * (progress % 1.0))))


def _linear_to_zero(step, c):
    span = max(c.total_steps - c.warmup_steps, 1)
    return jnp.clip((c.total_steps - step) / span, 0.0, 1.0)


# Factor name -> f(step, ScheduleParams). The schedule is the product of the named factors.
SCHEDULE_FACTORS: dict[str, Callable[[Any, "_ScheduleParams"], Any]] = {
    "constant": lambda step, c: c.base_learning_rate,
    "linear_warmup": _warmup,
    "rsqrt_decay": _rsqrt,
    "rsqrt_normalized_decay": _rsqrt_normalized,
    "decay_every": lambda step, c: c.decay_factor ** (step // c.steps_per_decay),
    "cosine_decay": _cosine,
    "linear_to_zero": _linear_to_zero,
}


@dataclasses.dataclass(frozen=True)
class _ScheduleParams:
    base_learning_rate: float
    warmup_steps: int
    total_steps: int
    decay_factor: float
    steps_per_decay: int
    steps_per_cycle: int


def learning_rate_schedule(factors: str = "constant", *, base_learning_rate: float = 1e-3,
                           warmup_steps: int = 0, total_steps: int = 1, decay_factor: float = 0.5,
                           steps_per_decay: int = 20000, steps_per_cycle: int = 100000,
                           min_learning_rate: float = 0.0) -> Schedule:
    """`step -> learning rate` as the product of `factors` ('constant * rsqrt_decay', ...)."""
    names = [n.strip() for n in factors.split("*") if n.strip()]
    unknown = [n for n in names if n not in SCHEDULE_FACTORS]
    if unknown or not names:
        raise ValueError(f"learning-rate schedule {factors!r}: unknown factor(s) {unknown}; known: "
                         f"{sorted(SCHEDULE_FACTORS)}")
    params = _ScheduleParams(base_learning_rate, warmup_steps, total_steps, decay_factor,
                             steps_per_decay, steps_per_cycle)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        value = jnp.float32(1.0)
        for name in names:
            value = value * SCHEDULE_FACTORS[name](step, params)
        return jnp.maximum(jnp.asarray(value, jnp.float32), min_learning_rate)

    return schedule


# ----------------------------------------------------------------------------- per-layer update

class PerLayerState(NamedTuple):
    """State of `per_layer`: the inner state of the unstacked params, and one per stack."""

    rest: Any     # inner state over the params outside any `layers` stack
    stacks: tuple  # per stack (in `stack_paths` order): each layer's inner state, stacked on axis 0


def stack_paths(tree: Any, path: tuple = ()) -> list[tuple]:
    """Paths (dict keys) of every stacked `layers` entry, in sorted order."""
    if not isinstance(tree, Mapping):
        return []
    found = []
    for key in sorted(tree):
        if key == STACKED:
            found.append(path + (key,))
        else:
            found.extend(stack_paths(tree[key], path + (key,)))
    return found


def split_stacks(tree: Any, paths: list[tuple]) -> tuple[Any, list[Any]]:
    """`(tree without the stacks, [each stack as a one-branch tree keeping its full path])`."""
    if tree is None:
        return None, [None] * len(paths)

    def without(node, path):
        out = dict(node)
        if len(path) == 1:
            del out[path[0]]
        else:
            out[path[0]] = without(node[path[0]], path[1:])
        return out

    def branch(node, path):
        return {path[0]: node[path[0]] if len(path) == 1 else branch(node[path[0]], path[1:])}

    rest = tree
    for path in paths:
        rest = without(rest, path)
    return rest, [branch(tree, path) for path in paths]


def merge_stacks(rest: Any, branches: list[Any]) -> Any:
    """The inverse of `split_stacks`."""
    def put(node, branch):
        out = dict(node)
        for key, value in branch.items():
            out[key] = put(node.get(key, {}), value) if isinstance(value, Mapping) and key != STACKED else value
        return out

    for branch in branches:
        rest = put(rest, branch)
    return rest


def _f32(tree):
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                  tree)


def _layer(tree, i):
    return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False), tree)


def _put_layer(buffers, values, i):
    return jax.tree_util.tree_map(
        lambda b, v: jax.lax.dynamic_update_index_in_dim(b, v.astype(b.dtype), i, 0), buffers, values)


def sq_norm(tree) -> jax.Array:
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)),
               jnp.float32(0.0))


def _stack_update(inner, grads, state, params, scale):
    """One stack: update layer i from its own slices, writing updates over the gradient buffer."""
    def body(i, carry):
        buffer, st = carry     # buffer[j] holds the gradient for j >= i and the update for j < i
        p = None if params is None else _f32(_layer(params, i))
        u, s = inner.update(_scaled(_layer(buffer, i), scale), _layer(st, i), p)
        return _put_layer(buffer, u, i), _put_layer(st, s, i)

    return jax.lax.fori_loop(0, _num_layers(grads), body, (grads, state))


def apply_layer(inner, grads, state, params, scale, key):
    """One layer (or any subtree) updated from its own gradient and state: `(new params, new
    state, squared norm of the update)`, written back in the params' dtype (`apply_updates`)."""
    u, s = inner.update(_scaled(grads, scale), state, _f32(params))
    return apply_updates(params, u, key), s, sq_norm(u)


def _stack_apply(inner, grads, state, params, scale, key):
    """One stack: update layer i and write it into the (donated) params and state in place."""
    def body(i, carry):
        p_buf, st, sq = carry
        new, s, q = apply_layer(inner, _layer(grads, i), _layer(st, i), _layer(p_buf, i), scale,
                                None if key is None else jax.random.fold_in(key, i))
        return _put_layer(p_buf, new, i), _put_layer(st, s, i), sq + q

    return jax.lax.fori_loop(0, _num_layers(grads), body, (params, state, jnp.float32(0.0)))


def _num_layers(tree) -> int:
    return jax.tree_util.tree_leaves(tree)[0].shape[0]


def _scaled(grads, scale):
    return _f32(grads) if scale is None else jax.tree_util.tree_map(lambda g: g.astype(jnp.float32) * scale, grads)


class PerLayerTransformation(NamedTuple):
    """An optax `GradientTransformation` (`init`, `update`) with a fused `apply`:
    `apply(grads, state, params, key=None) -> (new params, new state, update norm)` updates and
    writes back each layer in place (no full-size update tree; what the trainer uses). `inner`
    and `clip_norm` are what `per_layer` was built from (the fused update, `doa_jax.fused_update`,
    applies `inner` itself, layer by layer, inside the backward pass)."""

    init: Callable
    update: Callable
    apply: Callable
    inner: optax.GradientTransformation
    clip_norm: Optional[float]


def per_layer(inner: optax.GradientTransformation, clip_norm: Optional[float] = None,
              loop: bool = True) -> PerLayerTransformation:
    """`inner` applied to each layer of every stacked `layers` entry separately (see module doc),
    after clipping the gradients' global norm to `clip_norm` (optax's `clip_by_global_norm`).

    Params without stacks (or `loop=False`: an element-wise `inner`, whose update of a whole
    stacked array is the per-layer one) get `inner`'s own state and update (in float32).
    """

    def init(params):
        paths = stack_paths(params) if loop else []
        if not paths:
            return inner.init(_f32(params))
        rest, branches = split_stacks(params, paths)
        return PerLayerState(inner.init(_f32(rest)),
                             tuple(jax.vmap(lambda b: inner.init(_f32(b)))(b) for b in branches))

    def clip_scale(grads):
        return None if clip_norm is None else clip_factor(jnp.sqrt(sq_norm(grads)), clip_norm)

    def update(grads, state, params=None):
        scale = clip_scale(grads)
        if not isinstance(state, PerLayerState):
            updates, state = inner.update(_scaled(grads, scale), state, None if params is None else _f32(params))
            return jax.tree_util.tree_map(lambda u, g: u.astype(g.dtype), updates, grads), state
        paths = stack_paths(grads)
        (g_rest, g_stacks), (p_rest, p_stacks) = split_stacks(grads, paths), split_stacks(params, paths)
        u_rest, s_rest = inner.update(_scaled(g_rest, scale), state.rest, None if p_rest is None else _f32(p_rest))
        u_rest = jax.tree_util.tree_map(lambda u, g: u.astype(g.dtype), u_rest, g_rest)
        done = [_stack_update(inner, g, s, p, scale) for g, s, p in zip(g_stacks, state.stacks, p_stacks)]
        return merge_stacks(u_rest, [u for u, _ in done]), PerLayerState(s_rest, tuple(s for _, s in done))

    def apply(grads, state, params, key=None):
        scale = clip_scale(grads)
        if not isinstance(state, PerLayerState):
            updates, state = inner.update(_scaled(grads, scale), state, _f32(params))
            return _apply_by_layer(params, updates, key), state, jnp.sqrt(sq_norm(updates))
        paths = stack_paths(grads)
        (g_rest, g_stacks), (p_rest, p_stacks) = split_stacks(grads, paths), split_stacks(params, paths)
        keys = update_keys(key, len(paths))
        new_rest, s_rest, sq = apply_layer(inner, g_rest, state.rest, p_rest, scale, keys[0])
        done = [_stack_apply(inner, g, s, p, scale, k)
                for g, s, p, k in zip(g_stacks, state.stacks, p_stacks, keys[1:])]
        new_params = merge_stacks(new_rest, [p for p, _, _ in done])
        sq = sq + sum(q for _, _, q in done)
        return new_params, PerLayerState(s_rest, tuple(s for _, s, _ in done)), jnp.sqrt(sq)

    return PerLayerTransformation(init, update, apply, inner, clip_norm)


def _apply_by_layer(params, updates, key):
    """`apply_updates` with the rounding keys a per-layer update would use (`update_keys`: layer i
    of stack j folds i into the stack's key), so a whole-tree update of stacked params (AdamW's)
    rounds as the fused update (`doa_jax.fused_update`), which updates one layer at a time."""
    paths = stack_paths(params)
    if key is None or not paths:
        return apply_updates(params, updates, key)
    keys = update_keys(key, len(paths))
    (p_rest, p_stacks), (u_rest, u_stacks) = split_stacks(params, paths), split_stacks(updates, paths)
    layer_keys = lambda k, p: jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(_num_layers(p)))  # noqa: E731
    stacks = [jax.vmap(apply_updates)(p, u, layer_keys(k, p)) for p, u, k in zip(p_stacks, u_stacks, keys[1:])]
    return merge_stacks(apply_updates(p_rest, u_rest, keys[0]), stacks)


def clip_factor(norm, clip_norm: float):
    """What gradients with global norm `norm` are multiplied by to clip them to `clip_norm`."""
    return jnp.where(norm < clip_norm, 1.0, clip_norm / norm)


def update_keys(key, num_stacks: int) -> list:
    """The rounding keys of one update: the unstacked params' first, then one per stack (its layer
    i folds in i); all None without a key."""
    return [None] * (num_stacks + 1) if key is None else list(jax.random.split(key, num_stacks + 1))


def apply_gradients(tx, grads, state, params, key=None):
    """`(new params, new state, update norm)`: `tx.apply` when `tx` has one (`per_layer`), else
    optax's `update` followed by `apply_updates`."""
    if isinstance(tx, PerLayerTransformation):
        return tx.apply(grads, state, params, key)
    updates, state = tx.update(grads, state, params)
    return apply_updates(params, updates, key), state, jnp.sqrt(sq_norm(updates))


def stochastic_round(x: jax.Array, dtype: Any, key: jax.Array) -> jax.Array:
    """float32 `x` rounded to bfloat16 `dtype`, up or down with probability by distance: unbiased.

    Adds 16 random low bits to the float32 bit pattern and truncates them; sign-magnitude bits make
    this round the magnitude, so it is unbiased for either sign.
    """
    if jnp.dtype(dtype) != jnp.bfloat16:
        raise ValueError(f"stochastic rounding is to bfloat16, not {jnp.dtype(dtype).name}")
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


PARAM_DTYPES = ("float32", "bfloat16")


def cast_params(tree: Any, dtype: str) -> Any:
    """Floating leaves of `tree` (arrays or ShapeDtypeStructs) in `dtype` ('float32' or 'bfloat16')."""
    if dtype not in PARAM_DTYPES:
        raise ValueError(f"param_dtype must be one of {PARAM_DTYPES}, got {dtype!r}")
    target = jnp.dtype(dtype)

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == target:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, target, sharding=x.sharding)
        return x.astype(target)

    return jax.tree_util.tree_map(cast, tree)


def apply_updates(params: Any, updates: Any, key: Optional[jax.Array] = None) -> Any:
    """`params + updates`, added in float32 and written back in each param's dtype.

    bfloat16 params are stochastically rounded with `key` (a fresh key per step): an update
    smaller than half a bf16 ulp of its weight then still moves it on average, where rounding to
    nearest would drop it. Without a key (or for float32 params) rounding is to nearest.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    upd = treedef.flatten_up_to(updates)
    out = []
    for n, (p, u) in enumerate(zip(leaves, upd)):
        total = p.astype(jnp.float32) + u.astype(jnp.float32)
        if p.dtype == jnp.bfloat16 and key is not None:
            out.append(stochastic_round(total, p.dtype, jax.random.fold_in(key, n)))
        else:
            out.append(total.astype(p.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------- optimizers

def _adafactor(c: "OptimizerConfig", lr: Schedule) -> optax.GradientTransformation:
    return optax.adafactor(learning_rate=lr, decay_rate=c.decay_rate,
                           min_dim_size_to_factor=c.min_dim_size_to_factor,
                           clipping_threshold=c.clipping_threshold,
                           multiply_by_parameter_scale=c.multiply_by_parameter_scale,
                           momentum=c.momentum, eps=c.epsilon1)


def scale_by_adam_hf(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's scaling as transformers' AdamW (`adamw_hf`, HF Trainer's default optimizer until
    transformers 4.39, the paper's) computes it: eps joins sqrt(v) *before* the bias correction,
    `m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2^t))`, where optax and torch add eps to sqrt(v_hat).
    The effective eps is 32x larger at step 1 and falls to eps over ~1/(1-b2) steps; it matters
    where |gradient| is within a few eps/sqrt(1 - b2^t). Same state as `optax.scale_by_adam`."""
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def update(updates, state, params=None):
        _, state = adam.update(updates, state, params)        # the moments and the step count
        t = state.count.astype(jnp.float32)
        correction1, correction2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        scaled = jax.tree_util.tree_map(
            lambda m, v: (m / correction1) / (jnp.sqrt(v / correction2) + eps / jnp.sqrt(correction2)),
            state.mu, state.nu)
        return scaled, state

    return optax.GradientTransformation(adam.init, update)


def _adamw(c: "OptimizerConfig", lr: Schedule) -> optax.GradientTransformation:
    if not c.eps_before_bias_correction:
        return optax.adamw(learning_rate=lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    # optax.adamw's chain (the same state), with transformers' eps.
    return optax.chain(scale_by_adam_hf(c.b1, c.b2, c.eps), optax.add_decayed_weights(c.weight_decay),
                       optax.scale_by_learning_rate(lr))


OPTIMIZERS: dict[str, Callable[["OptimizerConfig", Schedule], optax.GradientTransformation]] = {
    "adafactor": _adafactor,
    "adamw": _adamw,
}
# Element-wise optimizers: updating a whole stacked array equals updating each layer, and XLA
# does it in place with no temporaries (notes/performance.md), so `per_layer` does not loop.
ELEMENTWISE = frozenset({"adamw"})


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer + schedule. Defaults are T5X's fine-tuning run (Adafactor, constant lr 1e-3).

    The paper's PyTorch setting is `name='adamw', learning_rate=3e-5`. `schedule` is a factor
    string (see `SCHEDULE_FACTORS`) or, from Python, any optax schedule `step -> lr`.
    `grad_clip_norm` clips the global gradient norm first (any optimizer).
    """

    name: str = "adafactor"
    learning_rate: float = 1e-3
    schedule: Union[str, Schedule] = "constant"
    warmup_steps: int = 0
    decay_factor: float = 0.5
    steps_per_decay: int = 20000
    steps_per_cycle: int = 100000
    min_learning_rate: float = 0.0
    grad_clip_norm: Optional[float] = None
    # Adafactor (T5X fine-tuning defaults).
    decay_rate: float = 0.8
    min_dim_size_to_factor: int = 128
    clipping_threshold: Optional[float] = 1.0
    multiply_by_parameter_scale: bool = True
    momentum: Optional[float] = None
    epsilon1: float = 1e-30
    # AdamW.
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    # True: eps added to sqrt(v) before bias correction, as transformers' AdamW (`adamw_hf`, the
    # paper's; `scale_by_adam_hf`); False: after it, as optax and torch.optim.AdamW.
    eps_before_bias_correction: bool = False

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"OptimizerConfig.name {self.name!r}: known optimizers {sorted(OPTIMIZERS)}")
        if not self.learning_rate > 0:
            raise ValueError(f"OptimizerConfig.learning_rate must be > 0, got {self.learning_rate}")
        if isinstance(self.schedule, str):
            learning_rate_schedule(self.schedule)  # validates the factor names early
        if self.eps_before_bias_correction and self.name != "adamw":
            raise ValueError(f"OptimizerConfig.eps_before_bias_correction is AdamW's (transformers' eps); "
                             f"optimizer {self.name!r} has no such eps")

    @property
    def uses_total_steps(self) -> bool:
        """Whether the schedule depends on the run's length (so programs can be shared otherwise)."""
        return isinstance(self.schedule, str) and "linear_to_zero" in self.schedule

    def make_schedule(self, total_steps: int) -> Schedule:
        if callable(self.schedule):
            return self.schedule
        return learning_rate_schedule(
            self.schedule, base_learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
            total_steps=total_steps, decay_factor=self.decay_factor,
            steps_per_decay=self.steps_per_decay, steps_per_cycle=self.steps_per_cycle,
            min_learning_rate=self.min_learning_rate)

    def build(self, total_steps: int) -> tuple[optax.GradientTransformation, Schedule]:
        """`(optax transformation, schedule)`; `total_steps` feeds decays that end with training."""
        schedule = self.make_schedule(total_steps)
        tx = per_layer(OPTIMIZERS[self.name](self, schedule), clip_norm=self.grad_clip_norm,
                       loop=self.name not in ELEMENTWISE)
        return tx, schedule


__all__ = ["OPTIMIZERS", "OptimizerConfig", "PerLayerState", "PerLayerTransformation", "SCHEDULE_FACTORS",
           "PARAM_DTYPES", "apply_gradients", "apply_layer", "apply_updates", "cast_params", "clip_factor",
           "learning_rate_schedule", "merge_stacks", "per_layer", "scale_by_adam_hf", "split_stacks", "sq_norm",
           "stack_paths", "stochastic_round", "update_keys"]
