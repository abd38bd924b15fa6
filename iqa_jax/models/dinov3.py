"""DINOv3 ViT in Flax, loading HF `dinov3_vit` weights (facebook/dinov3-vith16plus-pretrain-lvd1689m).

2-D RoPE on the patch tokens (CLS and register tokens are not rotated), layer scale, and a gated
MLP where the checkpoint's config asks for one. The feature is the mean of the final-layernormed
last hidden state over all tokens (App. A.1). As HF does in training mode, RoPE coordinates are
randomly shifted/jittered/rescaled when `train=True` (config pos_embed_*; rope_augment=False
turns it off).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iqa_jax.models import hf_io, tower
from iqa_jax.models.attention import attention
from iqa_jax.models.lora import LoraDense

ACT = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}



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
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in cfg.items() if k in names})


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


def apply_rope(x, cos, sin, num_heads: int):
  """Rotate the trailing len(cos) tokens of (B, T, D) per head; leading (CLS, register) stay."""
  b, t, d = x.shape
  n = cos.shape[0]
  heads = x.reshape(b, t, num_heads, d // num_heads)
  prefix, patches = heads[:, :t - n], heads[:, t - n:]
  half = patches.shape[-1] // 2
  rotated = jnp.concatenate([-patches[..., half:], patches[..., :half]], axis=-1)
  c, s = cos[None, :, None].astype(x.dtype), sin[None, :, None].astype(x.dtype)
  patches = patches * c + rotated * s
  return jnp.concatenate([prefix, patches], axis=1).reshape(b, t, d)


class Mlp(nn.Module):
  cfg: Dinov3Config
  dtype: Any

  @nn.compact
  def __call__(self, x):
    cfg, act = self.cfg, ACT[self.cfg.hidden_act]
    dense = lambda n, name: nn.Dense(n, use_bias=cfg.mlp_bias, dtype=self.dtype, name=name)
    if cfg.use_gated_mlp:
      h = act(dense(cfg.intermediate_size, "gate_proj")(x)) * dense(cfg.intermediate_size, "up_proj")(x)
    else:
      h = act(dense(cfg.intermediate_size, "up_proj")(x))
    return dense(cfg.hidden_size, "down_proj")(h)


class SelfAttention(nn.Module):
  cfg: Dinov3Config
  dtype: Any
  lora: tuple[int, float, float]  # rank, alpha, dropout on q/k (§3.1)
  attention_impl: str

  @nn.compact
  def __call__(self, x, rope, deterministic: bool = True):
    cfg, (rank, alpha, dropout) = self.cfg, self.lora
    d, h = cfg.hidden_size, cfg.num_attention_heads
    q = LoraDense(d, rank, alpha, dropout, cfg.query_bias, dtype=self.dtype, name="q_proj")(
        x, deterministic)
    k = LoraDense(d, rank, alpha, dropout, cfg.key_bias, dtype=self.dtype, name="k_proj")(
        x, deterministic)
    v = nn.Dense(d, use_bias=cfg.value_bias, dtype=self.dtype, name="v_proj")(x)
    q, k = apply_rope(q, *rope, h), apply_rope(k, *rope, h)
    y = attention(q, k, v, h, self.attention_impl)
    return nn.Dense(d, use_bias=cfg.proj_bias, dtype=self.dtype, name="o_proj")(y)


class LayerScale(nn.Module):
  init_value: float

  @nn.compact
  def __call__(self, x):
    lam = self.param("lambda1", nn.initializers.constant(self.init_value), (x.shape[-1],),
                     jnp.float32)
    return x * lam.astype(x.dtype)


class Layer(nn.Module):
  """x + ls1(attn(norm1 x)); x + ls2(mlp(norm2 x)). Returns (x, x) for nn.scan."""
  cfg: Dinov3Config
  dtype: Any
  lora: tuple[int, float, float]
  attention_impl: str

  @nn.compact
  def __call__(self, x, rope, deterministic: bool = True):
    cfg = self.cfg
    y = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm1")(x)
    y = SelfAttention(cfg, self.dtype, self.lora, self.attention_impl, name="attention")(
        y, rope, deterministic)
    x = x + LayerScale(cfg.layerscale_value, name="layer_scale1")(y)
    y = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm2")(x)
    y = Mlp(cfg, self.dtype, name="mlp")(y)
    x = x + LayerScale(cfg.layerscale_value, name="layer_scale2")(y)
    return x, x


class Dinov3(nn.Module):
  """(B, H, W, 3) normalised images -> (mean of last hidden state, {named intermediates})."""
  cfg: Dinov3Config
  dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 8.0
  lora_dropout: float = 0.0
  remat: str = "none"  # none | nothing | dots | everything
  scan: bool = True
  attention_impl: str = "auto"
  pool: str = "mean"  # mean (all tokens, App. A.1) | patch_mean | cls
  rope_augment: bool = True  # HF's train-mode RoPE coordinate augmentation

  @nn.compact
  def __call__(self, images, train: bool = False):
    cfg, out = self.cfg, {}
    p, d = cfg.patch_size, cfg.hidden_size
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="embeddings_patch_embeddings")(images.astype(self.dtype))
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, d)
    cls = self.param("embeddings_cls_token", nn.initializers.normal(0.02), (1, 1, d), jnp.float32)
    reg = self.param("embeddings_register_tokens", nn.initializers.normal(0.02),
                     (1, cfg.num_register_tokens, d), jnp.float32)
    prefix = jnp.concatenate([cls, reg], axis=1).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(prefix, (b,) + prefix.shape[1:]), x], axis=1)

    coords = jnp.asarray(patch_coordinates(gh, gw))
    if train and self.rope_augment:
      coords = augment_coordinates(coords, self.make_rng("dropout"), cfg.pos_embed_shift,
                                   cfg.pos_embed_jitter, cfg.pos_embed_rescale)
    rope = rope_tables(coords, d // cfg.num_attention_heads, cfg.rope_theta)
    # HF casts the tables to the pixel dtype before rotating.
    rope = tuple(t.astype(self.dtype) for t in rope)

    lora = (self.lora_rank, self.lora_alpha, self.lora_dropout)
    layer = Layer
    if self.remat != "none":
      layer = nn.remat(layer, prevent_cse=not self.scan, static_argnums=(3,),
                       policy=tower.REMAT_POLICIES[self.remat])
    deterministic = not train
    if self.scan:
      layers = nn.scan(layer, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_hidden_layers)
      x, per_layer = layers(cfg, self.dtype, lora, self.attention_impl, name="layer")(
          x, rope, deterministic)
      out["layers"] = per_layer  # (depth, B, T, D)
    else:
      for i in range(cfg.num_hidden_layers):
        x, y = layer(cfg, self.dtype, lora, self.attention_impl, name=f"layer_{i}")(
            x, rope, deterministic)
        out[f"layer_{i}"] = y
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm")(x)
    out["encoded"] = x  # HF last_hidden_state: CLS, registers, patches
    n_prefix = 1 + cfg.num_register_tokens
    pooled = {"mean": lambda: x.mean(axis=1), "patch_mean": lambda: x[:, n_prefix:].mean(axis=1),
              "cls": lambda: x[:, 0]}[self.pool]()
    out["pre_logits"] = pooled
    return pooled, out


# HF module -> Flax module. Checkpoints store blocks as `layer.{i}`; the transformers>=5 module
# tree calls them `model.layer.{i}`: both load.
RENAMES = [
    (r"embeddings\.patch_embeddings", "embeddings_patch_embeddings"),
    (r"(?:model\.)?layer\.{i}\.(?P<m>norm[12]|layer_scale[12])", "layer/{m}"),
    (r"(?:model\.)?layer\.{i}\.attention\.(?P<proj>[qkvo]_proj)", "layer/attention/{proj}"),
    (r"(?:model\.)?layer\.{i}\.mlp\.(?P<proj>gate_proj|up_proj|down_proj)", "layer/mlp/{proj}"),
    (r"norm", "norm"),
]


def _special(name: str, value: np.ndarray):
  if name in ("embeddings.cls_token", "embeddings.register_tokens"):
    return [("embeddings_" + name.split(".")[1], value)]
  return None


def hf_params(tensors: dict[str, np.ndarray]) -> dict:
  """HF DINOv3ViTModel tensors -> Flax params of `Dinov3` (scan layout)."""
  return hf_io.to_flax_tree(tensors, RENAMES, special=_special,
                            skip=(r"embeddings\.mask_token", r"classifier\.", r".*inv_freq"))


def load_hf_dinov3(path_or_id: str, **module_kwargs):
  """Local folder or cached hub id -> (Dinov3 module, params, native preprocessing).

  >>> module, params, pp = load_hf_dinov3("facebook/dinov3-vith16plus-pretrain-lvd1689m")
  """
  folder = hf_io.resolve_checkpoint(path_or_id)
  cfg = Dinov3Config.from_hf(hf_io.read_json(folder, "config.json"))
  module = Dinov3(cfg, **module_kwargs)
  params = hf_params(hf_io.read_safetensors(folder))
  if not module.scan:
    params = tower.unscan(params, cfg.num_hidden_layers, "layer")
  return module, params, hf_io.read_preprocessing(folder, cfg.image_size)


def build(model_config):
  """Registry entry: config.model -> Backbone. `init=None`: random tower of `variant` + `arch`."""
  from iqa_jax.models.model import Backbone
  kwargs = dict(
      **tower.tower_kwargs(model_config),
      pool=model_config.get("pool", "mean"),
      rope_augment=model_config.get("rope_augment", True),
  )
  if model_config.get("init"):
    return Backbone(*load_hf_dinov3(model_config.init, **kwargs))
  cfg = tower.variant_config(model_config, VARIANTS, "h+/16")
  # DINOv3's image processor: 224x224 bilinear, ImageNet statistics.
  pp = {"size": cfg.image_size, "crop": None, "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225), "resample": "bilinear"}
  return Backbone(Dinov3(cfg, **kwargs), None, pp)
