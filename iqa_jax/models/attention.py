"""The attention helpers the towers share: softmax attention and rotary position embedding."""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def pick_implementation(requested: str, dtype) -> str | None:
  """'auto' takes cuDNN flash attention on GPU for 16-bit inputs, XLA elsewhere."""
  if requested == "auto":
    on_gpu = jax.default_backend() == "gpu"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if on_gpu and half else "xla"
  if requested not in ("xla", "cudnn"):
    raise ValueError(f"model.attention must be auto|xla|cudnn, got {requested!r}")
  return requested


def attention(q, k, v, num_heads: int, implementation: str = "auto", mask=None):
  """Multi-head softmax attention on (B, T, D) projections; returns (B, Tq, D)."""
  b, tq, d = q.shape

  def split(t):
    return t.reshape(t.shape[0], t.shape[1], num_heads, d // num_heads)

  impl = pick_implementation(implementation, q.dtype)
  if mask is not None:
    impl = "xla"
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
