"""model.scan_unroll: the scanned layers unrolled (tower.unrolled) compute the same train step as
the loop, on the same stacked params, and 'auto' unrolls only where it was measured to pay."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_parallel import _max_diff  # the max |diff| over two param trees
from test_xla_cpu import _tiny  # a 2-layer SigLIP, float32, lr 1e-3

from iqa_jax import parallel
from iqa_jax.models import tower
from iqa_jax.models.model import create_model
from iqa_jax.training.optim import make_optimizer
from iqa_jax.training.steps import TrainState, make_train_step


def test_auto_unrolls_only_a_cpu_train_step_without_remat(monkeypatch):
  assert tower.unrolled("auto", "none", training=True)  # this suite runs on the CPU
  assert not tower.unrolled("auto", "nothing", training=True)
  assert not tower.unrolled("auto", "none", training=False)
  assert tower.unrolled("full", "nothing", training=False)
  assert not tower.unrolled("loop", "none", training=True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not tower.unrolled("auto", "none", training=True)
  with pytest.raises(ValueError, match=r"model.scan_unroll must be auto\|loop\|full, got 'yes'"):
    tower.unrolled("yes", "none", training=True)
  config = _tiny()
  config.model.scan_unroll = "yes"
  with pytest.raises(ValueError, match=r"^model.scan_unroll must be"):  # when the model is built
    create_model(config)


@pytest.mark.parametrize("remat", ["none", "nothing"])
def test_unrolled_layers_train_as_the_loop(remat):
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(4, 32, 32, 3)).astype(np.float32),
           "mos": rng.uniform(size=4).astype(np.float32)}
  mesh = parallel.make_mesh()
  out, params = {}, None
  for unroll in ("loop", "full"):
    config = _tiny()
    config.model.lora.dropout = 0.05  # the per-layer dropout keys must match too
    config.model.remat, config.model.scan_unroll = remat, unroll
    model, own, _ = create_model(config)
    # Both steps start from the loop's params: the unrolled init is another program.
    params = own if params is None else params
    tx, labels = make_optimizer(config, params, steps_per_epoch=10)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(1))
    step = parallel.jit_train_step(functools.partial(make_train_step, model, tx, labels,
                                                     with_grad_norm=True), mesh, donate=False)
    on_mesh = parallel.put_batch(batch, mesh)
    new, metrics = step(state, on_mesh)
    loops = step.lower(state, on_mesh).as_text().count("stablehlo.while")
    out[unroll] = {"layout": jax.tree.map(jnp.shape, own), "new": new.params,
                   "loss": float(metrics["loss"]),
                   "grad_norm": float(metrics["grad_norm"]), "loops": loops}
  loop, full = out["loop"], out["full"]
  # The layer loops, forward and backward, are gone (the RNG keeps its own loops on the CPU).
  assert loop["loops"] - full["loops"] == 2
  assert full["layout"] == loop["layout"]  # the same stacked param layout
  # Measured: loss and gradient norm 0 apart, params 0 (remat) and 2.3e-10 (none) after the
  # step. The bounds are float32 rounding, as two differently shaped programs may differ by it on
  # another host; params: a hundredth of lr, as Adam's first step lr * g / |g| scales an
  # element's rounding up to lr where its gradient is near zero (tests/test_xla_cpu.py).
  assert full["loss"] == pytest.approx(loop["loss"], rel=1e-6)
  assert full["grad_norm"] == pytest.approx(loop["grad_norm"], rel=1e-6)
  assert _max_diff(loop["new"], full["new"]) <= 1e-5


def test_frozen_layers_fed_one_per_layer_train_as_the_stacked_step():
  """parallel.LayerSplitStep: the unrolled step reads each frozen layer's weights from its own
  input, made once per state, without XLA's per-layer slice copies. Another program than the
  plain step; measured equal to the last bit over 3 steps (bounds: float32 rounding)."""
  from iqa_jax.training.steps import split_layers_for, stacked_frozen
  config = _tiny()
  config.model.lora.dropout = 0.05
  config.model.remat = "none"
  model, params, _ = create_model(config)
  tx, labels = make_optimizer(config, params, steps_per_epoch=10)
  mesh = parallel.make_mesh()
  split = split_layers_for(config.model, params, labels, mesh)
  assert split == stacked_frozen(params, labels)
  marked = {jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_flatten_with_path(split)[0]
            if v}
  frozen_layers = {jax.tree_util.keystr(k) for k, v in
                   jax.tree_util.tree_flatten_with_path(labels)[0]
                   if v == "frozen" and "['encoder_layers']" in jax.tree_util.keystr(k)}
  assert marked == frozen_layers and len(marked) == 16  # not LoRA, not the MAP head's
  for remat, unroll in (("nothing", "auto"), ("none", "loop")):  # a loop slices anyway
    config.model.remat, config.model.scan_unroll = remat, unroll
    assert split_layers_for(config.model, params, labels, mesh) is None

  def start():
    return parallel.put_state(TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                         opt_state=tx.init(params), rng=jax.random.PRNGKey(1)),
                              labels, mesh)
  make = functools.partial(make_train_step, model, tx, labels, with_grad_norm=True)
  plain, by_layer = parallel.jit_train_step(make, mesh), parallel.jit_train_step(
      make, mesh, split_layers=split)
  assert isinstance(by_layer, parallel.LayerSplitStep)
  rng = np.random.default_rng(0)
  batch = parallel.put_batch({"image": rng.normal(size=(4, 32, 32, 3)).astype(np.float32),
                              "mos": rng.uniform(size=4).astype(np.float32)}, mesh)
  a, b = start(), start()
  slices = [s.lower(x, batch).compile().as_text().count("slice") for s, x in
            ((plain, a), (by_layer, b))]
  assert slices[1] < slices[0]
  held = by_layer._held[1]

  def stacked(state):
    return [p for p, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(split), strict=True)
            if s]
  before = stacked(b)
  for _ in range(3):
    a, ma = plain(a, batch)
    b, mb = by_layer(b, batch)
    assert float(mb["loss"]) == pytest.approx(float(ma["loss"]), rel=1e-6)
    assert float(mb["grad_norm"]) == pytest.approx(float(ma["grad_norm"]), rel=5e-6)
  assert by_layer._held[1] is held  # the per-layer copies were made once
  assert all(p is q for p, q in zip(before, stacked(b), strict=True))  # handed back as such
  assert _max_diff(a.params, b.params) <= 1e-5  # 3 Adam steps of lr 1e-3
  by_layer(start(), batch)
  assert by_layer._held[1] is not held  # a new state: new copies
