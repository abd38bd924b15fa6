"""Position-table resampling that matches torch's bicubic interpolation exactly."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(t: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel: torch's bicubic uses a=-0.75, its antialiased path -0.5."""
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
    for offset in (-1, 0, 1, 2):
      idx = min(max(base + offset, 0), n_in - 1)
      m[o, idx] += _cubic(np.array(t - offset + 0.0), -0.75)
  return m


def torch_aa_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of F.interpolate(mode='bicubic', antialias=True) along one axis.

  torch's antialiased path is PIL's resampler: a=-0.5 cubic, stretched by the downscale factor,
  taps clipped to the input and renormalised (no edge replication).
  """
  scale = n_in / n_out
  stretch = max(scale, 1.0)
  support = 2.0 * stretch
  m = np.zeros((n_out, n_in), np.float64)
  for o in range(n_out):
    center = scale * (o + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), n_in)
    w = _cubic((np.arange(lo, hi) - center + 0.5) / stretch, -0.5)
    m[o, lo:hi] = w / w.sum()
  return m


def resample_grid(posemb, grid_in: tuple[int, int], grid_out: tuple[int, int],
                  antialias: bool = False):
  """Resample a (h*w, d) position table to another grid in float32.

  antialias=False: HF's interpolate_pos_encoding (SigLIP, CLIP, DINOv2); True: timm's
  resample_abs_pos_embed (PE).
  """
  if tuple(grid_in) == tuple(grid_out):
    return posemb
  matrix = torch_aa_bicubic_matrix if antialias else torch_bicubic_matrix
  d = posemb.shape[-1]
  grid = posemb.reshape(grid_in[0], grid_in[1], d).astype(jnp.float32)
  mh = jnp.asarray(matrix(grid_in[0], grid_out[0]), jnp.float32)
  mw = jnp.asarray(matrix(grid_in[1], grid_out[1]), jnp.float32)
  out = jnp.einsum("oh,hwd,pw->opd", mh, grid, mw, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(grid_out[0] * grid_out[1], d).astype(posemb.dtype)
