"""Learning-rate schedules (§3.1, App. A.3) and per-partition learning rates (App. A.1)."""
import pytest

from iqa_jax.defaults import base_config
from iqa_jax.training.optim import lr_schedule, resolve_schedule


def test_multistep_is_x02_at_epochs_15_and_25():
  c = base_config()
  c.optim.schedule = "multistep"
  sched = lr_schedule(1e-4, c.optim, steps_per_epoch=100)
  assert float(sched(0)) == pytest.approx(1e-4)
  assert float(sched(1499)) == pytest.approx(1e-4)
  assert float(sched(1500)) == pytest.approx(2e-5)
  assert float(sched(2499)) == pytest.approx(2e-5)
  assert float(sched(2500)) == pytest.approx(4e-6)


@pytest.mark.parametrize("name,want", [("clive", "constant"), ("agiqa1k", "constant"),
                                       ("agiqa3k", "constant"), ("koniq10k", "multistep"),
                                       ("kadid10k", "multistep"), ("flive", "multistep"),
                                       ("spaq", "multistep")])
def test_schedule_follows_the_dataset(name, want):
  c = base_config()
  c.data.name = name
  assert resolve_schedule(c) == want
  c.optim.schedule = "constant"
  assert resolve_schedule(c) == "constant"


def test_full_finetune_uses_two_learning_rates():
  import jax.numpy as jnp
  import numpy as np

  from iqa_jax.training.optim import make_optimizer
  c = base_config()
  c.model.finetune, c.optim.schedule = "full", "constant"
  params = {"backbone": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(3)}}
  tx, labels = make_optimizer(c, params, 10)
  grads = {"backbone": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(3)}}
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step moves each weight by -lr (unit gradient): 5e-6 backbone, 1e-4 head.
  np.testing.assert_allclose(updates["backbone"]["w"], -5e-6, rtol=1e-3)
  np.testing.assert_allclose(updates["head"]["w"], -1e-4, rtol=1e-3)
