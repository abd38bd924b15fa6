"""Perception Encoder (PE-Core) vision tower in Flax, loading timm's `vit_pe_core_*` checkpoints.

The reference implementation is timm's `Eva` (timm/models/eva.py, e.g. timm/vit_pe_core_large_
patch14_336.fb on the hub); transformers has no PE image tower. The architecture: bias-free patch
conv, CLS token, learned absolute positions (resampled as timm's resample_abs_pos_embed does:
torch bicubic with antialias), a pre-transformer LayerNorm, pre-LN blocks whose attention
rotates q/k with 2-D RoPE ("cat" layout, interleaved pairs, grid offset, scaled to the reference
grid), a final LayerNorm, latent-query attention pooling and a linear projection.

The feature (App. B, Fig. S5): the tokens after block `tap_layer` (0-based, as timm's
forward_intermediates indices and PE's own layer_idx count; 20 for the paper) are pooled as the
full model pools its last block: final norm -> attention pool -> projection. Blocks past the tap
are not built. LoRA (§3.1) goes on q and k: the fused qkv projection is split into q/k/v at load.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from iqa_jax.models import hf_io, tower
from iqa_jax.models.attention import attention, rotate_patches
from iqa_jax.models.lora import LoraDense
from iqa_jax.models.posemb import resample_grid


@dataclasses.dataclass(frozen=True)
class PEConfig:
  """Field names follow timm's Eva arguments, so a checkpoint's `model_args` apply directly."""
  embed_dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_ratio: float = 4.0
  patch_size: int = 14
  img_size: int = 336
  num_classes: int = 1024  # the output projection width; 0: none
  class_token: bool = True
  ref_feat_shape: Sequence[int] = (24, 24)
  rope_grid_offset: float = 1.0
  rope_temperature: float = 10000.0
  attn_pool_num_heads: int = 8
  attn_pool_mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-5


# timm architecture name -> config (timm/models/eva.py's vit_pe_core_* entries).
VARIANTS = {
    "vit_pe_core_large_patch14_336": PEConfig(),
    "vit_pe_core_base_patch16_224": PEConfig(768, 12, 12, 4.0, 16, 224, 1024, True, (14, 14)),
    "vit_pe_core_small_patch16_384": PEConfig(384, 12, 6, 4.0, 16, 384, 512, True, (24, 24)),
    "vit_pe_core_tiny_patch16_384": PEConfig(192, 12, 3, 4.0, 16, 384, 512, True, (24, 24)),
    "vit_pe_core_gigantic_patch14_448": PEConfig(1536, 50, 16, 8960 / 1536, 14, 448, 1280, False,
                                                 (32, 32), 0.0),
}


def rope_tables(grid: tuple[int, int], head_dim: int,
                cfg: PEConfig) -> tuple[np.ndarray, np.ndarray]:
  """cos, sin (h*w, head_dim) of timm's RotaryEmbeddingCat(in_pixels=False, grid_indexing='xy').

  Per axis, coordinates (index + offset) rescaled to the reference grid, times head_dim/4
  inverse-temperature bands; [x bands, y bands], each value repeated for an interleaved pair.
  """
  n = head_dim // 4
  bands = 1.0 / cfg.rope_temperature ** (np.arange(n, dtype=np.float32) / np.float32(n))
  h, w = grid
  ref_h, ref_w = cfg.ref_feat_shape
  offset = np.float32(cfg.rope_grid_offset)
  ys = (np.arange(h, dtype=np.float32) + offset) / np.float32(h) * np.float32(ref_h)
  xs = (np.arange(w, dtype=np.float32) + offset) / np.float32(w) * np.float32(ref_w)
  coords = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1).reshape(h * w, 2)  # (x, y)
  angles = (coords[:, :, None] * bands.astype(np.float32)).reshape(h * w, 2 * n)
  angles = np.repeat(angles, 2, axis=-1)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate_pairs(x):
  """timm's rot: interleaved pairs (x0, x1) -> (-x1, x0)."""
  pairs = x.reshape(x.shape[:-1] + (-1, 2))
  return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


class Attention(nn.Module):
  cfg: PEConfig
  dtype: Any
  lora: tuple[int, float, float]  # LoRA on q, k (§3.1): rank, alpha, dropout
  attention_impl: str

  @nn.compact
  def __call__(self, x, rope, *, deterministic: bool = True):
    cfg, (rank, alpha, dropout) = self.cfg, self.lora
    d, h = cfg.embed_dim, cfg.num_heads
    q = LoraDense(d, rank, alpha, dropout, dtype=self.dtype, name="q")(x, deterministic)
    k = LoraDense(d, rank, alpha, dropout, dtype=self.dtype, name="k")(x, deterministic)
    v = nn.Dense(d, dtype=self.dtype, name="v")(x)
    q, k = (rotate_patches(t, *rope, h, rotate_pairs) for t in (q, k))
    y = attention(q, k, v, h, self.attention_impl)
    return nn.Dense(d, dtype=self.dtype, name="proj")(y)


class Block(nn.Module):
  """x + attn(norm1 x); x + mlp(norm2 x)."""
  cfg: PEConfig
  dtype: Any
  lora: tuple[int, float, float]
  attention_impl: str

  @nn.compact
  def __call__(self, x, rope, *, deterministic: bool = True):
    cfg = self.cfg
    y = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm1")(x)
    x = x + Attention(cfg, self.dtype, self.lora, self.attention_impl, name="attn")(
        y, rope, deterministic=deterministic)
    y = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm2")(x)
    return x + tower.MlpBlock(int(cfg.embed_dim * cfg.mlp_ratio), "gelu", self.dtype,
                              name="mlp")(y)


class AttentionPool(nn.Module):
  """timm's AttentionPoolLatent: one latent query over all tokens, proj, then x + mlp(norm x)."""
  cfg: PEConfig
  dtype: Any

  @nn.compact
  def __call__(self, x):
    cfg, d = self.cfg, self.cfg.embed_dim
    latent = self.param("latent", nn.initializers.normal(d ** -0.5), (1, 1, d), jnp.float32)
    q = nn.Dense(d, dtype=self.dtype, name="q")(
        jnp.broadcast_to(latent, (x.shape[0], 1, d)).astype(self.dtype))
    kv = nn.Dense(2 * d, dtype=self.dtype, name="kv")(x)
    # One query: cuDNN flash attention does not take it, so XLA here.
    y = attention(q, kv[..., :d], kv[..., d:], cfg.attn_pool_num_heads, "xla")
    y = nn.Dense(d, dtype=self.dtype, name="proj")(y)
    z = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm")(y)
    y = y + tower.MlpBlock(int(d * cfg.attn_pool_mlp_ratio), "gelu", self.dtype, name="mlp")(z)
    return y[:, 0]


class PerceptionEncoder(tower.TransformerTower):
  """(B, H, W, 3) normalised images -> (projected pooled feature of block `tap_layer`, {...})."""
  cfg: PEConfig
  tap_layer: int = 20  # App. B: layer 20 is best for IQA; -1: the last block

  @nn.compact
  def __call__(self, images, train: bool = False):
    cfg = self.cfg
    p, d = cfg.patch_size, cfg.embed_dim
    x, (gh, gw) = tower.embed_patches(images, d, p, self.dtype, "patch_embed_proj", use_bias=False)
    native = cfg.img_size // p
    n_prefix = int(cfg.class_token)
    posemb = self.param("pos_embed", nn.initializers.normal(0.02),
                        (native * native + n_prefix, d), jnp.float32)
    posemb = jnp.concatenate([posemb[:n_prefix], resample_grid(
        posemb[n_prefix:], (native, native), (gh, gw), antialias=True)])
    if cfg.class_token:
      x = tower.prepend(x, self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d),
                                      jnp.float32))
    x = x + posemb.astype(self.dtype)[None]
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm_pre")(x)
    rope = tuple(jnp.asarray(t, self.dtype) for t in rope_tables((gh, gw), d // cfg.num_heads, cfg))

    layer = functools.partial(Block, cfg, self.dtype, self.lora, self.attention_impl)
    x, out = self.encoder(layer, num_blocks(cfg, self.tap_layer), "blocks")(
        x, rope, deterministic=not train)
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm")(x)
    out["encoded"] = x
    pooled = AttentionPool(cfg, self.dtype, name="attn_pool")(x)
    out["pooler_output"] = pooled
    if cfg.num_classes:
      pooled = nn.Dense(cfg.num_classes, dtype=self.dtype, name="head")(pooled)
    out["pre_logits"] = pooled
    return pooled, out


def num_blocks(cfg: PEConfig, tap_layer: int) -> int:
  """Blocks to run for a 0-based tap (negative counts from the end, -1 = last)."""
  n = tap_layer % cfg.depth if tap_layer < 0 else tap_layer
  if not 0 <= n < cfg.depth:
    raise ValueError(f"config.model.tap_layer={tap_layer} is outside the {cfg.depth} blocks")
  return n + 1


# The weight table (hf_io.to_flax_tree). timm fuses q, k, v into one projection: split at
# load, so LoRA can sit on q and k (§3.1).
WEIGHTS = [
    (r"patch_embed\.proj", "patch_embed_proj"),
    (r"cls_token", "cls_token", hf_io.as_is),
    (r"pos_embed", "pos_embed", hf_io.drop_batch_axis),
    (r"norm_pre", "norm_pre"),
    (r"blocks\.{i}\.(?P<m>norm[12])", "blocks/{m}"),
    (r"blocks\.{i}\.attn\.qkv\.(?P<leaf>weight|bias)", "blocks/attn", hf_io.split("q", "k", "v")),
    (r"blocks\.{i}\.attn\.proj", "blocks/attn/proj"),
    (r"blocks\.{i}\.mlp\.(?P<m>fc[12])", "blocks/mlp/{m}"),
    (r"norm", "norm"),
    (r"attn_pool\.latent", "attn_pool/latent", hf_io.as_is),
    (r"attn_pool\.(?P<m>q|kv|proj|norm)", "attn_pool/{m}"),
    (r"attn_pool\.mlp\.(?P<m>fc[12])", "attn_pool/mlp/{m}"),
    (r"head", "head"),
    (r"rope\..*|fc_norm\..*", None),
]


def hf_params(tensors: dict[str, np.ndarray], depth: int) -> dict:
  """timm Eva (vit_pe_core_*) tensors -> Flax params of `PerceptionEncoder` (`depth` blocks)."""
  built = "|".join(str(i) for i in range(depth))
  past_tap = (rf"blocks\.(?!(?:{built})\.).*", None)  # the blocks after the tap are not built
  return hf_io.to_flax_tree(tensors, [past_tap, *WEIGHTS])


def config_from_timm(cfg: dict) -> PEConfig:
  """A timm hub config.json ({'architecture', 'num_classes', 'model_args'}) -> PEConfig."""
  arch = cfg.get("architecture", "vit_pe_core_large_patch14_336")
  if arch not in VARIANTS:
    raise ValueError(f"pe: architecture {arch!r} is not one of {sorted(VARIANTS)}")
  args = tower.fields_from(PEConfig, dict(cfg.get("model_args") or {}))
  if "num_classes" in cfg:
    args["num_classes"] = cfg["num_classes"]
  pretrained = cfg.get("pretrained_cfg") or {}
  if "input_size" in pretrained and "img_size" not in args:
    args["img_size"] = int(pretrained["input_size"][-1])
  return dataclasses.replace(VARIANTS[arch], **args)


def timm_preprocessing(cfg: dict, img_size: int) -> dict:
  """timm pretrained_cfg -> {'size','crop','mean','std','resample'} (PE: 0.5 stats, bicubic)."""
  pretrained = cfg.get("pretrained_cfg") or {}
  crop_pct = float(pretrained.get("crop_pct", 1.0))
  size = int(pretrained.get("input_size", (3, img_size, img_size))[-1])
  return {"size": int(math.floor(size / crop_pct)), "crop": size if crop_pct < 1.0 else None,
          "mean": tuple(pretrained.get("mean", (0.5, 0.5, 0.5))),
          "std": tuple(pretrained.get("std", (0.5, 0.5, 0.5))),
          "resample": pretrained.get("interpolation", "bicubic")}


def load_timm_pe(path_or_id: str, tap_layer: int = 20, **module_kwargs) -> tower.Backbone:
  """Local folder or cached hub id of a timm PE checkpoint -> (module, params, preprocessing).

  >>> module, params, pp = load_timm_pe("timm/vit_pe_core_large_patch14_336.fb", tap_layer=20)
  """
  _, config, tensors = hf_io.read_checkpoint(path_or_id)
  cfg = config_from_timm(config)
  module = PerceptionEncoder(cfg, tap_layer=tap_layer, **module_kwargs)
  params = hf_params(tensors, num_blocks(cfg, tap_layer))
  return tower.Backbone(module, tower.in_layout(params, module.scan, "blocks"),
                        timm_preprocessing(config, cfg.img_size))


def random_preprocessing(cfg: PEConfig) -> dict:
  """timm's PE-Core recipe at the architecture's input size."""
  return timm_preprocessing({}, cfg.img_size)


def build(model_config) -> tower.Backbone:
  """Registry entry (tower.build): `config.model.init`, or a random `variant` + `arch`."""
  return tower.build(model_config, load_timm_pe, PerceptionEncoder, VARIANTS,
                     "vit_pe_core_large_patch14_336", random_preprocessing,
                     tap_layer=int(model_config.get("tap_layer", 20)))
