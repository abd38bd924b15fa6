"""DINOv3 ViT in Flax, loading HF `dinov3_vit` weights (facebook/dinov3-vith16plus-pretrain-*).

2-D RoPE on the patch tokens (CLS and register tokens are not rotated), layer scale, and a gated
MLP where the checkpoint's config asks for one. The feature is the mean of the final-layernormed
last hidden state over all tokens (App. A.1). As HF does in training mode, RoPE coordinates are
randomly shifted/jittered/rescaled when `train=True` (config pos_embed_*; rope_augment=False
turns it off).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iqa_jax.models import dinov2, hf_io, tower
from iqa_jax.models.attention import attention, rotate_patches
from iqa_jax.models.lora import LoraDense


@dataclasses.dataclass(frozen=True)
class Dinov3Config:
  hidden_size: int = 1280
  intermediate_size: int = 5120
  num_hidden_layers: int = 32
  num_attention_heads: int = 20
  patch_size: int = 16
  image_size: int = 224
  layer_norm_eps: float = 1e-5
  hidden_act: str = "silu"
  rope_theta: float = 100.0
  query_bias: bool = True
  key_bias: bool = False
  value_bias: bool = True
  proj_bias: bool = True
  mlp_bias: bool = True
  layerscale_value: float = 1.0
  use_gated_mlp: bool = True
  num_register_tokens: int = 4
  pos_embed_shift: float | None = None
  pos_embed_jitter: float | None = None
  pos_embed_rescale: float | None = 2.0

  @classmethod
  def from_hf(cls, cfg: dict) -> Dinov3Config:
    return cls(**tower.fields_from(cls, cfg))


VARIANTS = {
    "h+/16": Dinov3Config(),  # facebook/dinov3-vith16plus-pretrain-lvd1689m (the paper's ViT-H/16)
    "l/16": Dinov3Config(1024, 4096, 24, 16, hidden_act="gelu", use_gated_mlp=False),
    "b/16": Dinov3Config(768, 3072, 12, 12, hidden_act="gelu", use_gated_mlp=False),
    "s/16": Dinov3Config(384, 1536, 12, 6, hidden_act="gelu", use_gated_mlp=False),
}


def patch_coordinates(grid_h: int, grid_w: int) -> np.ndarray:
  """(h*w, 2) patch centres (y, x) in [-1, 1], float32 as HF computes them."""
  ys = np.arange(0.5, grid_h, dtype=np.float32) / np.float32(grid_h)
  xs = np.arange(0.5, grid_w, dtype=np.float32) / np.float32(grid_w)
  coords = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)
  return np.float32(2.0) * coords - np.float32(1.0)


def augment_coordinates(coords, rng, shift, jitter, rescale):
  """HF's training-time RoPE augmentation: one random shift, per-axis jitter, global rescale."""
  k1, k2, k3 = jax.random.split(rng, 3)
  if shift is not None:
    coords = coords + jax.random.uniform(k1, (1, 2), jnp.float32, -shift, shift)
  if jitter is not None:
    r = math.log(jitter)
    coords = coords * jnp.exp(jax.random.uniform(k2, (1, 2), jnp.float32, -r, r))
  if rescale is not None:
    r = math.log(rescale)
    coords = coords * jnp.exp(jax.random.uniform(k3, (1,), jnp.float32, -r, r))
  return coords


def rope_tables(coords, head_dim: int, theta: float):
  """coords (n, 2) -> cos, sin (n, head_dim): head_dim/4 frequencies per axis, halves tiled."""
  inv_freq = 1.0 / theta ** np.arange(0, 1, 4 / head_dim, dtype=np.float32)
  angles = 2 * np.float32(math.pi) * coords[:, :, None] * jnp.asarray(inv_freq, jnp.float32)
  angles = jnp.tile(angles.reshape(angles.shape[0], -1), (1, 2))
  return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x):
  """HF's rotate_half: (x1, x2) -> (-x2, x1) on the two halves of each head."""
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class Mlp(nn.Module):
  cfg: Dinov3Config
  dtype: Any

  @nn.compact
  def __call__(self, x):
    cfg, act = self.cfg, tower.ACTIVATIONS[self.cfg.hidden_act]

    def dense(n, name):
      return nn.Dense(n, use_bias=cfg.mlp_bias, dtype=self.dtype, name=name)

    if cfg.use_gated_mlp:
      gate = act(dense(cfg.intermediate_size, "gate_proj")(x))
      h = gate * dense(cfg.intermediate_size, "up_proj")(x)
    else:
      h = act(dense(cfg.intermediate_size, "up_proj")(x))
    return dense(cfg.hidden_size, "down_proj")(h)


class SelfAttention(nn.Module):
  cfg: Dinov3Config
  dtype: Any
  lora: tuple[int, float, float]  # rank, alpha, dropout on q/k (§3.1)
  attention_impl: str

  @nn.compact
  def __call__(self, x, rope, *, deterministic: bool = True):
    cfg, (rank, alpha, dropout) = self.cfg, self.lora
    d, h = cfg.hidden_size, cfg.num_attention_heads
    q = LoraDense(d, rank, alpha, dropout, cfg.query_bias, dtype=self.dtype, name="q_proj")(
        x, deterministic)
    k = LoraDense(d, rank, alpha, dropout, cfg.key_bias, dtype=self.dtype, name="k_proj")(
        x, deterministic)
    v = nn.Dense(d, use_bias=cfg.value_bias, dtype=self.dtype, name="v_proj")(x)
    q, k = (rotate_patches(t, *rope, h, rotate_half) for t in (q, k))
    y = attention(q, k, v, h, self.attention_impl)
    return nn.Dense(d, use_bias=cfg.proj_bias, dtype=self.dtype, name="o_proj")(y)


class Dinov3(tower.TransformerTower):
  """(B, H, W, 3) normalised images -> (mean of last hidden state, {named intermediates}).

  DINOv2's block (`dinov2.Layer`) with DINOv3's RoPE attention and MLP.
  """
  cfg: Dinov3Config
  pool: str = "mean"  # mean (all tokens, App. A.1) | patch_mean | cls
  rope_augment: bool = True  # HF's train-mode RoPE coordinate augmentation

  @nn.compact
  def __call__(self, images, train: bool = False):
    cfg = self.cfg
    p, d = cfg.patch_size, cfg.hidden_size
    x, (gh, gw) = tower.embed_patches(images, d, p, self.dtype, "embeddings_patch_embeddings")
    cls = self.param("embeddings_cls_token", nn.initializers.normal(0.02), (1, 1, d), jnp.float32)
    reg = self.param("embeddings_register_tokens", nn.initializers.normal(0.02),
                     (1, cfg.num_register_tokens, d), jnp.float32)
    x = tower.prepend(x, jnp.concatenate([cls, reg], axis=1))

    coords = jnp.asarray(patch_coordinates(gh, gw))
    if train and self.rope_augment:
      coords = augment_coordinates(coords, self.make_rng("dropout"), cfg.pos_embed_shift,
                                   cfg.pos_embed_jitter, cfg.pos_embed_rescale)
    rope = rope_tables(coords, d // cfg.num_attention_heads, cfg.rope_theta)
    # HF casts the tables to the pixel dtype before rotating.
    rope = tuple(t.astype(self.dtype) for t in rope)

    layer = functools.partial(
        dinov2.Layer, functools.partial(SelfAttention, cfg, self.dtype, self.lora,
                                        self.attention_impl),
        functools.partial(Mlp, cfg, self.dtype), cfg.layer_norm_eps, cfg.layerscale_value,
        self.dtype)
    x, out = self.encoder(layer, cfg.num_hidden_layers, "layer")(
        x, rope, deterministic=not train)
    out["encoded"] = x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm")(x)
    # HF's last_hidden_state holds CLS, registers and patches: all are pooled.
    out["pre_logits"] = dinov2.pool_tokens(x, self.pool, 1 + cfg.num_register_tokens)
    return out["pre_logits"], out


# The weight table (hf_io.to_flax_tree). Checkpoints store blocks as `layer.{i}`; the
# transformers>=5 module tree calls them `model.layer.{i}`: both load.
_LAYER = r"(?:model\.)?layer\.{i}\."
WEIGHTS = [
    (r"embeddings\.patch_embeddings", "embeddings_patch_embeddings"),
    (r"embeddings\.(?P<m>cls_token|register_tokens)", "embeddings_{m}", hf_io.as_is),
    (_LAYER + r"(?P<m>norm[12]|layer_scale[12])", "layer/{m}"),
    (_LAYER + r"attention\.(?P<m>[qkvo]_proj)", "layer/attention/{m}"),
    (_LAYER + r"mlp\.(?P<m>gate_proj|up_proj|down_proj)", "layer/mlp/{m}"),
    (r"norm", "norm"),
    (r"embeddings\.mask_token|classifier\..*|.*inv_freq", None),
]


def load_hf_dinov3(path_or_id: str, **module_kwargs) -> tower.Backbone:
  """Local folder or cached hub id -> (Dinov3 module, params, native preprocessing).

  >>> module, params, pp = load_hf_dinov3("facebook/dinov3-vith16plus-pretrain-lvd1689m")
  """
  folder, config, tensors = hf_io.read_checkpoint(path_or_id)
  cfg = Dinov3Config.from_hf(config)
  module = Dinov3(cfg, **module_kwargs)
  params = tower.in_layout(hf_io.to_flax_tree(tensors, WEIGHTS), module.scan, "layer")
  return tower.Backbone(module, params, hf_io.read_preprocessing(folder, cfg.image_size))


def random_preprocessing(cfg: Dinov3Config) -> dict:
  """DINOv3's image processor: a square resize, bilinear, ImageNet statistics."""
  return {"size": cfg.image_size, "crop": None, "mean": (0.485, 0.456, 0.406),
          "std": (0.229, 0.224, 0.225), "resample": "bilinear"}


def build(model_config) -> tower.Backbone:
  """Registry entry (tower.build): `config.model.init`, or a random `variant` + `arch`."""
  return tower.build(model_config, load_hf_dinov3, Dinov3, VARIANTS, "h+/16", random_preprocessing,
                     pool=model_config.get("pool", "mean"),
                     rope_augment=model_config.get("rope_augment", True))
