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

  The same sums as `jax.nn.dot_product_attention`'s XLA path (logits and softmax in float32),
  laid out so that the CPU's batched matrix products see contiguous heads.
  """
  scale = q.shape[-1] ** -0.5
  q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3)


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
