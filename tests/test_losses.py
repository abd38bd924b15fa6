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


def official_loop(y, yp, lam=0.25):
  """The official util.margin_loss(y, yp) as issue 22 describes it, written here as a loop:
  population std of y, pairs with y_i = y_j skipped, 2 / (n (n - 1)) over all pairs."""
  n, m, total = len(y), lam * np.std(y), 0.0
  for i in range(n):
    for j in range(i + 1, n):
      s = np.sign(y[i] - y[j])
      if s != 0:
        total += max(0.0, -s * (yp[i] - yp[j]) + m)
  return 2.0 / (n * (n - 1)) * total


# pred (0.5, 0.2, 0.3), mos (0.2, 0.6, 0.6), worked by hand:
# eq1: m = 0.25 std(mos, ddof 1) = 0.057735; hinges 0.357735, 0.257735 and m for the tie (1, 2):
#      0.673205 / 3 = 0.224402.
# official (margin_loss(mos, pred)): m = 0.25 std(mos, ddof 0) = 0.047140; the tie is skipped:
#      (0.347140 + 0.247140) / 3 = 0.198094.
# official_swapped (margin_loss(pred, mos), as train.py calls it): m = 0.25 std(pred, ddof 0) =
#      0.031180; signs from pred (+, +, -), differences from mos (-0.4, -0.4, 0): (0.431180 +
#      0.431180 + 0.031180) / 3 = 0.297847.
WORKED = {"eq1": 0.224402, "official": 0.198094, "official_swapped": 0.297847}


@pytest.mark.parametrize("form", sorted(WORKED))
def test_margin_forms_worked_numbers(form):
  from iqa_jax.training.losses import margin_term
  pred, mos = jnp.array([0.5, 0.2, 0.3]), jnp.array([0.2, 0.6, 0.6])
  assert float(margin_term(pred, mos, form=form)) == pytest.approx(WORKED[form], abs=2e-6)
  _, parts = iqa_loss(pred, mos, margin_form=form)
  assert float(parts["margin"]) == pytest.approx(WORKED[form], abs=2e-6)


def test_official_forms_equal_the_official_loop():
  from iqa_jax.training.losses import margin_term
  rng = np.random.RandomState(5)
  pred, mos = rng.rand(12), np.round(rng.rand(12) * 4) / 4  # MOS levels: ties
  p32, m32 = jnp.asarray(pred, jnp.float32), jnp.asarray(mos, jnp.float32)
  assert float(margin_term(p32, m32, form="official")) == pytest.approx(
      official_loop(mos, pred), rel=1e-5)
  assert float(margin_term(p32, m32, form="official_swapped")) == pytest.approx(
      official_loop(pred, mos), rel=1e-5)


def test_swapped_margin_only_shrinks_the_spread_of_predictions():
  """With the arguments swapped the hinge's slope is d(0.25 std(pred))/dpred: the pairs' order
  gives no gradient. Every pair of the worked example is active, so the gradient is
  0.25 (p - mean) / (n std(pred)) = (0.111359, -0.089087, -0.022272)."""
  import jax

  from iqa_jax.training.losses import margin_term
  mos = jnp.array([0.2, 0.6, 0.6])
  grad = jax.grad(lambda p: margin_term(p, mos, form="official_swapped"))(
      jnp.array([0.5, 0.2, 0.3]))
  np.testing.assert_allclose(grad, [0.111359, -0.089087, -0.022272], atol=2e-6)


def test_unknown_margin_form():
  from iqa_jax.training.losses import margin_term
  with pytest.raises(ValueError, match="margin_form must be one of eq1|official"):
    margin_term(jnp.zeros(3), jnp.zeros(3), form="swapped")
