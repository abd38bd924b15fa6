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
import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iqa_jax.data import pp as pp_lib
from iqa_jax.models import hf_io, tower
from iqa_jax.models.attention import attention
from iqa_jax.models.lora import LoraDense

ACT = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}



@dataclasses.dataclass(frozen=True)
class NaflexConfig:
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_hidden_layers: int = 27
  num_attention_heads: int = 16
  patch_size: int = 16
  num_patches: int = 256  # the learned position table is sqrt x sqrt of this
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  vision_use_head: bool = True

  @classmethod
  def from_hf(cls, cfg: dict) -> NaflexConfig:
    cfg = cfg.get("vision_config", cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in cfg.items() if k in names})


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
          f"|normalize({tuple(mean)}, {tuple(std)})|naflex_patches({patch_size}, {max_num_patches})")


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


class MlpBlock(nn.Module):
  cfg: NaflexConfig
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
    x = ACT[self.cfg.hidden_act](x)
    return nn.Dense(self.cfg.hidden_size, dtype=self.dtype, name="fc2")(x)


class SelfAttention(nn.Module):
  cfg: NaflexConfig
  dtype: Any
  lora: tuple[int, float, float]  # rank, alpha, dropout on q/k (§3.1)
  attention_impl: str

  @nn.compact
  def __call__(self, x, mask, deterministic: bool = True):
    rank, alpha, dropout = self.lora
    d = self.cfg.hidden_size
    q = LoraDense(d, rank, alpha, dropout, dtype=self.dtype, name="q_proj")(x, deterministic)
    k = LoraDense(d, rank, alpha, dropout, dtype=self.dtype, name="k_proj")(x, deterministic)
    v = nn.Dense(d, dtype=self.dtype, name="v_proj")(x)
    y = attention(q, k, v, self.cfg.num_attention_heads, self.attention_impl, mask=mask)
    return nn.Dense(d, dtype=self.dtype, name="out_proj")(y)


class EncoderLayer(nn.Module):
  """Pre-LN block; padding keys masked out. Returns (x, x) for nn.scan."""
  cfg: NaflexConfig
  dtype: Any
  lora: tuple[int, float, float]
  attention_impl: str

  @nn.compact
  def __call__(self, x, mask, deterministic: bool = True):
    eps = self.cfg.layer_norm_eps
    y = nn.LayerNorm(eps, dtype=self.dtype, name="layer_norm1")(x)
    x = x + SelfAttention(self.cfg, self.dtype, self.lora, self.attention_impl,
                          name="self_attn")(y, mask, deterministic)
    y = nn.LayerNorm(eps, dtype=self.dtype, name="layer_norm2")(x)
    x = x + MlpBlock(self.cfg, self.dtype, name="mlp")(y)
    return x, x


class MAPHead(nn.Module):
  """Attention pooling with a learned probe over the valid tokens (nn.MultiheadAttention layout)."""
  cfg: NaflexConfig
  dtype: Any

  @nn.compact
  def __call__(self, x, mask):
    d = self.cfg.hidden_size
    probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, d), jnp.float32)
    probe = jnp.broadcast_to(probe, (x.shape[0], 1, d)).astype(self.dtype)
    q = nn.Dense(d, dtype=self.dtype, name="q")(probe)
    k = nn.Dense(d, dtype=self.dtype, name="k")(x)
    v = nn.Dense(d, dtype=self.dtype, name="v")(x)
    y = attention(q, k, v, self.cfg.num_attention_heads, "xla", mask=mask)
    y = nn.Dense(d, dtype=self.dtype, name="out_proj")(y)
    z = nn.LayerNorm(self.cfg.layer_norm_eps, dtype=self.dtype, name="layernorm")(y)
    y = y + MlpBlock(self.cfg, self.dtype, name="mlp")(z)
    return y[:, 0]


def unpack(inputs, patch_size: int):
  """Images or packed patches -> (patches (B, L, 3p^2), grids (B, 2) int32, valid (B, L) or None)."""
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


class Siglip2NaflexVision(nn.Module):
  """Images or packed NaFlex patches -> (pooled feature, {named intermediates})."""
  cfg: NaflexConfig
  dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 8.0
  lora_dropout: float = 0.0
  remat: str = "none"  # none | nothing | dots | everything
  scan: bool = True
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, inputs, train: bool = False):
    cfg, out = self.cfg, {}
    patches, grids, valid = unpack(inputs, cfg.patch_size)
    x = nn.Dense(cfg.hidden_size, dtype=self.dtype, name="embeddings_patch_embedding")(
        patches.astype(self.dtype))
    table = self.param("embeddings_position_embedding", nn.initializers.normal(0.02),
                       (cfg.num_patches, cfg.hidden_size), jnp.float32)
    x = x + resize_position_table(table, grids, x.shape[1]).astype(self.dtype)
    # Key mask (B, 1, 1, L): padding tokens are attended by none; None keeps flash attention.
    mask = None if valid is None else valid[:, None, None, :]

    lora = (self.lora_rank, self.lora_alpha, self.lora_dropout)
    layer = EncoderLayer
    if self.remat != "none":
      layer = nn.remat(layer, prevent_cse=not self.scan, static_argnums=(3,),
                       policy=tower.REMAT_POLICIES[self.remat])
    deterministic = not train
    if self.scan:
      layers = nn.scan(layer, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_hidden_layers)
      x, per_layer = layers(cfg, self.dtype, lora, self.attention_impl, name="encoder_layers")(
          x, mask, deterministic)
      out["layers"] = per_layer  # (depth, B, L, D)
    else:
      for i in range(cfg.num_hidden_layers):
        x, y = layer(cfg, self.dtype, lora, self.attention_impl, name=f"encoder_layers_{i}")(
            x, mask, deterministic)
        out[f"layer_{i}"] = y
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(x)
    out["encoded"] = x
    out["spatial_shapes"] = grids
    if cfg.vision_use_head:
      pooled = MAPHead(cfg, self.dtype, name="head")(x, mask)
    else:
      w = jnp.ones(x.shape[:2], x.dtype) if valid is None else valid.astype(x.dtype)
      pooled = (x * w[..., None]).sum(1) / w.sum(1, keepdims=True)
    out["pre_logits"] = pooled
    return pooled, out


# HF module -> Flax module. `{i}` layers are stacked for nn.scan.
RENAMES = [
    (r"embeddings\.patch_embedding", "embeddings_patch_embedding"),
    (r"encoder\.layers\.{i}\.(?P<ln>layer_norm[12])", "encoder_layers/{ln}"),
    (r"encoder\.layers\.{i}\.self_attn\.(?P<proj>[qkv]_proj|out_proj)",
     "encoder_layers/self_attn/{proj}"),
    (r"encoder\.layers\.{i}\.mlp\.(?P<fc>fc[12])", "encoder_layers/mlp/{fc}"),
    (r"post_layernorm", "post_layernorm"),
    (r"head\.layernorm", "head/layernorm"),
    (r"head\.mlp\.(?P<fc>fc[12])", "head/mlp/{fc}"),
    (r"head\.attention\.out_proj", "head/out_proj"),
]


def _special(name: str, value: np.ndarray):
  """Bare parameters and the MAP head's fused q/k/v projection."""
  if name == "embeddings.position_embedding.weight":
    return [("embeddings_position_embedding", value)]
  if name == "head.probe":
    return [("head/probe", value)]
  if name.startswith("head.attention.in_proj_"):
    leaf = "kernel" if name.endswith("weight") else "bias"
    parts = np.split(value, 3, axis=0)
    return [(f"head/{n}/{leaf}", p.T if leaf == "kernel" else p) for n, p in zip("qkv", parts)]
  return None


def hf_params(tensors: dict[str, np.ndarray]) -> dict:
  """HF Siglip2VisionModel / Siglip2Model tensors -> Flax params of `Siglip2NaflexVision`."""
  return hf_io.to_flax_tree(tensors, RENAMES, special=_special, strip_prefixes=("vision_model.",),
                            skip=(r"text_model\.", r"logit_scale", r"logit_bias"))


def _preprocessing(folder, cfg: NaflexConfig) -> dict:
  """Native recipe: normalisation from preprocessor_config.json, plus the NaFlex patch budget.

  `size` is only the square fallback (§3.1: 512); native-aspect scoring uses `naflex_pp`.
  """
  f = folder / "preprocessor_config.json"
  budget = json.loads(f.read_text()).get("max_num_patches", 256) if f.exists() else 256
  return {**hf_io.read_preprocessing(folder, 512), "size": 512, "crop": None,
          "patch_size": cfg.patch_size, "max_num_patches": int(budget)}


def load_hf_siglip2_naflex(path_or_id: str, **module_kwargs):
  """Local folder or cached hub id -> (Siglip2NaflexVision module, params, native preprocessing).

  >>> module, params, pp = load_hf_siglip2_naflex("google/siglip2-so400m-patch16-naflex")
  """
  folder = hf_io.resolve_checkpoint(path_or_id)
  cfg = NaflexConfig.from_hf(hf_io.read_json(folder, "config.json"))
  module = Siglip2NaflexVision(cfg, **module_kwargs)
  params = hf_params(hf_io.read_safetensors(folder))
  if not module.scan:
    params = tower.unscan(params, cfg.num_hidden_layers, "encoder_layers")
  return module, params, _preprocessing(folder, cfg)


def build(model_config):
  """Registry entry: config.model -> Backbone. `init=None`: random tower of `variant` + `arch`."""
  from iqa_jax.models.model import Backbone
  kwargs = dict(
      **tower.tower_kwargs(model_config),
  )
  if model_config.get("init"):
    return Backbone(*load_hf_siglip2_naflex(model_config.init, **kwargs))
  cfg = tower.variant_config(model_config, VARIANTS, "so400m/16")
  pp = {"size": 512, "crop": None, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "resample": "bilinear", "patch_size": cfg.patch_size, "max_num_patches": 256}
  return Backbone(Siglip2NaflexVision(cfg, **kwargs), None, pp)
