"""The jit-compiled train and eval steps: grads of the trainable partition only, accumulated
over micro-batches inside one step (App. B.1: physical batch 2 x accumulation 6)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from iqa_jax import xla_cpu
from iqa_jax.models import tower
from iqa_jax.training.losses import iqa_loss


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def split_params(params, labels):
  """-> (trainable, frozen) trees of the same structure, with None where a leaf is elsewhere."""
  trainable = jax.tree.map(lambda p, label: None if label == "frozen" else p, params, labels)
  frozen = jax.tree.map(lambda p, label: p if label == "frozen" else None, params, labels)
  return trainable, frozen


def merge_params(a, b):
  return jax.tree.map(lambda x, y: y if x is None else x, a, b, is_leaf=lambda x: x is None)


def split_layers_for(model_config, params, labels, mesh) -> Any | None:
  """-> parallel.jit_train_step's `split_layers` (stacked_frozen) where the step unrolls its
  scanned layers on a CPU mesh of one process (tower.unrolled); None where it does not."""
  get = model_config.get
  if not (get("scan", True) and tower.unrolled(get("scan_unroll", "auto"), get("remat", "none"),
                                                training=True)
          and mesh.devices.flat[0].platform == "cpu" and jax.process_count() == 1):
    return None
  return stacked_frozen(params, labels)


def stacked_frozen(params, labels) -> Any:
  """-> a tree of bools like `params`: True at the frozen leaves of a layer stack (nn.scan's
  `Encoder`: a dict of modules whose leaves all have at least 2 axes and one leading size >= 2,
  the layer axis), for parallel.jit_train_step(split_layers=...)."""
  def stack_size(tree) -> int:
    sizes = {x.shape[0] if x.ndim >= 2 else 0 for x in jax.tree.leaves(tree)}
    return sizes.pop() if len(sizes) == 1 else 0

  def mark(tree, tree_labels, in_stack: bool):
    if not isinstance(tree, dict):
      return in_stack and tree_labels == "frozen"
    in_stack = in_stack or (any(isinstance(v, dict) for v in tree.values())
                            and stack_size(tree) >= 2)
    return {k: mark(v, tree_labels[k], in_stack) for k, v in tree.items()}
  return mark(params, labels, False)


def make_train_step(model, tx: optax.GradientTransformation, labels, *, grad_accum: int = 1,
                    margin_lambda: float = 0.25, margin_weight: float = 1.0,
                    with_grad_norm: bool = False, micro_batched: bool = False,
                    axis_name: str | None = None, fuse_micro_batches: bool = False,
                    margin_form: str = "eq1") -> Callable:
  """-> train_step(state, batch) -> (state, metrics); batch holds 'image' and 'mos'.

  micro_batched: the batch is already (grad_accum, micro, ...), as parallel.put_batch lays it out.
  axis_name: inside pmap over that axis; the loss sees the whole micro-batch, grads are pmean'd.
  fuse_micro_batches: one forward and backward over all grad_accum micro-batches, the loss still
  taken per micro-batch (Eq. 1's pairs stay within one) and averaged: the same gradient in fewer,
  larger matmuls. For a model without batch-coupled layers whose micro-batches fit at once (the
  head on stored features); dropout masks are then drawn once per step. Ignored with axis_name.
  On the CPU the dropout masks' threefry is lowered unrolled (xla_cpu.unrolled_threefry): the
  same masks, drawn faster.
  """
  xla_cpu.unrolled_threefry()

  def loss_fn(trainable, frozen, images, mos, weight, rng):
    params = merge_params(trainable, frozen)
    pred, _ = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
    if axis_name:  # the pairwise margin loss (Eq. 1) spans all devices' shares of the micro-batch
      pred, mos, weight = (jax.lax.all_gather(x, axis_name, tiled=True)
                           for x in (pred, mos, weight))
    loss, parts = iqa_loss(pred, mos, margin_lambda, margin_weight, weight, margin_form)
    return loss, parts

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def fused_loss_fn(trainable, frozen, images, mos, weight, rng):
    k, m = mos.shape  # (grad_accum, micro)
    params = merge_params(trainable, frozen)
    pred, _ = model.apply({"params": params}, images.reshape((k * m,) + images.shape[2:]),
                          train=True, rngs={"dropout": rng})
    losses, parts = jax.vmap(
        lambda p, y, w: iqa_loss(p, y, margin_lambda, margin_weight, w, margin_form))(
        pred.reshape(k, m), mos, weight)
    return losses.sum(), jax.tree.map(jnp.sum, parts)  # sums over micro-batches, as `one` adds

  fused_grad_fn = jax.value_and_grad(fused_loss_fn, has_aux=True)

  def train_step(state: TrainState, batch):
    trainable, frozen = split_params(state.params, labels)
    step_rng = jax.random.fold_in(state.rng, state.step)
    if axis_name:
      step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
    images, mos = batch["image"], batch["mos"]
    weight = batch.get("valid", jnp.ones(mos.shape, bool)).astype(jnp.float32)
    k = grad_accum

    def micro(x):
      return x if micro_batched else x.reshape((k, x.shape[0] // k) + x.shape[1:])

    def one(carry, xs):
      g_sum, l_sum, parts_sum = carry
      i, im, y, w = xs
      (loss, parts), g = grad_fn(trainable, frozen, im, y, w, jax.random.fold_in(step_rng, i))
      return (jax.tree.map(jnp.add, g_sum, g), l_sum + loss,
              jax.tree.map(jnp.add, parts_sum, parts)), None

    # Gradients are accumulated in one place: a scan over the k micro-batches (k, micro, ...).
    # k=1 is no accumulation and calls the body once: a one-trip scan, even unrolled, compiles to
    # other fusions and rounds differently (measured: params 7e-4 apart after 3 demo steps).
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    init = (zeros, jnp.zeros(()), {"mse": jnp.zeros(()), "margin": jnp.zeros(())})
    images, mos, weight = micro(images), micro(mos), micro(weight)
    if fuse_micro_batches and not axis_name:
      (loss, parts), grads = fused_grad_fn(trainable, frozen, images, mos, weight, step_rng)
    elif k == 1:
      (grads, loss, parts), _ = one(init, (0, images[0], mos[0], weight[0]))
    else:
      (grads, loss, parts), _ = jax.lax.scan(one, init, (jnp.arange(k), images, mos, weight))
    grads = jax.tree.map(lambda g: g / k, grads)
    if axis_name:  # all_gather's transpose sums D equal cotangents: the mean is the batch grad
      grads = jax.lax.pmean(grads, axis_name)
    # Frozen leaves get zero grads that optax.set_to_zero discards; XLA drops them entirely.
    full_grads = merge_params(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss / k, "mse": parts["mse"] / k, "margin": parts["margin"] / k}
    if with_grad_norm:
      metrics["grad_norm"] = optax.tree.norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step
