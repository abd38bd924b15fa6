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
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iqa_jax.models import hf_io, tower
from iqa_jax.models.attention import attention
from iqa_jax.models.lora import LoraDense


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


def _aa_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  x = np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


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
    w = _aa_cubic((np.arange(lo, hi) - center + 0.5) / stretch)
    m[o, lo:hi] = w / w.sum()
  return m


def resample_positions(posemb, grid_in: tuple[int, int], grid_out: tuple[int, int]):
  """(h*w, d) table -> grid_out, as timm's resample_abs_pos_embed (bicubic, antialias=True)."""
  if tuple(grid_in) == tuple(grid_out):
    return posemb
  d = posemb.shape[-1]
  grid = posemb.reshape(grid_in[0], grid_in[1], d).astype(jnp.float32)
  mh = jnp.asarray(torch_aa_bicubic_matrix(grid_in[0], grid_out[0]), jnp.float32)
  mw = jnp.asarray(torch_aa_bicubic_matrix(grid_in[1], grid_out[1]), jnp.float32)
  out = jnp.einsum("oh,hwd,pw->opd", mh, grid, mw, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(grid_out[0] * grid_out[1], d).astype(posemb.dtype)


def rope_tables(grid: tuple[int, int], head_dim: int, cfg: PEConfig) -> tuple[np.ndarray, np.ndarray]:
  """sin, cos (h*w, head_dim) of timm's RotaryEmbeddingCat(in_pixels=False, grid_indexing='xy').

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
  return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def apply_rope(x, sin, cos, num_heads: int, num_prefix: int):
  """Rotate interleaved pairs (x0, x1) -> (x0 c - x1 s, x1 c + x0 s) of the patch tokens per head."""
  b, t, d = x.shape
  heads = x.reshape(b, t, num_heads, d // num_heads)
  prefix, patches = heads[:, :num_prefix], heads[:, num_prefix:]
  pairs = patches.reshape(patches.shape[:-1] + (-1, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(patches.shape)
  s, c = sin[None, :, None].astype(x.dtype), cos[None, :, None].astype(x.dtype)
  patches = patches * c + rotated * s
  return jnp.concatenate([prefix, patches], axis=1).reshape(b, t, d)


class Mlp(nn.Module):
  hidden: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
    return nn.Dense(d, dtype=self.dtype, name="fc2")(jax.nn.gelu(x, approximate=False))


class Attention(nn.Module):
  cfg: PEConfig
  dtype: Any
  lora: tuple[int, float, float]  # rank, alpha, dropout on q/k (§3.1)
  attention_impl: str

  @nn.compact
  def __call__(self, x, rope, deterministic: bool = True):
    cfg, (rank, alpha, dropout) = self.cfg, self.lora
    d, h = cfg.embed_dim, cfg.num_heads
    q = LoraDense(d, rank, alpha, dropout, dtype=self.dtype, name="q")(x, deterministic)
    k = LoraDense(d, rank, alpha, dropout, dtype=self.dtype, name="k")(x, deterministic)
    v = nn.Dense(d, dtype=self.dtype, name="v")(x)
    n_prefix = int(cfg.class_token)
    q, k = apply_rope(q, *rope, h, n_prefix), apply_rope(k, *rope, h, n_prefix)
    y = attention(q, k, v, h, self.attention_impl)
    return nn.Dense(d, dtype=self.dtype, name="proj")(y)


class Block(nn.Module):
  """x + attn(norm1 x); x + mlp(norm2 x). Returns (x, x) for nn.scan."""
  cfg: PEConfig
  dtype: Any
  lora: tuple[int, float, float]
  attention_impl: str

  @nn.compact
  def __call__(self, x, rope, deterministic: bool = True):
    cfg = self.cfg
    y = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm1")(x)
    x = x + Attention(cfg, self.dtype, self.lora, self.attention_impl, name="attn")(
        y, rope, deterministic)
    y = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm2")(x)
    x = x + Mlp(int(cfg.embed_dim * cfg.mlp_ratio), self.dtype, name="mlp")(y)
    return x, x


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
    y = y + Mlp(int(d * cfg.attn_pool_mlp_ratio), self.dtype, name="mlp")(z)
    return y[:, 0]


class PerceptionEncoder(nn.Module):
  """(B, H, W, 3) normalised images -> (projected pooled feature of block `tap_layer`, {...})."""
  cfg: PEConfig
  tap_layer: int = 20  # App. B: layer 20 is best for IQA; -1: the last block
  dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 8.0
  lora_dropout: float = 0.0
  remat: str = "none"  # none | nothing | dots | everything
  scan: bool = True
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, images, train: bool = False):
    cfg, out = self.cfg, {}
    p, d = cfg.patch_size, cfg.embed_dim
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                name="patch_embed_proj")(images.astype(self.dtype))
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, d)
    native = cfg.img_size // p
    n_prefix = int(cfg.class_token)
    posemb = self.param("pos_embed", nn.initializers.normal(0.02),
                        (native * native + n_prefix, d), jnp.float32)
    posemb = jnp.concatenate([posemb[:n_prefix],
                              resample_positions(posemb[n_prefix:], (native, native), (gh, gw))])
    if cfg.class_token:
      cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x], axis=1)
    x = x + posemb.astype(self.dtype)[None]
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm_pre")(x)
    rope = tuple(jnp.asarray(t, self.dtype) for t in rope_tables((gh, gw), d // cfg.num_heads, cfg))

    depth = num_blocks(cfg, self.tap_layer)
    lora = (self.lora_rank, self.lora_alpha, self.lora_dropout)
    block = Block
    if self.remat != "none":
      block = nn.remat(block, prevent_cse=not self.scan, static_argnums=(3,),
                       policy=tower.REMAT_POLICIES[self.remat])
    deterministic = not train
    if self.scan:
      blocks = nn.scan(block, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=(nn.broadcast, nn.broadcast), length=depth)
      x, per_layer = blocks(cfg, self.dtype, lora, self.attention_impl, name="blocks")(
          x, rope, deterministic)
      out["layers"] = per_layer  # (tap_layer + 1, B, T, D)
    else:
      for i in range(depth):
        x, y = block(cfg, self.dtype, lora, self.attention_impl, name=f"blocks_{i}")(
            x, rope, deterministic)
        out[f"layer_{i}"] = y
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


# timm module -> Flax module. `{i}` blocks are stacked for nn.scan.
RENAMES = [
    (r"patch_embed\.proj", "patch_embed_proj"),
    (r"norm_pre", "norm_pre"),
    (r"blocks\.{i}\.(?P<n>norm[12])", "blocks/{n}"),
    (r"blocks\.{i}\.attn\.(?P<m>q|k|v|proj)", "blocks/attn/{m}"),
    (r"blocks\.{i}\.mlp\.(?P<fc>fc[12])", "blocks/mlp/{fc}"),
    (r"norm", "norm"),
    (r"attn_pool\.(?P<m>q|kv|proj|norm)", "attn_pool/{m}"),
    (r"attn_pool\.mlp\.(?P<fc>fc[12])", "attn_pool/mlp/{fc}"),
    (r"head", "head"),
]


def _special(name: str, value: np.ndarray):
  if name in ("cls_token", "attn_pool.latent"):
    return [(name.replace(".", "/"), value)]
  if name == "pos_embed":
    return [("pos_embed", value[0])]
  return None


def hf_params(tensors: dict[str, np.ndarray], depth: int) -> dict:
  """timm Eva (vit_pe_core_*) tensors -> Flax params of `PerceptionEncoder`, first `depth` blocks.

  The fused qkv projection is split into q, k, v so LoRA can sit on q and k (§3.1).
  """
  split = {}
  for name, value in tensors.items():
    if name.startswith("blocks.") and int(name.split(".")[1]) >= depth:
      continue  # blocks past the tap do not exist in the module
    if ".attn.qkv." in name:
      for part, chunk in zip("qkv", np.split(value, 3, axis=0)):
        split[name.replace(".qkv.", f".{part}.")] = chunk
    else:
      split[name] = value
  return hf_io.to_flax_tree(split, RENAMES, special=_special, skip=(r"rope\.", r"fc_norm\."))


def config_from_timm(cfg: dict) -> PEConfig:
  """A timm hub config.json ({'architecture', 'num_classes', 'model_args'}) -> PEConfig."""
  arch = cfg.get("architecture", "vit_pe_core_large_patch14_336")
  if arch not in VARIANTS:
    raise ValueError(f"pe: architecture {arch!r} is not one of {sorted(VARIANTS)}")
  names = {f.name for f in dataclasses.fields(PEConfig)}
  args = {k: v for k, v in dict(cfg.get("model_args") or {}).items() if k in names}
  if "num_classes" in cfg:
    args["num_classes"] = cfg["num_classes"]
  if "ref_feat_shape" in args:
    args["ref_feat_shape"] = tuple(args["ref_feat_shape"])
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


def load_timm_pe(path_or_id: str, tap_layer: int = 20, **module_kwargs):
  """Local folder or cached hub id of a timm PE checkpoint -> (module, params, preprocessing).

  >>> module, params, pp = load_timm_pe("timm/vit_pe_core_large_patch14_336.fb", tap_layer=20)
  """
  folder = hf_io.resolve_checkpoint(path_or_id)
  raw = hf_io.read_json(folder, "config.json")
  cfg = config_from_timm(raw)
  module = PerceptionEncoder(cfg, tap_layer, **module_kwargs)
  depth = num_blocks(cfg, tap_layer)
  params = hf_params(hf_io.read_safetensors(folder), depth)
  if not module.scan:
    params = tower.unscan(params, depth, "blocks")
  return module, params, timm_preprocessing(raw, cfg.img_size)


def build(model_config):
  """Registry entry: config.model -> Backbone. `init=None`: random tower of `variant` + `arch`."""
  from iqa_jax.models.model import Backbone
  tap_layer = int(model_config.get("tap_layer", 20))
  kwargs = dict(
      **tower.tower_kwargs(model_config),
  )
  if model_config.get("init"):
    return Backbone(*load_timm_pe(model_config.init, tap_layer, **kwargs))
  variant = model_config.get("variant", "vit_pe_core_large_patch14_336")
  if variant not in VARIANTS:
    raise ValueError(f"config.model.variant={variant!r}; known: {sorted(VARIANTS)}")
  arch = {k: tuple(v) if isinstance(v, (list, tuple)) else v
          for k, v in dict(model_config.get("arch", {})).items()}
  cfg = dataclasses.replace(VARIANTS[variant], **arch)
  pp = timm_preprocessing({}, cfg.img_size)
  return Backbone(PerceptionEncoder(cfg, tap_layer, **kwargs), None, pp)
