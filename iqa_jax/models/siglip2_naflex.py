"""SigLIP2 NaFlex vision tower in Flax, loading HF `siglip2` weights (google/siglip2-*-naflex).

NaFlex scores an image at its native aspect ratio: the image is resized so that its patch grid
(rows x cols, any shape) fits `max_num_patches`, patchified, and padded to a fixed token count;
the 16x16 position table is resampled per image and padding tokens are masked out of attention
and of the MAP pooling. The feature is the MAP-pooled output (App. A.1: image_embeds).

Inputs, either
  * (B, H, W, 3) normalised images: a full grid of H/p x W/p patches (square resize), or
  * (B, 1 + max_num_patches, 3 p^2) packed NaFlex patches from the `naflex_patches` pp op:
    row 0 holds the grid (rows, cols), rows 1.. the patches, row-major, padding at the end.
    Packing keeps a batch one array, so the shared loaders and train step carry it unchanged.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iqa_jax.data import pp as pp_lib
from iqa_jax.models import hf_io, siglip, tower


@dataclasses.dataclass(frozen=True)
class NaflexConfig(siglip.SiglipConfig):
  """SigLIP's fields (HF's Siglip2VisionConfig has no image_size: it stays unused) and the
  size of the learned position table."""
  num_patches: int = 256  # the learned position table is sqrt x sqrt of this


VARIANTS = {
    "so400m/16": NaflexConfig(),  # google/siglip2-so400m-patch16-naflex
    "b/16": NaflexConfig(768, 3072, 12, 12),
}


# ---------------------------------------------------------------------------------------------
# Preprocessing: HF Siglip2ImageProcessor's resize rule and patch layout, as pp ops.


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int,
                eps: float = 1e-5) -> tuple[int, int]:
  """Largest patch-aligned (h, w) at the image's aspect ratio with at most max_num_patches.

  Bisects the scale as Siglip2ImageProcessor does (same bracket and tolerance), so sizes agree.
  """
  def side(scale, n):
    return max(patch_size, int(math.ceil(n * scale / patch_size) * patch_size))

  lo, hi = eps / 10, 100.0
  while hi - lo >= eps:
    mid = (lo + hi) / 2
    if (side(mid, height) / patch_size) * (side(mid, width) / patch_size) <= max_num_patches:
      lo = mid
    else:
      hi = mid
  return side(lo, height), side(lo, width)


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
  """(H, W, C) -> (H/p * W/p, p * p * C), row-major patches, each flattened (py, px, c)."""
  h, w, c = image.shape
  p = patch_size
  x = image.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4)
  return x.reshape((h // p) * (w // p), p * p * c)


def pack(patches: np.ndarray, grid: tuple[int, int], max_num_patches: int) -> np.ndarray:
  """(n, d) patches of a rows x cols grid -> (1 + max_num_patches, d): header row, zero padding."""
  n, d = patches.shape
  if n > max_num_patches:
    raise ValueError(f"{n} patches do not fit max_num_patches={max_num_patches}")
  out = np.zeros((1 + max_num_patches, d), np.float32)
  out[0, :2] = grid
  out[1:1 + n] = patches
  return out


@pp_lib.register("naflex_resize")
def get_naflex_resize(patch_size: int, max_num_patches: int, resample: str = "bilinear",
                      key: str = "image"):
  """Resize to the native-aspect NaFlex size (uint8 in, uint8 out, PIL as HF's PIL processor)."""
  def _naflex_resize(example):
    h, w = example[key].shape[:2]
    hw = naflex_size(h, w, patch_size, max_num_patches)
    return pp_lib.get_resize(hw, resample, key)(example)
  return _naflex_resize


@pp_lib.register("naflex_patches")
def get_naflex_patches(patch_size: int, max_num_patches: int, key: str = "image"):
  """A normalised (H, W, 3) image -> packed (1 + max_num_patches, 3 p^2) NaFlex input."""
  def _naflex_patches(example):
    x = np.asarray(example[key], np.float32)
    grid = (x.shape[0] // patch_size, x.shape[1] // patch_size)
    example[key] = pack(patchify(x, patch_size), grid, max_num_patches)
    return example
  return _naflex_patches


def naflex_pp(patch_size: int = 16, max_num_patches: int = 1024, resample: str = "bilinear",
              mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> str:
  """The pp string for native-aspect scoring; 1024 patches at p=16 is the paper's 512^2 budget."""
  return (f"decode|naflex_resize({patch_size}, {max_num_patches}, {resample!r})"
          f"|normalize({tuple(mean)}, {tuple(std)})"
          f"|naflex_patches({patch_size}, {max_num_patches})")


# ---------------------------------------------------------------------------------------------
# The tower.


def resize_position_table(table, grids, max_len: int):
  """(g*g, D) table -> (B, max_len, D) per-image tables, HF's Siglip2 resampling.

  A separable triangle filter whose support widens when shrinking (antialiasing), normalised per
  output; tokens past rows*cols (padding) take position (0, 0) as in HF.
  """
  g = int(round(math.sqrt(table.shape[0])))
  sizes = grids.astype(jnp.float32)[:, None, :]  # (B, 1, 2)
  pos = jnp.arange(max_len, dtype=jnp.float32)[None, :, None]  # (1, L, 1)
  rows = jnp.floor(pos / sizes[..., 1:])
  index = jnp.concatenate([rows, pos - rows * sizes[..., 1:]], axis=-1)  # (B, L, 2)
  index = index * (pos < sizes.prod(-1, keepdims=True))
  scale = g / sizes
  support = jnp.maximum(scale, 1.0)
  center = (index + 0.5) * scale - 0.5
  src = jnp.arange(g, dtype=jnp.float32)
  w = jnp.maximum(1.0 - jnp.abs(src - center[..., None]) / support[..., None], 0.0)  # (B,L,2,g)
  w = w / w.sum(-1, keepdims=True)
  w2 = (w[..., 0, :, None] * w[..., 1, None, :]).reshape(w.shape[0], max_len, g * g)
  return jnp.einsum("blk,kd->bld", w2, table.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def unpack(inputs, patch_size: int):
  """Images or packed patches -> (patches (B, L, 3p^2), grids (B, 2) int32, valid (B, L)|None)."""
  if inputs.ndim == 4:
    b, h, w, c = inputs.shape
    p = patch_size
    x = inputs.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (h // p) * (w // p), p * p * c)
    return x, jnp.broadcast_to(jnp.array([h // p, w // p], jnp.int32), (b, 2)), None
  # Zero-padded eval examples carry a (0, 0) grid; one valid token keeps them finite.
  grids = jnp.maximum(jnp.round(inputs[:, 0, :2]).astype(jnp.int32), 1)
  patches = inputs[:, 1:]
  valid = jnp.arange(patches.shape[1])[None] < (grids[:, 0] * grids[:, 1])[:, None]
  return patches, grids, valid


class Siglip2NaflexVision(tower.TransformerTower):
  """Images or packed NaFlex patches -> (pooled feature, {named intermediates}).

  SigLIP's blocks (`siglip.EncoderLayer`, `siglip.MAPHead`) with the padding keys masked out;
  only the patch embedding (a Dense on flattened patches) and the per-image positions differ.
  """
  cfg: NaflexConfig

  @nn.compact
  def __call__(self, inputs, train: bool = False):
    cfg = self.cfg
    patches, grids, valid = unpack(inputs, cfg.patch_size)
    x = nn.Dense(cfg.hidden_size, dtype=self.dtype, name="embeddings_patch_embedding")(
        patches.astype(self.dtype))
    table = self.param("embeddings_position_embedding", nn.initializers.normal(0.02),
                       (cfg.num_patches, cfg.hidden_size), jnp.float32)
    x = x + resize_position_table(table, grids, x.shape[1]).astype(self.dtype)
    # Key mask (B, 1, 1, L): padding tokens are attended by none; None keeps flash attention.
    mask = None if valid is None else valid[:, None, None, :]

    layer = functools.partial(siglip.EncoderLayer, cfg, self.dtype, self.lora,
                              self.attention_impl)
    x, out = self.encoder(layer, cfg.num_hidden_layers, "encoder_layers")(
        x, mask, deterministic=not train)
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(x)
    out["encoded"] = x
    out["spatial_shapes"] = grids
    if cfg.vision_use_head:
      pooled = siglip.MAPHead(cfg, self.dtype, name="head")(x, mask)
    else:
      w = jnp.ones(x.shape[:2], x.dtype) if valid is None else valid.astype(x.dtype)
      pooled = (x * w[..., None]).sum(1) / w.sum(1, keepdims=True)
    out["pre_logits"] = pooled
    return pooled, out


def _preprocessing(folder, cfg: NaflexConfig) -> dict:
  """Native recipe: normalisation from preprocessor_config.json, plus the NaFlex patch budget.

  `size` is only the square fallback (§3.1: 512); native-aspect scoring uses `naflex_pp`.
  """
  f = folder / "preprocessor_config.json"
  budget = json.loads(f.read_text()).get("max_num_patches", 256) if f.exists() else 256
  return {**hf_io.read_preprocessing(folder, 512), "size": 512, "crop": None,
          "patch_size": cfg.patch_size, "max_num_patches": int(budget)}


def load_hf_siglip2_naflex(path_or_id: str, **module_kwargs) -> tower.Backbone:
  """Local folder or cached hub id -> (Siglip2NaflexVision module, params, native preprocessing).

  >>> module, params, pp = load_hf_siglip2_naflex("google/siglip2-so400m-patch16-naflex")
  """
  folder, config, tensors = hf_io.read_checkpoint(path_or_id)
  cfg = NaflexConfig.from_hf(config)
  module = Siglip2NaflexVision(cfg, **module_kwargs)
  # SigLIP's names: the patch embedding is a Linear here, a conv there, the table takes both.
  params = tower.in_layout(siglip.hf_params(tensors), module.scan, "encoder_layers")
  return tower.Backbone(module, params, _preprocessing(folder, cfg))


def random_preprocessing(cfg: NaflexConfig) -> dict:
  """A random tower: SigLIP2's 0.5 statistics, 512 px square fallback, 256 patches."""
  return {"size": 512, "crop": None, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
          "resample": "bilinear", "patch_size": cfg.patch_size, "max_num_patches": 256}


def build(model_config) -> tower.Backbone:
  """Registry entry (tower.build): `config.model.init`, or a random `variant` + `arch`."""
  return tower.build(model_config, load_hf_siglip2_naflex, Siglip2NaflexVision, VARIANTS,
                     "so400m/16", random_preprocessing)
