"""Position-embedding resampling that matches torch's bicubic interpolation exactly."""
from __future__ import annotations

import numpy as np


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  t = np.abs(t)
  return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                  np.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, 0.0))


def torch_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of F.interpolate(mode='bicubic', align_corners=False) along one axis."""
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for o in range(n_out):
    src = (o + 0.5) * scale - 0.5
    base = int(np.floor(src))
    t = src - base
    for tap, offset in enumerate((-1, 0, 1, 2)):
      idx = min(max(base + offset, 0), n_in - 1)
      m[o, idx] += _cubic(np.array(t - offset + 0.0))
  return m


def resample_grid(posemb, grid_in: tuple[int, int], grid_out: tuple[int, int]):
  """Resample a (h*w, d) position table to another grid, as HF's interpolate_pos_encoding does."""
  if tuple(grid_in) == tuple(grid_out):
    return posemb
  import jax.numpy as jnp
  d = posemb.shape[-1]
  grid = posemb.reshape(grid_in[0], grid_in[1], d).astype(jnp.float32)
  mh = jnp.asarray(torch_bicubic_matrix(grid_in[0], grid_out[0]), jnp.float32)
  mw = jnp.asarray(torch_bicubic_matrix(grid_in[1], grid_out[1]), jnp.float32)
  out = jnp.einsum("oh,hwd,pw->opd", mh, grid, mw)
  return out.reshape(grid_out[0] * grid_out[1], d).astype(posemb.dtype)
