"""The fused per-layer update (issue 27): the optimizer consumes each layer's gradient inside the
backward pass, so no whole gradient tree is ever alive.

The plain train step (`trainer.program.StepProgram`) differentiates the whole loss, which leaves a
gradient for every parameter (41.5 GiB of float32 for T5 v1.1 XXL) alive before the optimizer
reads any of it. This step runs the same math in another order, on scanned layers:

* forward: the encoder and decoder embeddings, each stack's `lax.scan` over its layers, the final
  norms, logits and loss; each piece is `jax.vjp`'d. A layer keeps what `network.layer_policy`
  says (its inputs only for REMAT 'full'; the matmul outputs for 'dots' and 'none'), stacked over
  the layers; a residual that is the layer's own parameters, its input or a loop-invariant input
  (biases, the encoder output) is not stacked but given back to the backward pass, which reads
  the parameters from their buffer before overwriting them;
* backward, in reverse: logits and loss, then the decoder's layers last to first in a `fori_loop`
  whose carry holds the stack's parameters and optimizer state (donated by the step, written in
  place): layer i's gradient is computed, fed to its optimizer update (`optimizers.apply_layer`:
  the plain step's per-layer rule, its stochastic-rounding key, its clipping scale) and dropped;
  then the decoder embedding, the encoder's norm, the encoder's layers the same way, and the
  encoder embedding. The parameters outside the stacks (token embedding, logits kernel, norms,
  position biases: about 1 GiB of gradient at XXL) are updated last, from their own gradients.

Settings that need the whole gradient first are run in two passes: with global-norm clipping
(`OptimizerConfig.grad_clip_norm`, the paper's `max_grad_norm` 1.0) a first backward pass only
sums the squared gradients, a second one applies the clipped updates. The forward is shared (its
stacked residuals serve both), so a step costs one backward pass more: 7 forward-equivalents
instead of 4 with REMAT 'full' (1.75x), 5 instead of 3 otherwise (1.67x).

Microbatches are refused: a layer's update needs every microbatch's gradient of that layer at
once, so every microbatch's activations would be alive together, which is what microbatches are
there to avoid. Dropout keys are the step's key folded with the piece and the layer: a resumed run
is bit-identical, and masks differ from the plain step's (as the scanned model's already differ
from the unscanned one's).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from doa_jax import losses, optimizers
from doa_jax.losses import LossConfig
from doa_jax.model import T5Config, Transformer
from doa_jax.model.network import DecoderLayer, EncoderLayer, StackLayer
from doa_jax.model.scan import STACKED
from doa_jax.model.stack import Tape, forward, index, layer_vjp

ENCODER, DECODER = ("encoder", STACKED), ("decoder", STACKED)
# Dropout keys of the pieces of one step (folded into the step's key).
_PIECES = dict(encoder_embed=1, encoder_finish=2, decoder_embed=3, head=4, encoder_layers=5, decoder_layers=6)


def check(model_config: T5Config, num_microbatches: int) -> None:
    """Raises, naming the setting and the alternative, when the fused update cannot run."""
    if not model_config.scan_layers:
        raise ValueError("FUSED_UPDATE needs scanned layers (T5Config.scan_layers = True): it walks each stack "
                         "of layers backwards in one loop; scan the layers or set FUSED_UPDATE = False")
    if model_config.scan_backward == "autodiff":
        raise ValueError("FUSED_UPDATE runs the stack's own backward loop (the optimizer inside it), not JAX's "
                         "transposed scan: leave T5Config.scan_backward 'auto' or 'stack', or set FUSED_UPDATE = False")
    check_microbatches(num_microbatches)


def check_microbatches(num_microbatches: int) -> None:
    if num_microbatches != 1:
        raise ValueError(f"FUSED_UPDATE does not take microbatches (NUM_MICROBATCHES = {num_microbatches}): a "
                         "layer's update needs every microbatch's gradient of it at once, so the whole batch's "
                         "activations would be kept anyway; use REMAT (T5Config.remat_policy) or a smaller "
                         "BATCH_SIZE, or FUSED_UPDATE = False to accumulate microbatches")


# ----------------------------------------------------------------------------- the optimizer state, by stack

class StateView(NamedTuple):
    """`per_layer`'s state as this step walks it (`view_state`): `rest`, the inner state of the
    unstacked params; `stacks`, per stack (`optimizers.stack_paths` order) an inner state whose
    param-shaped entries hold the stack's layers on their leading axis. Entries without that axis
    (the step counts of a whole-tree state, e.g. AdamW's) are left as they are by
    `put_layer_state`; the rest's update gives their new value."""

    rest: Any
    stacks: tuple


def _param_shaped(params: Any) -> Callable[[Any], bool]:
    struct = jax.tree_util.tree_structure(params)
    return lambda node: isinstance(node, dict) and jax.tree_util.tree_structure(node) == struct


def view_state(state: Any, params: Any) -> StateView:
    """`state` (of `per_layer` over `params`) as a `StateView`: no copy, only regrouped leaves."""
    paths = optimizers.stack_paths(params)
    if isinstance(state, optimizers.PerLayerState):
        return StateView(state.rest, tuple(state.stacks))
    like = _param_shaped(params)

    def part(j):     # j = -1: the rest
        def pick(node):
            rest, branches = optimizers.split_stacks(node, paths)
            return rest if j < 0 else branches[j]
        return jax.tree_util.tree_map(lambda n: pick(n) if like(n) else n, state, is_leaf=like)

    return StateView(part(-1), tuple(part(j) for j in range(len(paths))))


def unview_state(view: StateView, state: Any, params: Any) -> Any:
    """The state `view` (from `view_state(state, params)`, updated) stands for, in `state`'s layout."""
    if isinstance(state, optimizers.PerLayerState):
        return optimizers.PerLayerState(view.rest, tuple(view.stacks))
    rest, branches = optimizers.split_stacks(params, optimizers.stack_paths(params))
    items, treedef = jax.tree_util.tree_flatten(state, is_leaf=_param_shaped(params))
    rest_items = jax.tree_util.tree_flatten(view.rest, is_leaf=_param_shaped(rest))[0]
    stack_items = [jax.tree_util.tree_flatten(s, is_leaf=_param_shaped(b))[0] for s, b in zip(view.stacks, branches)]
    out = [optimizers.merge_stacks(r, [s[k] for s in stack_items]) if isinstance(old, dict) else r
           for k, (old, r) in enumerate(zip(items, rest_items))]
    return jax.tree_util.tree_unflatten(treedef, out)


def _put(tree: Any, new: Any, i) -> Any:
    return jax.tree_util.tree_map(
        lambda b, v: jax.lax.dynamic_update_index_in_dim(b, v.astype(b.dtype), i, 0) if b.ndim else b, tree, new)


# ----------------------------------------------------------------------------- the backward pass of a stack

class _Update(NamedTuple):
    """The optimizer side of a backward pass: None in the norm-only pass."""

    inner: optax.GradientTransformation
    scale: Optional[jax.Array]       # the clipping factor (None: no clipping)
    key: Optional[jax.Array]         # the stack's rounding key (layer i folds in i)


def _backward(tape: Tape, branch: Any, state: Any, path: tuple, consts: tuple, fixed: tuple, dy: Any,
              update: Optional[_Update]):
    """Layers last to first: each layer's gradient from its `vjp`, and (with `update`) its optimizer
    update written into `branch` (the stack's params, `{path: stack}`) and `state` in place.
    `(cotangent of the first layer's input, summed cotangents of `consts` (float32), branch, state,
    squared gradient norm, squared update norm)`."""
    length = jax.tree_util.tree_leaves(tape.inputs)[0].shape[0]
    zero = jnp.float32(0.0)
    dconsts = jax.tree_util.tree_map(lambda c: jnp.zeros(c.shape, jnp.float32), consts)

    def grads(i, dy, dc, p_branch):
        dp, dx, dcon = layer_vjp(tape, i, _get(p_branch, path), consts, fixed)(dy)
        return dx, jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), dc, dcon), _at(path, dp)

    if update is None:     # the norm-only pass: no params or state in the carry
        def norm_body(k, carry):
            i = length - 1 - k
            dy, dc, sq_g = carry
            dx, dc, g = grads(i, dy, dc, index(branch, i))
            return dx, dc, sq_g + optimizers.sq_norm(g)

        dx, dc, sq_g = jax.lax.fori_loop(0, length, norm_body, (dy, dconsts, zero))
        return dx, dc, branch, state, sq_g, zero

    def body(k, carry):
        i = length - 1 - k
        dy, dc, branch, state, sq_g, sq_u = carry
        p_branch = index(branch, i)
        dx, dc, g = grads(i, dy, dc, p_branch)
        key = None if update.key is None else jax.random.fold_in(update.key, i)
        new, s, q = optimizers.apply_layer(update.inner, g, index(state, i), p_branch, update.scale, key)
        return dx, dc, _put(branch, new, i), _put(state, s, i), sq_g + optimizers.sq_norm(g), sq_u + q

    return jax.lax.fori_loop(0, length, body, (dy, dconsts, branch, state, zero, zero))


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _at(path: tuple, value: Any) -> Any:
    for key in reversed(path):
        value = {key: value}
    return value


# ----------------------------------------------------------------------------- the model's pieces

class _Pieces:
    """The model as this step runs it: functions of the params outside the stacks (`rest`) for the
    embeddings, the encoder's final norm and the loss head, and of one layer's params for a layer.
    Each piece (and layer i of a stack) draws dropout from the step's key folded with its own."""

    def __init__(self, cfg: T5Config, loss: LossConfig, batch: dict, rng: jax.Array):
        self.cfg, self.loss, self.batch = cfg, loss, batch
        self.deterministic = cfg.dropout_rate == 0.0
        self.rng, self.model = rng, Transformer(cfg)
        self.weights, self.divisor = losses.loss_weights(loss, batch)
        # One layer's function of (params, input, consts, fixed, key), as the scanned model runs it.
        self.encoder_layer = StackLayer(EncoderLayer, cfg, self.deterministic)
        self.decoder_layer = StackLayer(DecoderLayer, cfg, self.deterministic)

    def key(self, piece: str) -> Optional[jax.Array]:
        return None if self.deterministic else jax.random.fold_in(self.rng, _PIECES[piece])

    def _rngs(self, key):
        return None if key is None else {"dropout": key}

    def _run(self, piece: str, method, rest, *args):
        return self.model.apply({"params": rest}, *args, method=method, rngs=self._rngs(self.key(piece)))

    def encoder_embed(self, rest):
        b = self.batch
        return self._run("encoder_embed", lambda m, *a: m.encoder.embed(*a), rest, b["encoder_input_tokens"],
                         b.get("encoder_segment_ids"), self.deterministic)

    def encoder_finish(self, rest, x):
        return self._run("encoder_finish", lambda m, *a: m.encoder.finish(*a), rest, x, self.deterministic)

    def decoder_embed(self, rest):
        b = self.batch
        return self._run("decoder_embed", lambda m, *a: m.decoder.embed(*a), rest, b["encoder_input_tokens"],
                         b["decoder_input_tokens"], b.get("encoder_segment_ids"), b.get("decoder_segment_ids"),
                         self.deterministic)

    def head(self, rest, y):
        """`(loss, metrics)`: the plain step's `sequence_loss` of the logits."""
        logits = self._run("head", lambda m, *a: m.decoder.finish(*a), rest, y, self.deterministic)
        return losses.sequence_loss(self.loss, logits, self.batch, self.weights, self.divisor)


# ----------------------------------------------------------------------------- the step

def step(model_config: T5Config, loss: LossConfig, tx: optimizers.PerLayerTransformation, params: Any,
         opt_state: Any, batch: dict, rng: jax.Array, rounding_key: jax.Array) -> tuple[Any, Any, dict]:
    """`(new params, new optimizer state, metrics)` of one step (see the module doc); the metrics
    are the plain step's but the learning rate (`loss`, the loss's sums, `grad_norm`, `nonfinite`,
    `param_norm`). `rng`: the step's dropout key; `rounding_key`: the plain step's key for
    bfloat16 params' stochastic rounding."""
    pieces = _Pieces(model_config, loss, batch, rng)
    paths = optimizers.stack_paths(params)
    rest, branches = optimizers.split_stacks(params, paths)
    view = view_state(opt_state, params)
    enc, dec = paths.index(ENCODER), paths.index(DECODER)
    # Forward, each piece's vjp kept.
    (x, e_rel, e_mask), enc_embed_vjp = jax.vjp(pieces.encoder_embed, rest)
    x, enc_tape = forward(pieces.encoder_layer, _get(branches[enc], ENCODER), x, (e_rel,), (e_mask,),
                           pieces.key("encoder_layers"))
    encoded, enc_finish_vjp = jax.vjp(pieces.encoder_finish, rest, x)
    (y, d_rel, self_mask, cross_bias), dec_embed_vjp = jax.vjp(pieces.decoder_embed, rest)
    y, dec_tape = forward(pieces.decoder_layer, _get(branches[dec], DECODER), y, (encoded, d_rel),
                           (self_mask, cross_bias), pieces.key("decoder_layers"))
    loss_value, head_vjp, metrics = jax.vjp(pieces.head, rest, y, has_aux=True)
    g_head, dy = head_vjp(jnp.ones_like(loss_value))

    def backward(update: Callable[[int], Optional[_Update]]):
        """Both stacks backwards: `(gradient of rest, new branches, new stack states, sq grads, sq updates)`."""
        dy0, (d_enc, d_drel), b_dec, s_dec, g_dec, u_dec = _backward(
            dec_tape, branches[dec], view.stacks[dec], DECODER, (encoded, d_rel), (self_mask, cross_bias), dy,
            update(dec))
        (g_dec_embed,) = dec_embed_vjp((dy0, d_drel.astype(d_rel.dtype), jnp.zeros_like(self_mask),
                                        jnp.zeros_like(cross_bias)))
        g_finish, dx = enc_finish_vjp(d_enc.astype(encoded.dtype))
        dx0, (d_erel,), b_enc, s_enc, g_enc, u_enc = _backward(
            enc_tape, branches[enc], view.stacks[enc], ENCODER, (e_rel,), (e_mask,), dx, update(enc))
        (g_enc_embed,) = enc_embed_vjp((dx0, d_erel.astype(e_rel.dtype), jnp.zeros_like(e_mask)))
        g_rest = jax.tree_util.tree_map(lambda *g: sum(g[1:], g[0]), g_head, g_dec_embed, g_finish, g_enc_embed)
        new_b, new_s = list(branches), list(view.stacks)
        new_b[dec], new_b[enc], new_s[dec], new_s[enc] = b_dec, b_enc, s_dec, s_enc
        return g_rest, new_b, new_s, g_dec + g_enc + optimizers.sq_norm(g_rest), u_dec + u_enc

    keys = optimizers.update_keys(rounding_key, len(paths))
    scale = None
    if tx.clip_norm is not None:      # pass 1: the global norm; pass 2 below applies the clipped updates
        scale = optimizers.clip_factor(jnp.sqrt(backward(lambda j: None)[3]), tx.clip_norm)
    g_rest, new_b, new_s, sq_g, sq_u = backward(lambda j: _Update(tx.inner, scale, keys[1 + j]))
    new_rest, s_rest, q = optimizers.apply_layer(tx.inner, g_rest, view.rest, rest, scale, keys[0])
    new_params = optimizers.merge_stacks(new_rest, new_b)
    new_opt = unview_state(StateView(s_rest, tuple(new_s)), opt_state, params)
    grad_norm, update_norm = jnp.sqrt(sq_g), jnp.sqrt(sq_u + q)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    metrics = dict(metrics, grad_norm=grad_norm, nonfinite=(~finite).astype(jnp.int32),
                   param_norm=optax.tree.norm(new_params))
    return new_params, new_opt, metrics


__all__ = ["StateView", "check", "check_microbatches", "step", "unview_state", "view_state"]
