"""The attention helpers the towers share: softmax attention and rotary position embedding."""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "heads_major")


def pick_implementation(requested: str, dtype) -> str:
  """'auto': cuDNN flash attention on GPU for 16-bit inputs, heads-major einsums on the CPU, and
  `jax.nn.dot_product_attention`'s XLA path elsewhere.

  On the CPU, heads-major einsums cut the B/16@224 attention's kernel time about in half
  against `jax.nn.dot_product_attention`'s XLA path (docs/performance.md), with the same
  float32 scores up to rounding (tests/test_attention.py).
  """
  if requested == "auto":
    backend = jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend == "gpu" and half:
      return "cudnn"
    return "heads_major" if backend == "cpu" else "xla"
  if requested not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention must be {'|'.join(IMPLEMENTATIONS)}, got {requested!r}")
  return requested


def heads_major_attention(q, k, v, mask=None):
  """Softmax attention on (B, T, H, D) heads, computed as (B, H, T, D) batched products.

  The same function as `jax.nn.dot_product_attention`'s XLA path (logits and softmax in
  float32) up to float32 rounding (tests/test_attention.py), laid out so that the CPU's batched
  matrix products see contiguous heads, with fewer passes over the (B, H, Tq, Tk) scores:
  the forward divides the (Tq, D) output by the softmax's row sums instead of the scores, and
  the gradient is written out (`_flash_bwd`) the way flash attention takes it, with
  rowsum(dP * P) = rowsum(dO * O) summed over D, not over the keys. On the B/16@224 train step
  (batch 8) that cut the attention's forward and backward from ~41 to ~35 ms a layer
  (docs/performance.md).
  """
  return _flash(q, k, v, mask)


def _heads(t):
  return t.transpose(0, 2, 1, 3)  # (B, T, H, D) <-> (B, H, T, D)


def _flash_fwd(q, k, v, mask):
  scale = q.shape[-1] ** -0.5
  qh, kh, vh = _heads(q), _heads(k), _heads(v)
  logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  # softmax(scale * logits) = e / row_sum; the scale (> 0) commutes with the row max.
  e = jnp.exp((logits - jnp.max(logits, axis=-1, keepdims=True)) * scale)
  row_sum = jnp.sum(e, axis=-1, keepdims=True)
  o = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), vh,
                 preferred_element_type=jnp.float32) / row_sum
  return _heads(o).astype(v.dtype), (qh, kh, vh, mask, e, row_sum, o)


def _flash_bwd(residuals, g):
  qh, kh, vh, mask, e, row_sum, o = residuals
  scale = qh.shape[-1] ** -0.5
  g_l = _heads(g).astype(jnp.float32) / row_sum  # dO / row_sum: P = e / row_sum, undivided
  dv = jnp.einsum("bhqk,bhqd->bhkd", e.astype(vh.dtype), g_l.astype(vh.dtype),
                  preferred_element_type=jnp.float32)
  dp = jnp.einsum("bhqd,bhkd->bhqk", g_l.astype(vh.dtype), vh, preferred_element_type=jnp.float32)
  # dLogits = P * (dP - rowsum(dP * P)) with rowsum(dP * P) = rowsum(dO * O), over row_sum.
  ds = e * (dp - jnp.sum(g_l * o, axis=-1, keepdims=True))
  if mask is not None:  # masked logits take no gradient, as through jnp.where
    ds = jnp.where(mask, ds, 0.0)
  ds = ds.astype(qh.dtype)
  dq = jnp.einsum("bhqk,bhkd->bhqd", ds, kh, preferred_element_type=jnp.float32) * scale
  dk = jnp.einsum("bhqk,bhqd->bhkd", ds, qh, preferred_element_type=jnp.float32) * scale
  return (_heads(dq).astype(qh.dtype), _heads(dk).astype(kh.dtype),
          _heads(dv).astype(vh.dtype), None)


@jax.custom_vjp
def _flash(q, k, v, mask):
  return _flash_fwd(q, k, v, mask)[0]


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention(q, k, v, num_heads: int, implementation: str = "auto", mask=None):
  """Multi-head softmax attention on (B, T, D) projections; returns (B, Tq, D)."""
  b, tq, d = q.shape

  def split(t):
    return t.reshape(t.shape[0], t.shape[1], num_heads, d // num_heads)

  impl = pick_implementation(implementation, q.dtype)
  if impl == "cudnn" and mask is not None:
    impl = "xla"
  if impl == "heads_major":
    out = heads_major_attention(split(q), split(k), split(v), mask=mask)
  else:
    out = jax.nn.dot_product_attention(split(q), split(k), split(v), mask=mask, implementation=impl)
  return out.reshape(b, tq, d)


def rotate_patches(x, cos, sin, num_heads: int, rotate: Callable):
  """RoPE on the trailing len(cos) tokens of (B, T, D), per head: x cos + rotate(x) sin.

  The leading tokens (CLS, registers) are not rotated. `rotate` pairs a head's features: its
  two halves (DINOv3) or neighbours (PE).
  """
  b, t, d = x.shape
  n = cos.shape[0]
  heads = x.reshape(b, t, num_heads, d // num_heads)
  prefix, patches = heads[:, :t - n], heads[:, t - n:]
  c, s = cos[None, :, None].astype(x.dtype), sin[None, :, None].astype(x.dtype)
  patches = patches * c + rotate(patches) * s
  return jnp.concatenate([prefix, patches], axis=1).reshape(b, t, d)
