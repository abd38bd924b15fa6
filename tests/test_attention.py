"""The CPU's heads-major attention (its forward and its hand-written gradient) against a float64
softmax and against jax.nn's XLA path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iqa_jax.models.attention import attention, heads_major_attention, pick_implementation


def reference(q, k, v, mask=None):
  """Float64 softmax attention on (B, T, H, D)."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", probs, v)


def reference_grads(q, k, v, g, mask=None):
  """Float64 gradients of sum(attention(q, k, v) * g) by the softmax's chain rule."""
  q, k, v, g = (np.asarray(t, np.float64).transpose(0, 2, 1, 3) for t in (q, k, v, g))
  scale = 1 / np.sqrt(q.shape[-1])
  logits = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dp = np.einsum("bhqd,bhkd->bhqk", g, v)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  grads = (np.einsum("bhqk,bhkd->bhqd", ds, k) * scale, np.einsum("bhqk,bhqd->bhkd", ds, q) * scale,
           np.einsum("bhqk,bhqd->bhkd", p, g))
  return [t.transpose(0, 2, 1, 3) for t in grads]


def inputs(tq=37, tk=37, heads=4, dim=16):
  rs = np.random.RandomState(0)
  return [jnp.asarray(rs.randn(2, t, heads, dim).astype(np.float32) * 2) for t in (tq, tk, tk)]


@pytest.mark.parametrize("masked", [False, True])
def test_heads_major_matches_float64_and_jax_nn(masked):
  q, k, v = inputs()
  mask = None
  if masked:  # causal, broadcast over the batch and heads as jax.nn takes it
    mask = jnp.tril(jnp.ones((37, 37), bool))[None, None]
  want = reference(q, k, v, None if mask is None else np.asarray(mask))
  ours = np.asarray(jax.jit(heads_major_attention)(q, k, v, mask), np.float64)
  xla = np.asarray(jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla"),
                   np.float64)
  # Relative to the largest output (~5.6): measured ours 3.2e-7 and jax.nn 6.6e-7 from float64,
  # 8e-7 apart, i.e. a few float32 ulps.
  scale = np.abs(want).max()
  assert np.abs(ours - want).max() <= 1e-6 * scale
  assert np.abs(ours - xla).max() <= 2e-6 * scale


@pytest.mark.parametrize("masked", [False, True])
def test_heads_major_gradients_match_float64_and_jax_nn(masked):
  q, k, v = inputs()
  g = jnp.asarray(np.random.RandomState(1).randn(*q.shape).astype(np.float32))
  mask = jnp.tril(jnp.ones((37, 37), bool))[None, None] if masked else None
  want = reference_grads(q, k, v, g, None if mask is None else np.asarray(mask))

  def grads(fn):
    def loss(q, k, v):
      return jnp.sum(fn(q, k, v, mask=mask) * g)

    return [np.asarray(t, np.float64) for t in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)]

  ours = grads(heads_major_attention)
  xla = grads(functools.partial(jax.nn.dot_product_attention, implementation="xla"))
  for name, o, x, w in zip("qkv", ours, xla, want, strict=True):
    scale = np.abs(w).max()
    # Measured (relative to the largest gradient, 4 to 13): ours <= 4.2e-7 and jax.nn <= 6.0e-7
    # from float64, <= 7.4e-7 apart; a few float32 ulps.
    assert np.abs(o - w).max() <= 1.5e-6 * scale, name
    assert np.abs(o - x).max() <= 2e-6 * scale, name


def test_heads_major_fully_masked_rows_take_no_gradient():
  """A query row with every key masked averages the values (as jax.nn does) and, as through
  jnp.where, passes no gradient to q or k."""
  q, k, v = inputs(tq=3, tk=5)
  mask = jnp.asarray([True, False, True])[None, None, :, None] & jnp.ones((1, 1, 3, 5), bool)

  def loss(q, k, v):
    return jnp.sum(heads_major_attention(q, k, v, mask))

  dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  xla = jax.grad(lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(
      q, k, v, mask=mask, implementation="xla")), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(np.asarray(heads_major_attention(q, k, v, mask))[:, 1],
                             np.asarray(v).mean(1), rtol=1e-6, atol=1e-6)
  assert not np.asarray(dq)[:, 1].any()
  for ours, theirs in zip((dq, dk, dv), xla, strict=True):
    # Measured: <= 2.3e-6 of the largest gradient (1.5 to 1.9) apart.
    scale = np.abs(np.asarray(theirs)).max()
    assert np.abs(np.asarray(ours) - np.asarray(theirs)).max() <= 3e-6 * scale


def test_heads_major_cross_attention_and_bfloat16():
  q, k, v = inputs(tq=5, tk=50)
  want = reference(q, k, v)
  half = [t.astype(jnp.bfloat16) for t in (q, k, v)]
  ours = np.asarray(heads_major_attention(*half).astype(jnp.float32), np.float64)
  xla = np.asarray(jax.nn.dot_product_attention(*half, implementation="xla").astype(jnp.float32),
                   np.float64)
  # Measured: both 0.050 from float64 (inputs and outputs rounded to bfloat16, |out| up to 5.2)
  # and equal to each other; allow one bfloat16 ulp at that size (2**-5) between them.
  assert np.abs(ours - want).max() <= 0.07
  assert np.abs(ours - xla).max() <= 2**-5


def test_attention_auto_picks_heads_major_on_cpu_and_rejects_unknown():
  assert jax.default_backend() != "cpu" or pick_implementation("auto", jnp.float32) == "heads_major"
  q, k, v = (t.reshape(2, t.shape[1], 64) for t in inputs())
  auto = np.asarray(attention(q, k, v, 4), np.float64)
  xla = np.asarray(attention(q, k, v, 4, "xla"), np.float64)
  assert np.abs(auto - xla).max() <= 2e-6 * np.abs(xla).max()
  with pytest.raises(ValueError, match="auto|xla|cudnn|heads_major"):
    pick_implementation("flash", jnp.float32)
