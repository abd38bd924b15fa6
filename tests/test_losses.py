"""Eq. 1-2 against a brute-force numpy loop over pairs."""
import jax.numpy as jnp
import numpy as np
import pytest

from iqa_jax.training.losses import iqa_loss, margin_ranking_loss


def brute_margin(pred, mos, lam=0.25):
  n = len(pred)
  m = lam * np.std(mos, ddof=1)
  total = 0.0
  for i in range(n):
    for j in range(i + 1, n):
      total += max(0.0, -np.sign(mos[i] - mos[j]) * (pred[i] - pred[j]) + m)
  return 2.0 / (n * (n - 1)) * total


@pytest.mark.parametrize("n,seed", [(2, 0), (6, 1), (12, 2), (33, 3)])
def test_margin_loss_equals_brute_force(n, seed):
  rng = np.random.RandomState(seed)
  pred, mos = rng.rand(n), rng.rand(n)
  mos[1] = mos[0]  # a tie: sgn = 0 contributes m
  got = float(margin_ranking_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(mos, jnp.float32)))
  assert got == pytest.approx(brute_margin(pred, mos), rel=1e-5, abs=1e-6)


def test_total_loss_is_mse_plus_margin_and_mask_drops_padding():
  rng = np.random.RandomState(4)
  pred, mos = rng.rand(8), rng.rand(8)
  loss, parts = iqa_loss(jnp.asarray(pred), jnp.asarray(mos))
  assert float(parts["mse"]) == pytest.approx(np.mean((pred - mos) ** 2), rel=1e-5)
  expected = np.mean((pred - mos) ** 2) + brute_margin(pred, mos)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  w = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  masked, _ = iqa_loss(jnp.asarray(pred), jnp.asarray(mos), weight=jnp.asarray(w))
  want = np.mean((pred[:5] - mos[:5]) ** 2) + brute_margin(pred[:5], mos[:5])
  assert float(masked) == pytest.approx(want, rel=1e-5)


def test_worked_example():
  """pred (0.2, 0.8), mos (0.0, 1.0): m = 0.25 * std([0,1], ddof=1) = 0.1768;
  hinge = max(0, -(-1)(0.2-0.8) + m) = max(0, -0.6 + 0.1768) = 0 -> margin 0; mse = 0.04."""
  loss, parts = iqa_loss(jnp.array([0.2, 0.8]), jnp.array([0.0, 1.0]))
  assert float(parts["margin"]) == 0.0
  assert float(loss) == pytest.approx(0.04, rel=1e-6)
  # Swapped predictions: hinge = 0.6 + 0.1768 = 0.7768.
  _, parts = iqa_loss(jnp.array([0.8, 0.2]), jnp.array([0.0, 1.0]))
  assert float(parts["margin"]) == pytest.approx(0.6 + 0.25 * np.sqrt(0.5), rel=1e-5)
