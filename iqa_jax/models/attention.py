"""The one attention helper the towers share."""
from __future__ import annotations

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
  split = lambda t: t.reshape(t.shape[0], t.shape[1], num_heads, d // num_heads)
  impl = pick_implementation(implementation, q.dtype)
  if mask is not None:
    impl = "xla"
  out = jax.nn.dot_product_attention(split(q), split(k), split(v), mask=mask, implementation=impl)
  return out.reshape(b, tq, d)
