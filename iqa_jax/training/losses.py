"""The training objective of §3.2: MSE plus a pairwise margin ranking term (Eq. 1-2)."""
from __future__ import annotations

import jax.numpy as jnp


def mse(pred, mos, weight=None):
  err = (pred - mos) ** 2
  if weight is None:
    return err.mean()
  return (err * weight).sum() / jnp.maximum(weight.sum(), 1.0)


MARGIN_FORMS = ("eq1", "official", "official_swapped")


def margin_ranking_loss(pred, mos, margin_lambda: float = 0.25, weight=None, ddof: int = 1,
                        skip_ties: bool = False):
  """Eq. 1: 2/(n(n-1)) sum_{i<j} max(0, -sgn(s_i - s_j)(p_i - p_j) + m), m = lambda * std(s).

  `ddof=1` takes torch's default (unbiased) std for sigma_y. `weight` (0/1) drops padded rows.
  skip_ties: pairs with s_i = s_j add nothing (Eq. 1 as written adds m for each).
  """
  n = pred.shape[0]
  w = jnp.ones((n,), pred.dtype) if weight is None else weight.astype(pred.dtype)
  count = w.sum()
  mean = (mos * w).sum() / jnp.maximum(count, 1.0)
  var = (w * (mos - mean) ** 2).sum() / jnp.maximum(count - ddof, 1.0)
  m = margin_lambda * jnp.sqrt(var)
  sign = jnp.sign(mos[:, None] - mos[None, :])
  diff = pred[:, None] - pred[None, :]
  hinge = jnp.maximum(0.0, -sign * diff + m)
  pair_w = jnp.triu(w[:, None] * w[None, :], k=1)
  if skip_ties:
    pair_w = pair_w * (sign != 0)
  pairs = jnp.maximum(count * (count - 1) / 2, 1.0)
  return (hinge * pair_w).sum() / pairs


def margin_term(pred, mos, margin_lambda: float = 0.25, weight=None, form: str = "eq1"):
  """config.loss.margin_form: eq1 (the paper), official (the official util.margin_loss(y, yp):
  population std, ties skipped) or official_swapped (called as margin_loss(pred, mos), as the
  official train.py does: the margin is 0.25 std(pred), pairs ordered by the predictions)."""
  if form == "eq1":
    return margin_ranking_loss(pred, mos, margin_lambda, weight)
  if form == "official":
    return margin_ranking_loss(pred, mos, margin_lambda, weight, ddof=0, skip_ties=True)
  if form == "official_swapped":
    return margin_ranking_loss(mos, pred, margin_lambda, weight, ddof=0, skip_ties=True)
  raise ValueError(f"config.loss.margin_form must be one of {'|'.join(MARGIN_FORMS)}, got "
                   f"{form!r}")


def iqa_loss(pred, mos, margin_lambda: float = 0.25, margin_weight: float = 1.0, weight=None,
             margin_form: str = "eq1"):
  """Eq. 2: L = L_MSE + L_margin; returns (loss, parts)."""
  l_mse = mse(pred, mos, weight)
  l_margin = margin_term(pred, mos, margin_lambda, weight, margin_form)
  return l_mse + margin_weight * l_margin, {"mse": l_mse, "margin": l_margin}
